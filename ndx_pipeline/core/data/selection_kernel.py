"""The streaming selection's update for one batch of dense units on the CPU, compiled (numba): one call per layer and
batch does what `LayerSelection`'s torch path does in about 60 tensor operations. Beside it, `order_statistics` (the
quantile pilot's boundaries without sorting every row) and `cut_windows` (the kept windows copied into the records'
rows once, `record_frames.records_frame`).

On 2 CPU cores each of those operations costs 15–300 µs, mostly dispatch and temporaries, for a [16 windows × 64
tokens × 1536 neurons] batch; compiled, the batch is read once for its per-window sums, squares, maxima and minima,
and each (unit, window) pair then costs a few comparisons. Measured on the bundled corpus (113k tokens), both signs
of every neuron: over 8 layers the update went from 5.9 to 3.0 ms per layer and batch; over all 30 layers the pass
from 1.26–1.29× to 1.16–1.17× the bare forward (`benchmarks/activations.py`). What remains is mostly copying the
windows that enter (a window's activations of one unit are strided in the batch: ≈ 0.4 µs each, ≈ 4000 per batch
just after the quantile pilot) and the one read of the batch (≈ 0.8 ms).

The update runs on numba's threads (windows, then units, in parallel; each unit's state is its own, so the result
does not depend on the threads): the forward waits for it, so on its own thread the other core sat idle. 30 layers ×
30k tokens, fresh processes, three runs each: 4.5 s beyond a bare forward against 5.3 s on one thread. (An earlier
try over 8 layers measured no gain: within the noise of runs that short.)

The kept sets are those of the torch path exactly: the top windows are the top k by (max desc, window asc) of every
window seen, the quantile samples the k lowest priorities of each bucket (priorities drawn by the caller, as the torch
path draws them), so only which slot holds which window differs, and `finalize` / `quantile_samples` order the slots.
Moments are summed per window in float32 (the torch path: per batch), then over the corpus in float64.

Plain numpy arrays in, nothing returned: the arrays given are updated in place. The torch path remains the reference
(tests compare the two) and the path for GPUs and for sparse units."""

from __future__ import annotations

import threading

import numpy as np
from numba import njit, prange

# sums and squares may be reassociated (vectorized); comparisons keep IEEE semantics (infinities mark empty slots)
_VECTOR_MATH = {"nsz", "arcp", "contract", "reassoc"}


def _compiled(**options):
    """numba's njit (releasing the GIL), its machine code cached on disk: beside this module, else in the user's
    cache folder (numba's choice; the first process compiles in ≈ 8 s, later ones load it in 0.2 s). Where neither can
    be written (a read-only image whose home is read-only too), numba refuses to cache, and each process compiles
    on first use instead of failing to import."""
    def compile_(function):
        try:
            return njit(cache=True, nogil=True, **options)(function)
        except RuntimeError:  # "cannot cache function …: no locator available"
            return njit(nogil=True, **options)(function)

    return compile_


@_compiled(fastmath=_VECTOR_MATH, parallel=True)
def _window_stats(a, mask, win_sum, win_sq, win_max, win_min):
    """Per window b and column c of a [B, T, m]: the sum, sum of squares, max and min over the window's real tokens
    (mask[b, t]); [B, m] each. A window with no real token has max -inf and min +inf. Windows in parallel."""
    n_windows, n_tokens, m = a.shape
    for b in prange(n_windows):
        s = np.zeros(m, np.float32)
        q = np.zeros(m, np.float32)
        hi = np.full(m, -np.inf, np.float32)
        lo = np.full(m, np.inf, np.float32)
        for t in range(n_tokens):
            if not mask[b, t]:
                continue
            row = a[b, t]
            for c in range(m):
                x = row[c]
                s[c] += x
                q[c] += x * x
                if x > hi[c]:
                    hi[c] = x
                if x < lo[c]:
                    lo[c] = x
        win_sum[b] = s
        win_sq[b] = q
        win_max[b] = hi
        win_min[b] = lo


