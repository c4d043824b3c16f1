"""A stored explanation's explainer prompt, rebuilt as its backend sent it and checked against the stored hash
(`rebuild_prompt`, for lineage and the viewer).

Made from the neuron's explain excerpts with the explainer's own template (`explainer.PromptFit`, as fitted to the
context) and the sent form of the backend kind its `explainer` name gives (`sent_prompts`): pure text, so a report
rebuilds a prompt with no LLM backend importable.
"""

from __future__ import annotations

from collections.abc import Mapping

from ndx_pipeline.core.llm.sent_prompts import rebuild_sent_prompt, sent_prompt_sha256
from ndx_pipeline.core.method.explainer import LEAD_IN, PromptFit, prompt_sha256


def rebuild_prompt(chosen: Mapping, shown: list, output: tuple | None = None) -> dict:
    """The explainer prompt of a stored explanation as its backend sent it, rebuilt from the neuron's explain
    excerpts (`shown`, in rank order), and whether its hash is the stored one.

    Keys: sent (the rebuilt sent prompt, None when it cannot be rebuilt), messages and assistant_prefix (the
    template, as fitted), digest (whether the "Strongest tokens" line was in it: rows do not say, so both are
    tried), excerpts_shown, prompt_fitted, sha256 (of `sent`), verified, note (why not verified, None when it is).
    `output`: the unit's output tokens (promoted, suppressed); prompts listing them (`quality.explainer_logits`) are
    tried after those without, since rows do not say either.
    """
    stored = chosen.get("prompt_sha256")
    fit = PromptFit.parse(chosen.get("prompt_fitted"), chosen.get("excerpts_shown"), len(shown))
    tried = []
    for digest, listed in [(True, None), (False, None), *([(True, output), (False, output)] if output else [])]:
        messages = fit.messages(shown, digest, listed)
        sent, why = rebuild_sent_prompt(chosen.get("explainer"), messages, LEAD_IN)
        sha = sent_prompt_sha256(sent) if sent is not None else None
        tried.append({"sent": sent, "messages": messages, "assistant_prefix": LEAD_IN, "digest": digest,
                      "output_tokens_listed": listed is not None,
                      "excerpts_shown": fit.excerpts, "prompt_fitted": chosen.get("prompt_fitted"), "sha256": sha,
                      "verified": bool(stored) and sha == stored, "note": why})
        if sent is None or sha == stored:
            break
    out = next((t for t in tried if t["verified"]), tried[0])
    if not chosen:
        out["note"] = "no explanation row to check the prompt against"
    elif out["sent"] is not None and not out["verified"]:
        old = stored in {prompt_sha256(t["messages"]) for t in tried}
        out["note"] = ("the stored hash is of the template messages (rows written before the sent prompt was "
                       "hashed); the prompt shown is rebuilt as sent, not verified" if old else
                       "the stored hash differs from the rebuilt prompt's")
    return out
