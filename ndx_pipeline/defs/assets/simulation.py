"""The simulator stage: every scored excerpt simulated from each neuron's kept explanation, and from each baseline
explanation, by the same simulator, in the same step."""

import time

import dagster as dg
import polars as pl

from ndx_pipeline.core import stages, validation
from ndx_pipeline.core.contract import (
    BASELINE_EXPLANATIONS,
    BASELINE_SIMULATIONS,
    EXPLANATIONS,
    SIMULATIONS,
    STATUS_OK,
    TOP_EXCERPTS,
)
from ndx_pipeline.defs.automation import FOLLOW_UPSTREAM
from ndx_pipeline.defs.checks import FAILURES, check_specs
from ndx_pipeline.defs.materialize import (
    LLM_POOL,
    SIMULATION_GROUP,
    SINGLE_RUN,
    Outputs,
    VariantSettings,
    bad_input_fails_the_run,
    layers_of,
    one_writer,
    variant_of,
)
from ndx_pipeline.defs.metadata import llm_accounting, llm_cost_per, simulator_scale
from ndx_pipeline.defs.partitions import layer_variant
from ndx_pipeline.defs.queues import step_tags
from ndx_pipeline.defs.resources import LLMResource, StorageResource
from ndx_pipeline.defs.versioning import CODE_VERSIONS, PROMPT_SHAS, with_settings


@dg.multi_asset(
    name=SIMULATIONS, op_tags=step_tags(SIMULATIONS), group_name=SIMULATION_GROUP, pool=LLM_POOL, can_subset=False,
    backfill_policy=SINGLE_RUN,
    specs=[
        dg.AssetSpec(SIMULATIONS, deps=with_settings(SIMULATIONS, [EXPLANATIONS, TOP_EXCERPTS]),
                     partitions_def=layer_variant,
                     code_version=CODE_VERSIONS[SIMULATIONS], automation_condition=FOLLOW_UPSTREAM,
                     description="Simulated activations (expected value over 0–10) on every scored excerpt."),
        dg.AssetSpec(BASELINE_SIMULATIONS,
                     deps=with_settings(BASELINE_SIMULATIONS, [BASELINE_EXPLANATIONS, TOP_EXCERPTS]),
                     partitions_def=layer_variant,
                     code_version=CODE_VERSIONS[BASELINE_SIMULATIONS], automation_condition=FOLLOW_UPSTREAM,
                     description="The baseline explanations simulated on the same excerpts, the same way."),
    ],
    check_specs=check_specs(SIMULATIONS, BASELINE_SIMULATIONS),
)
@one_writer
def simulations(context: dg.AssetExecutionContext, simulator_llm: LLMResource, storage: StorageResource):
    variant, layers = variant_of(context), layers_of(context)
    settings = VariantSettings(storage.path(), variant)
    simulator_llm = settings("simulator_llm", simulator_llm)
    with bad_input_fails_the_run():
        backend = simulator_llm.build(storage, log=context.log.info)
    out = Outputs(context, storage.path(), variant)
    try:
        def every_layer(asset: str) -> pl.DataFrame:
            return pl.concat([out.read(asset, layer) for layer in layers])

        # every layer of the run, ours and the baselines, in one wave
        started, before = time.perf_counter(), backend.stats.snapshot()
        made = stages.simulations(every_layer(EXPLANATIONS), every_layer(BASELINE_EXPLANATIONS),
                                  every_layer(TOP_EXCERPTS), backend, mode=simulator_llm.simulator_mode,
                                  what=f"simulations, {variant} layers {layers}", log=context.log.info)
        accounting = {**llm_accounting(backend, before, started), "llm_accounting_covers_layers": str(layers),
                      "variant": variant, "settings_version": settings.digest(simulator_llm=simulator_llm)}
        accounting.update(simulation_cost(made, accounting, backend, simulator_llm.simulator_mode))
        for layer in layers:
            ours = made.simulations.filter(pl.col("layer") == layer)
            theirs = made.baseline_simulations.filter(pl.col("layer") == layer)
            out.write(SIMULATIONS, ours, layer, excerpts=len(ours), neurons=ours["neuron"].n_unique(),
                      simulator=backend.name, simulator_mode=simulator_llm.simulator_mode,
                      prompt_template_sha=PROMPT_SHAS["simulator"],
                      failed_excerpts=int((ours["status"] != STATUS_OK).sum()),
                      **accounting)
            out.check(SIMULATIONS, "simulations_well_formed", layer, validation.simulations_well_formed(ours))
            out.check(SIMULATIONS, FAILURES, layer, validation.failure_share(ours, "simulated excerpts"))
            out.write(BASELINE_SIMULATIONS, theirs, layer, excerpts=len(theirs), simulator=backend.name,
                      failed_excerpts=int((theirs["status"] != STATUS_OK).sum()))
            out.check(BASELINE_SIMULATIONS, "baseline_simulations_well_formed", layer,
                      validation.simulations_well_formed(theirs))
            out.check(BASELINE_SIMULATIONS, FAILURES, layer,
                      validation.failure_share(theirs, "baseline excerpts", blocking=False))
    finally:
        backend.close()
    yield from out.results(SIMULATIONS, BASELINE_SIMULATIONS)


def simulation_cost(made, accounting: dict, backend, mode: str) -> dict:
    """Requests and prompt tokens per simulated excerpt and per unit (ours and the baselines' together, every layer
    of the wave), and the value scale the prompts asked for."""
    both = pl.concat([made.simulations.select("layer", "neuron"), made.baseline_simulations.select("layer", "neuron")])
    return {**llm_cost_per(accounting, {"excerpt": len(both), "unit": both.n_unique()}),
            **simulator_scale(backend, mode, len(both))}
