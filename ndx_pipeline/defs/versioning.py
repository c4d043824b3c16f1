"""Code versions: each asset's version hashes what changes its output — the stage's method revision, its prompt
templates and few-shot examples, and the configured models and counts it uses — and nothing else, so changing the
simulator makes `simulations` (and, through its new data, `scores`) stale and leaves every upstream asset fresh.

The values come from the resources as the definitions bind them (environment variables, see README); a one-off
launchpad override runs with other settings but is not a new version of the asset.

A variant's own settings (the variants file) are versioned per partition instead: each group of stages depends on an
observed asset `variant_settings/<group>`, partitioned by variant, whose data version hashes the code versions its
stages would have under that variant's settings (`observe_settings`). Changing a variant's simulator observes a new
version of `variant_settings/simulator` for that variant alone: its `simulations` and `baseline_simulations`
partitions turn stale, and nothing of another variant, nor any other stage of its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dagster as dg

from ndx_pipeline.core.contract import (
    ACTIVATION_RECORDS,
    ASSETS,
    BASELINE_EXPLANATIONS,
    BASELINE_SIMULATIONS,
    CALIBRATION_SIMULATIONS,
    CORPUS,
    DETECTION,
    EMBEDDING,
    EXPLANATIONS,
    FUZZING,
    LOOKUP_BASELINE,
    NEURON_VIEWER,
    OUTPUT_TOKENS,
    SCORER_ASSETS,
    SCORER_EXCERPTS,
    SCORES,
    SIMULATED_BASELINES,
    SIMULATIONS,
    TOKEN_TABLE,
    TOP_EXCERPTS,
)
from ndx_pipeline.core.method.detection import detection_messages
from ndx_pipeline.core.method.explainer import explainer_messages
from ndx_pipeline.core.method.fuzzing import fuzzing_messages
from ndx_pipeline.core.method.judging import Shown, excerpt_text
from ndx_pipeline.core.method.simulator import simulation_prompt
from ndx_pipeline.core.method.token_list import token_list_messages
from ndx_pipeline.core.variants import VARIANT_RESOURCES, declared_settings
from ndx_pipeline.defs.partitions import VARIANT
from ndx_pipeline.defs.resources import default_resources

# Bump when a stage's method changes in a way that changes its output.
METHOD_REVISIONS = {asset: 1 for asset in ASSETS}
METHOD_REVISIONS[ACTIVATION_RECORDS] = 2  # unit columns; a unit that never fired gets one `dead` row
METHOD_REVISIONS[SCORER_EXCERPTS] = 2  # a window where the unit never fires is non-activating; too few: left out
METHOD_REVISIONS[EXPLANATIONS] = 2  # abbreviations by their shape (St. Louis, Jr., Inc.) no longer end the answer
NOT_VERSIONED = {"api_key_env", "max_concurrency", "timeout_s", "deadline_s", "max_attempts", "device", "batch_size",
                 "storage_dir"}
SPLIT_COUNTS = ("explain_excerpts", "score_top_excerpts", "score_random_excerpts")


def _digest(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# settings added later whose default leaves everything as it was: versioned only when set otherwise, so that
# adding them made nothing stale
LATER_DEFAULTS = {"subject_weights": "trained", "explainer_logits": False}


def _config(resource, drop=()) -> dict:
    return {k: v for k, v in resource.model_dump().items() if k not in NOT_VERSIONED and k not in drop
            and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}


def explainer_prompt_sha() -> str:
    """A hash of the explainer's prompt template: system text, few-shot examples, formatting, lead-in."""
    return _digest(explainer_messages([(["a", " b"], [0.0, 1.0])]))


def simulator_prompt_sha() -> str:
    return _digest(simulation_prompt("a pattern", ["a", " b"]).segments)


def token_list_prompt_sha() -> str:
    return _digest(token_list_messages([" a", " b"]))


