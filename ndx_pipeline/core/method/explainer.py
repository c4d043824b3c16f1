"""The explainer: a prompt that shows a neuron's top excerpts as token⇥activation lines, and the parsing of the one
phrase the LLM writes back.

Under the excerpts a line lists the strongest tokens ("Strongest tokens: ..."): measured on the bundled 135M model
(benchmarks/prompts.py), it cannot find the high values among hundreds of lines by itself, but it can name a token
it is shown. The answer is completed after the lead-in `LEAD_IN` and stored without it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from ndx_pipeline.core.contract import EXPLAIN, EXPLANATION_SCHEMA, explanation_id, frame
from ndx_pipeline.core.llm.backend import RecordableLLMError
from ndx_pipeline.core.method.display import display_scale, escape_token, excerpt_block
from ndx_pipeline.core.progress import Progress

LEAD_IN = "Its main job is to detect"
SPARSE_FRACTION = 0.2  # below this share of non-zero values, the excerpts are repeated with zero lines left out
MAX_EXPLANATION_TOKENS = 60
TEMPERATURE = 1.0

SYSTEM = (
    "You are looking inside a language model at one neuron, a unit that fires on some pattern in text. You will see "
    "short excerpts of text, one token per line. After each token comes a tab and how strongly the neuron fires on "
    "that token, an integer from 0 (not at all) to 10 (as strongly as it ever does here). Below the excerpts, the "
    "tokens with the highest values are listed again. Finish the sentence about the neuron with a few words naming "
    "the tokens, or the kind of tokens, that make it fire."
)
DIGEST_SIZE = 5  # tokens listed under the excerpts
DIGEST_FRACTION = 0.5  # only tokens reaching this share of the strongest activation are listed


@dataclass(frozen=True)
class FewShot:
    excerpts: tuple[tuple[tuple[str, ...], tuple[float, ...]], ...]
    explanation: str


# Our own made-up neurons: a single word, a word class, a punctuation mark and a code keyword. Short excerpts keep
# the prompt small enough for a local model on a CPU; each explanation quotes the tokens it is about, a form even a
# small model can follow (and a simulator can match against tokens). The simulator's prompt shows the first excerpt
# of the first two.
FEW_SHOTS = (
    FewShot(
        excerpts=(
            (("Salt", " and", " pepper", " are", " on", " the", " table", ",", " bread", " and", " butter", " too"),
             (0, 10, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0)),
        ),
        explanation='the word "and"',
    ),
    FewShot(
        excerpts=(
            (("We", " met", " in", " early", " March", " and", " again", " in", " June", "."),
             (0, 0, 0, 1, 10, 0, 0, 1, 9, 0)),
        ),
        explanation='month names such as "March" and "June"',
    ),
    FewShot(
        excerpts=(
            (("print", "(", "len", "(", "items", "))", " +", " max", "(", "a", ")"),
             (0, 0, 0, 0, 0, 10, 0, 0, 0, 0, 8)),
        ),
        explanation='closing parentheses ")"',
    ),
    FewShot(
        excerpts=(
            (("def", " load", "(", "path", "):", "\n", "   ", " return", " open", "(", "path", ")"),
             (0, 2, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0)),
        ),
        explanation='the word "return" in code',
    ),
)


def neuron_block(excerpts: Sequence[tuple[Sequence[str], Sequence[float]]], max_activation: float | None = None) -> str:
    """All excerpts of one neuron on the common 0–10 scale, repeated without zero lines when activity is sparse."""
    if max_activation is None:
        max_activation = max((max(a, default=0.0) for _, a in excerpts), default=0.0)
    shown = [display_scale(acts, max_activation) for _, acts in excerpts]
    blocks = [excerpt_block(toks, s) for (toks, _), s in zip(excerpts, shown)]
    values = [v for s in shown for v in s]
    text = "\n".join(blocks)
    if values and sum(1 for v in values if v) < SPARSE_FRACTION * len(values):
        sparse = [excerpt_block(toks, s, skip_zeros=True) for (toks, _), s in zip(excerpts, shown)]
        text += "\n\nThe same excerpts again, listing only the tokens where the neuron fires:\n" + "\n".join(sparse)
    return text


def strongest_tokens(excerpts: Sequence[tuple[Sequence[str], Sequence[float]]], n: int,
                     min_fraction: float = 0.0) -> list[str]:
    """Up to n distinct tokens with the highest activation over the excerpts, strongest first (ties: first
    appearance); only positive activations, and only those reaching `min_fraction` of the strongest one."""
    best: dict[str, tuple[float, int]] = {}
    position = 0
    for tokens, acts in excerpts:
        for tok, a in zip(tokens, acts, strict=True):
            a = float(a)
            if a > 0 and (tok not in best or a > best[tok][0]):
                best[tok] = (a, best[tok][1] if tok in best else position)
            position += 1
    top = max((a for a, _ in best.values()), default=0.0)
    ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[1][1]))
    return [t for t, (a, _) in ranked if a >= min_fraction * top][:n]


def shown_token(token: str) -> str:
    """A token as listed: surrounding spaces dropped; whitespace-only tokens escaped (\\n, \\t) so they show."""
    return token.strip() or escape_token(token)


def token_list_text(tokens: Sequence[str]) -> str:
    """`"a", "b", "c"`: the distinct shown forms, in order."""
    seen: list[str] = []
    for t in tokens:
        s = shown_token(t)
        if s not in seen:
            seen.append(s)
    return ", ".join(f'"{s}"' for s in seen)


def digest(excerpts: Sequence[tuple[Sequence[str], Sequence[float]]]) -> str:
    """The line under the excerpts naming the strongest tokens."""
    listed = token_list_text(strongest_tokens(excerpts, DIGEST_SIZE, DIGEST_FRACTION))
    return f"Strongest tokens: {listed or '(none)'}"


def _user_message(number: int, excerpts) -> str:
    return f"Neuron {number}\nActivations:\n{neuron_block(excerpts)}\n\n{digest(excerpts)}"


def explainer_messages(excerpts: Sequence[tuple[Sequence[str], Sequence[float]]]) -> list[dict]:
    """Chat messages for one neuron. The assistant's answer is to be continued from `LEAD_IN`."""
    messages = [{"role": "system", "content": SYSTEM}]
    for i, shot in enumerate(FEW_SHOTS, start=1):
        messages.append({"role": "user", "content": _user_message(i, shot.excerpts)})
        messages.append({"role": "assistant", "content": f"{LEAD_IN} {shot.explanation}."})
    messages.append({"role": "user", "content": _user_message(len(FEW_SHOTS) + 1, excerpts)})
    return messages


