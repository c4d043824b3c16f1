"""Batching for an in-process model: requests made one at a time by many threads are computed together.

The stages hand an LLM backend many independent items at once (`LLMBackend.map`, one thread per item in flight).
For a server that is concurrency; for a model in this process it is the chance to batch: each thread's request
waits in a `Batcher` for a moment, the first thread to arrive computes everything waiting (up to `max_batch`) in
one call, and every thread gets its own answer back. The per-item logic — the cache, prompt fitting, retries,
parsing, failure rows — stays one item at a time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class _Pending:
    request: Any
    done: bool = False
    value: Any = None
    error: BaseException | None = None


class Batcher:
    """Collects requests from many threads and computes them `max_batch` at a time with `compute(requests) ->
    results` (one result, or an Exception, per request, in order). A thread that finds nobody computing leads: it
    waits until a batch is full or requests stop arriving (`gather_s` without a new one, `patience_s` at most),
    computes that batch, and steps down; every waiting thread wakes, those answered return, and one of the others
    leads the next batch (so the thread that led is free at once to bring its next request)."""

    def __init__(self, compute: Callable[[Sequence[Any]], Sequence[Any]], max_batch: int = 8,
                 gather_s: float = 0.05, patience_s: float = 0.5):
        self.compute, self.max_batch = compute, max(1, int(max_batch))
        self.gather_s, self.patience_s = gather_s, patience_s
        self._changed = threading.Condition()
        self._waiting: list[_Pending] = []
        self._computing = False
        self.batches: list[int] = []  # sizes of the batches computed (for tests and benchmarks)

    def submit(self, request: Any) -> Any:
        mine = _Pending(request)
        with self._changed:
            self._waiting.append(mine)
            self._changed.notify_all()
            while not mine.done:
                if self._computing:
                    self._changed.wait()
                    continue
                self._computing = True
                batch = self._gather()
                self._changed.release()
                try:
                    self._run(batch)
                finally:
                    self._changed.acquire()
                    self._computing = False
                    self._changed.notify_all()
        if mine.error is not None:
            raise mine.error
        return mine.value

    def _gather(self) -> list[_Pending]:
        """(Holding the lock.) Wait until a whole batch waits, or no request has arrived for `gather_s` (at most
        `patience_s`), then take up to `max_batch` of the waiting requests, oldest first."""
        started = last_change = time.monotonic()
        seen = len(self._waiting)
        while len(self._waiting) < self.max_batch:
            now = time.monotonic()
            if now - last_change >= self.gather_s or now - started >= self.patience_s:
                break
            self._changed.wait(self.gather_s / 5)
            if len(self._waiting) != seen:
                seen, last_change = len(self._waiting), time.monotonic()
        batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch:]
        return batch

    def _run(self, batch: list[_Pending]) -> None:
        self.batches.append(len(batch))
        try:
            results = list(self.compute([p.request for p in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} requests gave {len(results)} results")
        except BaseException as exc:  # the whole batch failed: every request says why
            results = [exc] * len(batch)
        for pending, result in zip(batch, results):
            if isinstance(result, BaseException):
                pending.error = result
            else:
                pending.value = result
            pending.done = True
