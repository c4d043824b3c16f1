"""The explainer stage: one explanation per neuron (best-of-k candidates with the calibration simulations that chose
among them), and the explanations the random and token-list baselines simulate beside ours (and, for planted units,
their true and a wrong explanation: the judge's control)."""

import time

import dagster as dg
import polars as pl

from ndx_pipeline.core import stages, validation
from ndx_pipeline.core.contract import (
    ACTIVATION_RECORDS,
    BASELINE_EXPLANATIONS,
    CALIBRATION_SIMULATIONS,
    CONTROL_BASELINES,
    EXPLANATIONS,
    OUTPUT_TOKENS,
    STATUS_OK,
    TOP_EXCERPTS,
    kept,
)
from ndx_pipeline.core.data.planted import PLANTED_UNIT
from ndx_pipeline.core.storage import asset_path
from ndx_pipeline.defs.automation import FOLLOW_UPSTREAM
from ndx_pipeline.defs.checks import FAILURES, check_specs
from ndx_pipeline.defs.materialize import (
    EXPLANATION_GROUP,
    LLM_POOL,
    SINGLE_RUN,
    Outputs,
    VariantSettings,
    bad_input_fails_the_run,
    layers_of,
    one_writer,
    variant_of,
)
from ndx_pipeline.defs.metadata import candidates_table, finite_mean, llm_accounting
from ndx_pipeline.defs.partitions import layer_variant
from ndx_pipeline.defs.queues import step_tags
from ndx_pipeline.defs.resources import LLMResource, QualityResource, StorageResource
from ndx_pipeline.defs.versioning import CODE_VERSIONS, PROMPT_SHAS, with_settings


def holds_planted_units(storage_dir, layer: int, variant: str) -> bool:
    """Whether the layer's activation records are of planted units (read from their `unit_kind` column alone)."""
    path = asset_path(storage_dir, ACTIVATION_RECORDS, layer, variant)
    if not path.exists():
        return False
    kinds = pl.read_parquet(path, columns=["unit_kind"])["unit_kind"]
    return bool((kinds == PLANTED_UNIT).any())


def _spec(asset: str, description: str) -> dg.AssetSpec:
    # the explainer reads the units' output tokens when `quality.explainer_logits` is on
    reads = [TOP_EXCERPTS, OUTPUT_TOKENS] if asset == EXPLANATIONS else [TOP_EXCERPTS]
    return dg.AssetSpec(asset, deps=with_settings(asset, reads), partitions_def=layer_variant,
                        code_version=CODE_VERSIONS[asset], automation_condition=FOLLOW_UPSTREAM,
                        description=description)


