"""The scoring stage: the pooled Pearson score of each neuron's explanation, beside every configured baseline scored
on the same excerpts."""

import dagster as dg
import polars as pl

from ndx_pipeline.core import stages, validation
from ndx_pipeline.core.contract import (
    BASELINE_EXPLANATIONS,
    BASELINE_SIMULATIONS,
    EXPLANATIONS,
    SCORES,
    SIMULATIONS,
    STATUS_OK,
    TOKEN_TABLE,
    TOP_EXCERPTS,
)
from ndx_pipeline.core.method.controls import SIMULATION
from ndx_pipeline.core.models import BUNDLED_MODEL_NOTE, is_bundled
from ndx_pipeline.core.storage import viewer_dir
from ndx_pipeline.defs.automation import FOLLOW_UPSTREAM
from ndx_pipeline.defs.checks import FAILURES, JUDGE, check_specs
from ndx_pipeline.defs.materialize import (
    SIMULATION_GROUP,
    SINGLE_RUN,
    Outputs,
    VariantSettings,
    bad_input_fails_the_run,
    layers_of,
    one_writer,
    variant_of,
)
from ndx_pipeline.defs.metadata import (
    baseline_metadata,
    control_metadata,
    finite_mean,
    judge_control,
    neuron_table,
    score_histogram,
    variant_control,
)
from ndx_pipeline.defs.partitions import layer_variant
from ndx_pipeline.defs.queues import step_tags
from ndx_pipeline.defs.resources import QualityResource, StorageResource
from ndx_pipeline.defs.versioning import CODE_VERSIONS, with_settings

READS = (SIMULATIONS, EXPLANATIONS, BASELINE_SIMULATIONS, BASELINE_EXPLANATIONS, TOKEN_TABLE,
         TOP_EXCERPTS)


def _names(values) -> str:
    return ", ".join(sorted(set(values.drop_nulls())))


@dg.asset(name=SCORES, op_tags=step_tags(SCORES), group_name=SIMULATION_GROUP, deps=with_settings(SCORES, READS),
          partitions_def=layer_variant,
          backfill_policy=SINGLE_RUN, code_version=CODE_VERSIONS[SCORES], automation_condition=FOLLOW_UPSTREAM,
          check_specs=check_specs(SCORES),
          description="Pooled Pearson correlation of simulated vs true activations, per neuron, beside baselines.")
@one_writer
def scores(context: dg.AssetExecutionContext, quality: QualityResource, storage: StorageResource):
    variant = variant_of(context)
    quality = VariantSettings(storage.path(), variant)("quality", quality)
    with bad_input_fails_the_run():
        names = quality.checked().baselines
    out = Outputs(context, storage.path(), variant)
    controlled = variant_control(storage.path(), variant)
    for layer in layers_of(context):
        sims, expl, base_sims, base_expl, table, excerpts = (out.read(a, layer) for a in READS)
        made = stages.scores(sims, expl, excerpts=excerpts, baselines=names, baseline_explanations=base_expl,
                             baseline_simulations=base_sims, token_table=table, lookup_held_out=quality.lookup_held_out)
        for name, why in made.missing.items():
            context.log.warning(f"layer {layer}: no inputs for the {name} baseline ({why}); rematerialize from "
                                "that stage to fill it")
        frame = made.scores
        judge, control = judge_control(controlled, frame, variant, SIMULATION)
        valid = frame["score"].drop_nans().drop_nulls()
        simulators = set(sims["simulator"].drop_nulls())
        out.write(SCORES, frame, layer, neurons=len(frame), scored=len(valid),
                  mean_score=float(valid.mean()) if len(valid) else float("nan"),
                  median_score=float(valid.median()) if len(valid) else float("nan"),
                  undefined_or_failed=len(frame) - len(valid),
                  mean_calibrated_ev=finite_mean(frame["calibrated_ev"]),
                  score_histogram=dg.MetadataValue.md(score_histogram(frame["score"])),
                  top_10_neurons=neuron_table(frame, best=True), bottom_10_neurons=neuron_table(frame, best=False),
                  explainer=_names(expl["explainer"]), simulator=_names(sims["simulator"]),
                  explanation_prompts=len(set(expl["prompt_sha256"].drop_nulls())),
                  failed_explanations=int((expl["status"] != STATUS_OK).sum()),
                  failed_simulations=int((sims["status"] != STATUS_OK).sum()),
                  missing_baselines=str(sorted(made.missing)), **baseline_metadata(frame, names),
                  **({"note": BUNDLED_MODEL_NOTE} if any(is_bundled(s) for s in simulators) else {}),
                  variant=variant, **control_metadata(judge, control, SIMULATION),
                  neuron_viewer=dg.MetadataValue.path(str(viewer_dir(storage.path(), variant) / "index.html")))
        out.check(SCORES, "scores_valid", layer, validation.scores_valid(frame))
        out.check(SCORES, JUDGE, layer, validation.judge_separates(judge, SIMULATION, control))
        out.check(SCORES, FAILURES, layer, validation.failure_share(
            frame.with_columns(pl.when(pl.col("score").is_nan()).then(pl.lit("undefined")).otherwise(pl.lit(STATUS_OK))
                               .alias("status")), "neurons' scores (undefined or failed)"))
    return out.result(SCORES)
