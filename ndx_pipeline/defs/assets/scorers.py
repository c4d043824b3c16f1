"""The scorers beside simulation: the held-out excerpts they judge (`scorer_excerpts`), then one step per scorer —
detection and fuzzing by the scorer LLM, embedding by a sentence-embedding model — writing its judgements and one
score row per neuron (ours, beside the random and token-list baselines' scored the same way). Each step is
versioned on its own (its prompt, its model, whether it runs), so changing one scorer makes only its two assets
stale; a scorer that is off writes empty files."""

import time

import dagster as dg
import polars as pl

from ndx_pipeline.core import stages, validation
from ndx_pipeline.core.contract import (
    ACTIVATION_RECORDS,
    BASELINE_EXPLANATIONS,
    DETECTION,
    EMBEDDING,
    EXPLANATIONS,
    FUZZING,
    SCORER_ASSETS,
    SCORER_EXCERPTS,
    SIMULATED_BASELINES,
    STATUS_OK,
    TOP_EXCERPTS,
    empty,
)
from ndx_pipeline.core.method.scorers import make_scorer
from ndx_pipeline.defs.automation import FOLLOW_UPSTREAM
from ndx_pipeline.defs.checks import FAILURES, JUDGE, check_specs
from ndx_pipeline.defs.materialize import (
    LLM_POOL,
    SCORERS_GROUP,
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
    llm_accounting,
    llm_cost_per,
    variant_control,
)
from ndx_pipeline.defs.partitions import layer_variant
from ndx_pipeline.defs.queues import step_tags
from ndx_pipeline.defs.resources import QualityResource, StorageResource
from ndx_pipeline.defs.versioning import CODE_VERSIONS, PROMPT_SHAS, with_settings

JUDGED = (SCORER_EXCERPTS, EXPLANATIONS, BASELINE_EXPLANATIONS)  # what every scorer step reads


@dg.asset(name=SCORER_EXCERPTS, op_tags=step_tags(SCORER_EXCERPTS), group_name=SCORERS_GROUP,
          deps=with_settings(SCORER_EXCERPTS, [ACTIVATION_RECORDS, TOP_EXCERPTS]), partitions_def=layer_variant,
          backfill_policy=SINGLE_RUN,
          code_version=CODE_VERSIONS[SCORER_EXCERPTS], automation_condition=FOLLOW_UPSTREAM,
          check_specs=check_specs(SCORER_EXCERPTS),
          description="Per neuron, held-out activating windows (across the upper activation quantiles) and "
                      "non-activating ones that the explainer never saw: what detection, fuzzing and embedding "
                      "judge (no rows when no scorer runs).")
@one_writer
def scorer_excerpts(context: dg.AssetExecutionContext, quality: QualityResource, storage: StorageResource):
    variant = variant_of(context)
    with bad_input_fails_the_run():
        q = VariantSettings(storage.path(), variant)("quality", quality).checked()
    count = q.scorer_excerpts if q.scorers else 0
    out = Outputs(context, storage.path(), variant)
    for layer in layers_of(context):
        records, excerpts = out.read(ACTIVATION_RECORDS, layer), out.read(TOP_EXCERPTS, layer)
        frame, left_out = empty(SCORER_EXCERPTS), {}
        if count:
            with bad_input_fails_the_run():
                frame = stages.scorer_excerpts(records, excerpts, count, scope=variant, left_out=left_out)
        for why in left_out.values():
            context.log.warning(f"{why}: the scorers do not judge it (its scorer scores say so)")
        out.write(SCORER_EXCERPTS, frame, layer, neurons=frame["neuron"].n_unique(), per_split=count,
                  scorers=str(q.scorers), quantile_buckets=str(sorted(frame["kind"].unique().to_list())),
                  units_left_out=len(left_out))
        out.check(SCORER_EXCERPTS, "held_out_from_the_explainer", layer,
                  validation.scorer_excerpts_held_out(frame, excerpts, count, [n for _, n in left_out]))
    return out.result(SCORER_EXCERPTS)


