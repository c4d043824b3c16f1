"""An LLM backend for any OpenAI-compatible server (OpenAI, vLLM, llama.cpp / llama-cpp-python, …).

- Explainer: chat completions. A chat API cannot prefill the assistant's answer with the lead-in, so the model is
  asked to write one sentence that starts with it, and the lead-in is cut off the reply when it is repeated.
- Simulator, "all at once": one `/v1/completions` request per excerpt with `echo=True` and `logprobs=k` on the
  simulation prompt; the distribution over the values at each slot is read from the echoed top logprobs. Servers
  disagree on where they put that distribution (see `LOGPROB_ALIGNMENTS`); the alignment is a named option, and
  `"auto"` tells them apart from the response itself. When the server writes "10" as "1" + "0", P(10) is read
  honestly as P("1") · P("0" | "1") with one short extra request per slot where "1" is plausible.
- Simulator, JSON: for chat-only models; the model answers `{"activations": [{"token", "activation"}, …]}` and
  an answer of the wrong length or with invalid values raises `JSONSimulationError`.
- Every request goes through a content-addressed cache (`LLMCache`) and a retry loop (`call_with_retries`):
  exponential backoff with jitter, `Retry-After` honoured on 429 (and shared by all threads using the backend),
  5xx / timeouts / connection errors / truncated bodies retried, a total deadline, no retry on other 4xx.
- `map_concurrently` runs many calls under a concurrency limit; the backend also bounds its in-flight requests.

The API key is handed to the `openai` client and nowhere else: not in `name`, cache keys or entries, log lines or
exception messages (those are redacted in case a server echoes it).
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ndx_pipeline.core.llm.backend import Completion, LLMBackend, Outcome, RecordableLLMError, map_concurrently
from ndx_pipeline.core.method.display import escape_token
from ndx_pipeline.core.method.explainer import FEW_SHOTS
from ndx_pipeline.core.llm.cache import LLMCache, LLMStats, cache_key
from ndx_pipeline.core.method.simulator import VALUES, SimulationPrompt

log = logging.getLogger(__name__)

KIND = "openai-compatible"


# ---------------------------------------------------------------------------------------------------------------
# Errors


class LLMRequestError(RecordableLLMError, RuntimeError):
    """A request to the LLM server did not produce an answer. `reason` is one short line, free of secrets."""

    def __init__(self, reason: str, attempts: int = 0, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts
        self.status = status


class LLMRejectedError(LLMRequestError):
    """The server refused the request with a 4xx that retrying cannot fix (bad request, auth, not found, …)."""


class LLMGaveUpError(LLMRequestError):
    """Retryable failures went on until the attempts or the total deadline ran out."""


class MalformedResponseError(LLMRequestError):
    """The server answered 2xx with a body that is not the JSON it should be (e.g. truncated). Retried."""


class ExcerptSimulationError(RecordableLLMError, ValueError):
    """The answer for one excerpt cannot be used; the caller records that excerpt as failed, with this reason."""


class LogprobsUnavailableError(ExcerptSimulationError):
    """The server returned no (echoed) logprobs, or fewer than the prompt needs."""


class LogprobAlignmentError(ExcerptSimulationError):
    """`logprob_alignment="auto"` could not tell from the response how the server aligns its logprobs."""


class SlotAlignmentError(ExcerptSimulationError):
    """A slot does not fall on a token boundary of the server's tokenization, so its distribution is not there."""


class NoValueCandidatesError(ExcerptSimulationError):
    """Too many slots have none of the values 0..10 among the server's top candidates."""


class JSONSimulationError(ExcerptSimulationError):
    """The JSON simulator's answer is not JSON of the expected shape."""


class JSONSimulationLengthError(JSONSimulationError):
    """The JSON simulator returned a different number of entries than there are tokens."""


class JSONSimulationValueError(JSONSimulationError):
    """An activation is missing, not a number, or outside 0..10."""


class JSONSimulationTokenError(JSONSimulationError):
    """An entry names a different token than the one at its position."""


