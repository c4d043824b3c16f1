"""Reading the distribution over the values 0..10 at each slot of a simulator prompt from the top logprobs an
OpenAI-compatible server echoes for it (`/v1/completions` with `echo=True` and `logprobs=k`).

Servers disagree on where they put that distribution (see `LOGPROB_ALIGNMENTS`); `"auto"` tells them apart from
the response itself. `ten_layout` says whether the server writes "10" as one token or as "1" + "0". The errors
here are per excerpt: the caller records the excerpt as failed and goes on.
"""

from __future__ import annotations

import math
import re

import numpy as np

from ndx_pipeline.core.llm.backend import VALUES, ExcerptSimulationError, SimulationPrompt


class LogprobsUnavailableError(ExcerptSimulationError):
    """The server returned no (echoed) logprobs, or fewer than the prompt needs."""


class LogprobAlignmentError(ExcerptSimulationError):
    """`logprob_alignment="auto"` could not tell from the response how the server aligns its logprobs."""


class SlotAlignmentError(ExcerptSimulationError):
    """A slot does not fall on a token boundary of the server's tokenization, so its distribution is not there."""


class NoValueCandidatesError(ExcerptSimulationError):
    """Too many slots have none of the values 0..10 among the server's top candidates."""


# ---------------------------------------------------------------------------------------------------------------
# Reading the echoed logprobs

# Where a server puts the distribution over token i in an echoed prompt:
#   "openai":    top_logprobs[i] is P(token i | tokens < i)  (OpenAI's legacy completions, vLLM; entry 0 is null)
#   "llama_cpp": top_logprobs[i] is P(token i+1 | tokens ≤ i), one entry later than "openai" would put it: what
#                llama-cpp-python's server (0.3.x) does for models whose tokenizer adds no BOS token (SmolLM2,
#                Qwen, GPT-2…). Its entry i also carries token i itself with that token's logprob under the
#                shifted distribution, which means nothing and is dropped. For models with a BOS token its
#                output is "openai"-aligned, which is why "auto" exists.
#   "auto":      decide per response: in a prompt full of predictable template tokens, the most likely candidate
#                of entry i is far more often token i ("openai") or token i+1 ("llama_cpp").
LOGPROB_ALIGNMENTS = ("openai", "llama_cpp", "auto")