@dg.multi_asset(
    name=EXPLANATIONS, op_tags=step_tags(EXPLANATIONS), group_name=EXPLANATION_GROUP, pool=LLM_POOL,
    can_subset=False, backfill_policy=SINGLE_RUN,
    specs=[
        _spec(EXPLANATIONS, "One explanation per neuron, written by the explainer LLM from the explain excerpts "
                              "(with best-of-k: every candidate, the kept one marked `selected`)."),
        _spec(BASELINE_EXPLANATIONS, "The random-explanation and token-list baselines' explanations, simulated and "
                                       "scored beside ours (no rows for a baseline that is off)."),
        _spec(CALIBRATION_SIMULATIONS, "Best-of-k: every candidate simulated on the calibration excerpts it was "
                                         "chosen on (no rows without best-of-k)."),
    ],
    check_specs=check_specs(EXPLANATIONS, BASELINE_EXPLANATIONS, CALIBRATION_SIMULATIONS),
)
@one_writer
def explanations(context: dg.AssetExecutionContext, explainer_llm: LLMResource, simulator_llm: LLMResource,
                 quality: QualityResource, storage: StorageResource):
    variant, layers = variant_of(context), layers_of(context)
    settings = VariantSettings(storage.path(), variant)
    quality, explainer_llm = settings("quality", quality), settings("explainer_llm", explainer_llm)
    simulator_llm = settings("simulator_llm", simulator_llm)
    # the judge's control: planted units (as their records say) get their true and a wrong explanation too
    planted = any(holds_planted_units(storage.path(), layer, variant) for layer in layers)
    controls = list(CONTROL_BASELINES) if planted else []
    with bad_input_fails_the_run():
        k = quality.checked().explanation_candidates
        backend = explainer_llm.build(storage, log=context.log.info)
        chooser = simulator_llm.build(storage, log=context.log.info) if k > 1 else None
    out = Outputs(context, storage.path(), variant)
    try:
        # every layer of the run in one wave: one set of requests in flight under the explainer's limit
        excerpts = {layer: out.read(TOP_EXCERPTS, layer) for layer in layers}
        output_tokens = (pl.concat([out.read(OUTPUT_TOKENS, layer) for layer in layers])
                         if quality.explainer_logits else None)
        started, before = time.perf_counter(), backend.stats.snapshot()
        with bad_input_fails_the_run():
            made = stages.explanations(
                pl.concat(list(excerpts.values())), backend, candidates=k, chooser=chooser,
                baselines=quality.baselines, token_list_explainer=quality.token_list_explainer,
                seed=explainer_llm.seed, max_tokens=explainer_llm.max_tokens, temperature=explainer_llm.temperature,
                digest=quality.explainer_digest, output_tokens=output_tokens,
                simulator_mode=simulator_llm.simulator_mode, scope=variant,
                what=f"explanations, {variant} layers {layers}", planted=planted, log=context.log.info)
        accounting = {**llm_accounting(backend, before, started), "llm_accounting_covers_layers": str(layers),
                      "variant": variant,
                      "settings_version": settings.digest(quality=quality, explainer_llm=explainer_llm)}
        for layer in layers:
            frame = made.explanations.filter(pl.col("layer") == layer)
            chosen = kept(frame)
            for row in chosen.iter_rows(named=True):
                context.log.info(f"layer {layer} neuron {row['neuron']}: {row['status']} "
                                 f"{row['explanation'] or row['error']!r}")
            best_of_k = {}
            if k > 1:
                best_of_k = {"candidates_per_neuron": k,
                             "kept_a_later_candidate": int((chosen["candidate"] > 0).sum()),
                             "mean_calibration_score_kept": finite_mean(chosen["calibration_score"]),
                             "mean_calibration_score_candidate_0": finite_mean(
                                 frame.filter(pl.col("candidate") == 0)["calibration_score"]),
                             "candidates": candidates_table(frame)}
            out.write(EXPLANATIONS, frame, layer, neurons=len(chosen),
                      failed=int((chosen["status"] != STATUS_OK).sum()),
                      explainer=backend.name, prompt_template_sha=PROMPT_SHAS["explainer"],
                      digest=quality.explainer_digest, output_tokens_shown=quality.explainer_logits, **best_of_k,
                      **accounting)
            out.check(EXPLANATIONS, "every_neuron_explained", layer,
                      validation.every_neuron_explained(frame, excerpts[layer]))
            out.check(EXPLANATIONS, FAILURES, layer, validation.failure_share(chosen, "explanations"))
            base = made.baseline_explanations.filter(pl.col("layer") == layer)
            out.write(BASELINE_EXPLANATIONS, base, layer, baselines=str(quality.simulated_baselines + controls),
                      failed=int((base["status"] != STATUS_OK).sum()),
                      token_list_explainer=quality.token_list_explainer,
                      prompt_template_sha=PROMPT_SHAS["token_list"])
            out.check(BASELINE_EXPLANATIONS, "baselines_explained", layer,
                      validation.baselines_explained(base, excerpts[layer], quality.simulated_baselines + controls))
            out.check(BASELINE_EXPLANATIONS, FAILURES, layer,
                      validation.failure_share(base, "baseline explanations", blocking=False))
            cal = made.calibration_simulations.filter(pl.col("layer") == layer)
            out.write(CALIBRATION_SIMULATIONS, cal, layer, candidates_per_neuron=k,
                      failed_excerpts=int((cal["status"] != STATUS_OK).sum()),
                      simulator=chooser.name if chooser is not None else "")
            out.check(CALIBRATION_SIMULATIONS, "calibration_simulations_well_formed", layer,
                      validation.simulations_well_formed(cal))
    finally:
        backend.close()
        if chooser is not None:
            chooser.close()
    yield from out.results(EXPLANATIONS, BASELINE_EXPLANATIONS, CALIBRATION_SIMULATIONS)