def _sample_batch() -> list[Shown]:
    excerpt = {"tokens": ["a", " b"]}
    return [Shown(excerpt, True, (1,)), Shown(excerpt, False, (0,))]


def scorer_prompt_sha(scorer: str) -> str:
    """A hash of a verdict scorer's prompt template (instructions, worked example, how excerpts and marks are
    written)."""
    messages = detection_messages if scorer == DETECTION else fuzzing_messages
    return _digest(messages("a pattern", _sample_batch()), excerpt_text(["a\n", " b"], (1,)))


def code_versions(resources: dict) -> dict[str, str]:
    """asset → code version, for every asset of the contract."""
    sel = resources["selection"]
    extraction = [_config(resources["subject_model"]), _config(sel, drop=SPLIT_COUNTS)]
    explainer = _config(resources["explainer_llm"], drop=("simulator_mode", "ten_probe"))
    simulator = _config(resources["simulator_llm"], drop=("max_tokens", "temperature", "seed"))
    if simulator.get("backend") == "local":
        simulator.pop("base_url", None)
        simulator.pop("server", None)
        simulator.pop("ten_probe", None)  # a server's affair: an openai simulator's version names it (its
        # default changed what servers that write "10" as two tokens are asked: their older simulations are stale)
    q = _config(resources["quality"])
    k = q.get("explanation_candidates") or 1
    calibration = {name: q.get(name) for name in ("calibration_top_excerpts", "calibration_random_excerpts")}
    choosing = {"explanation_candidates": k, "explainer_digest": q.get("explainer_digest", True),
                **({"explainer_logits": True} if q.get("explainer_logits") else {})}
    if k > 1:  # best-of-k: the simulator takes part in choosing
        choosing["simulator"] = [simulator, simulator_prompt_sha()]
    simulated_baselines = sorted(b for b in q.get("baselines", ()) if b in SIMULATED_BASELINES)
    # the scorers beside simulation: each one's step versioned by whether it runs and what judges with it, so that
    # changing one scorer's prompt or model makes only its own two assets stale
    running = set(q.get("scorers", ()))
    scorer_llm = _config(resources["scorer_llm"], drop=("simulator_mode", "max_tokens", "temperature", "ten_probe"))
    if scorer_llm.get("backend") == "local":
        scorer_llm.pop("base_url", None)
        scorer_llm.pop("server", None)
    judges = {DETECTION: [scorer_llm, scorer_prompt_sha(DETECTION), q.get("scorer_batch")],
              FUZZING: [scorer_llm, scorer_prompt_sha(FUZZING), q.get("scorer_batch")],
              EMBEDDING: [_config(resources["embedder"])]}
    scorer_steps = {}
    for name, (judgements, scores) in SCORER_ASSETS.items():
        on = {"runs": name in running}
        scorer_steps[judgements] = [on, *judges[name]] if name in running else [on]
        scorer_steps[scores] = [on]
    inputs = {
        CORPUS: [_config(resources["corpus_source"])],
        ACTIVATION_RECORDS: extraction,
        TOKEN_TABLE: extraction + [{"counted": LOOKUP_BASELINE in q.get("baselines", ())}],
        OUTPUT_TOKENS: extraction,
        TOP_EXCERPTS: [{name: getattr(sel, name) for name in SPLIT_COUNTS}, calibration],
        EXPLANATIONS: [explainer, explainer_prompt_sha(), choosing],
        BASELINE_EXPLANATIONS: [explainer, simulated_baselines, q.get("token_list_explainer"),
                                  token_list_prompt_sha()],
        CALIBRATION_SIMULATIONS: [choosing, calibration],
        SIMULATIONS: [simulator, simulator_prompt_sha()],
        BASELINE_SIMULATIONS: [simulator, simulator_prompt_sha()],
        SCORES: [{name: q.get(name) for name in ("baselines", "lookup_held_out")}],
        SCORER_EXCERPTS: [{"any_scorer": bool(running), "scorer_excerpts": q.get("scorer_excerpts")}],
        **scorer_steps,
        NEURON_VIEWER: [],
    }
    return {asset: _digest(asset, METHOD_REVISIONS[asset], *parts) for asset, parts in inputs.items()}


