"""Automation: the conditions assets carry, the jobs, the corpus- and dictionary-folder sensors, the variants-file
sensor, the nightly re-scoring schedule, and the staleness query behind it. Each run they request carries the layers
of one variant, and each sensor acts on the variants it was asked about only.

Declarative automation: every downstream asset carries an AutomationCondition that follows its upstream layer.
Dagster evaluates them only while the `default_automation_condition_sensor` is running: switch it on in the UI
(Automation → sensors) or with `dagster sensor start default_automation_condition_sensor`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._time import get_current_datetime

from ndx_pipeline.core.contract import (
    ACTIVATION_RECORDS,
    BASELINE_EXPLANATIONS,
    BASELINE_SIMULATIONS,
    CALIBRATION_SIMULATIONS,
    CORPUS,
    EXPLANATIONS,
    NEURON_VIEWER,
    OUTPUT_TOKENS,
    RELEASE,
    SCORER_ASSETS,
    SCORER_EXCERPTS,
    SCORES,
    SIMULATIONS,
    TOKEN_TABLE,
    TOP_EXCERPTS,
)
from ndx_pipeline.core.data.corpus import TEXT_SUFFIXES
from ndx_pipeline.core.data.dictionaries import load_dictionary
from ndx_pipeline.core.data.units import DICTIONARY, dictionary_folders
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.variants import default_name, read_variants, record_variant, variants_file
from ndx_pipeline.defs.partitions import (
    EXTRACT_WITH_TAG,
    VARIANT,
    contiguous_ranges,
    layer_and_variant,
    layer_variant,
    partition_key,
    range_tags,
    variants,
)
from ndx_pipeline.defs.pools import release_stale_runs
from ndx_pipeline.defs.resources import StorageResource
from ndx_pipeline.defs.versioning import settings_observations

# Downstream layers follow their upstream layer; activation_records re-extracts, when the corpus changes, only the
# layers that already have records (the corpus is one asset for all layers: "all missing layers" would be every
# layer of the model).
FOLLOW_UPSTREAM = (
    dg.AutomationCondition.any_deps_updated()
    & ~dg.AutomationCondition.any_deps_missing()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("follow upstream updates")
REFRESH_MATERIALIZED = (FOLLOW_UPSTREAM & ~dg.AutomationCondition.missing()).with_label(
    "re-extract layers already materialized")

MAIN_JOB = "explain_neurons"
EXTRACTION_JOB = "extract_activations"
EXPLAIN_AND_SCORE_JOB = "explain_and_score"
EXTRACTION_ASSETS = (CORPUS, ACTIVATION_RECORDS, TOKEN_TABLE, OUTPUT_TOKENS, TOP_EXCERPTS)
EXPLAIN_AND_SCORE_ASSETS = (EXPLANATIONS, BASELINE_EXPLANATIONS, CALIBRATION_SIMULATIONS, SIMULATIONS,
                            BASELINE_SIMULATIONS, SCORES, SCORER_EXCERPTS,
                            *(a for pair in SCORER_ASSETS.values() for a in pair), NEURON_VIEWER)

# Materialized only when asked for (the UI, `dagster asset materialize`): outside every job here, so neither
# `ndx-pipeline run` (the main job) nor a sensor or the schedule ever launches them.
ON_DEMAND_ASSETS = (RELEASE,)

explain_neurons = dg.define_asset_job(
    MAIN_JOB, selection=dg.AssetSelection.all() - dg.AssetSelection.assets(*ON_DEMAND_ASSETS),
    partitions_def=layer_variant,
    description="corpus → activation_records → … → scores → neuron_viewer for the chosen layers.")
extract_activations = dg.define_asset_job(
    EXTRACTION_JOB, selection=dg.AssetSelection.assets(*EXTRACTION_ASSETS), partitions_def=layer_variant,
    description="The subject-model stages: corpus, activation_records (+ token_table), output_tokens, top_excerpts.")
explain_and_score = dg.define_asset_job(
    EXPLAIN_AND_SCORE_JOB, selection=dg.AssetSelection.assets(*EXPLAIN_AND_SCORE_ASSETS), partitions_def=layer_variant,
    description="The LLM stages: explanations, simulations, scores (with their baselines), the scorers beside "
                "simulation (detection, fuzzing, embedding) and the viewer.")


def materialized_layers(instance: dg.DagsterInstance, asset: str = ACTIVATION_RECORDS) -> dict[str, list[int]]:
    """variant → its layers that have a materialization of `asset`."""
    out: dict[str, list[int]] = {}
    for key in instance.get_materialized_partitions(dg.AssetKey(asset)):
        if "|" not in key:  # a partition of the layout from before variants (see `ndx-pipeline migrate`)
            continue
        layer, variant = layer_and_variant(key)
        out.setdefault(variant, []).append(layer)
    return {variant: sorted(found) for variant, found in sorted(out.items())}


def variant_requests(found: dict[str, list[int]], run_key: str, tags: dict | None = None,
                     one_pass: bool = False) -> list[dg.RunRequest]:
    """One run per variant and contiguous range of its layers (each run with that variant's own settings).
    one_pass: the first variant's runs read the other variants' unit sets of their layers in their extraction pass
    (EXTRACT_WITH_TAG), so that the subject model runs once for them all (each of the others' runs, when it comes
    second, takes what was read for it; when it comes first, it extracts, and the pass leaves it out)."""
    first = next(iter(found), None)
    joint = {EXTRACT_WITH_TAG: ",".join(v for v in found if v != first)} if one_pass and len(found) > 1 else {}
    return [dg.RunRequest(run_key=f"{run_key}-{variant}-layers-{lo}-{hi}",
                          tags={**(tags or {}), **(joint if variant == first else {}), **range_tags(variant, lo, hi)})
            for variant, at in found.items() for lo, hi in contiguous_ranges(at)]


def release_killed_runs(context) -> None:
    """What a sensor or schedule does first: the runs whose process is gone are marked failed and their pool slots
    freed (`pools.release_stale_runs`), each said in one line of its log, so that the runs it requests are not kept
    waiting by them."""
    for line in release_stale_runs(context.instance):
        context.log.info(line)


def folder_state(root: Path) -> dict[str, list[int]]:
    """relative path → [size, mtime_ns] of every corpus file under root."""
    if root.is_file():
        st = root.stat()
        return {root.name: [st.st_size, st.st_mtime_ns]}
    state = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES:
            st = p.stat()
            state[p.relative_to(root).as_posix()] = [st.st_size, st.st_mtime_ns]
    return state


CORPUS_ENV, DICTIONARIES_ENV = "NDX_CORPUS", "NDX_DICTIONARIES"


def watched_folder(path: str | None, env: str, what: str, unset_note: str = "") -> Path | dg.SkipReason:
    """The folder a sensor watches (given, else from the environment variable), or why it skips."""
    path = path or os.environ.get(env)
    if not path:
        return dg.SkipReason(f"no {what} configured (set {env}){unset_note}")
    root = Path(path).expanduser()
    return root if root.exists() else dg.SkipReason(f"{what} {root} does not exist")


def corpus_sensor(corpus_path: str | None = None):
    @dg.sensor(name="corpus_folder_sensor", job_name=MAIN_JOB, minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.STOPPED,
               description="Watches the corpus folder: a new, changed or removed file re-runs the corpus and, for "
                           "every variant, each of its layers that already has activation records (with that "
                           "variant's own settings).")
    def sensor(context: dg.SensorEvaluationContext):
        release_killed_runs(context)
        root = watched_folder(corpus_path, CORPUS_ENV, "corpus folder", "; the bundled corpus never changes")
        if isinstance(root, dg.SkipReason):
            return root
        cursor = json.loads(context.cursor) if context.cursor else {"generation": 0, "state": None}
        state = folder_state(root)
        if cursor["state"] is None:
            context.update_cursor(json.dumps({"generation": 0, "state": state}))
            return dg.SkipReason(f"started watching {len(state)} corpus files under {root}")
        if state == cursor["state"]:
            return dg.SkipReason("corpus unchanged")
        before = cursor["state"]
        changed = sorted((set(state) ^ set(before)) | {k for k in state if k in before and state[k] != before[k]})
        # The generation number makes every change a new run key, so a later change (even one back to an earlier
        # state) is never deduplicated against an old run.
        generation = cursor["generation"] + 1
        found = materialized_layers(context.instance)
        context.log.info(f"corpus change {generation}: {len(changed)} files ({changed[:5]}); layers by variant "
                         f"{found}")
        context.update_cursor(json.dumps({"generation": generation, "state": state}))
        tags = {"ndx/corpus_generation": str(generation)}
        if not found:
            return [dg.RunRequest(run_key=f"corpus-{generation}", asset_selection=[dg.AssetKey(CORPUS)],
                                  tags=tags)]
        return variant_requests(found, f"corpus-{generation}", tags, one_pass=True)

    return sensor


corpus_folder_sensor = corpus_sensor()  # watches NDX_CORPUS, read at each evaluation


def dictionary_state(root: Path) -> dict[str, list[int]]:
    """dictionary folder → [size, mtime_ns] of its files (cfg.json and weights), for every dictionary under root."""
    state = {}
    for folder in dictionary_folders(root):
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else [folder]
        stats = [p.stat() for p in files]
        state[folder.as_posix()] = [sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)]
    return state


def dictionary_settings(folder: str) -> dict:
    """A dictionary's variant: its latents (the other settings stay as the resources are configured)."""
    return {"selection": {"units": DICTIONARY, "dictionary": folder}}


def dictionary_sensor(dictionaries_path: str | None = None):
    @dg.sensor(name="dictionary_folder_sensor", job_name=MAIN_JOB, minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.STOPPED,
               description="Watches a folder of sparse dictionaries (SAELens or sparsify folders, NDX_DICTIONARIES): "
                           "a new or changed one becomes a variant of its own (named after its folder, declared in "
                           "the variants file) and runs the whole graph for its layer, for that variant only.")
    def sensor(context: dg.SensorEvaluationContext, storage: StorageResource):
        release_killed_runs(context)
        root = watched_folder(dictionaries_path, DICTIONARIES_ENV, "dictionary folder")
        if isinstance(root, dg.SkipReason):
            return root
        before = json.loads(context.cursor) if context.cursor else {}
        state = dictionary_state(root)
        changed = [folder for folder in state if before.get(folder) != state[folder]]
        context.update_cursor(json.dumps(state))
        requests, names, observations = [], [], []
        for folder in changed:
            try:
                d = load_dictionary(folder)
            except NdxInputError as e:  # one bad file does not hold up the others; it is retried when it changes
                context.log.warning(f"dictionary {folder} skipped: {e}")
                continue
            if d.layer is None or d.hook is None:
                context.log.warning(f"dictionary {folder} skipped: its files do not say which layer and hook it "
                                    "reads (run it with ndx-pipeline run --dictionary … --dictionary-hook …).")
                continue
            name = default_name(DICTIONARY, folder)
            record_variant(variants_file(storage.path()), name, dictionary_settings(folder))
            observations += settings_observations(context.instance, name, dictionary_settings(folder))
            context.log.info(f"new dictionary for layer {d.layer}: {d.describe()}; variant {name}")
            names.append(name)
            requests.append(dg.RunRequest(
                run_key=f"dictionary-{folder}-{state[folder][0]}-{state[folder][1]}",
                partition_key=str(partition_key(d.layer, name)), tags={"ndx/dictionary": folder, "ndx/variant": name}))
        if not requests:
            return dg.SkipReason(f"no new dictionary among {len(state)} under {root}")
        new = [n for n in dict.fromkeys(names) if not context.instance.has_dynamic_partition(VARIANT, n)]
        return dg.SensorResult(run_requests=requests, asset_events=observations,
                               dynamic_partitions_requests=[variants.build_add_request(new)] if new else [])

    return sensor


dictionary_folder_sensor = dictionary_sensor()  # watches NDX_DICTIONARIES, read at each evaluation


def stale_layers(instance: dg.DagsterInstance, asset_graph, assets=EXPLAIN_AND_SCORE_ASSETS) -> dict[str, list[int]]:
    """variant → its layers whose LLM-stage partitions are stale (code or upstream data changed since they were
    made)."""
    resolver = stale_status_resolver(instance, asset_graph)
    out: dict[str, list[int]] = {}
    for variant, at in materialized_layers(instance, SCORES).items():
        for layer in at:
            key = partition_key(layer, variant)
            if any(resolver.get_status(dg.AssetKey(a), key) == StaleStatus.STALE for a in assets
                   if a != NEURON_VIEWER):
                out.setdefault(variant, []).append(layer)
    return out


def stale_status_resolver(instance: dg.DagsterInstance, asset_graph):
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=asset_graph)
    return CachingStaleStatusResolver(instance=instance, asset_graph=asset_graph, loading_context=view)