@_compiled(inline="always")
def _copy_window(dest, a, mask, b, column, sign):
    """dest[:] = sign × window b's activations of `column`, 0 at its padding."""
    for t in range(a.shape[1]):
        dest[t] = sign * a[b, t, column] if mask[b, t] else np.float32(0.0)


# one parallel kernel at a time in a process: numba's fallback thread pool (where OpenMP is missing) may not be entered
# from two threads at once
_ONE_AT_A_TIME = threading.Lock()


def update_batch(*arrays) -> None:
    """Merge a batch into a layer's selection, in place (`_update_batch`)."""
    with _ONE_AT_A_TIME:
        _update_batch(*arrays)


@_compiled(parallel=True)
def _update_batch(a, mask, window_index, mirrored, sample_quantiles,
                  total, squares, running_max, per_window_max,
                  top_max, top_window, top_acts, top_min,
                  q_bounds, q_seen, q_priority, q_window, q_acts, priority):
    """Merge a batch into a layer's selection, in place; units in parallel (each unit's state is its own).

    a [B, T, m] float32 (C-contiguous), the units' activations (mirrored: the first half's; unit m + c is column c
    negated); mask [B, T] bool, real tokens; window_index [B] int64.
    total, squares [n] float64: running sums and sums of squares; running_max [n]; per_window_max [n, B], written:
    each unit's max per window (the quantile pilot keeps it).
    top_max, top_window, top_acts, top_min: the kept top windows [n, k], [n, k], [n, k, T] and the weakest kept max
    [n]; a window enters only where the unit fired (max > 0).
    sample_quantiles: merge the batch into the quantile samples q_seen [n, buckets], q_priority / q_window
    [n, buckets, k], q_acts [n, buckets, k, T], each (unit, window) with its priority [n, B] and its bucket the count
    of q_bounds [n, levels] at or below its max."""
    n_windows, _, m = a.shape
    n = running_max.shape[0]
    k = top_max.shape[1]
    win_sum = np.empty((n_windows, m), np.float32)
    win_sq = np.empty((n_windows, m), np.float32)
    win_max = np.empty((n_windows, m), np.float32)
    win_min = np.empty((n_windows, m), np.float32)
    _window_stats(a, mask, win_sum, win_sq, win_max, win_min)
    for c in prange(m):
        for b in range(n_windows):
            s, q = np.float64(win_sum[b, c]), np.float64(win_sq[b, c])
            total[c] += s
            squares[c] += q
            per_window_max[c, b] = win_max[b, c]
            if mirrored:
                total[m + c] -= s
                squares[m + c] += q
                per_window_max[m + c, b] = -win_min[b, c]
    for u in prange(n):
        unit = np.int64(u)  # (prange's index is unsigned: mixed with m it would be typed float)
        column = unit - m if unit >= m else unit
        sign = np.float32(-1.0) if unit >= m else np.float32(1.0)
        mx = running_max[u]
        for b in range(n_windows):
            mx = max(mx, per_window_max[u, b])
        running_max[u] = mx
        if sample_quantiles:
            _sample_quantiles(u, column, sign, a, mask, window_index, per_window_max, q_bounds, q_seen, q_priority,
                              q_window, q_acts, priority)
        floor = top_min[u]
        for b in range(n_windows):
            x = per_window_max[u, b]
            if not (x > 0 and x >= floor):
                continue
            weakest = 0  # the slot of the smallest (max, then largest window) kept; empty slots hold -inf
            for s in range(1, k):
                if top_max[u, s] < top_max[u, weakest] or (
                        top_max[u, s] == top_max[u, weakest] and top_window[u, s] > top_window[u, weakest]):
                    weakest = s
            w = window_index[b]
            if x > top_max[u, weakest] or (x == top_max[u, weakest] and w < top_window[u, weakest]):
                top_max[u, weakest] = x
                top_window[u, weakest] = w
                _copy_window(top_acts[u, weakest], a, mask, b, column, sign)
                floor = top_max[u].min()
        top_min[u] = floor


