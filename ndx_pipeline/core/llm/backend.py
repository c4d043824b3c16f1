"""The LLM seam: what the explainer and the simulator need from a language model, and nothing about any one.

`LLMBackend` is the interface every backend implements — chat completion for explanations, per-slot value
distributions for the "all at once" simulator, optionally JSON-constrained chat for the JSON simulator — plus
`map` (run many calls at the backend's concurrency). Implementations: `local.LocalTransformersBackend` (in-process
transformers) and `openai.OpenAICompatibleBackend` (any OpenAI-compatible server); `registry.build_backend` picks
one by name. A new backend subclasses `LLMBackend`, answers through `cache.cached_call` so reruns are free, and
registers itself in `registry.BACKENDS`.
"""

from __future__ import annotations

import math
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from ndx_pipeline.core.llm.cache import LLMStats
from ndx_pipeline.core.llm.errors import NonFiniteAnswerError, PromptTooLongError, RecordableLLMError  # noqa: F401


class ExcerptSimulationError(RecordableLLMError, ValueError):
    """The answer for one excerpt cannot be used; the caller records that excerpt as failed, with this reason."""


def short_text(text: Any, limit: int = 200, redact: Callable[[str], str] | None = None) -> str:
    """`text` on one line, cut to `limit` characters (for reasons in error messages). `redact` (e.g. removing an
    API key) runs on the whole text first: a secret cut in half by the limit would no longer be recognised."""
    text = " ".join(str(text).split())
    if redact is not None:
        text = redact(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------------------------
# What a backend sends: an upper estimate of its length in tokens (its hash: `sent_prompts.sent_prompt_sha256`)


# Word-level pieces: a word with its leading space, a digit, a whitespace character, a punctuation mark. A BPE
# tokenizer rarely cuts finer, except inside long or rare words and non-ASCII text, which are counted by bytes.
_PIECE = re.compile(r" ?[^\W\d_]+|\d|\s|[^\w\s]|_")
ESTIMATE_MARGIN = 1.1
MESSAGE_OVERHEAD = 8  # chat-template tokens around each message (role markers, separators)


def _texts(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key != "role":
                yield from _texts(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _texts(item)


def estimate_tokens(sent: Mapping[str, Any]) -> int:
    """An upper estimate of the prompt tokens of a sent prompt (any mapping of texts and message lists), for models
    whose tokenizer is out of reach. Measured on SmolLM2's tokenizer: 1.1–1.2× the real count on explainer prompts
    (excerpt listings, where a plain characters/3 rule counts only 0.7×), 1.5–1.9× on English prose and code, ~1.0×
    on digits and CJK text; made-up long words can exceed it, which is why servers that can count are asked and a
    server's refusal is read (see the OpenAI-compatible backend)."""
    pieces = 0
    for text in _texts(sent):
        for piece in _PIECE.findall(text):
            size = len(piece.encode("utf-8"))
            pieces += 1 + (size - 1) // 4 if piece.isascii() else 1 + size // 2
    messages = len(sent.get("messages") or ()) if isinstance(sent.get("messages"), list) else 0
    return math.ceil(pieces * ESTIMATE_MARGIN) + MESSAGE_OVERHEAD * (messages + 1)


@dataclass
class Outcome:
    """The result of one item of `map_concurrently`: `value`, or the `error` it raised."""

    index: int
    item: Any
    value: Any = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def map_concurrently(fn: Callable[[Any], Any], items: Iterable[Any], max_concurrency: int = 4,
                     on_done: Callable[[Outcome], None] | None = None,
                     stopping: threading.Event | None = None) -> list[Outcome]:
    """Run `fn(item)` for every item with at most `max_concurrency` running at once (threads).

    An item that raises does not stop the others: its Outcome carries the error. `on_done` is called in the
    calling thread as each item finishes (e.g. to write results or caches per neuron); the list comes back in
    input order. If `on_done` raises (or the caller is interrupted), items not yet started are cancelled and
    `stopping` is set, so that work in flight that watches it (an in-process model's steps) ends early.
    """
    items = list(items)
    outcomes: list[Outcome | None] = [None] * len(items)

    def finish(i: int, value=None, error=None):
        outcomes[i] = Outcome(i, items[i], value, error)
        if on_done is not None:
            on_done(outcomes[i])

    if max_concurrency <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            try:
                value = fn(item)
            except Exception as exc:
                finish(i, error=exc)
            else:
                finish(i, value=value)
        return outcomes  # type: ignore[return-value]

    pool = ThreadPoolExecutor(max_workers=min(max_concurrency, len(items)), thread_name_prefix="ndx-llm")
    try:
        pending = {pool.submit(fn, item): i for i, item in enumerate(items)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                exc = fut.exception()
                if exc is None:
                    finish(i, value=fut.result())
                elif isinstance(exc, Exception):
                    finish(i, error=exc)
                else:  # KeyboardInterrupt / SystemExit in a worker
                    raise exc
    except BaseException:
        if stopping is not None:
            stopping.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return outcomes  # type: ignore[return-value]




VALUES = tuple(range(11))  # the activation values a simulator predicts, 0..10


@dataclass(frozen=True)
class SimulationPrompt:
    """A simulator prompt as text segments; the activation of target token i is read right after segment
    `slots[i]` (where the value would be written). Built by the method (`simulator.simulation_prompt`), read by
    a backend's `value_probabilities`."""

    segments: tuple[str, ...]
    slots: tuple[int, ...]

    @property
    def text(self) -> str:
        return "".join(self.segments)

    def slot_offsets(self) -> list[int]:
        """Character offset in `text` where each slot's value would begin."""
        ends, pos = [], 0
        for seg in self.segments:
            pos += len(seg)
            ends.append(pos)
        return [ends[i] for i in self.slots]


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int


class LLMBackend(ABC):
    """What the explanation and simulation stages need from an LLM."""

    @property
    @abstractmethod
    def name(self) -> str:
        """Identifies backend and model in stored rows and metadata (never a secret)."""

    @abstractmethod
    def chat(self, messages: list[dict], assistant_prefix: str, max_tokens: int, temperature: float,
             seed: int) -> Completion:
        """Continue the assistant's reply, which starts with `assistant_prefix`; return only the new text."""

    @abstractmethod
    def value_probabilities(self, prompt: SimulationPrompt) -> np.ndarray:
        """[slots, 11]: probability that the value at each slot is 0..10 (not renormalized)."""

    stats: LLMStats
    max_concurrency: int = 1
    context_tokens: int | None = None  # the context window when set explicitly; None: ask the model or server
    dtype: str | None = None  # the precision an in-process model computes in; None: a server's own affair
    precision = None  # an in-process model's `dtype: auto`: the measured choice (precision.PrecisionChoice)
    log: Callable[[str], None] | None = None  # where the backend says what it decided by itself (the run's log)

    def sent_prompt(self, messages: list[dict], assistant_prefix: str) -> dict:
        """The chat request as this backend sends it (what `chat` puts before the model): the hash of this is
        what rows store as prompt_sha256, and lineage rebuilds it. By default the messages as given, with the
        assistant's answer prefilled with `assistant_prefix`."""
        return {"messages": messages, "assistant_prefix": assistant_prefix}

    def simulation_top_value(self) -> int:
        """The top of the value scale the all-at-once simulator's prompt asks this backend for: 10 (the method's
        0–10), or 9 where the backend reads every value of a 0–9 scale from one request but the value 10 only at
        many times the cost (see `OpenAICompatibleBackend`'s `ten_probe`). `value_probabilities` then gets a 0–9
        prompt, and the method puts its expected value back on the 0–10 scale."""
        return VALUES[-1]

    def context_window(self) -> int | None:
        """The model's context in tokens (prompt and answer together); None when it cannot be known."""
        return self.context_tokens

    def count_tokens(self, sent: Mapping[str, Any], limit: int | None = None) -> int:
        """The prompt tokens of `sent` (a `sent_prompt`, or {"prompt": text}): exact where the backend can count,
        else an upper estimate. With `limit`, an estimate already within it may be returned without counting."""
        return estimate_tokens(sent)

    def check_fits(self, sent: Mapping[str, Any], max_tokens: int, what: str = "prompt") -> None:
        """Raise PromptTooLongError when `sent` plus `max_tokens` of answer cannot fit the context window."""
        context = self.context_window()
        if context is None:
            return
        budget = context - int(max_tokens)
        needed = self.count_tokens(sent, limit=budget)
        if needed > budget:
            raise PromptTooLongError(
                f"the {what} needs about {needed} tokens plus {int(max_tokens)} for the answer, more than the "
                f"model's context of {context} tokens", context)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], on_done=None) -> list[Outcome]:
        """Run `fn` over items at this backend's concurrency; an item that raises does not stop the others."""
        return map_concurrently(fn, items, self.max_concurrency, on_done, self.stopping)

    @property
    def stopping(self) -> threading.Event:
        """Set when a caller of `map` was interrupted: an in-process model ends the work in flight at its next
        step (LLMStopped) instead of finishing it for nobody."""
        if "_stopping" not in self.__dict__:
            self._stopping = threading.Event()
        return self._stopping

    def chat_json(self, messages: list[dict], schema: dict, max_tokens: int, seed: int) -> Completion:
        """A greedy (temperature 0) chat answer constrained to JSON, as far as the backend can: to `schema` (a
        JSON Schema) where it supports one, else to any JSON, else by the prompt alone. The caller parses and
        checks the answer."""
        raise RecordableLLMError(f"the backend {self.name} has no JSON mode; use the all-at-once simulator")

    def can_pin(self, token: str) -> bool:
        """Whether a schema given to `chat_json` may pin `token` as a constant (some servers' schema converters
        cannot express every string); where not, the caller leaves it free and checks it in the answer."""
        return True

    def close(self) -> None:
        """Release connections (nothing for in-process models)."""