@dg.schedule(name="nightly_rescore_stale_layers", cron_schedule="0 3 * * *", job_name=EXPLAIN_AND_SCORE_JOB,
             default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Every night: re-explain, re-simulate and re-score the layers whose LLM stages are stale "
                         "(a changed prompt, model or upstream data). Cached answers cost nothing.")
def nightly_rescore(context: dg.ScheduleEvaluationContext):
    release_killed_runs(context)
    found = stale_layers(context.instance, context.repository_def.asset_graph)
    if not found:
        return dg.SkipReason("no stale layer")
    return variant_requests(found, f"rescore-{context.scheduled_execution_time:%Y%m%d}")


@dg.sensor(name="variants_file_sensor", minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Makes every variant declared in the variants file (NDX_VARIANTS, else "
                       "<storage>/variants.yaml) a key of the variant partition dimension, so the UI can launch it, "
                       "and observes the versions of its settings (a changed variant's partitions turn stale). It "
                       "launches nothing.")
def variants_file_sensor(context: dg.SensorEvaluationContext, storage: StorageResource):
    release_killed_runs(context)
    path = variants_file(storage.path())
    try:
        declared = read_variants(path)
    except NdxInputError as e:
        return dg.SkipReason(str(e))
    new = [name for name in declared if not context.instance.has_dynamic_partition(VARIANT, name)]
    observations = []
    for name, fields in declared.items():
        try:
            observations += settings_observations(context.instance, name, fields)
        except Exception as e:  # a field a resource does not take: that variant only, said in the log
            context.log.warning(f"variant {name} in {path}: settings not observed ({str(e).splitlines()[0]})")
    if not new and not observations:
        return dg.SkipReason(f"{len(declared)} variants in {path}, none new or changed")
    return dg.SensorResult(dynamic_partitions_requests=[variants.build_add_request(new)] if new else [],
                           asset_events=observations)