@_compiled(inline="always")
def _sample_quantiles(u, column, sign, a, mask, window_index, per_window_max, q_bounds, q_seen, q_priority, q_window,
                      q_acts, priority):
    """Unit u's windows of the batch into its buckets' bottom-k samples: a window takes the slot of its bucket's
    largest kept priority when its own is below it (a free slot holds a priority above every one drawn)."""
    for b in range(per_window_max.shape[1]):
        x = per_window_max[u, b]
        bucket = 0
        for level in range(q_bounds.shape[1]):
            if q_bounds[u, level] <= x:
                bucket += 1
        q_seen[u, bucket] += 1
        largest = 0
        for s in range(1, q_priority.shape[2]):
            if q_priority[u, bucket, s] > q_priority[u, bucket, largest]:
                largest = s
        if priority[u, b] < q_priority[u, bucket, largest]:
            q_priority[u, bucket, largest] = priority[u, b]
            q_window[u, bucket, largest] = window_index[b]
            _copy_window(q_acts[u, bucket, largest], a, mask, b, column, sign)


@_compiled()
def cut_windows(source, unit, slot, row, offset, length, values, row_max):
    """The records' `activations` and `max_activation` from a block of kept windows, without a [rows, T] copy: for
    each i, the first length[row[i]] activations of source[unit[i], slot[i]] ([n, k, T], any layout) go to
    values[offset[row[i]]:], and their max (NaN if one is NaN; -inf for none) to row_max[row[i]]."""
    for i in range(unit.shape[0]):
        r = row[i]
        start, n_tokens = offset[r], length[r]
        window = source[unit[i], slot[i]]
        top = -np.inf
        nan = False
        for t in range(n_tokens):
            x = window[t]
            values[start + t] = x
            if x > top:
                top = x
            elif x != x:
                nan = True
        row_max[r] = np.nan if nan else top


def order_statistics(x, ranks):
    """Each row's values of ascending rank `ranks` (sorted, distinct), x [n, m] with no NaN → [n, len(ranks)]
    (`_order_statistics`)."""
    with _ONE_AT_A_TIME:
        return _order_statistics(x, ranks)


@_compiled(parallel=True)
def _order_statistics(x, ranks):
    """A quickselect per rank on a copy of each row, each searching only above the rank before it; rows in parallel."""
    n, m = x.shape
    out = np.empty((n, ranks.shape[0]), x.dtype)
    for i in prange(n):
        row = x[i].copy()
        lo = 0
        for j in range(ranks.shape[0]):
            _select(row, ranks[j], lo, m)
            out[i, j] = row[ranks[j]]
            lo = ranks[j] + 1
    return out


@_compiled(inline="always")
def _select(a, k, lo, hi):
    """Rearrange a[lo:hi] so that a[k] holds its value of rank k - lo, with none larger before it and none smaller
    after it (Hoare partitions around a median of three)."""
    hi -= 1
    while hi > lo:
        mid = (lo + hi) >> 1
        x, y, z = a[lo], a[mid], a[hi]  # the median of the three to a[lo], the pivot
        if (x <= y) == (y <= z):
            a[lo], a[mid] = y, x
        elif (y <= x) != (x <= z):
            a[lo], a[hi] = z, x
        pivot = a[lo]
        i, j = lo, hi + 1
        while True:
            i += 1
            while i <= hi and a[i] < pivot:
                i += 1
            j -= 1
            while a[j] > pivot:
                j -= 1
            if i >= j:
                break
            a[i], a[j] = a[j], a[i]
        a[lo], a[j] = a[j], a[lo]
        if j == k:
            return
        if j < k:
            lo = j + 1
        else:
            hi = j - 1
