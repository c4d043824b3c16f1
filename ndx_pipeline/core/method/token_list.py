"""Token-list explanations: an explanation written from the neuron's strongest tokens alone, with no context.

`strongest_tokens` ranks the distinct tokens of the neuron's `explain` excerpts (the same excerpts the explainer
sees, so nothing scored leaks in) by their highest activation. From that list either a fixed template writes the
explanation (`template_explanation`, no LLM) or the explainer LLM does (`token_list_messages`, completed after the
same lead-in as the explainer). Both are simulated and scored like any explanation: a point of comparison between
the lookup table (tokens, with their corpus means) and a full explanation (tokens in context).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import polars as pl

from ndx_pipeline.core.contract import (
    EXPLAIN,
    EXPLANATION_SCHEMA,
    STATUS_FAILED,
    STATUS_OK,
    frame,
    token_list_explanation_id,
)
from ndx_pipeline.core.llm.backend import RecordableLLMError
from ndx_pipeline.core.llm.sent_prompts import sent_prompt_sha256
from ndx_pipeline.core.method.explainer import (
    FEW_SHOTS,
    LEAD_IN,
    MAX_EXPLANATION_TOKENS,
    TEMPERATURE,
    ExplanationParseError,
    neuron_seed,
    parse_explanation,
    shown_token,
    token_list_text,
)
from ndx_pipeline.core.method.explainer import strongest_tokens as _strongest
from ndx_pipeline.core.method.work import Work, run_together
from ndx_pipeline.core.progress import Progress

__all__ = ["explain_token_lists", "shown_token", "strongest_tokens", "template_explanation", "token_list_messages",
           "token_list_text"]

TOKEN_LIST_SIZE = 8
TEMPLATE_EXPLAINER = "token-list-template"
SEED_OFFSET = 104_729  # token-list samples use other seeds than the explainer's

TOKEN_LIST_SYSTEM = (
    "You are looking inside a language model at one neuron, a unit that fires on some pattern in text. You are "
    "given only the tokens it fires on most strongly, strongest first, each in double quotes. Say in a few words "
    "what these tokens have in common."
)


def strongest_tokens(excerpts: Sequence[tuple[Sequence[str], Sequence[float]]], n: int = TOKEN_LIST_SIZE) -> list[str]:
    """Up to n distinct tokens with the highest activation over the excerpts (positive activations only),
    strongest first; ties keep the order of first appearance."""
    return _strongest(excerpts, n)


def template_explanation(tokens: Sequence[str]) -> str:
    """The fixed-template explanation (no LLM)."""
    listed = token_list_text(tokens)
    return f"the tokens {listed}" if listed else "no token in particular"


def _user(tokens: Sequence[str]) -> str:
    return f"Strongest tokens: {token_list_text(tokens) or '(none)'}"


def token_list_messages(tokens: Sequence[str]) -> list[dict]:
    """Chat messages for one neuron; the answer continues from `LEAD_IN`. The worked examples are the explainer's
    few-shot neurons reduced to their strongest tokens."""
    messages = [{"role": "system", "content": TOKEN_LIST_SYSTEM}]
    for shot in FEW_SHOTS:
        messages.append({"role": "user", "content": _user(strongest_tokens(shot.excerpts))})
        messages.append({"role": "assistant", "content": f"{LEAD_IN} {shot.explanation}."})
    messages.append({"role": "user", "content": _user(tokens)})
    return messages


def token_list_work(excerpts: pl.DataFrame, backend=None, n_tokens: int = TOKEN_LIST_SIZE,
                    max_tokens: int = MAX_EXPLANATION_TOKENS, temperature: float = TEMPERATURE, seed: int = 0) -> Work:
    """One token-list explanation per neuron from its `explain` excerpts: by `backend` (an LLMBackend) reading only
    the strongest tokens, or by the fixed template when backend is None. Explanations-shaped rows (explanation_id
    `<layer>/<neuron>/token_list`) plus `strongest_tokens` (list of str)."""
    explain = excerpts.filter(pl.col("split") == EXPLAIN).sort(["layer", "neuron", "rank"])
    items = []
    for (layer, neuron), group in explain.group_by(["layer", "neuron"], maintain_order=True):
        shown = list(zip(group["tokens"].to_list(), group["activations"].to_list()))
        items.append((int(layer), int(neuron), strongest_tokens(shown, n_tokens)))

    def run(item) -> dict:
        layer, neuron, tokens = item
        started = time.perf_counter()
        row = {"layer": layer, "neuron": neuron, "explanation_id": token_list_explanation_id(layer, neuron),
               "status": STATUS_OK, "strongest_tokens": tokens}
        if backend is None:
            row.update(explanation=template_explanation(tokens), explainer=TEMPLATE_EXPLAINER)
        else:
            messages = token_list_messages(tokens)
            row.update(explainer=f"token-list:{backend.name}",
                       prompt_sha256=sent_prompt_sha256(backend.sent_prompt(messages, LEAD_IN)))
            try:
                completion = backend.chat(messages, LEAD_IN, max_tokens, temperature,
                                          neuron_seed(seed + SEED_OFFSET, layer, neuron))
                row.update(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
                           explanation=parse_explanation(completion.text))
            except (ExplanationParseError, RecordableLLMError) as exc:  # fails this neuron only
                row.update(status=STATUS_FAILED, error=str(exc))
        row["seconds"] = time.perf_counter() - started
        return row

    return Work(items, run, lambda rows: frame(rows, EXPLANATION_SCHEMA, {"strongest_tokens": pl.List(pl.String)}))


def explain_token_lists(excerpts: pl.DataFrame, backend=None, n_tokens: int = TOKEN_LIST_SIZE,
                        max_tokens: int = MAX_EXPLANATION_TOKENS, temperature: float = TEMPERATURE, seed: int = 0,
                        progress: Progress | None = None) -> pl.DataFrame:
    """`token_list_work` run at once (without a backend: the template, no LLM)."""
    work = token_list_work(excerpts, backend, n_tokens, max_tokens, temperature, seed)
    if backend is None:
        return work.table([work.run(item) for item in work.items])
    return run_together(backend, [work], progress)[0]
