"""Getting one answer from an OpenAI-compatible server: the request errors, and a retry loop under a deadline.

`call_with_retries` calls one attempt until it returns: exponential backoff with jitter, `Retry-After` honoured on
429 (and shared by all threads of a backend through a `RateGate`), 5xx / timeouts / connection errors / truncated
bodies retried, a total deadline, no retry on other 4xx. Every reason it reports goes through a `redact` function
first, so an API key a server echoes never reaches an exception message or a log line.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ndx_pipeline.core.llm.backend import RecordableLLMError, short_text

REDACTED = "[redacted]"


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


# ---------------------------------------------------------------------------------------------------------------
# Secrets


SECRET_RUN = 6  # a run of this many characters of a secret (or the whole of a shorter one) counts as the secret


def redact_secret(text: str, secret: str | None) -> str:
    """`text` with the secret replaced: the whole of it, and any run of at least SECRET_RUN of its characters — a
    prefix left by a cut, a suffix, a piece from the middle — so a message cut before it was redacted, or a server
    that echoes part of a key, leaks nothing a reader could use. A secret under 4 characters is left alone: it
    would match ordinary text."""
    if not isinstance(secret, str) or len(secret) < 4:
        return text
    run = min(SECRET_RUN, len(secret))
    covered = [False] * len(text)
    for piece in {secret[i:i + run] for i in range(len(secret) - run + 1)}:
        start = text.find(piece)
        while start >= 0:
            covered[start:start + run] = [True] * run
            start = text.find(piece, start + 1)
    if not any(covered):
        return text
    out, i = [], 0
    while i < len(text):
        if covered[i]:
            while i < len(text) and covered[i]:
                i += 1
            out.append(REDACTED)
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# How servers say that a prompt does not fit: OpenAI, vLLM and llama-cpp-python ("This model's maximum context
# length is 2048 tokens…"), llama.cpp ("…exceed context window of 2048"), llama-server ("… context size (2048)").
_CONTEXT_LIMIT = (re.compile(r"maximum context length is (\d+)"), re.compile(r"context window of (\d+)"),
                  re.compile(r"context (?:size|length) \(?(\d+)\)?"))


def context_limit_in(text: str) -> int | None:
    """The context window a server's refusal names, or None when the message is not about the context."""
    for pattern in _CONTEXT_LIMIT:
        found = pattern.search(text)
        if found:
            return int(found.group(1))
    return None


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


def classify_error(exc: BaseException, redact: Callable[[str], str] = lambda s: s) -> Verdict | None:
    """How the retry loop treats an exception raised by one attempt; None: not a transport error, re-raise.
    A server's message is redacted whole, before it is cut to one short line."""
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
            detail = short_text(exc.message, redact=redact)
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


def _redacted(exc: Exception, redact: Callable[[str], str]) -> Exception:
    """`exc` itself when its message holds nothing to redact, else one like it with the redacted message."""
    text = str(exc)
    clean = redact(text)
    if clean == text:
        return exc
    try:
        again = type(exc)(clean)
    except Exception:  # a type that takes other arguments: the message, redacted, on a plain one
        return RuntimeError(f"{type(exc).__name__}: {clean}")
    return again if str(again) == clean else RuntimeError(f"{type(exc).__name__}: {clean}")


def call_with_retries(attempt: Callable[[float], Any], policy: RetryPolicy, *, gate: RateGate | None = None,
                      on_attempt: Callable[[], None] | None = None,
                      on_retry: Callable[[str, float], None] | None = None,
                      redact: Callable[[str], str] = lambda s: s,
                      sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                      rng: Callable[[], float] = random.random) -> Any:
    """Call `attempt(timeout_s)` until it returns, retrying per `policy`.

    Raises `LLMRejectedError` for a non-retryable status, `LLMGaveUpError` when attempts or the deadline run
    out; exceptions that are not transport errors (see `classify_error`) propagate, their message redacted (an
    exception whose message held a secret is raised again, of the same type where it can be made from the redacted
    message alone, without the original chained).
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
            verdict = classify_error(exc, redact)
            if verdict is None:
                raise _redacted(exc, redact) from None
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