def scorer_step(name: str, backend: str, pool: str | None, judgements_text: str, scores_text: str):
    """The multi-asset of one scorer: `<name>_judgements` and `<name>_scores`, judged by the resource `backend`
    (`scorer_llm` or `embedder`) for every layer of the run in one wave."""
    judgements, scores = SCORER_ASSETS[name]

    def spec(asset: str, deps, description: str) -> dg.AssetSpec:
        return dg.AssetSpec(asset, deps=with_settings(asset, deps), partitions_def=layer_variant,
                            code_version=CODE_VERSIONS[asset],
                            automation_condition=FOLLOW_UPSTREAM, description=description)

    @dg.multi_asset(
        name=name, op_tags=step_tags(name), group_name=SCORERS_GROUP, pool=pool, can_subset=False,
        backfill_policy=SINGLE_RUN, required_resource_keys={backend, "quality", "storage"},
        specs=[spec(judgements, list(JUDGED), judgements_text),
               spec(scores, [judgements, EXPLANATIONS, BASELINE_EXPLANATIONS], scores_text)],
        check_specs=check_specs(judgements, scores),
    )
    @one_writer
    def step(context: dg.AssetExecutionContext):
        storage = context.resources.storage
        variant, layers_run = variant_of(context), layers_of(context)
        settings = VariantSettings(storage.path(), variant)
        with bad_input_fails_the_run():
            q = settings("quality", context.resources.quality).checked()
        on = name in q.scorers
        out = Outputs(context, storage.path(), variant)
        found = {asset: {layer: out.read(asset, layer) for layer in layers_run} for asset in JUDGED}
        made, accounting, model = None, {}, ""
        if on:
            resource = settings(backend, getattr(context.resources, backend))
            with bad_input_fails_the_run():
                judge = resource.build(storage, log=context.log.info)
            scorer = make_scorer(name, q.scorer_batch, getattr(resource, "seed", 0))
            every = {asset: pl.concat(list(frames.values())) for asset, frames in found.items()}
            try:
                # every layer of the run, ours and the baselines, in one wave
                started, before = time.perf_counter(), judge.stats.snapshot()
                made = stages.judged(scorer, every[EXPLANATIONS], every[BASELINE_EXPLANATIONS],
                                     every[SCORER_EXCERPTS], judge, what=f"{name}, {variant} layers {layers_run}",
                                     log=context.log.info)
                accounting = {**llm_accounting(judge, before, started),
                              "llm_accounting_covers_layers": str(layers_run)}
                accounting.update(llm_cost_per(accounting, {
                    "unit": made.judgements.select("layer", "neuron").n_unique(), "judgement": len(made.judgements)}))
                model = judge.name
            finally:
                judge.close()
        controlled = variant_control(storage.path(), variant) if on else None
        for layer in layers_run:
            mine = made.judgements.filter(pl.col("layer") == layer) if made else empty(judgements)
            scored = made.scores.filter(pl.col("layer") == layer) if made else empty(scores)
            out.write(judgements, mine, layer, runs=on, scorer=model, judged=len(mine),
                      failed=int((mine["status"] != STATUS_OK).sum()),
                      prompt_template_sha=PROMPT_SHAS.get(name, ""), **accounting)
            out.check(judgements, "judgements_well_formed", layer,
                      validation.judgements_well_formed(mine, found[SCORER_EXCERPTS][layer]))
            out.check(judgements, FAILURES, layer,
                      validation.failure_share(mine, f"{name} judgements", blocking=False))
            valid = scored["score"].drop_nans().drop_nulls()
            judged, control = judge_control(controlled, scored, variant, name) if on else (None, None)
            out.write(scores, scored, layer, runs=on, neurons=len(scored), scored=len(valid),
                      metric=scored["metric"][0] if len(scored) else "", mean_score=finite_mean(scored["score"]),
                      median_score=float(valid.median()) if len(valid) else float("nan"),
                      **baseline_metadata(scored, SIMULATED_BASELINES), **control_metadata(judged, control, name))
            out.check(scores, "scorer_scores_valid", layer,
                      validation.scorer_scores_valid(scored, found[EXPLANATIONS][layer], on))
            out.check(scores, JUDGE, layer, validation.judge_separates(judged, name, control))
        yield from out.results(judgements, scores)

    return step


detection = scorer_step(
    DETECTION, "scorer_llm", LLM_POOL,
    "Detection: per explanation (ours and the baselines') × held-out excerpt, the scorer LLM's verdict on whether the "
    "neuron fires on it (no rows when detection is off).",
    "Detection: balanced accuracy (precision, recall, F1) of each neuron's explanation, beside the baselines'.")
fuzzing = scorer_step(
    FUZZING, "scorer_llm", LLM_POOL,
    "Fuzzing: per explanation × activating excerpt shown with its strongest tokens marked, or as many others, the "
    "scorer LLM's verdict on whether the marks fit the explanation (no rows when fuzzing is off).",
    "Fuzzing: balanced accuracy (precision, recall, F1) of each neuron's explanation, beside the baselines'.")
embedding = scorer_step(
    EMBEDDING, "embedder", None,
    "Embedding: per explanation × held-out excerpt, the cosine similarity of their sentence embeddings (no rows "
    "when the embedding scorer is off).",
    "Embedding: ROC AUC of the similarities, activating vs non-activating, per neuron, beside the baselines'.")
