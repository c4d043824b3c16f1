"""Code versions: each asset's version hashes what changes its output — the stage's method revision, its prompt
templates and few-shot examples, and the configured models and counts it uses — and nothing else, so changing the
simulator makes `simulations` (and, through its new data, `scores`) stale and leaves every upstream asset fresh.

The values come from the resources as the definitions bind them (environment variables, see README); a one-off
launchpad override runs with other settings but is not a new version of the asset.
"""

from __future__ import annotations

import hashlib
import json

from ndx_pipeline.core import contract as c
from ndx_pipeline.core.contract import LOOKUP_BASELINE
from ndx_pipeline.core.method.explainer import explainer_messages
from ndx_pipeline.core.method.simulator import simulation_prompt
from ndx_pipeline.core.method.token_list import token_list_messages
from ndx_pipeline.defs.resources import default_resources

# Bump when a stage's method changes in a way that changes its output.
METHOD_REVISIONS = {asset: 1 for asset in c.ASSETS}
NOT_VERSIONED = {"api_key_env", "max_concurrency", "timeout_s", "deadline_s", "max_attempts", "device", "batch_size",
                 "storage_dir"}
SPLIT_COUNTS = ("explain_excerpts", "score_top_excerpts", "score_random_excerpts")


def _digest(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _config(resource, drop=()) -> dict:
    return {k: v for k, v in resource.model_dump().items() if k not in NOT_VERSIONED and k not in drop}


def explainer_prompt_sha() -> str:
    """A hash of the explainer's prompt template: system text, few-shot examples, formatting, lead-in."""
    return _digest(explainer_messages([(["a", " b"], [0.0, 1.0])]))


def simulator_prompt_sha() -> str:
    return _digest(simulation_prompt("a pattern", ["a", " b"]).segments)


def token_list_prompt_sha() -> str:
    return _digest(token_list_messages([" a", " b"]))


def code_versions(resources: dict) -> dict[str, str]:
    """asset → code version, for every asset of the contract."""
    sel = resources["selection"]
    extraction = [_config(resources["subject_model"]), _config(sel, drop=SPLIT_COUNTS)]
    explainer = _config(resources["explainer_llm"], drop=("simulator_mode",))
    simulator = _config(resources["simulator_llm"], drop=("max_tokens", "temperature", "seed"))
    if simulator.get("backend") == "local":
        simulator.pop("base_url", None)
        simulator.pop("server", None)
    q = _config(resources["quality"])
    k = q.get("explanation_candidates") or 1
    calibration = {name: q.get(name) for name in ("calibration_top_excerpts", "calibration_random_excerpts")}
    choosing = {"explanation_candidates": k, "explainer_digest": q.get("explainer_digest", True)}
    if k > 1:  # best-of-k: the simulator takes part in choosing
        choosing["simulator"] = [simulator, simulator_prompt_sha()]
    simulated_baselines = sorted(b for b in q.get("baselines", ()) if b in c.SIMULATED_BASELINES)
    inputs = {
        c.CORPUS: [_config(resources["corpus_source"])],
        c.ACTIVATION_RECORDS: extraction,
        c.TOKEN_TABLE: extraction + [{"counted": LOOKUP_BASELINE in q.get("baselines", ())}],
        c.TOP_EXCERPTS: [{name: getattr(sel, name) for name in SPLIT_COUNTS}, calibration],
        c.EXPLANATIONS: [explainer, explainer_prompt_sha(), choosing],
        c.BASELINE_EXPLANATIONS: [explainer, simulated_baselines, q.get("token_list_explainer"),
                                  token_list_prompt_sha()],
        c.CALIBRATION_SIMULATIONS: [choosing, calibration],
        c.SIMULATIONS: [simulator, simulator_prompt_sha()],
        c.BASELINE_SIMULATIONS: [simulator, simulator_prompt_sha()],
        c.SCORES: [{name: q.get(name) for name in ("baselines", "lookup_held_out")}],
        c.NEURON_VIEWER: [],
    }
    return {asset: _digest(asset, METHOD_REVISIONS[asset], *parts) for asset, parts in inputs.items()}


# What the definitions load with (each load re-reads the environment).
CODE_VERSIONS = code_versions(default_resources())
PROMPT_SHAS = {"explainer": explainer_prompt_sha(), "simulator": simulator_prompt_sha(),
               "token_list": token_list_prompt_sha()}
