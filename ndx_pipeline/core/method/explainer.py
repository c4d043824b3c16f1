"""The explainer: a prompt that shows a neuron's top excerpts as token⇥activation lines, and the parsing of the one
phrase the LLM writes back.

Under the excerpts a line lists the strongest tokens ("Strongest tokens: ..."; `digest=False` leaves it out):
measured on the bundled 135M model (benchmarks/prompts.py), it cannot find the high values among hundreds of lines
by itself, but it can name a token it is shown. The answer is completed after the lead-in `LEAD_IN` and stored
without it.

The prompt is fitted to the explainer's context window (`fit_prompt`): the zero-activation repeat goes first, then
excerpts from the weakest end, then the last excerpt is cut around its peak; the row says what was left out
(`excerpts_shown`, `prompt_fitted`) and its `prompt_sha256` is the hash of the prompt as the backend sent it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import polars as pl

from ndx_pipeline.core.contract import EXPLAIN, EXPLANATION_SCHEMA, STATUS_FAILED, STATUS_OK, explanation_id, frame
from ndx_pipeline.core.llm.backend import PromptTooLongError, RecordableLLMError
from ndx_pipeline.core.llm.sent_prompts import sent_prompt_sha256
from ndx_pipeline.core.method.display import display_scale, escape_token, excerpt_block
from ndx_pipeline.core.method.work import Work, run_together
from ndx_pipeline.core.progress import Progress

LEAD_IN = "Its main job is to detect"
SPARSE_FRACTION = 0.2  # below this share of non-zero values, the excerpts are repeated with zero lines left out
MAX_EXPLANATION_TOKENS = 60
TEMPERATURE = 1.0

SYSTEM_DIGEST = "Below the excerpts, the tokens with the highest values are listed again. "  # only with the digest
SYSTEM = (
    "You are looking inside a language model at one neuron, a unit that fires on some pattern in text. You will see "
    "short excerpts of text, one token per line. After each token comes a tab and how strongly the neuron fires on "
    f"that token, an integer from 0 (not at all) to 10 (as strongly as it ever does here). {SYSTEM_DIGEST}Finish the "
    "sentence about the neuron with a few words naming the tokens, or the kind of tokens, that make it fire."
)
# with `quality.explainer_logits`: the unit's output tokens (core/data/output_tokens.py), said under the excerpts
SYSTEM_OUTPUT = (" Below that, the tokens the neuron's output makes more likely and less likely in the next "
                 "position are listed; they may help, or not.")
OUTPUT_SIZE = 5  # output tokens listed each way
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


def _scaled(excerpts, max_activation: float | None) -> list:
    if max_activation is None:
        max_activation = max((max(a, default=0.0) for _, a in excerpts), default=0.0)
    return [display_scale(acts, max_activation) for _, acts in excerpts]


def _sparse(shown: list) -> bool:
    values = [v for s in shown for v in s]
    return bool(values) and sum(1 for v in values if v) < SPARSE_FRACTION * len(values)


def has_repeat(excerpts: Sequence[tuple[Sequence[str], Sequence[float]]]) -> bool:
    """Whether `neuron_block` repeats these excerpts without their zero lines (activity is sparse)."""
    return _sparse(_scaled(excerpts, None))


def neuron_block(excerpts: Sequence[tuple[Sequence[str], Sequence[float]]], max_activation: float | None = None,
                 repeat: bool = True) -> str:
    """All excerpts of one neuron on the common 0–10 scale, repeated without zero lines when activity is sparse
    (and `repeat`)."""
    shown = _scaled(excerpts, max_activation)
    text = "\n".join(excerpt_block(toks, s) for (toks, _), s in zip(excerpts, shown))
    if repeat and _sparse(shown):
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


def output_lines(output: tuple[Sequence[str], Sequence[str]]) -> str:
    """The lines naming a unit's output tokens: (promoted, suppressed), strongest first."""
    promoted, suppressed = output
    return (f"Output makes more likely: {token_list_text(list(promoted)[:OUTPUT_SIZE]) or '(none)'}\n"
            f"Output makes less likely: {token_list_text(list(suppressed)[:OUTPUT_SIZE]) or '(none)'}")


def _user_message(number: int, excerpts, digest_line: bool = True, repeat: bool = True,
                  output: tuple[Sequence[str], Sequence[str]] | None = None) -> str:
    text = f"Neuron {number}\nActivations:\n{neuron_block(excerpts, repeat=repeat)}"
    text = f"{text}\n\n{digest(excerpts)}" if digest_line else text
    return f"{text}\n{output_lines(output)}" if output else text