def _logprobs_block(response: dict) -> dict:
    try:
        choice = response["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise LogprobsUnavailableError("the completion response has no choices") from None
    lp = choice.get("logprobs") if isinstance(choice, dict) else None
    if not isinstance(lp, dict) or not lp.get("tokens") or lp.get("top_logprobs") is None:
        raise LogprobsUnavailableError(
            "the server returned no echoed logprobs (does it support echo=True with logprobs on /v1/completions?"
            " llama-cpp-python needs --logits_all true)")
    n = len(lp["tokens"])
    if len(lp["top_logprobs"]) != n or len(lp.get("text_offset") or []) != n:
        raise LogprobsUnavailableError("the echoed tokens, offsets and top logprobs have different lengths")
    return lp


def has_echoed_logprobs(response: dict) -> bool:
    """Whether an echo answer carries the logprobs the simulator reads (only such answers are cached)."""
    try:
        _logprobs_block(response)
    except LogprobsUnavailableError:
        return False
    return True


def has_top_logprobs(response: dict) -> bool:
    """Whether a completion answer carries top logprobs for its first generated token (the "10" probe's answer)."""
    try:
        return bool(response["choices"][0]["logprobs"]["top_logprobs"][0])
    except (KeyError, IndexError, TypeError):
        return False


def detect_logprob_alignment(logprobs: dict, min_votes: int = 5) -> str:
    """"openai" or "llama_cpp" for one echoed response (see LOGPROB_ALIGNMENTS)."""
    tokens, tops = logprobs["tokens"], logprobs["top_logprobs"]
    same = nxt = 0
    for i in range(1, len(tokens) - 1):
        top = tops[i]
        if not top:
            continue
        best = max(top.items(), key=lambda kv: kv[1])[0]
        same += best == tokens[i]
        nxt += best == tokens[i + 1]
    if nxt >= 2 * same + min_votes:
        return "llama_cpp"
    if same >= 2 * nxt + min_votes:
        return "openai"
    raise LogprobAlignmentError(
        f"cannot tell how the server aligns echoed logprobs ({same} entries favour 'openai', {nxt} 'llama_cpp');"
        " set logprob_alignment explicitly")


def _token_starts(logprobs: dict, text: str) -> list[int]:
    """Character offset of each echoed token in `text`: from the token strings when they spell the prompt
    exactly (robust to servers that count bytes), else the server's text_offset."""
    tokens = logprobs["tokens"]
    starts, pos = [], 0
    for tok in tokens:
        starts.append(pos)
        pos += len(tok)
    joined = "".join(tokens)
    if joined[: len(text)] == text:
        return starts
    return [int(o) for o in logprobs["text_offset"]]


def _token_at(starts: list[int], offset: int) -> int | None:
    """Index of the first token starting exactly at `offset` (None when `offset` falls inside a token)."""
    lo, hi = 0, len(starts)
    while lo < hi:
        mid = (lo + hi) // 2
        if starts[mid] < offset:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo < len(starts) and starts[lo] == offset else None


def slot_candidates(response: dict, prompt: SimulationPrompt, alignment: str) -> tuple[list[dict], str]:
    """The top-logprob candidates for the value at each slot, and the alignment used ("openai"/"llama_cpp")."""
    if alignment not in LOGPROB_ALIGNMENTS:
        raise ValueError(f"logprob_alignment must be one of {LOGPROB_ALIGNMENTS}, not {alignment!r}")
    lp = _logprobs_block(response)
    if alignment == "auto":
        alignment = detect_logprob_alignment(lp)
    text = prompt.text
    starts = _token_starts(lp, text)
    tokens, tops = lp["tokens"], lp["top_logprobs"]
    out = []
    for k, offset in enumerate(prompt.slot_offsets()):
        j = _token_at(starts, offset)
        if j is None or j == 0:
            raise SlotAlignmentError(
                f"slot {k} (character {offset}) falls inside a token of the server's tokenization")
        if alignment == "openai":
            top = tops[j]
        else:
            top = tops[j - 1]
            if top:
                top = {t: v for t, v in top.items() if t != tokens[j - 1]}
        if top is None:
            raise LogprobsUnavailableError(f"the server gave no top logprobs at slot {k}")
        out.append(dict(top))
    return out, alignment


def value_of(token: str) -> int | None:
    s = token.strip()
    if s.isdigit() and s == str(int(s)) and int(s) in VALUES:
        return int(s)
    return None


def values_from_candidates(candidates: dict[str, float]) -> np.ndarray:
    """[11] probabilities of the values 0..10 among one slot's candidates (not renormalized)."""
    probs = np.zeros(len(VALUES))
    for tok, lp in candidates.items():
        v = value_of(tok)
        if v is not None and lp is not None and math.isfinite(lp):
            probs[v] += math.exp(lp)
    return probs


def ten_layout(response: dict, prompt: SimulationPrompt) -> str:
    """How the server tokenizes the value "10", seen in the few-shot lines of the echoed prompt:
    "single" (one token), "split" ("1" then "0"), or "unknown"."""
    lp = _logprobs_block(response)
    text = prompt.text
    starts = _token_starts(lp, text)
    head_end = prompt.slot_offsets()[0] if prompt.slots else len(text)
    for m in re.finditer("\t10\n", text[:head_end]):
        j = _token_at(starts, m.start() + 1)
        if j is None:
            continue
        tok = lp["tokens"][j]
        if tok.strip() == "10":
            return "single"
        if tok == "1":
            return "split"
    return "unknown"
