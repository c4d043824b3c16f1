"""The contract's frames from a finished selection (`selection.LayerSelection`), built columnar in Arrow and polars:
one layer's `activation_records` rows (`records_frame`) and the lookup baseline's token table (`token_table_frame`),
with the token texts of the windows as a list column of codes (`window_token_lists`).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ndx_pipeline.core.contract import (
    DEAD,
    FAILED_UNIT,
    RANDOM,
    RECORD_SCHEMA,
    TOKEN_TABLE_SCHEMA,
    TOP,
    UNIT_COLUMNS,
    conform,
    describe_ids,
    quantile_kind,
)
from ndx_pipeline.core.data.selection import LayerSelection
from ndx_pipeline.core.data.selection_kernel import cut_windows
from ndx_pipeline.core.data.units import UnitSet
from ndx_pipeline.core.data.windows import TokenTexts, Windows


def records_frame(layer: int, selection: LayerSelection, windows: Windows, token_texts: TokenTexts,
                  units: UnitSet | None = None) -> pl.DataFrame:
    """The contract's activation_records rows for one layer, per unit: `top` rows (rank 0 strongest; only windows
    where the unit fired, max > 0, so a rarely firing unit has fewer than top_k), then `random` rows, then (with
    quantile samples) `quantile_<bucket>` rows, bucket 0 lowest, ordered by window index. A unit that never fired (its
    max over the corpus ≤ 0) gets one `dead` row instead, with no window: nothing downstream explains it.

    Columnar from the selection's tensors to Arrow: the rows' order is settled on index arrays (dead rows in their
    unit's place), the wide columns are gathered once in that order, the activations are cut from the kept windows
    straight into the list column's values (`cut_windows`: one copy, their max taken on the way) and the tokens from
    the windows' ids, so no Python runs per row and no frame is sorted."""
    import pyarrow as pa

    mean, var, mx = selection.moments()
    ids = np.asarray(selection.ids, dtype=np.int64)
    fired = selection.fired()
    blocks = []  # (unit positions, kind, ranks, windows, where the activations are: (array [units, ranks, T], u, r))

    def block(kind, keep, windows_of, acts_of):
        u, r = np.nonzero(keep & fired[:, None])
        blocks.append((u, kind, r, windows_of[u, r], (acts_of, u, r)))

    top_window = selection.top_window.cpu().numpy()
    # a top row only where the unit fired in the window: a sparse latent seen in 3 windows has 3 top rows, not 3 and
    # 17 windows of zeros
    block(TOP, (top_window >= 0) & (selection.top_max.cpu().numpy() > 0), top_window, selection.top_acts.cpu().numpy())
    sample = np.broadcast_to(selection.sample[None, :], (len(ids), len(selection.sample)))
    block(RANDOM, sample >= 0, sample, selection.sample_acts.cpu().numpy())
    q_bounds = None
    if selection.quantile_k:
        q_windows, q_acts, q_bounds, _ = selection.quantile_samples()
        for bucket in range(q_windows.shape[1]):
            block(quantile_kind(bucket), q_windows[:, bucket] >= 0, q_windows[:, bucket], q_acts[:, bucket])
    failed = selection.failed()  # a unit whose activation was not finite somewhere: one row, the reason in `error`
    is_failed = np.zeros(len(ids), dtype=bool)
    is_failed[list(failed)] = True
    dead = np.nonzero(~fired & ~is_failed)[0]  # a unit that never fired: one row, no window (-1), no activations
    blocks.append((dead, DEAD, np.zeros(len(dead), dtype=np.int64), np.full(len(dead), -1), None))
    gone = np.nonzero(is_failed)[0]
    blocks.append((gone, FAILED_UNIT, np.zeros(len(gone), dtype=np.int64), np.full(len(gone), -1), None))
    unit = np.concatenate([b[0] for b in blocks])
    order = np.argsort(unit, kind="stable")  # per unit: top, random, quantile buckets, each by rank (or its dead row)
    unit = unit[order]
    window = np.concatenate([b[3] for b in blocks])[order].astype(np.int64)
    is_dead = window < 0
    seen = np.where(is_dead, 0, window)  # a dead row reads window 0, masked to null below
    length = np.where(is_dead, 0, windows.length[seen]).astype(np.int64)  # a window's real tokens (0: dead row)
    offset = _offsets(length)
    # each block's windows cut straight into the rows' activations, with their max over the real tokens
    row_of = np.empty_like(order)
    row_of[order] = np.arange(len(order))
    values = np.empty(offset[-1], dtype=np.float32)
    max_activation = np.empty(len(order), dtype=np.float32)
    start = 0
    for u, *_, source in blocks:
        if source is not None:
            acts_of, u, r = source
            cut_windows(acts_of, u, r, row_of[start : start + len(u)], offset, length, values, max_activation)
        start += len(u)
    max_activation = np.where(is_dead, mx[unit], max_activation)  # a dead unit's row: its max over the corpus

    def of_window(values, dtype):  # a window's value per row, null for a dead row
        return pa.array(np.asarray(values)[seen].astype(dtype), mask=is_dead)

    # per-unit columns, gathered to rows (a failed unit's moments are not known: NaN)
    mean, var, mx = (np.where(is_failed, np.nan, x) for x in (mean, var, mx))
    max_activation = np.where(is_failed[unit], np.nan, max_activation)
    errors = [f"activation not finite on {failed[u][0]} tokens, first in window {failed[u][1]}" if u in failed else None
              for u in range(len(ids))]
    per_unit = pl.DataFrame({
        "neuron": ids.astype(np.int32), "neuron_mean": mean.astype(np.float64),
        "neuron_variance": var.astype(np.float64), "neuron_max": mx.astype(np.float32),
        "error": pl.Series(errors, dtype=pl.String),
        "neuron_token_count": np.full(len(ids), selection.count, dtype=np.int64),
        "quantile_boundaries": (_rows(q_bounds.astype(np.float64)).cast(pl.List(pl.Float64))
                                if q_bounds is not None else pl.Series([None] * len(ids), dtype=pl.List(pl.Float64))),
        **(units.describe() if units is not None else describe_ids(selection.ids)),
    }, schema_overrides=UNIT_COLUMNS)
    frame = pl.DataFrame({
        "layer": np.full(len(unit), layer, dtype=np.int32),
        "kind": np.concatenate([np.full(len(b[0]), b[1]) for b in blocks])[order],
        "rank": np.concatenate([b[2] for b in blocks])[order].astype(np.int32),
        "doc_id": pl.Series(windows.doc_ids, dtype=pl.String).gather(
            pl.Series(of_window(windows.doc_index, np.int64))),
        "token_start": of_window(windows.token_start, np.int32),
        "tokens": window_token_lists(windows, token_texts, seen, null=is_dead),
        "activations": _lists(pa.array(values), offset, null=is_dead),
        "window_index": pa.array(seen.astype(np.int32), mask=is_dead),
        "char_start": of_window(windows.char_start, np.int32),
        "char_end": of_window(windows.char_end, np.int32),
        "max_activation": max_activation.astype(np.float32, copy=False),
    }).hstack(per_unit[unit])
    if failed:  # where it first happened: the window's index on the failed row (its other window columns null)
        first = pl.Series([failed[u][1] if u in failed else None for u in range(len(ids))], dtype=pl.Int32)[unit]
        frame = frame.with_columns(pl.when(pl.col("kind") == FAILED_UNIT).then(first).otherwise(
            pl.col("window_index")).alias("window_index"))
    return conform(frame, RECORD_SCHEMA)


def _rows(matrix: np.ndarray) -> pl.Series:
    """A 2-D array as an Array series, one row per row, built from the flat buffer (no per-row conversion)."""
    return pl.Series(np.ascontiguousarray(matrix).reshape(-1)).reshape(matrix.shape)


def _offsets(length: np.ndarray) -> np.ndarray:
    """Where each of consecutive lists of `length[i]` items starts, and (last) where the last one ends: int64."""
    return np.concatenate([[0], np.cumsum(length)]).astype(np.int64)


def _lists(values, offsets: np.ndarray, null: np.ndarray | None = None) -> pl.Series:
    """Arrow `values` cut at `offsets` (`_offsets`) into consecutive lists, as a List series (no copy per row); rows
    where `null` is set are null lists (they must be empty)."""
    import pyarrow as pa

    mask = pa.array(null) if null is not None and null.any() else None
    return pl.from_arrow(pa.LargeListArray.from_arrays(pa.array(offsets), values, mask=mask))


def window_token_lists(windows: Windows, token_texts: TokenTexts, window: np.ndarray,
                       null: np.ndarray | None = None) -> pl.Series:
    """The token texts of each given window (a list per entry of `window`; null where `null` is set), decoding each
    distinct token id once and building each distinct window's list once. The texts are held as codes, List(Enum) of
    the distinct texts in ascending order: a whole-model layer's records hold 11M tokens, and as codes they are
    gathered, split into excerpts and written (`write_parquet_atomic` stores strings) without a string copied or
    hashed; `.cast(pl.List(pl.String))` gives the strings."""
    import pyarrow as pa

    distinct, inverse = np.unique(window, return_inverse=True)
    length = windows.length[distinct].astype(np.int64)
    ids = windows.ids[distinct]  # [m, T]
    kept = np.arange(ids.shape[1])[None, :] < length[:, None]
    vocab, position = np.unique(ids[kept], return_inverse=True)
    texts = token_texts(vocab)
    enum = pl.Enum(pl.Series(texts, dtype=pl.String).unique().sort())  # ids with the same text (rare) share it
    items = pa.array(texts, type=pa.large_string()).take(pa.array(position.reshape(-1)))
    inverse = pl.Series(inverse.reshape(-1), dtype=pl.Int64)
    if null is not None and null.any():
        inverse = inverse.scatter(np.nonzero(null)[0], None)
    return _lists(items, _offsets(length)).cast(pl.List(enum)).gather(inverse)


def token_table_frame(layer: int, selection: LayerSelection, token_texts: TokenTexts) -> pl.DataFrame:
    """The lookup table of one layer: one row per neuron × distinct token text seen in the corpus.

    Keyed by the token's text (`tokenizer.decode([id])`, as in the `tokens` columns), so the stored excerpts can be
    looked up without token ids; the rare ids that decode to the same text are merged (counts and sums added)."""
    ids, counts, sums = selection.token_table()
    texts = token_texts(ids)
    neurons = selection.ids
    frame = pl.DataFrame({"token": texts, "count": counts.astype(np.int64)})
    frame = frame.with_columns([pl.Series(f"s{i}", sums[:, i], dtype=pl.Float64) for i in range(len(neurons))])
    frame = frame.filter(pl.col("count") > 0).group_by("token", maintain_order=True).sum()
    parts = []
    for i, neuron in enumerate(neurons):
        parts.append(frame.select(
            pl.lit(layer, dtype=pl.Int32).alias("layer"), pl.lit(neuron, dtype=pl.Int32).alias("neuron"),
            pl.col("token"), pl.col("count").cast(pl.Int64), pl.col(f"s{i}").alias("activation_sum"),
            (pl.col(f"s{i}") / pl.col("count")).alias("mean_activation"),
        ))
    if not parts:
        return pl.DataFrame(schema=TOKEN_TABLE_SCHEMA)
    return pl.concat(parts).sort(["neuron", "token"]).cast(TOKEN_TABLE_SCHEMA)
