"""LLM work as items, so that a stage can put everything it asks of one LLM in flight at once.

A `Work` is one table's worth of requests: its items, how to do one (`run(item) -> row`, an LLM failure recorded
in the row, never raised) and the table its rows make. `run_together` runs several works through one backend's
`map` — one wave under the backend's concurrency (a server's limit of requests in flight; an in-process model's
batch) — instead of one after the other, and counts the items on one `Progress`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from ndx_pipeline.core.progress import Progress


@dataclass
class Work:
    items: list
    run: Callable[[Any], dict]
    table: Callable[[list[dict]], pl.DataFrame]


def run_together(backend, works: Sequence[Work], progress: Progress | None = None) -> list[pl.DataFrame]:
    """Every item of every work through `backend.map` at once; one table per work, rows in item order."""
    tagged = [(w, item) for w, work in enumerate(works) for item in work.items]
    if progress is not None:
        progress.expect(len(tagged))

    def done(outcome) -> None:
        if outcome.error is not None:  # not an LLM failure (those are rows): a bug or an interruption
            raise outcome.error
        if progress is not None:
            progress.advance()

    outcomes = backend.map(lambda t: works[t[0]].run(t[1]), tagged, on_done=done) if tagged else []
    rows: list[list[dict]] = [[] for _ in works]
    for outcome in outcomes:
        rows[outcome.item[0]].append(outcome.value)
    return [work.table(r) for work, r in zip(works, rows)]
