"""The six software-defined assets. Each calls the pure core and writes the data contract's Parquet file(s).

The layer-partitioned assets handle every partition of their run in one go (single-run backfills): the subject
model is loaded once and run once per batch for all requested layers. They write their files themselves
(atomically) and report per-partition metadata.
"""


import time

import dagster as dg
import numpy as np
import polars as pl

from .core import activations as act
from .core import corpus as corpus_mod
from .core import excerpts as exc
from .core import explainer, scoring, simulator
from .core import viewer as viewer_mod
from .core.errors import NdxInputError
from .core.storage import asset_path, read_parquet, write_parquet_atomic
from .core.subject_model import check_layers, load_subject_model, mlp_width, num_layers
from .core.windows import TokenTexts, tokenize_windows
from .provenance import stage_runs
from .resources import (
    CorpusResource,
    LLMResource,
    SelectionResource,
    StorageResource,
    SubjectModelResource,
    configured_subject_model,
)


GROUP = "neuron_explanation"
LLM_POOL = "llm"
SUBJECT_MODEL_POOL = "subject_model"


def llm_cache_dir(storage: StorageResource):
    """The content-addressed cache of LLM answers, beside the data it produced."""
    return storage.path() / "llm_cache"


def llm_accounting(backend, before: dict, started: float) -> dict:
    """Per-partition LLM work: requests sent, cache hits, tokens, failures, wall time."""
    from .core.llm_cache import LLMStats

    delta = LLMStats.difference(backend.stats.snapshot(), before)
    return {
        "llm_requests": int(delta["requests"]), "llm_calls": int(delta["calls"]),
        "llm_retries": int(delta["retries"]), "llm_cache_hits": int(delta["cache_hits"]),
        "llm_failures": int(delta["failures"]), "prompt_tokens": int(delta["prompt_tokens"]),
        "completion_tokens": int(delta["completion_tokens"]),
        "llm_cache_hit_rate": float("nan") if delta["cache_hit_rate"] is None else round(delta["cache_hit_rate"], 4),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


def layer_partitions(model: str | None = None) -> dg.StaticPartitionsDefinition:
    """Partition keys "0"…"N-1" from the subject model's config (config only, never weights)."""
    return dg.StaticPartitionsDefinition([str(i) for i in range(num_layers(model or configured_subject_model()))])


def _layers(context) -> list[int]:
    return sorted(int(k) for k in context.partition_keys)


def _report(context, layer: int, metadata: dict) -> None:
    context.add_asset_metadata(metadata, partition_key=str(layer))


def _fail(message: str):
    raise dg.Failure(description=message)


def build_assets(partitions: dg.StaticPartitionsDefinition):
    single_run = dg.BackfillPolicy.single_run()

    @dg.asset(group_name=GROUP, description="The text corpus, one row per document.")
    def corpus(context: dg.AssetExecutionContext, corpus_source: CorpusResource, storage: StorageResource):
        try:
            frame = corpus_mod.read_corpus(corpus_source.path)
        except NdxInputError as e:
            _fail(str(e))
        path = write_parquet_atomic(frame, asset_path(storage.path(), "corpus"))
        return dg.MaterializeResult(metadata={
            "documents": len(frame),
            "characters": int(frame["text"].str.len_chars().sum()),
            "source": corpus_source.path or corpus_mod.DEFAULT_CORPUS,
            "path": dg.MetadataValue.path(str(path)),
        })

    @dg.asset(group_name=GROUP, deps=[corpus], partitions_def=partitions, backfill_policy=single_run,
              pool=SUBJECT_MODEL_POOL, description="Per neuron: top windows by max activation, a seeded random sample, mean/variance/max.")
    def activation_records(context: dg.AssetExecutionContext, subject_model: SubjectModelResource,
                           selection: SelectionResource, storage: StorageResource) -> None:
        try:
            layers = check_layers(subject_model.model, _layers(context))
            width = mlp_width(subject_model.model)
            layer_neurons = {}
            for layer in layers:
                if selection.neurons is not None:
                    bad = [n for n in selection.neurons if not 0 <= n < width]
                    if bad or not selection.neurons:
                        raise NdxInputError(
                            f"neurons {bad or '[]'} are not valid: layer {layer} has neurons 0..{width - 1}."
                        )
                    layer_neurons[layer] = sorted(set(selection.neurons))
                else:
                    layer_neurons[layer] = act.choose_neurons(width, selection.neurons_per_layer, selection.seed,
                                                              layer)
            docs = read_parquet(asset_path(storage.path(), "corpus"), "the corpus asset's file")
            device = subject_model.resolved_device()
            context.log.info(f"loading subject model {subject_model.model} on {device}")
            model, tokenizer = load_subject_model(subject_model.model, device, subject_model.dtype)
            windows = tokenize_windows(tokenizer, docs["doc_id"].to_list(), docs["text"].to_list(),
                                       subject_model.window_tokens)
        except NdxInputError as e:
            _fail(str(e))
        context.log.info(f"{windows.total_tokens} tokens in {len(windows)} windows; layers {layers}")
        last = [0.0]

        def progress(done, total, seconds):
            if seconds - last[0] >= 10 or done == total:
                last[0] = seconds
                context.log.info(f"activations: {done}/{total} tokens ({done / max(seconds, 1e-9):.0f} tokens/s)")

        try:
            selections, stats = act.extract(model, tokenizer, windows, layer_neurons, selection.top_k,
                                            selection.random_k, selection.seed, subject_model.batch_size, progress)
        except NdxInputError as e:
            _fail(str(e))
        texts = TokenTexts(tokenizer)
        for layer in layers:
            frame = act.records_frame(layer, selections[layer], windows, texts)
            path = write_parquet_atomic(frame, asset_path(storage.path(), "activation_records", layer))
            _report(context, layer, {
                "neurons": len(layer_neurons[layer]), "rows": len(frame), "tokens_processed": stats.tokens,
                "windows": stats.windows, "tokens_per_second": round(stats.tokens_per_second, 1),
                "wall_seconds": round(stats.seconds, 2), "subject_model": subject_model.model,
                "path": dg.MetadataValue.path(str(path)),
            })

    @dg.asset(group_name=GROUP, deps=[activation_records], partitions_def=partitions, backfill_policy=single_run,
              description="Disjoint explain / score_top / score_random excerpts per neuron (interleaved splits).")
    def top_excerpts(context: dg.AssetExecutionContext, selection: SelectionResource, storage: StorageResource) -> None:
        for layer in _layers(context):
            try:
                records = read_parquet(asset_path(storage.path(), "activation_records", layer),
                                       f"activation_records for layer {layer}")
                frame = exc.split_excerpts(records, selection.explain_excerpts, selection.score_top_excerpts,
                                           selection.score_random_excerpts)
            except NdxInputError as e:
                _fail(str(e))
            path = write_parquet_atomic(frame, asset_path(storage.path(), "top_excerpts", layer))
            _report(context, layer, {
                "neurons": frame["neuron"].n_unique(), "rows": len(frame),
                "path": dg.MetadataValue.path(str(path)),
            })

    @dg.asset(group_name=GROUP, deps=[top_excerpts], partitions_def=partitions, backfill_policy=single_run,
              pool=LLM_POOL, description="One explanation per neuron, written by the explainer LLM from the explain "
              "excerpts.")
    def explanations(context: dg.AssetExecutionContext, explainer_llm: LLMResource, storage: StorageResource) -> None:
        try:
            backend = explainer_llm.build(cache_dir=llm_cache_dir(storage))
        except NdxInputError as e:
            _fail(str(e))
        try:
            for layer in _layers(context):
                started, before = time.perf_counter(), backend.stats.snapshot()
                try:
                    excerpts = read_parquet(asset_path(storage.path(), "top_excerpts", layer),
                                            f"top_excerpts for layer {layer}")
                except NdxInputError as e:
                    _fail(str(e))

                def log(row, layer=layer):
                    context.log.info(f"layer {layer} neuron {row['neuron']}: {row['status']} "
                                     f"{row['explanation'] or row['error']!r}")

                frame = explainer.explain_layer(excerpts, backend, explainer_llm.max_tokens,
                                                explainer_llm.temperature, explainer_llm.seed, on_neuron=log)
                path = write_parquet_atomic(frame, asset_path(storage.path(), "explanations", layer))
                _report(context, layer, {
                    "neurons": len(frame), "failed": int((frame["status"] != "ok").sum()),
                    "explainer": backend.name, **llm_accounting(backend, before, started),
                    "path": dg.MetadataValue.path(str(path)),
                })
        finally:
            backend.close()

    @dg.asset(group_name=GROUP, deps=[explanations, top_excerpts], partitions_def=partitions,
              backfill_policy=single_run, pool=LLM_POOL,
              description="Simulated activations (expected value over 0–10) on every scored excerpt.")
    def simulations(context: dg.AssetExecutionContext, simulator_llm: LLMResource, storage: StorageResource) -> None:
        try:
            backend = simulator_llm.build(cache_dir=llm_cache_dir(storage))
        except NdxInputError as e:
            _fail(str(e))
        try:
            for layer in _layers(context):
                started, before = time.perf_counter(), backend.stats.snapshot()
                try:
                    expl = read_parquet(asset_path(storage.path(), "explanations", layer),
                                        f"explanations for layer {layer}")
                    excerpts = read_parquet(asset_path(storage.path(), "top_excerpts", layer),
                                            f"top_excerpts for layer {layer}")
                except NdxInputError as e:
                    _fail(str(e))
                frame = simulator.simulate_layer(
                    expl, excerpts, backend, mode=simulator_llm.simulator_mode,
                    on_neuron=lambda e, layer=layer: context.log.info(f"layer {layer} neuron {e['neuron']} simulated"),
                )
                path = write_parquet_atomic(frame, asset_path(storage.path(), "simulations", layer))
                _report(context, layer, {
                    "excerpts": len(frame), "neurons": frame["neuron"].n_unique(), "simulator": backend.name,
                    "failed_excerpts": int((frame["status"] != "ok").sum()),
                    **llm_accounting(backend, before, started), "path": dg.MetadataValue.path(str(path)),
                })
        finally:
            backend.close()

    @dg.asset(group_name=GROUP, deps=[simulations, explanations], partitions_def=partitions,
              backfill_policy=single_run,
              description="Pooled Pearson correlation of simulated vs true activations, per neuron.")
    def scores(context: dg.AssetExecutionContext, storage: StorageResource) -> None:
        for layer in _layers(context):
            try:
                sims = read_parquet(asset_path(storage.path(), "simulations", layer), f"simulations for layer {layer}")
                expl = read_parquet(asset_path(storage.path(), "explanations", layer), f"explanations for layer {layer}")
            except NdxInputError as e:
                _fail(str(e))
            frame = scoring.score_layer(sims, expl)
            path = write_parquet_atomic(frame, asset_path(storage.path(), "scores", layer))
            valid = frame["score"].drop_nans().drop_nulls()
            _report(context, layer, {
                "neurons": len(frame), "scored": len(valid),
                "mean_score": float(valid.mean()) if len(valid) else float("nan"),
                "median_score": float(valid.median()) if len(valid) else float("nan"),
                "undefined_or_failed": len(frame) - len(valid),
                "path": dg.MetadataValue.path(str(path)),
                "neuron_viewer": dg.MetadataValue.path(str(viewer_mod.viewer_dir(storage.path()) / "index.html")),
            })

    @dg.asset(group_name=GROUP, deps=[scores], partitions_def=partitions, backfill_policy=single_run,
              description="Static HTML pages (open from disk): an index of neurons and one page per neuron.")
    def neuron_viewer(context: dg.AssetExecutionContext, storage: StorageResource) -> None:
        out = viewer_mod.viewer_dir(storage.path())
        for layer in _layers(context):
            pages = viewer_mod.write_layer_pages(storage.path(), layer, out,
                                                 runs=stage_runs(context.instance, layer))
            index = viewer_mod.write_index(storage.path(), out)
            _report(context, layer, {
                "pages": len(pages), "index": dg.MetadataValue.path(str(index)),
                "layer_folder": dg.MetadataValue.path(str(out / str(layer))),
            })

    return [corpus, activation_records, top_excerpts, explanations, simulations, scores, neuron_viewer]