# What a stage should catch per neuron / per excerpt and record as `failed` (with `str(error)` as the reason).
RECORDABLE_ERRORS: tuple[type[Exception], ...] = (LLMRequestError, ExcerptSimulationError)


# ---------------------------------------------------------------------------------------------------------------
# Retries


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter under a total deadline.

    The n-th retry waits `min(max_delay, initial_delay · multiplier^(n-1))`, of which the upper half is random
    ("equal jitter"); a 429's Retry-After (seconds or HTTP date; `retry-after-ms` too) replaces that wait, plus
    up to 10 % jitter. Each attempt may take at most `timeout` seconds and never more than what is left of
    `deadline`, the limit on one logical request with all its attempts and waits. A wait that would end past
    the deadline is not started: the request fails at once.
    """

    max_attempts: int = 8
    initial_delay: float = 0.5
    multiplier: float = 2.0
    max_delay: float = 30.0
    timeout: float = 120.0
    deadline: float = 600.0

    def backoff(self, retry_number: int, rng: Callable[[], float] = random.random) -> float:
        cap = min(self.max_delay, self.initial_delay * self.multiplier ** max(0, retry_number - 1))
        return cap / 2 + rng() * cap / 2


def parse_retry_after(headers: Any, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (delta-seconds or HTTP date); None if absent/bad."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
    except (TypeError, ValueError):
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    value = str(value).strip()
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now())


@dataclass(frozen=True)
class Verdict:
    retryable: bool
    reason: str
    status: int | None = None
    retry_after: float | None = None


def classify_error(exc: BaseException) -> Verdict | None:
    """How the retry loop treats an exception raised by one attempt; None: not a transport error, re-raise."""
    if isinstance(exc, MalformedResponseError):
        return Verdict(True, exc.reason)
    if isinstance(exc, LLMRequestError):
        return Verdict(False, exc.reason, exc.status)
    try:
        import openai
    except ImportError:  # pragma: no cover - the package is a dependency of this module's users
        openai = None
    if openai is not None:
        if isinstance(exc, openai.APITimeoutError):
            return Verdict(True, "the request timed out")
        if isinstance(exc, openai.APIConnectionError):
            return Verdict(True, f"connection error ({type(exc.__cause__ or exc).__name__})")
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            detail = _short(exc.message)
            if status == 429:
                return Verdict(True, f"HTTP 429 rate limited: {detail}", status,
                               parse_retry_after(exc.response.headers))
            if status == 408 or status >= 500:
                return Verdict(True, f"HTTP {status}: {detail}", status)
            return Verdict(False, f"HTTP {status}: {detail}", status)
    name = type(exc).__module__ + "." + type(exc).__name__
    if name.startswith("httpx") and ("Timeout" in type(exc).__name__):
        return Verdict(True, "the request timed out")
    if name.startswith("httpx") and any(s in type(exc).__name__ for s in ("Protocol", "Network", "Connect",
                                                                            "Read", "Write", "Transport")):
        return Verdict(True, f"connection error ({type(exc).__name__})")
    return None


def _short(text: Any, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class RateGate:
    """A pause shared by every thread of one backend: after a 429 with Retry-After, nobody sends before it ends."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._until = 0.0
        self._lock = threading.Lock()

    def hold(self, seconds: float) -> None:
        with self._lock:
            self._until = max(self._until, self._clock() + seconds)

    def delay(self) -> float:
        with self._lock:
            return max(0.0, self._until - self._clock())