def explainer_messages(excerpts: Sequence[tuple[Sequence[str], Sequence[float]]], digest: bool = True,
                       repeat: bool = True, output: tuple[Sequence[str], Sequence[str]] | None = None) -> list[dict]:
    """Chat messages for one neuron. The assistant's answer is to be continued from `LEAD_IN`. digest: list the
    strongest tokens under the excerpts (and say so in the system message); repeat: the zero-activation repeat of
    sparse excerpts (the few-shot examples keep theirs); output: the unit's output tokens (promoted, suppressed),
    listed under those (`quality.explainer_logits`; the made-up few-shot neurons have none)."""
    system = SYSTEM if digest else SYSTEM.replace(SYSTEM_DIGEST, "")
    messages = [{"role": "system", "content": system + (SYSTEM_OUTPUT if output else "")}]
    for i, shot in enumerate(FEW_SHOTS, start=1):
        messages.append({"role": "user", "content": _user_message(i, shot.excerpts, digest)})
        messages.append({"role": "assistant", "content": f"{LEAD_IN} {shot.explanation}."})
    messages.append({"role": "user", "content": _user_message(len(FEW_SHOTS) + 1, excerpts, digest, repeat, output)})
    return messages


def prompt_sha256(messages: list[dict], assistant_prefix: str = LEAD_IN) -> str:
    """The hash of the template messages with the prefilled lead-in: what a backend that sends them as they are
    (the default `LLMBackend.sent_prompt`) sends. Rows store the hash of what their backend sent."""
    return sent_prompt_sha256({"messages": messages, "assistant_prefix": assistant_prefix})


# ---------------------------------------------------------------------------------------------------------------
# Fitting the prompt to the context window

MIN_CUT = 8  # the shortest an excerpt is cut to before the prompt is given up as too long


@dataclass(frozen=True)
class PromptFit:
    """What of a neuron's `total` explain excerpts a prompt shows: the first `excerpts` (strongest first), with the
    zero-activation repeat or not, each cut to `cut` tokens around its peak or whole."""

    excerpts: int
    total: int
    repeat: bool = True
    cut: int | None = None

    def apply(self, excerpts: Sequence[tuple[Sequence[str], Sequence[float]]]) -> list:
        shown = list(excerpts[: self.excerpts])
        return [cut_excerpt(toks, acts, self.cut) for toks, acts in shown] if self.cut else shown

    def messages(self, excerpts, digest: bool = True, output=None) -> list[dict]:
        return explainer_messages(self.apply(excerpts), digest, self.repeat, output)

    def describe(self, excerpts, context: int | None = None) -> str | None:
        """What was left out, in words (None: nothing); `parse` reads it back."""
        parts = []
        if not self.repeat and has_repeat(self.apply(excerpts)):
            parts.append("the zero-activation repeat left out")
        if self.excerpts < self.total:
            first = self.excerpts + 1
            parts.append(f"excerpt {first} of {self.total} left out" if first == self.total else
                         f"excerpts {first}–{self.total} of {self.total} left out")
        if self.cut:
            parts.append(f"excerpts cut to {self.cut} tokens around their peak")
        if not parts:
            return None
        return "; ".join(parts) + (f" (to fit a context of {context} tokens)" if context else "")

    @classmethod
    def parse(cls, text: str | None, excerpts_shown: int | None, total: int) -> PromptFit:
        """The fit a row describes (`prompt_fitted`, `excerpts_shown`; rows from before fitting have neither)."""
        text = text or ""
        cut = re.search(r"cut to (\d+) tokens", text)
        shown = total if excerpts_shown is None else min(int(excerpts_shown), total)
        return cls(shown, total, "repeat left out" not in text, int(cut.group(1)) if cut else None)


