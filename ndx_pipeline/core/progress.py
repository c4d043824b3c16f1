"""Progress of long work, as one line a reader can act on: what, done/total, rate, time left.

Stages take a `log` callable (Dagster's `context.log.info`, the CLI's console, `print`) and report through
`Progress`, which writes at most one line per `every_s` seconds of work, plus the last one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

Log = Callable[[str], None]


def quiet(_message: str) -> None:
    """A log that says nothing (the default of every stage)."""


def duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


WARM_UP_SHARE = 0.02  # the rate is measured once this share of the work (and one item) is done after the first


class Progress:
    """Counts finished items of one piece of work (`what`: "layer 3 explanations") and logs
    `what: done/total unit (rate unit/s, ETA …)` every `every_s` seconds and when the work is done.
    The rate and time left are measured from the first finished item on (what comes before it is warm-up: a model
    loading, a first batch compiling), and say "estimating" until enough work came after it.
    Thread-safe: items may finish in worker threads."""

    def __init__(self, what: str, total: int, log: Log = quiet, unit: str = "", every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.log, self.unit = what, int(total), log, f" {unit}" if unit else ""
        self.every_s, self.clock = every_s, clock
        self.done = 0
        self.started = clock()
        self._last = self.started
        self._first: tuple[float, int] | None = None  # (when, done) at the first finished item: the warm-up's end
        self._lock = threading.Lock()

    def line(self) -> str:
        now = self.clock()
        elapsed = now - self.started
        text = f"{self.what}: {self.done}/{self.total}{self.unit}"
        if self.done >= self.total:
            rate = self.done / elapsed if elapsed > 0 else 0.0
            return f"{text} in {duration(elapsed)} ({rate:.3g}{self.unit}/s)"
        if self._first is not None:
            since, before = now - self._first[0], self._first[1]
            if since > 0 and self.done - before >= max(1, WARM_UP_SHARE * self.total):
                rate = (self.done - before) / since
                return f"{text} ({rate:.3g}{self.unit}/s, ETA {duration((self.total - self.done) / rate)})"
        return f"{text} (estimating the rate and time left)"

    def expect(self, n: int) -> None:
        """n more items to do (work whose size is known only once it starts)."""
        with self._lock:
            self.total += int(n)

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = self.clock()
            if self._first is None and self.done > 0:
                self._first = (now, self.done)
            if now - self._last < self.every_s and self.done < self.total:
                return
            self._last = now
            message = self.line()
        self.log(message)

    def set(self, done: int) -> None:
        """For work that reports a running count (tokens processed) rather than finished items."""
        self.advance(done - self.done)