# What the definitions load with (each load re-reads the environment).
CODE_VERSIONS = code_versions(default_resources())
PROMPT_SHAS = {"explainer": explainer_prompt_sha(), "simulator": simulator_prompt_sha(),
               "token_list": token_list_prompt_sha(), DETECTION: scorer_prompt_sha(DETECTION),
               FUZZING: scorer_prompt_sha(FUZZING)}


# ------------------------------------------------------------------------------------------- variants' settings

SETTINGS = "variant_settings"
# the groups of stages whose outputs the same settings change (each group's stages read the same observed version)
SETTINGS_GROUPS = {
    "extraction": (ACTIVATION_RECORDS, TOKEN_TABLE),
    "output": (OUTPUT_TOKENS,),  # a group of its own: adding it left the extraction's settings version as it was
    "excerpts": (TOP_EXCERPTS,),
    "explainer": (EXPLANATIONS, BASELINE_EXPLANATIONS, CALIBRATION_SIMULATIONS),
    "simulator": (SIMULATIONS, BASELINE_SIMULATIONS),
    "scoring": (SCORES,),
    "scorers": (SCORER_EXCERPTS, *(a for pair in SCORER_ASSETS.values() for a in pair)),
}
GROUP_OF = {asset: group for group, assets in SETTINGS_GROUPS.items() for asset in assets}


def settings_key(group: str) -> dg.AssetKey:
    return dg.AssetKey([SETTINGS, group])


def with_settings(asset: str, deps) -> list:
    """`deps` of a layer asset, and the observed settings of its variant that its output depends on."""
    if asset not in GROUP_OF:
        return list(deps)
    return [*deps, dg.AssetDep(settings_key(GROUP_OF[asset]),
                               partition_mapping=dg.MultiToSingleDimensionPartitionMapping(
                                   partition_dimension_name=VARIANT))]


def settings_versions(resources: dict) -> dict[str, str]:
    """group → the version of a variant's settings for that group: a hash of its stages' code versions under
    `resources` (the resources with the variant's fields applied)."""
    versions = code_versions(resources)
    return {group: _digest(group, [versions[a] for a in assets]) for group, assets in SETTINGS_GROUPS.items()}


def variant_resources(declared: dict) -> dict:
    """The resources as the definitions bind them, with a variant's declared fields over the per-variant ones."""
    resources = default_resources()
    for name in VARIANT_RESOURCES:
        fields = declared.get(name) or {}
        if fields:
            resource = resources[name]
            resources[name] = type(resource)(**{**resource.model_dump(), **fields})
    return resources


def settings_observations(instance: dg.DagsterInstance, variant: str, declared: dict) -> list[dg.AssetObservation]:
    """The observations of `variant`'s settings (its declared fields, see `variants.read_variants`) whose version
    differs from the one last observed for it: none when nothing changed."""
    out = []
    for group, version in settings_versions(variant_resources(declared)).items():
        key = settings_key(group)
        last = instance.fetch_observations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[variant]),
                                           limit=1).records
        if last and (last[0].asset_observation.tags or {}).get("dagster/data_version") == version:
            continue
        out.append(dg.AssetObservation(asset_key=key, partition=variant, tags={"dagster/data_version": version},
                                       description=f"settings of variant {variant} for its {group} stages"))
    return out


def observe_settings(instance: dg.DagsterInstance, storage_dir: Path, variant: str) -> list[str]:
    """Record on `instance` the versions of `variant`'s settings (from the variants file beside `storage_dir`) that
    changed since they were last observed; returns the groups whose version changed."""
    changed = settings_observations(instance, variant, declared_settings(storage_dir, variant))
    for event in changed:
        instance.report_runless_asset_event(event)
    return [event.asset_key.path[-1] for event in changed]
