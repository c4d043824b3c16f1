"""Code versions: each asset's version hashes what changes its output — the stage's method revision, its prompt
templates and few-shot examples, and the configured models and counts it uses — and nothing else, so changing the
simulator makes `simulations` (and, through its new data, `scores`) stale and leaves every upstream asset fresh.

The values come from the resources as configured in the Definitions (environment variables, see README); a
one-off launchpad override runs with other settings but is not a new version of the asset.
"""

from __future__ import annotations

import hashlib
import json

from ndx_pipeline.core.method.explainer import explainer_messages
from ndx_pipeline.core.method.simulator import simulation_prompt

# Bump when a stage's method changes in a way that changes its output.
METHOD_REVISIONS = {
    "corpus": 1, "activation_records": 1, "top_excerpts": 1, "explanations": 1, "simulations": 1, "scores": 1,
    "neuron_viewer": 1,
}
NOT_VERSIONED = {"api_key", "max_concurrency", "timeout_s", "deadline_s", "max_attempts", "device", "batch_size",
                 "storage_dir"}


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
    from ndx_pipeline.core.method.token_list import token_list_messages

    return _digest(token_list_messages([" a", " b"]))


def code_versions(resources: dict) -> dict[str, str]:
    sel = resources["selection"]
    extraction = _config(sel, drop=("explain_excerpts", "score_top_excerpts", "score_random_excerpts"))
    splits = {k: getattr(sel, k) for k in ("explain_excerpts", "score_top_excerpts", "score_random_excerpts")}
    explainer = _config(resources["explainer_llm"], drop=("simulator_mode",))
    simulator = _config(resources["simulator_llm"], drop=("max_tokens", "temperature", "seed"))
    if simulator.get("backend") == "local":
        simulator.pop("base_url", None)
        simulator.pop("server", None)
    quality = resources.get("quality")
    q = _config(quality) if quality is not None else {}
    token_table = "lookup" in q.get("baselines", ())
    calibration = {k: q.get(k) for k in ("calibration_top_excerpts", "calibration_random_excerpts")}
    choosing = {k: q.get(k) for k in ("explanation_candidates", "baselines", "token_list_explainer")}
    if (q.get("explanation_candidates") or 1) > 1:  # best-of-k: the simulator takes part in choosing
        choosing["simulator"] = [simulator, simulator_prompt_sha()]
    inputs = {
        "corpus": [_config(resources["corpus_source"])],
        "activation_records": [_config(resources["subject_model"]), extraction] + ([{"token_table": True}]
                                                                                    if token_table else []),
        "top_excerpts": [splits, calibration],
        "explanations": [explainer, explainer_prompt_sha(), choosing, token_list_prompt_sha()],
        "simulations": [simulator, simulator_prompt_sha()],
        "scores": [{k: q.get(k) for k in ("baselines", "lookup_held_out")}],
        "neuron_viewer": [],
    }
    return {asset: _digest(asset, METHOD_REVISIONS[asset], *parts) for asset, parts in inputs.items()}