def call_with_retries(attempt: Callable[[float], Any], policy: RetryPolicy, *, gate: RateGate | None = None,
                      on_attempt: Callable[[], None] | None = None,
                      on_retry: Callable[[str, float], None] | None = None,
                      redact: Callable[[str], str] = lambda s: s,
                      sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                      rng: Callable[[], float] = random.random) -> Any:
    """Call `attempt(timeout_s)` until it returns, retrying per `policy`.

    Raises `LLMRejectedError` for a non-retryable status, `LLMGaveUpError` when attempts or the deadline run
    out; exceptions that are not transport errors (see `classify_error`) propagate unchanged.
    """
    started = clock()
    attempts = 0
    while True:
        remaining = policy.deadline - (clock() - started)
        pause = gate.delay() if gate is not None else 0.0
        if pause > 0:
            if pause >= remaining:
                raise LLMGaveUpError(
                    f"the server asked to wait {pause:.1f}s, past the {policy.deadline:g}s deadline", attempts)
            sleep(pause)
            remaining = policy.deadline - (clock() - started)
        if remaining <= 0:
            raise LLMGaveUpError(f"no answer within the {policy.deadline:g}s deadline", attempts)
        attempts += 1
        if on_attempt is not None:
            on_attempt()
        try:
            return attempt(min(policy.timeout, remaining))
        except Exception as exc:
            verdict = classify_error(exc)
            if verdict is None:
                raise
            reason = redact(verdict.reason)
            if not verdict.retryable:
                raise LLMRejectedError(f"the server refused the request ({reason})", attempts,
                                       verdict.status) from None
            if attempts >= policy.max_attempts:
                raise LLMGaveUpError(f"gave up after {attempts} attempts; last error: {reason}", attempts,
                                     verdict.status) from None
            if verdict.retry_after is not None:
                delay = verdict.retry_after * (1.0 + 0.1 * rng())
                if gate is not None:
                    gate.hold(verdict.retry_after)
            else:
                delay = policy.backoff(attempts, rng)
            remaining = policy.deadline - (clock() - started)
            if delay >= remaining:
                raise LLMGaveUpError(
                    f"gave up after {attempts} attempts: waiting {delay:.1f}s more would pass the "
                    f"{policy.deadline:g}s deadline; last error: {reason}", attempts, verdict.status) from None
            if on_retry is not None:
                on_retry(reason, delay)
            sleep(delay)


# ---------------------------------------------------------------------------------------------------------------
# Concurrency


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


# ---------------------------------------------------------------------------------------------------------------
# JSON simulator

JSON_SYSTEM = (
    "You estimate how strongly one neuron of a language model fires on each token of a short text. You get a "
    "one-line description of what the neuron responds to, and the text as a JSON list of tokens. Answer with JSON "
    'only: {"activations": [{"token": ..., "activation": ...}, ...]} with exactly one entry per token, in the '
    "given order, each token copied exactly as given, each activation an integer from 0 (the neuron stays "
    "silent) to 10 (it fires as strongly as it ever does). Most tokens get 0; tokens that fit the description "
    "get high values."
)


def _json_user(explanation: str, tokens: Sequence[str]) -> str:
    return f"Neuron description: {explanation}\nTokens: {json.dumps(list(tokens), ensure_ascii=False)}"


def _json_answer(tokens: Sequence[str], values: Sequence[float]) -> str:
    return json.dumps({"activations": [{"token": t, "activation": int(v)} for t, v in zip(tokens, values)]},
                      ensure_ascii=False)


def json_simulation_messages(explanation: str, tokens: Sequence[str]) -> list[dict]:
    """Chat messages asking for one activation per token as JSON, with two worked examples."""
    messages = [{"role": "system", "content": JSON_SYSTEM}]
    for shot in FEW_SHOTS[:2]:
        toks, vals = shot.excerpts[0]
        messages.append({"role": "user", "content": _json_user(shot.explanation, toks)})
        messages.append({"role": "assistant", "content": _json_answer(toks, vals)})
    messages.append({"role": "user", "content": _json_user(explanation, tokens)})
    return messages


def grammar_safe(token: str) -> bool:
    """Whether llama-cpp-python's JSON-schema-to-grammar converter can pin this token as a constant: it does not
    escape backslashes, so a constant whose JSON text holds one (a backslash, a quote, a control character) makes a
    grammar that fails to parse, and that failure aborts the whole server process (seen with the token "\\")."""
    return "\\" not in json.dumps(token)