def prompt_sha256(messages: list[dict], assistant_prefix: str = LEAD_IN) -> str:
    """A stable hash of exactly what the explainer was shown."""
    payload = json.dumps({"messages": messages, "assistant_prefix": assistant_prefix}, sort_keys=True,
                         ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ExplanationParseError(ValueError):
    pass


def parse_explanation(completion: str) -> str:
    """The phrase the model wrote after the lead-in: its first line and first sentence, trimmed, without a repeated
    lead-in, enclosing quotes or final dot. Small models often run on after the phrase; the rest is dropped."""
    text = completion.strip()
    if text.lower().startswith(LEAD_IN.lower()):
        text = text[len(LEAD_IN):].strip()
    text = text.split("\n", 1)[0].strip()
    text = re.split(r"\.\s+(?=[A-Z])", text, maxsplit=1)[0].strip()
    if len(text) >= 2 and text[0] == text[-1] == '"' and text.count('"') == 2:
        text = text[1:-1].strip()
    text = text.rstrip(".").strip()
    if not text:
        raise ExplanationParseError("the explainer returned no text after the lead-in")
    if "<start>" in text or "<end>" in text or "\t" in text:
        raise ExplanationParseError(f"the explainer echoed excerpt markup instead of an explanation: {text[:80]!r}")
    if not any(ch.isalpha() for ch in text):
        raise ExplanationParseError(f"the explainer's answer has no words: {text[:80]!r}")
    return text


def neuron_seed(seed: int, layer: int, neuron: int) -> int:
    return (seed * 1_000_003 + layer * 65_537 + neuron) % (2**31)


def explain_layer(excerpts, backend, max_tokens: int = MAX_EXPLANATION_TOKENS, temperature: float = TEMPERATURE,
                  seed: int = 0, on_neuron=None, progress: Progress | None = None):
    """One explanation per neuron from its `explain` excerpts, at the backend's concurrency.

    A neuron whose call fails (after the backend's retries) or whose answer cannot be parsed gets status `failed`
    and the reason; the others go on. `on_neuron(row)` is called as each neuron finishes. For k candidates per
    neuron see `best_of_k.explain_candidates` (its candidate 0 is exactly this explanation).
    """
    explain = excerpts.filter(pl.col("split") == EXPLAIN).sort(["layer", "neuron", "rank"])
    jobs = []
    for (layer, neuron), group in explain.group_by(["layer", "neuron"], maintain_order=True):
        shown = list(zip(group["tokens"].to_list(), group["activations"].to_list()))
        jobs.append((int(layer), int(neuron), explainer_messages(shown)))

    def run(job):
        layer, neuron, messages = job
        started = time.perf_counter()
        row = {"layer": layer, "neuron": neuron, "explanation_id": explanation_id(layer, neuron),
               "explainer": backend.name, "prompt_sha256": prompt_sha256(messages), "explanation": None,
               "status": "ok", "error": None, "prompt_tokens": None, "completion_tokens": None}
        try:
            completion = backend.chat(messages, LEAD_IN, max_tokens, temperature, neuron_seed(seed, layer, neuron))
            row["prompt_tokens"], row["completion_tokens"] = completion.prompt_tokens, completion.completion_tokens
            row["explanation"] = parse_explanation(completion.text)
        except (ExplanationParseError, RecordableLLMError) as exc:
            row["status"], row["error"] = "failed", str(exc)
        row["seconds"] = time.perf_counter() - started
        return row

    def done(outcome):
        if outcome.error is not None:  # not an LLM failure: a bug or an interruption, which must surface
            raise outcome.error
        if progress is not None:
            progress.advance()
        if on_neuron:
            on_neuron(outcome.value)

    if progress is not None:
        progress.expect(len(jobs))
    rows = [o.value for o in backend.map(run, jobs, on_done=done)]
    return frame(rows, EXPLANATION_SCHEMA)
