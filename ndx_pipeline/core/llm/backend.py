"""The LLM seam: what the explainer and the simulator need from a language model, and nothing about any one.

`LLMBackend` is the interface every backend implements — chat completion for explanations, per-slot value
distributions for the "all at once" simulator, optionally JSON-constrained chat for the JSON simulator — plus
`map` (run many calls at the backend's concurrency). Implementations: `local.LocalTransformersBackend` (in-process
transformers) and `openai.OpenAICompatibleBackend` (any OpenAI-compatible server); `registry.build_backend` picks
one by name. A new backend subclasses `LLMBackend`, answers through `cache.cached_call` so reruns are free, and
registers itself in `registry.BACKENDS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from ndx_pipeline.core.llm.cache import LLMStats


class RecordableLLMError(Exception):
    """An LLM call or answer that failed for one neuron or excerpt: recorded in its row, the layer goes on."""


class ExcerptSimulationError(RecordableLLMError, ValueError):
    """The answer for one excerpt cannot be used; the caller records that excerpt as failed, with this reason."""


def short_text(text: Any, limit: int = 200) -> str:
    """`text` on one line, cut to `limit` characters (for reasons in error messages)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
                     on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run `fn(item)` for every item with at most `max_concurrency` running at once (threads).

    An item that raises does not stop the others: its Outcome carries the error. `on_done` is called in the
    calling thread as each item finishes (e.g. to write results or caches per neuron); the list comes back in
    input order. If `on_done` raises (or the caller is interrupted), items not yet started are cancelled.
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

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], on_done=None) -> list[Outcome]:
        """Run `fn` over items at this backend's concurrency; an item that raises does not stop the others."""
        return map_concurrently(fn, items, self.max_concurrency, on_done)

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