def json_simulation_schema(tokens: Sequence[str], pin=lambda token: True) -> dict:
    """JSON Schema of the expected answer: one entry per token, values 0..10; each entry's token is pinned to the
    excerpt's token where `pin(token)`, else any string (the parser still checks it against the excerpt)."""
    return {
        "type": "object",
        "properties": {
            "activations": {
                "type": "array",
                "prefixItems": [
                    {"type": "object",
                     "properties": {"token": {"const": t} if pin(t) else {"type": "string"},
                                    "activation": {"enum": list(VALUES)}},
                     "required": ["token", "activation"], "additionalProperties": False}
                    for t in tokens
                ],
                "items": False,
                "minItems": len(tokens),
                "maxItems": len(tokens),
            }
        },
        "required": ["activations"],
        "additionalProperties": False,
    }


# How to ask the server for JSON: "json_schema" (OpenAI structured outputs, vLLM), "json_object_schema"
# (llama-cpp-python: {"type": "json_object", "schema": …}, enforced by a grammar), "json_object" (any valid JSON),
# "none" (rely on the prompt alone).
JSON_MODES = ("json_schema", "json_object_schema", "json_object", "none")


def _response_format(mode: str, tokens: Sequence[str]) -> dict | None:
    if mode == "json_schema":
        return {"type": "json_schema",
                "json_schema": {"name": "activations", "schema": json_simulation_schema(tokens), "strict": False}}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": json_simulation_schema(tokens, pin=grammar_safe)}
    if mode == "json_object":
        return {"type": "json_object"}
    if mode == "none":
        return None
    raise ValueError(f"json_mode must be one of {JSON_MODES}, not {mode!r}")


def _same_token(given: str, returned: str) -> bool:
    def norm(s: str) -> str:
        return " ".join(s.split())

    return norm(given) == norm(returned) or norm(escape_token(given)) == norm(returned)


