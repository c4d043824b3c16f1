"""The six software-defined assets. Each calls the pure core and writes the data contract's Parquet file(s).

The layer-partitioned assets handle every partition of their run in one go (single-run backfills): the subject
model is loaded once and run once per batch for all requested layers. They write their files themselves
(atomically) and report per-partition metadata.
"""


import time

import dagster as dg
import numpy as np
import polars as pl

from ndx_pipeline.core.data import activations as act
from ndx_pipeline.core.data import corpus as corpus_mod
from ndx_pipeline.core.data import excerpts as exc
from ndx_pipeline.core.method import baselines as baselines_mod
from ndx_pipeline.core.method import best_of_k, explainer, scoring, simulator
from ndx_pipeline.core import validation
from ndx_pipeline.reports import viewer as viewer_mod
from ndx_pipeline.core.models import BUNDLED_MODEL_NOTE
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.storage import asset_path, read_parquet, write_parquet_atomic
from ndx_pipeline.core.data.subject_model import check_layers, load_subject_model, mlp_width, num_layers
from ndx_pipeline.core.data.windows import TokenTexts, tokenize_windows
from ndx_pipeline.defs.metadata import candidates_table, column_schema, content_hash, neuron_table, score_histogram
from ndx_pipeline.defs.provenance import stage_runs
from ndx_pipeline.scale_out import op_tags
from ndx_pipeline.defs.resources import (
    CorpusResource,
    LLMResource,
    QualityResource,
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
    from ndx_pipeline.core.llm.cache import LLMStats

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


def _read(storage: StorageResource, asset: str, layer: int | None = None) -> pl.DataFrame:
    """An upstream stage's file, or a run failure saying which one is missing."""
    what = f"{asset} for layer {layer}" if layer is not None else f"the {asset} asset's file"
    try:
        return read_parquet(asset_path(storage.path(), asset, layer), what)
    except NdxInputError as e:
        _fail(str(e))


def _quality(quality: QualityResource) -> QualityResource:
    try:
        return quality.checked()
    except NdxInputError as e:
        _fail(str(e))


def _read_optional(storage: StorageResource, asset: str, layer: int) -> pl.DataFrame | None:
    """A side file of a stage (token_table, baseline_explanations, …): None when that stage did not write one."""
    path = asset_path(storage.path(), asset, layer)
    return _read(storage, asset, layer) if path.exists() else None




def _mean(values: pl.Series) -> float:
    finite = values.cast(pl.Float64).drop_nulls().drop_nans()
    return round(float(finite.mean()), 4) if len(finite) else float("nan")


def _baseline_scores(storage: StorageResource, layer: int, names, held_out: bool):
    """({name: score_layer rows} for the configured baselines whose inputs exist, {name: what is missing})."""
    scores, missing = {}, {}
    llm_based = [n for n in names if n in ("random", "token_list")]
    if llm_based:
        expl = _read_optional(storage, "baseline_explanations", layer)
        sims = _read_optional(storage, "baseline_simulations", layer)
        if expl is None or sims is None:
            missing.update({n: "baseline explanations or simulations not written" for n in llm_based})
        else:
            found = baselines_mod.baseline_scores(sims, expl.filter(pl.col("baseline").is_in(llm_based)))
            scores.update(found)
            missing.update({n: "not in the baseline explanations" for n in llm_based if n not in found})
    if "lookup" in names:
        table = _read_optional(storage, "token_table", layer)
        if table is None:
            missing["lookup"] = "no token table from activation_records"
        else:
            excerpts = _read(storage, "top_excerpts", layer)
            scores.update(baselines_mod.baseline_scores(pl.DataFrame(), None, table, excerpts, held_out))
    return scores, missing


def _baseline_metadata(frame: pl.DataFrame, names) -> dict:
    """Per baseline: its mean score, and how many neurons our explanation beats it on."""
    out = {}
    ours = frame["score"].to_numpy()
    for name in names:
        col = f"baseline_{name}"
        if col not in frame.columns:
            continue
        theirs = frame[col].to_numpy()
        both = np.isfinite(ours) & np.isfinite(theirs)
        out[f"mean_{col}"] = round(float(np.nanmean(theirs)), 4) if np.isfinite(theirs).any() else float("nan")
        out[f"beats_{name}"] = f"{int((ours[both] > theirs[both]).sum())} of {int(both.sum())} neurons"
    return out


def _backend(llm: LLMResource, storage: StorageResource):
    try:
        return llm.build(cache_dir=llm_cache_dir(storage))
    except NdxInputError as e:
        _fail(str(e))


def _finish(context, asset: str, written: dict, checks: dict | None = None) -> dg.MaterializeResult:
    """Close a materialization: the data version is a hash of the files written (an unchanged output keeps its
    children fresh); each check's result covers every layer of the run, with per-layer details."""
    results = []
    for name, per_layer in (checks or {}).items():
        passed = all(ok for ok, _, _ in per_layer.values())
        results.append(dg.AssetCheckResult(
            check_name=name, asset_key=asset, passed=passed,
            description="; ".join(f"layer {layer}: {desc}" for layer, (_, desc, _) in sorted(per_layer.items())),
            metadata={f"layer_{layer}_{k}": v for layer, (_, _, d) in per_layer.items() for k, v in d.items()},
        ))
    return dg.MaterializeResult(data_version=dg.DataVersion(content_hash(list(written.values()))),
                                check_results=results)


# Downstream layers follow their upstream layer; activation_records re-extracts, when the corpus changes, only the
# layers that already have records (the corpus is one asset for all 30 layers: "all missing layers" would be
# every layer of the model).
FOLLOW_UPSTREAM = (
    dg.AutomationCondition.any_deps_updated()
    & ~dg.AutomationCondition.any_deps_missing()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("follow upstream updates")
REFRESH_MATERIALIZED = (FOLLOW_UPSTREAM & ~dg.AutomationCondition.missing()).with_label(
    "re-extract layers already materialized")


def _check_specs(asset: str, *names_blocking):
    return [dg.AssetCheckSpec(name, asset=asset, blocking=blocking, description=desc)
            for name, blocking, desc in names_blocking]


def build_assets(partitions: dg.StaticPartitionsDefinition, versions: dict[str, str] | None = None):
    single_run = dg.BackfillPolicy.single_run()
    versions = versions or {}

    @dg.asset(op_tags=op_tags("corpus"), group_name=GROUP,
              description="The text corpus, one row per document.",
              code_version=versions.get("corpus"))
    def corpus(context: dg.AssetExecutionContext, corpus_source: CorpusResource, storage: StorageResource):
        try:
            frame = corpus_mod.read_corpus(corpus_source.path)
        except NdxInputError as e:
            _fail(str(e))
        path = write_parquet_atomic(frame, asset_path(storage.path(), "corpus"))
        return dg.MaterializeResult(data_version=dg.DataVersion(content_hash([path])), metadata={
            "documents": len(frame),
            "characters": int(frame["text"].str.len_chars().sum()),
            "source": corpus_source.path or corpus_mod.DEFAULT_CORPUS,
            "path": dg.MetadataValue.path(str(path)),
            "dagster/column_schema": column_schema(frame),
        })

    @dg.asset(op_tags=op_tags("activation_records"), group_name=GROUP,
              deps=[corpus], partitions_def=partitions, backfill_policy=single_run,
              pool=SUBJECT_MODEL_POOL, code_version=versions.get("activation_records"),
              automation_condition=REFRESH_MATERIALIZED,
              check_specs=_check_specs("activation_records",
                                       ("top_windows_ordered", True, "top windows ranked by max activation"),
                                       ("record_counts", True, "top_k top and random_k random rows per neuron")),
              description="Per neuron: top windows by max activation, a seeded random sample, mean/variance/max.")
    def activation_records(context: dg.AssetExecutionContext, subject_model: SubjectModelResource,
                           selection: SelectionResource, quality: QualityResource,
                           storage: StorageResource) -> dg.MaterializeResult:
        keep_token_table = "lookup" in _quality(quality).baselines
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
            docs = _read(storage, "corpus")
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
                                            selection.random_k, selection.seed, subject_model.batch_size, progress,
                                            token_table=keep_token_table, quantile_k=selection.quantile_k)
        except NdxInputError as e:
            _fail(str(e))
        texts = TokenTexts(tokenizer)
        written, checks = {}, {"top_windows_ordered": {}, "record_counts": {}}
        random_k = min(selection.random_k, len(windows))
        for layer in layers:
            frame = act.records_frame(layer, selections[layer], windows, texts)
            written[layer] = write_parquet_atomic(frame, asset_path(storage.path(), "activation_records", layer))
            if keep_token_table:  # per neuron × token: count and activation sum, for the lookup-table baseline
                table = act.token_table_frame(layer, selections[layer], texts)
                written[("token_table", layer)] = write_parquet_atomic(
                    table, asset_path(storage.path(), "token_table", layer))
            checks["top_windows_ordered"][layer] = validation.top_windows_ordered(frame)
            checks["record_counts"][layer] = validation.record_counts(frame, layer_neurons[layer], selection.top_k,
                                                                      random_k)
            _report(context, layer, {
                "neurons": len(layer_neurons[layer]), "rows": len(frame), "tokens_processed": stats.tokens,
                "windows": stats.windows, "tokens_per_second": round(stats.tokens_per_second, 1),
                "wall_seconds": round(stats.seconds, 2), "subject_model": subject_model.model,
                "layers_in_this_pass": str(layers),
                "path": dg.MetadataValue.path(str(written[layer])), "dagster/column_schema": column_schema(frame),
            })
        return _finish(context, "activation_records", written, checks)

    @dg.asset(op_tags=op_tags("top_excerpts"), group_name=GROUP,
              deps=[activation_records], partitions_def=partitions, backfill_policy=single_run,
              code_version=versions.get("top_excerpts"), automation_condition=FOLLOW_UPSTREAM,
              check_specs=_check_specs("top_excerpts",
                                       ("splits_disjoint", True, "no explained window is scored"),
                                       ("excerpt_counts", True, "the configured excerpts per split and neuron")),
              description="Disjoint explain / score_top / score_random excerpts per neuron (interleaved splits).")
    def top_excerpts(context: dg.AssetExecutionContext, selection: SelectionResource, quality: QualityResource,
                     storage: StorageResource) -> dg.MaterializeResult:
        written, checks = {}, {"splits_disjoint": {}, "excerpt_counts": {}}
        _quality(quality)
        for layer in _layers(context):
            records = _read(storage, "activation_records", layer)
            try:
                frame = exc.split_excerpts(records, selection.explain_excerpts, selection.score_top_excerpts,
                                           selection.score_random_excerpts)
                if quality.calibration_top_excerpts or quality.calibration_random_excerpts:
                    # for choosing among candidate explanations (best-of-k): never explained, never scored
                    frame = pl.concat([frame, exc.calibration_excerpts(records, quality.calibration_top_excerpts,
                                                                       quality.calibration_random_excerpts)])
            except NdxInputError as e:
                _fail(str(e))
            path = written[layer] = write_parquet_atomic(frame, asset_path(storage.path(), "top_excerpts", layer))
            checks["splits_disjoint"][layer] = validation.splits_disjoint(frame)
            checks["excerpt_counts"][layer] = validation.excerpt_counts(
                frame, selection.explain_excerpts, selection.score_top_excerpts, selection.score_random_excerpts)
            _report(context, layer, {
                "neurons": frame["neuron"].n_unique(), "rows": len(frame),
                "path": dg.MetadataValue.path(str(path)), "dagster/column_schema": column_schema(frame),
            })
        return _finish(context, "top_excerpts", written, checks)

    @dg.asset(op_tags=op_tags("explanations"), group_name=GROUP,
              deps=[top_excerpts], partitions_def=partitions, backfill_policy=single_run,
              pool=LLM_POOL, code_version=versions.get("explanations"), automation_condition=FOLLOW_UPSTREAM,
              check_specs=_check_specs("explanations",
                                       ("every_neuron_explained", True, "one row per neuron: ok, or failed with why")),
              description="One explanation per neuron, written by the explainer LLM from the explain excerpts.")
    def explanations(context: dg.AssetExecutionContext, explainer_llm: LLMResource, simulator_llm: LLMResource,
                     quality: QualityResource, storage: StorageResource) -> dg.MaterializeResult:
        written, checks = {}, {"every_neuron_explained": {}}
        k = _quality(quality).explanation_candidates
        wanted = [b for b in quality.baselines if b in ("random", "token_list")]
        backend = _backend(explainer_llm, storage)
        choosing = _backend(simulator_llm, storage) if k > 1 else None
        try:
            for layer in _layers(context):
                started, before = time.perf_counter(), backend.stats.snapshot()
                excerpts = _read(storage, "top_excerpts", layer)

                def log(row, layer=layer):
                    context.log.info(f"layer {layer} neuron {row['neuron']}: {row['status']} "
                                     f"{row['explanation'] or row['error']!r}")

                frame = explainer.explain_layer(excerpts, backend, explainer_llm.max_tokens,
                                                explainer_llm.temperature, explainer_llm.seed, on_neuron=log,
                                                candidates=k)
                extra = {}
                if k > 1:  # best-of-k: simulate every candidate on the calibration excerpts, keep the best
                    calibration = excerpts.filter(pl.col("split") == exc.CALIBRATION_SPLIT)
                    if calibration.is_empty():
                        _fail(f"best-of-k (explanation_candidates={k}) needs calibration excerpts, and top_excerpts "
                              f"for layer {layer} has none: set calibration_top_excerpts or "
                              "calibration_random_excerpts above 0.")
                    frame, cal_sims = best_of_k.select_best(frame, calibration, choosing,
                                                            mode=simulator_llm.simulator_mode)
                    written[("calibration_simulations", layer)] = write_parquet_atomic(
                        cal_sims, asset_path(storage.path(), "calibration_simulations", layer))
                    kept = best_of_k.selected(frame)
                    improved = kept.filter(pl.col("candidate") > 0)
                    extra = {"candidates_per_neuron": k,
                             "kept_a_later_candidate": len(improved),
                             "mean_calibration_score_kept": _mean(kept["calibration_score"]),
                             "mean_calibration_score_candidate_0": _mean(
                                 frame.filter(pl.col("candidate") == 0)["calibration_score"]),
                             "candidates": candidates_table(frame)}
                path = written[layer] = write_parquet_atomic(frame, asset_path(storage.path(), "explanations", layer))
                if wanted:  # the random and token-list baselines' explanations, simulated next stage beside ours
                    base = baselines_mod.baseline_explanations(
                        frame, excerpts, explainer_llm.seed,
                        token_list_backend=backend if quality.token_list_explainer == "llm" else None, names=wanted,
                        max_tokens=explainer_llm.max_tokens, temperature=explainer_llm.temperature)
                    written[("baseline_explanations", layer)] = write_parquet_atomic(
                        base, asset_path(storage.path(), "baseline_explanations", layer))
                    extra["failed_baseline_explanations"] = int((base["status"] != "ok").sum())
                checks["every_neuron_explained"][layer] = validation.every_neuron_explained(frame, excerpts)
                kept = best_of_k.selected(frame)
                _report(context, layer, {
                    "neurons": len(kept), "failed": int((kept["status"] != "ok").sum()),
                    "explainer": backend.name, "prompt_template_sha": versions.get("explainer_prompt", ""),
                    **extra, **llm_accounting(backend, before, started),
                    "path": dg.MetadataValue.path(str(path)), "dagster/column_schema": column_schema(frame),
                })
        finally:
            backend.close()
            if choosing is not None:
                choosing.close()
        return _finish(context, "explanations", written, checks)

    @dg.asset(op_tags=op_tags("simulations"), group_name=GROUP,
              deps=[explanations, top_excerpts], partitions_def=partitions,
              backfill_policy=single_run, pool=LLM_POOL, code_version=versions.get("simulations"),
              automation_condition=FOLLOW_UPSTREAM,
              check_specs=_check_specs("simulations",
                                       ("simulations_well_formed", True, "one value in [0, 10] per token")),
              description="Simulated activations (expected value over 0–10) on every scored excerpt.")
    def simulations(context: dg.AssetExecutionContext, simulator_llm: LLMResource,
                    storage: StorageResource) -> dg.MaterializeResult:
        written, checks = {}, {"simulations_well_formed": {}}
        backend = _backend(simulator_llm, storage)
        try:
            for layer in _layers(context):
                started, before = time.perf_counter(), backend.stats.snapshot()
                expl, excerpts = _read(storage, "explanations", layer), _read(storage, "top_excerpts", layer)
                frame = simulator.simulate_layer(
                    expl, excerpts, backend, mode=simulator_llm.simulator_mode,
                    on_neuron=lambda e, layer=layer: context.log.info(f"layer {layer} neuron {e['neuron']} simulated"),
                )
                path = written[layer] = write_parquet_atomic(frame, asset_path(storage.path(), "simulations", layer))
                checks["simulations_well_formed"][layer] = validation.simulations_well_formed(frame)
                extra = {}
                base = _read_optional(storage, "baseline_explanations", layer)
                if base is not None:  # the random and token-list baselines, simulated exactly like ours
                    base_sims = simulator.simulate_layer(base, excerpts, backend, mode=simulator_llm.simulator_mode)
                    written[("baseline_simulations", layer)] = write_parquet_atomic(
                        base_sims, asset_path(storage.path(), "baseline_simulations", layer))
                    extra = {"baseline_excerpts": len(base_sims),
                             "failed_baseline_excerpts": int((base_sims["status"] != "ok").sum())}
                _report(context, layer, {
                    "excerpts": len(frame), "neurons": frame["neuron"].n_unique(), "simulator": backend.name,
                    "simulator_mode": simulator_llm.simulator_mode,
                    "prompt_template_sha": versions.get("simulator_prompt", ""),
                    "failed_excerpts": int((frame["status"] != "ok").sum()), **extra,
                    **llm_accounting(backend, before, started), "path": dg.MetadataValue.path(str(path)),
                    "dagster/column_schema": column_schema(frame),
                })
        finally:
            backend.close()
        return _finish(context, "simulations", written, checks)

    @dg.asset(op_tags=op_tags("scores"), group_name=GROUP,
              deps=[simulations, explanations], partitions_def=partitions,
              backfill_policy=single_run, code_version=versions.get("scores"), automation_condition=FOLLOW_UPSTREAM,
              check_specs=_check_specs("scores",
                                       ("scores_valid", True, "in [-1, 1], or NaN with a status saying why")),
              description="Pooled Pearson correlation of simulated vs true activations, per neuron.")
    def scores(context: dg.AssetExecutionContext, quality: QualityResource,
               storage: StorageResource) -> dg.MaterializeResult:
        written, checks = {}, {"scores_valid": {}}
        names = _quality(quality).baselines
        for layer in _layers(context):
            sims, expl = _read(storage, "simulations", layer), _read(storage, "explanations", layer)
            baselines, missing = _baseline_scores(storage, layer, names, quality.lookup_held_out)
            frame = scoring.score_layer(sims, expl, baselines=baselines)
            for name in missing:  # configured but its inputs were never written: a column of NaN, and a warning
                frame = frame.with_columns(pl.lit(float("nan")).alias(f"baseline_{name}"))
                context.log.warning(f"layer {layer}: no inputs for the {name} baseline ({missing[name]}); "
                                    "rematerialize from that stage to fill it")
            path = written[layer] = write_parquet_atomic(frame, asset_path(storage.path(), "scores", layer))
            checks["scores_valid"][layer] = validation.scores_valid(frame)
            valid = frame["score"].drop_nans().drop_nulls()
            _report(context, layer, {
                "neurons": len(frame), "scored": len(valid),
                "mean_score": float(valid.mean()) if len(valid) else float("nan"),
                "median_score": float(valid.median()) if len(valid) else float("nan"),
                "undefined_or_failed": len(frame) - len(valid),
                "score_histogram": dg.MetadataValue.md(score_histogram(frame["score"])),
                "top_10_neurons": neuron_table(frame, best=True),
                "bottom_10_neurons": neuron_table(frame, best=False),
                "explainer": ", ".join(sorted(set(expl["explainer"].drop_nulls()))),
                "simulator": ", ".join(sorted(set(sims["simulator"].drop_nulls()))) if len(sims) else "",
                "explanation_prompts": len(set(expl["prompt_sha256"].drop_nulls())),
                "failed_explanations": int((expl["status"] != "ok").sum()),
                "failed_simulations": int((sims["status"] != "ok").sum()) if len(sims) else 0,
                "path": dg.MetadataValue.path(str(path)),
                **_baseline_metadata(frame, names),
                **({"note": BUNDLED_MODEL_NOTE} if any("SmolLM2" in str(x) or "smollm2" in str(x)
                                                       for x in set(sims["simulator"].drop_nulls())) else {}),
                "neuron_viewer": dg.MetadataValue.path(str(viewer_mod.viewer_dir(storage.path()) / "index.html")),
                "dagster/column_schema": column_schema(frame),
            })
        return _finish(context, "scores", written, checks)

    @dg.asset(op_tags=op_tags("neuron_viewer"), group_name=GROUP,
              deps=[scores], partitions_def=partitions, backfill_policy=single_run,
              code_version=versions.get("neuron_viewer"), automation_condition=FOLLOW_UPSTREAM,
              description="Static HTML pages (open from disk): an index of neurons and one page per neuron.")
    def neuron_viewer(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        out = viewer_mod.viewer_dir(storage.path())
        written = {}
        for layer in _layers(context):
            pages = viewer_mod.write_layer_pages(storage.path(), layer, out,
                                                 runs=stage_runs(context.instance, layer))
            index = viewer_mod.write_index(storage.path(), out)
            for i, page in enumerate(pages):
                written[(layer, i)] = page
            _report(context, layer, {
                "pages": len(pages), "index": dg.MetadataValue.path(str(index)),
                "layer_folder": dg.MetadataValue.path(str(out / str(layer))),
            })
        return _finish(context, "neuron_viewer", written)

    return [corpus, activation_records, top_excerpts, explanations, simulations, scores, neuron_viewer]