def cut_excerpt(tokens: Sequence[str], acts: Sequence[float], length: int) -> tuple[list, list]:
    """`length` tokens of an excerpt around its strongest activation."""
    tokens, acts = list(tokens), list(acts)
    if len(tokens) <= length:
        return tokens, acts
    peak = max(range(len(acts)), key=lambda i: acts[i])
    start = max(0, min(peak - length // 2, len(tokens) - length))
    return tokens[start:start + length], acts[start:start + length]


def candidate_fits(excerpts) -> Iterator[PromptFit]:
    """Ever smaller prompts: all, no repeat, fewer excerpts from the end, then the first one cut shorter."""
    total = len(excerpts)
    yield PromptFit(total, total)
    if has_repeat(excerpts):
        yield PromptFit(total, total, repeat=False)
    for n in range(total - 1, 0, -1):
        yield PromptFit(n, total, repeat=False)
    cut = len(excerpts[0][0]) // 2 if excerpts else 0
    while cut >= MIN_CUT:
        yield PromptFit(1, total, repeat=False, cut=cut)
        cut //= 2


def fit_prompt(excerpts, backend, max_tokens: int = MAX_EXPLANATION_TOKENS,
               digest: bool = True, output=None) -> tuple[list[dict], PromptFit, dict]:
    """(messages, fit, the prompt as `backend` sends it): the largest prompt of `candidate_fits` whose tokens and
    `max_tokens` of answer fit the backend's context window (everything when the window is not known). Raises
    PromptTooLongError when even the smallest does not fit."""
    context = backend.context_window()
    needed, fit = None, None
    for fit in candidate_fits(excerpts):
        messages = fit.messages(excerpts, digest, output)
        sent = backend.sent_prompt(messages, LEAD_IN)
        if context is None:
            return messages, fit, sent
        needed = backend.count_tokens(sent, limit=context - max_tokens)
        if needed + max_tokens <= context:
            return messages, fit, sent
    raise PromptTooLongError(
        f"the explainer prompt does not fit the model's context of {context} tokens: even with one excerpt of "
        f"{fit.cut or len(excerpts[0][0])} tokens it needs about {needed} tokens plus {max_tokens} for the answer",
        context)


# ---------------------------------------------------------------------------------------------------------------
# The answer


class ExplanationParseError(ValueError):
    pass


# Words after which a dot does not end a sentence. "etc." does, before a word that starts a new one.
ABBREVIATIONS = frozenset({"e.g", "i.e", "etc", "vs", "cf", "a.k.a", "aka", "approx", "incl", "esp", "resp", "viz",
                           "mr", "mrs", "dr"})
SENTENCE_STARTS = frozenset({"It", "Its", "This", "These", "That", "Those", "The", "They", "There", "In", "Also",
                             "However", "He", "She", "We", "I", "A", "An", "For", "When", "If", "Note"})
_CANDIDATE_END = re.compile(r"\.\s+(?=[\"'“(]?[A-Z])")


def _ends_sentence(text: str, dot: int) -> bool:
    """Whether the dot at `dot` (followed by a space and a capital) ends a sentence."""
    word = re.search(r"(\S*)$", text[:dot]).group(1).lstrip("(\"'“")
    following = re.match(r"\s+[\"'“(]?([A-Za-z]+)(\.?)", text[dot + 1:])
    next_word, next_dot = (following.group(1), following.group(2)) if following else ("", "")
    lowered = word.lower()
    if lowered == "etc":
        return next_word in SENTENCE_STARTS
    if lowered in ABBREVIATIONS:
        return False
    if re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", word):  # U.S, e.g, a.k.a
        return False
    # the shape of an abbreviation rather than a list of them: a capital and one to three lower-case letters (St.
    # Louis, Jr., Mt., Inc., Corp., Ltd.) ends a sentence only before a word that starts one
    if re.fullmatch(r"[A-Z][a-z]{1,3}", word) and next_word not in SENTENCE_STARTS:
        return False
    if re.fullmatch(r"[A-Z]", word) and (len(next_word) == 1 and next_dot or  # initials: J. K. Rowling
                                         re.search(r"(?:^|\s)[A-Z]\.\s+$", text[:dot - 1])):
        return False
    return True


def first_sentence(text: str) -> str:
    """`text` up to the dot that ends its first sentence, that dot included (abbreviations, initials, decimals
    and file extensions do not end one)."""
    for match in _CANDIDATE_END.finditer(text):
        if _ends_sentence(text, match.start()):
            return text[:match.start() + 1]
    return text


def _strip_final_dot(text: str) -> str:
    """Without the final dot, unless it belongs to an abbreviation ("etc.", "U.S.")."""
    if not text.endswith("."):
        return text
    word = re.search(r"(\S*)\.$", text).group(1).lstrip("(\"'“").lower()
    if word in ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.)+[a-z]", word):
        return text
    return text.rstrip(".").strip()


def parse_explanation(completion: str) -> str:
    """The phrase the model wrote after the lead-in: its first line and first sentence, trimmed, without a repeated
    lead-in, enclosing quotes or final dot. Small models often run on after the phrase; the rest is dropped."""
    text = completion.strip()
    if text.lower().startswith(LEAD_IN.lower()):
        text = text[len(LEAD_IN):].strip()
    text = text.split("\n", 1)[0].strip()
    text = first_sentence(text).strip()
    if len(text) >= 2 and text[0] == text[-1] == '"' and text.count('"') == 2:
        text = text[1:-1].strip()
    text = _strip_final_dot(text)
    if not text:
        raise ExplanationParseError("the explainer returned no text after the lead-in")
    if "<start>" in text or "<end>" in text or "\t" in text:
        raise ExplanationParseError(f"the explainer echoed excerpt markup instead of an explanation: {text[:80]!r}")
    if not any(ch.isalpha() for ch in text):
        raise ExplanationParseError(f"the explainer's answer has no words: {text[:80]!r}")
    return text


def neuron_seed(seed: int, layer: int, neuron: int) -> int:
    return (seed * 1_000_003 + layer * 65_537 + neuron) % (2**31)


def chat_fitted(excerpts, backend, row: dict, max_tokens: int, temperature: float, seed: int,
                digest: bool = True, output=None):
    """The backend's answer to the neuron's prompt fitted to its context; fills `row`'s prompt_sha256 (of the sent
    prompt), excerpts_shown and prompt_fitted. A server that tells its context only by refusing a prompt gets the
    prompt fitted to what it said, once."""
    for attempt in range(2):
        row.update(prompt_sha256=None, excerpts_shown=None, prompt_fitted=None)  # nothing sent yet
        context = backend.context_window()
        messages, fit, sent = fit_prompt(excerpts, backend, max_tokens, digest, output)
        row.update(prompt_sha256=sent_prompt_sha256(sent), excerpts_shown=fit.excerpts,
                   prompt_fitted=fit.describe(excerpts, context))
        try:
            return backend.chat(messages, LEAD_IN, max_tokens, temperature, seed)
        except PromptTooLongError:
            if attempt or backend.context_window() in (None, context):
                raise


def explanation_work(excerpts, backend, max_tokens: int = MAX_EXPLANATION_TOKENS, temperature: float = TEMPERATURE,
                     seeds: Sequence[int] = (0,), digest: bool = True, outputs: Mapping | None = None) -> Work:
    """One explanation per neuron and seed from the neuron's `explain` excerpts, each prompt fitted to the
    backend's context window (`fit_prompt`; the row's excerpts_shown and prompt_fitted say what was left out).
    digest: the "Strongest tokens" line under the excerpts; outputs: (layer, unit) → the unit's output tokens
    (promoted, suppressed), listed under it (`quality.explainer_logits`). With several `seeds` (best-of-k: one per
    candidate) the rows carry an Int32 `candidate` (the seed's position) and ids
    `<layer>/<neuron>/explanation/<candidate>`.

    A neuron whose call fails (after the backend's retries), whose prompt cannot fit, or whose answer cannot be
    parsed gets status `failed` and the reason; the others go on."""
    explain = excerpts.filter(pl.col("split") == EXPLAIN).sort(["layer", "neuron", "rank"])
    shown = []
    for (layer, neuron), group in explain.group_by(["layer", "neuron"], maintain_order=True):
        shown.append((int(layer), int(neuron), list(zip(group["tokens"].to_list(), group["activations"].to_list()))))
    items = [(c, seed, layer, neuron, ex) for c, seed in enumerate(seeds) for layer, neuron, ex in shown]

    def run(item) -> dict:
        candidate, seed, layer, neuron, ex = item
        started = time.perf_counter()
        row = {"layer": layer, "neuron": neuron, "explanation_id": explanation_id(layer, neuron, candidate),
               "candidate": candidate, "explainer": backend.name, "prompt_sha256": None, "explanation": None,
               "status": STATUS_OK, "error": None, "prompt_tokens": None, "completion_tokens": None}
        try:
            completion = chat_fitted(ex, backend, row, max_tokens, temperature, neuron_seed(seed, layer, neuron),
                                     digest, (outputs or {}).get((layer, neuron)))
            row["prompt_tokens"], row["completion_tokens"] = completion.prompt_tokens, completion.completion_tokens
            row["explanation"] = parse_explanation(completion.text)
        except (ExplanationParseError, RecordableLLMError) as exc:
            row["status"], row["error"] = STATUS_FAILED, str(exc)
        row["seconds"] = time.perf_counter() - started
        return row

    def table(rows: list[dict]) -> pl.DataFrame:
        out = frame(rows, EXPLANATION_SCHEMA, {"candidate": pl.Int32} if len(seeds) > 1 else None)
        return out.sort(["layer", "neuron", "candidate"]) if len(seeds) > 1 else out

    return Work(items, run, table)


def explain_layer(excerpts, backend, max_tokens: int = MAX_EXPLANATION_TOKENS, temperature: float = TEMPERATURE,
                  seed: int = 0, progress: Progress | None = None, digest: bool = True) -> pl.DataFrame:
    """One explanation per neuron (`explanation_work` with one seed), at the backend's concurrency. For k candidates
    per neuron see `best_of_k.explain_candidates` (its candidate 0 is exactly this explanation)."""
    return run_together(backend, [explanation_work(excerpts, backend, max_tokens, temperature, (seed,), digest)],
                        progress)[0]