def parse_json_simulation(text: str, tokens: Sequence[str], check_tokens=True) -> np.ndarray:
    """The activations of a JSON simulator answer, one float in [0, 10] per token; raises JSONSimulationError.

    check_tokens: True (every entry's token must be the excerpt's), False, or a predicate on the excerpt's token
    saying which to check (the grammar-safe ones, when the others could not be pinned by the schema)."""
    should_check = check_tokens if callable(check_tokens) else (lambda token: bool(check_tokens))
    body = (text or "").strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    if fenced:
        body = fenced.group(1)
    try:
        data = json.loads(body)
    except ValueError:
        raise JSONSimulationError(f"the simulator's answer is not valid JSON: {_short(text, 80)!r}") from None
    if not isinstance(data, dict) or not isinstance(data.get("activations"), list):
        raise JSONSimulationError("the simulator's answer has no list under 'activations'")
    entries = data["activations"]
    if len(entries) != len(tokens):
        raise JSONSimulationLengthError(
            f"the simulator returned {len(entries)} activations for {len(tokens)} tokens")
    values = np.zeros(len(tokens))
    for i, (entry, token) in enumerate(zip(entries, tokens)):
        if not isinstance(entry, dict) or "activation" not in entry:
            raise JSONSimulationValueError(f"entry {i} of the simulator's answer has no activation")
        v = entry["activation"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 10:
            raise JSONSimulationValueError(
                f"entry {i} of the simulator's answer has activation {_short(v, 40)!r}, not a number from 0 to 10")
        if should_check(token) and "token" in entry and not _same_token(token, str(entry["token"])):
            raise JSONSimulationTokenError(
                f"entry {i} of the simulator's answer is for token {_short(entry['token'], 40)!r}, "
                f"not {_short(token, 40)!r}")
        values[i] = float(v)
    return values


# ---------------------------------------------------------------------------------------------------------------
# Explainer on a chat API

LEAD_IN_INSTRUCTION = (
    'Write your answer as a single sentence that begins with the words "{prefix}" and ends with a short phrase '
    "naming the pattern. Write nothing else."
)


def chat_messages_for_api(messages: list[dict], assistant_prefix: str) -> list[dict]:
    """The messages with an instruction to start the answer with `assistant_prefix` (which cannot be prefilled)."""
    messages = [dict(m) for m in messages]
    if not assistant_prefix:
        return messages
    instruction = LEAD_IN_INSTRUCTION.format(prefix=assistant_prefix.strip())
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{instruction}"
    else:
        messages.insert(0, {"role": "system", "content": instruction})
    return messages


def continuation_after(text: str, prefix: str) -> str:
    """What the model wrote after `prefix`; the text itself when it did not repeat the prefix."""
    stripped = text.lstrip().lstrip("\"'“”*").lstrip()
    if prefix and stripped.lower().startswith(prefix.strip().lower()):
        return stripped[len(prefix.strip()):]
    return text


# ---------------------------------------------------------------------------------------------------------------
# The backend

# Server presets: (logprob_alignment, json_mode, top_logprobs). OpenAI's legacy completions endpoint returns at
# most 5 candidates per position; vLLM's default limit is 20; llama-cpp-python has none.
SERVER_PRESETS = {
    "openai": ("openai", "json_schema", 5),
    "vllm": ("openai", "json_schema", 20),
    "llama_cpp": ("auto", "json_object_schema", 20),
}


class OpenAICompatibleBackend(LLMBackend):
    """Explainer and simulators on an OpenAI-compatible HTTP server.

    base_url: e.g. "https://api.openai.com/v1", "http://127.0.0.1:8000/v1"; model: the model name sent with every
    request (and part of every cache key: with llama.cpp, which ignores it, name the weights you serve);
    api_key: passed to the client only (None: a placeholder, for servers without auth).
    cache: an LLMCache or a directory for one (None: no cache). stats: shared counters (a fresh LLMStats if None).
    server: a preset for logprob_alignment, json_mode and top_logprobs ("openai", "vllm", "llama_cpp"; see
    SERVER_PRESETS); explicit values win.
    top_logprobs: candidates per position for the simulator.
    ten_probe: "auto" (when the server splits "10", one extra short request per slot whose P("1") is at least
    probe_threshold of the value mass), "always", or "never" (then "1" stands for itself and P(10) may be 0).
    max_empty_slot_fraction: above this share of slots without any value candidate, the excerpt fails
    (NoValueCandidatesError); below it such slots predict 0, as in the reference method.
    max_concurrency: the most requests this backend has in flight at once (all threads together), and the
    default width of `map`.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *,
                 cache: LLMCache | str | os.PathLike | None = None, stats: LLMStats | None = None,
                 server: str | None = None, logprob_alignment: str | None = None, json_mode: str | None = None,
                 top_logprobs: int | None = None, ten_probe: str = "auto", probe_threshold: float = 0.01,
                 max_empty_slot_fraction: float = 0.5, retry: RetryPolicy | None = None,
                 max_concurrency: int = 4, simulator_max_tokens_per_token: int = 24):
        import openai

        preset = SERVER_PRESETS.get(server or "openai")
        if preset is None:
            raise ValueError(f"server must be one of {sorted(SERVER_PRESETS)}, not {server!r}")
        self.logprob_alignment = logprob_alignment or preset[0]
        self.json_mode = json_mode or preset[1]
        if self.logprob_alignment not in LOGPROB_ALIGNMENTS:
            raise ValueError(f"logprob_alignment must be one of {LOGPROB_ALIGNMENTS}, not {logprob_alignment!r}")
        if self.json_mode not in JSON_MODES:
            raise ValueError(f"json_mode must be one of {JSON_MODES}, not {json_mode!r}")
        if ten_probe not in ("auto", "always", "never"):
            raise ValueError(f"ten_probe must be 'auto', 'always' or 'never', not {ten_probe!r}")
        self.base_url = base_url
        self.model = model
        self.top_logprobs = int(top_logprobs or preset[2])
        self.ten_probe = ten_probe
        self.probe_threshold = float(probe_threshold)
        self.max_empty_slot_fraction = float(max_empty_slot_fraction)
        self.retry = retry or RetryPolicy()
        self.max_concurrency = max(1, int(max_concurrency))
        self.simulator_max_tokens_per_token = simulator_max_tokens_per_token
        self.cache = LLMCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.stats = stats if stats is not None else LLMStats()
        self._gate = RateGate()
        self._in_flight = threading.BoundedSemaphore(self.max_concurrency)
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key or "no-key", max_retries=0,
                                     timeout=self.retry.timeout)

    # -- identity, lifecycle -----------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return f"{KIND}:{self.model}"

    def __repr__(self) -> str:
        return f"OpenAICompatibleBackend(base_url={self.base_url!r}, model={self.model!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _redact(self, text: str) -> str:
        key = getattr(self._client, "api_key", None)
        if isinstance(key, str) and len(key) >= 4 and key in text:
            text = text.replace(key, "[redacted]")
        return text

    # -- requests ----------------------------------------------------------------------------------------------

    def _send(self, endpoint: str, body: dict, timeout: float) -> dict:
        resource = self._client.chat.completions if endpoint == "chat.completions" else self._client.completions
        with self._in_flight:
            raw = resource.with_raw_response.create(**body, timeout=timeout)
            text = raw.text
        try:
            data = json.loads(text)
        except ValueError:
            raise MalformedResponseError(
                f"the server's answer to {endpoint} is not valid JSON ({len(text)} bytes; truncated?)") from None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
            raise MalformedResponseError(f"the server's answer to {endpoint} has no choices")
        return data

    def request(self, endpoint: str, body: dict) -> dict:
        """One logical request (`endpoint` "chat.completions" or "completions"): from the cache, else from the
        server with retries, then cached. Raises LLMRequestError when no answer could be had."""
        key = cache_key(KIND, self.model, endpoint, body)
        if self.cache is not None:
            hit, response = self.cache.lookup(key, self.stats)
            if hit:
                return response
        started = time.monotonic()
        try:
            data = call_with_retries(
                lambda timeout: self._send(endpoint, body, timeout), self.retry, gate=self._gate,
                on_attempt=lambda: self.stats.add(requests=1), on_retry=self._log_retry, redact=self._redact)
        except LLMRequestError as exc:
            self.stats.add(failures=1, seconds=time.monotonic() - started)
            log.warning("LLM request to %s failed: %s", endpoint, self._redact(str(exc)))
            raise
        usage = data.get("usage") or {}
        self.stats.add(calls=1, seconds=time.monotonic() - started,
                       prompt_tokens=int(usage.get("prompt_tokens") or 0),
                       completion_tokens=int(usage.get("completion_tokens") or 0))
        if self.cache is not None:
            self.cache.put(key, KIND, self.model, endpoint, body, data)
        return data

    def _log_retry(self, reason: str, delay: float) -> None:
        self.stats.add(retries=1)
        log.warning("LLM request failed (%s); retrying in %.1fs", reason, delay)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], on_done=None) -> list[Outcome]:
        """`map_concurrently` at this backend's concurrency."""
        return map_concurrently(fn, items, self.max_concurrency, on_done)

    # -- explainer ---------------------------------------------------------------------------------------------

    def chat_body(self, messages: list[dict], assistant_prefix: str, max_tokens: int, temperature: float,
                  seed: int) -> dict:
        return {"model": self.model, "messages": chat_messages_for_api(messages, assistant_prefix),
                "max_tokens": int(max_tokens), "temperature": float(temperature), "seed": int(seed)}

    def chat(self, messages, assistant_prefix, max_tokens, temperature, seed) -> Completion:
        data = self.request("chat.completions", self.chat_body(messages, assistant_prefix, max_tokens,
                                                                temperature, seed))
        message = (data["choices"][0] or {}).get("message") or {}
        text = message.get("content") or ""
        usage = data.get("usage") or {}
        return Completion(continuation_after(text, assistant_prefix), int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0))

    # -- simulator, all at once --------------------------------------------------------------------------------

    def echo_body(self, prompt: SimulationPrompt) -> dict:
        return {"model": self.model, "prompt": prompt.text, "max_tokens": 1, "temperature": 0.0, "echo": True,
                "logprobs": self.top_logprobs}

    def _probe_after_one(self, prefix: str) -> dict[str, float]:
        body = {"model": self.model, "prompt": prefix + "1", "max_tokens": 1, "temperature": 0.0,
                "logprobs": self.top_logprobs}
        data = self.request("completions", body)
        try:
            tops = data["choices"][0]["logprobs"]["top_logprobs"]
            return dict(tops[0])
        except (KeyError, IndexError, TypeError):
            raise LogprobsUnavailableError("the server returned no logprobs for a P(\"0\" | \"1\") probe") from None

    def slot_candidates(self, prompt: SimulationPrompt) -> tuple[list[dict], str, str]:
        """Per slot, the value candidates (token → logprob) as the server returned them; the alignment used; and
        how the server writes "10" ("single", "split", "unknown")."""
        data = self.request("completions", self.echo_body(prompt))
        candidates, alignment = slot_candidates(data, prompt, self.logprob_alignment)
        return candidates, alignment, ten_layout(data, prompt)

    def value_probabilities(self, prompt: SimulationPrompt) -> np.ndarray:
        """[slots, 11] probabilities of the values 0..10 at each slot, from the top logprobs (values outside the
        top candidates get 0; `expected_values` renormalizes over the rest)."""
        try:
            candidates, _, layout = self.slot_candidates(prompt)
            probs = np.stack([values_from_candidates(c) for c in candidates]) if candidates else \
                np.zeros((0, len(VALUES)))
            empty = int((probs.sum(axis=1) <= 0).sum())
            if candidates and empty > self.max_empty_slot_fraction * len(candidates):
                raise NoValueCandidatesError(
                    f"{empty} of {len(candidates)} slots have no value 0-10 among the top {self.top_logprobs} "
                    "candidates")
            probe = self.ten_probe == "always" or (self.ten_probe == "auto" and layout != "single")
            if probe and len(candidates):
                self._split_ten(prompt, probs)
        except ExcerptSimulationError:
            self.stats.add(failures=1)
            raise
        return probs

    def _split_ten(self, prompt: SimulationPrompt, probs: np.ndarray) -> None:
        """Where "10" is "1" then "0": P(10) = P("1")·P("0" | "1"), P(1) = P("1")·P(no digit | "1")."""
        text, offsets = prompt.text, prompt.slot_offsets()
        mass = probs.sum(axis=1)
        todo = [k for k in range(len(offsets))
                if probs[k, 1] > 0 and probs[k, 1] >= self.probe_threshold * mass[k]]
        outcomes = self.map(lambda k: self._probe_after_one(text[: offsets[k]]), todo)
        for outcome in outcomes:
            if not outcome.ok:
                raise outcome.error
            k, after = outcome.item, outcome.value
            digits = values_from_candidates({t: v for t, v in after.items() if len(t.strip()) == 1})
            p_one = probs[k, 1]
            probs[k, 10] += p_one * digits[0]
            probs[k, 1] = p_one * max(0.0, 1.0 - digits[:10].sum())

    # -- simulator, JSON ---------------------------------------------------------------------------------------

    def json_body(self, explanation: str, tokens: Sequence[str]) -> dict:
        body = {"model": self.model, "messages": json_simulation_messages(explanation, tokens),
                "max_tokens": 32 + self.simulator_max_tokens_per_token * len(tokens), "temperature": 0.0,
                "seed": 0}
        fmt = _response_format(self.json_mode, tokens)
        if fmt is not None:
            body["response_format"] = fmt
        return body

    def simulate_json(self, explanation: str, tokens: Sequence[str]) -> np.ndarray:
        """One activation in [0, 10] per token, from a chat model answering JSON. Raises JSONSimulationError
        (length, value, token or syntax problems) or LLMRequestError."""
        data = self.request("chat.completions", self.json_body(explanation, tokens))
        message = (data["choices"][0] or {}).get("message") or {}
        try:
            return parse_json_simulation(message.get("content") or "", tokens,
                                         grammar_safe if self.json_mode == "json_object_schema" else True)
        except JSONSimulationError:
            self.stats.add(failures=1)
            raise
