"""Activation records: one pass of the subject model over every window, keeping per neuron

- the `top_k` windows with the highest max activation (ties: lower window index first),
- a seeded uniform random sample of windows (the same windows for every neuron of a layer),
- running count, mean, variance and max over every real (non-padding) token,
- optionally (`quantile_k > 0`), activation quantile samples as in the paper's released data: per neuron, windows
  bucketed by their max activation at the quantiles QUANTILE_LEVELS (5 buckets) and a uniform reservoir sample of
  `quantile_k` windows in each bucket. The bucket boundaries come from a seeded pilot of windows that the pass
  processes first (no extra forward); those pilot windows set the boundaries and are not themselves sampled, so the
  samples come from the other windows (stated in each row's kind, `quantile_<bucket>`),
- optionally (`token_table=True`), per token id of the corpus, the count of its occurrences and the running sum of
  each selected neuron's activation on it: the token lookup table behind the `baseline_lookup` score.

Dense units (MLP neurons) are given to the selection as [batch, tokens, units] blocks; sparse ones (dictionary
latents) as their nonzero entries (`SparseActivations`), so a batch costs what fires in it, not tokens × latents.

Selection is streaming: memory is O(layers × neurons × (top_k + random_k) × window), independent of the corpus
length. Dense units on the CPU take one compiled call per layer and batch (`selection_kernel`); on a GPU, and for
sparse units, the update is vectorized torch (the reference the tests hold the compiled one to). The token table adds
O(distinct token ids of the corpus × neurons) (≤ vocabulary × neurons). Kept activations are stored exactly, as
float32.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

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
from ndx_pipeline.core.data.dictionaries import SparseActivations
from ndx_pipeline.core.data.selection_kernel import cut_windows, order_statistics, update_batch
from ndx_pipeline.core.data.units import UnitSet, as_unit_sets
from ndx_pipeline.core.data.windows import TokenTexts, Windows
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.heap import release_freed_heap, reuse_freed_heap
from ndx_pipeline.core.models import special_token_wrap

QUANTILE_LEVELS = (0.5, 0.9, 0.99, 0.999)
# a batch [B, T, units] is transposed before its columns are gathered when they number ≥ B × units / 4: measured on 2
# CPU cores, a strided column costs ~3× a contiguous one, and the transpose as much as ~B × units / 4 strided columns
TRANSPOSE_FROM_SHARE = 4
PILOT_WINDOWS = 1024
EMPTY_PRIORITY = 2**62  # a quantile sample's free slot: above every priority drawn (below 2**62)
NEVER_ENTERS = 2**63 - 1  # the merge key of a batch window that is no candidate (`keep_smallest`)
# dense units on the CPU take the compiled update (`selection_kernel`); False: the torch path everywhere, the reference
# that the tests compare the compiled one against
COMPILED_ON_CPU = True
TOKEN_TABLE_CELLS = 50_000_000  # distinct tokens × units, over the run's layers: ~400 MB of float64 sums


# stand-ins for the quantile samples' arrays when a batch is not merged into them (the compiled update's arguments)
_NO_QUANTILES = (np.zeros((1, 1), np.float32), *(np.zeros((1,) * d, np.int64) for d in (2, 3, 3)),
                 np.zeros((1, 1, 1, 1), np.float32), np.zeros((1, 1), np.int64))


def pilot_windows(n_windows: int, seed: int, size: int = PILOT_WINDOWS) -> np.ndarray:
    """The seeded windows processed first to set the quantile boundaries (sorted): min(size, half the corpus)."""
    rng = np.random.default_rng([seed, 7])
    return np.sort(rng.permutation(n_windows)[: max(1, min(size, n_windows // 2))])


def random_windows(n_windows: int, count: int, seed: int) -> np.ndarray:
    """A seeded uniform sample of `count` distinct window indices, in sampling order."""
    rng = np.random.default_rng(seed)
    return rng.permutation(n_windows)[: min(count, n_windows)]


class LayerSelection:
    """Streaming top-k / random-sample / moments for the chosen neurons of one layer."""

    def __init__(self, ids, window_tokens: int, top_k: int, sample: np.ndarray, device="cpu",
                 token_vocab: np.ndarray | None = None, quantile_k: int = 0, seed: int = 0, mirrored: bool = False,
                 nonnegative: bool = False):
        """ids: the units' ids (`UnitSet.ids`), in the order of the columns `update` is given.
        token_vocab: the distinct token ids the corpus holds (sorted); when given, a per-token table of counts
        and activation sums is kept for the lookup-table baseline.
        mirrored: the second half of the units is the first half negated (`UnitSet.mirrored`); `update` is then
        given the first half's columns only and derives the rest (sum(-x) = -sum(x), max(-x) = -min(x)), so both
        signs of a neuron cost one pass over its activations, with results equal to selecting on [x, -x].
        nonnegative: the units are never below 0 (`UnitSet.nonnegative`: dictionary latents); `update` may then be
        given their nonzero entries alone (`SparseActivations`), a unit being 0 wherever it has none."""
        import torch

        self.ids = [int(u) for u in ids]
        n, t = len(self.ids), window_tokens
        if mirrored and n % 2:
            raise ValueError("a mirrored selection has an even number of units (each side of each neuron).")
        self.mirrored = mirrored
        self.nonnegative = nonnegative
        self.compiled = COMPILED_ON_CPU and torch.device(device).type == "cpu"
        self.read_width = n // 2 if mirrored else n  # the columns `update` is given
        # per column given: tokens whose activation was not finite (NaN, ±inf), and the first window where one was
        self.nonfinite = torch.zeros(self.read_width, dtype=torch.long, device=device)
        self.nonfinite_window = torch.full((self.read_width,), -1, dtype=torch.long, device=device)
        self.top_k = top_k
        self.top_max = torch.full((n, top_k), float("-inf"), device=device)
        self.top_window = torch.full((n, top_k), -1, dtype=torch.long, device=device)
        self.top_acts = torch.zeros((n, top_k, t), device=device)
        self.top_min = torch.full((n,), float("-inf"), device=device)  # the weakest kept max, per neuron
        self.sample = np.asarray(sample, dtype=np.int64)
        self.sample_slot = {int(w): i for i, w in enumerate(self.sample)}
        self.sample_acts = torch.zeros((n, len(self.sample), t), device=device)
        self.count = 0
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(n, dtype=torch.float64, device=device)
        self.max = torch.full((n,), float("-inf"), device=device)
        self.quantile_k = quantile_k
        if quantile_k:
            buckets = len(QUANTILE_LEVELS) + 1
            self.pilot_max: list = []  # per-window maxima of the pilot batches, until the boundaries are set
            self.q_bounds = None  # [n, len(QUANTILE_LEVELS)]
            self.q_seen = torch.zeros((n, buckets), dtype=torch.long, device=device)
            # each kept window's random priority (EMPTY_PRIORITY: a free slot)
            self.q_priority = torch.full((n, buckets, quantile_k), EMPTY_PRIORITY, dtype=torch.long, device=device)
            self.q_window = torch.full((n, buckets, quantile_k), -1, dtype=torch.long, device=device)
            self.q_acts = torch.zeros((n, buckets, quantile_k, t), device=device)
            self.q_rng = torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + 11)
        self.token_vocab = None
        if token_vocab is not None:
            vocab = np.unique(np.asarray(token_vocab, dtype=np.int64))
            self.token_vocab = vocab
            # token id → row of the table (-1: not in the corpus vocabulary given)
            index = torch.full((int(vocab.max()) + 1 if len(vocab) else 1,), -1, dtype=torch.long)
            index[torch.as_tensor(vocab)] = torch.arange(len(vocab))
            self.token_row = index.to(device)
            self.token_count = torch.zeros(len(vocab), dtype=torch.long, device=device)
            self.token_sum = torch.zeros((len(vocab), self.read_width), dtype=torch.float64, device=device)

    def update(self, acts, mask, window_index, token_ids=None) -> None:
        """acts: [B, T, units] (any float dtype), the units' activations in `ids` order (mirrored: the first half's),
        or for nonnegative units their nonzero entries (`SparseActivations`, positions < T); mask: [B, T] bool;
        window_index: [B] long; token_ids: [B, T] long, the window's token ids (needed only for the token table)."""
        import torch

        if isinstance(acts, SparseActivations):
            return self._update_sparse(acts, mask, window_index, token_ids)
        a = acts.float()
        if not bool(torch.isfinite(a.sum())):  # a NaN or ±inf anywhere (one reduction, no mask on the hot path):
            bad = ~torch.isfinite(a) & mask[..., None]  # counted per unit (recorded as failed), then 0 from here
            self._note_nonfinite(bad.sum(dim=(0, 1)), bad.any(dim=1), window_index)
            a = torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        rows = self._count_tokens(mask, token_ids)
        if rows is not None:
            self.token_sum.index_add_(0, rows, a[mask].double())
        if self.compiled:
            return self._update_compiled(a.contiguous(), mask, window_index)
        padded = ~mask.all(dim=1)  # [B] windows shorter than the window width
        if bool(padded.any()):
            a = a.masked_fill(~mask[..., None], 0.0)
        # per-batch sums in float32 (≤ batch × window terms), accumulated over the corpus in float64; one window at a
        # time, so its square stays in cache (on CPU, one reduction over both dims of the strided [B, T, units] view is
        # 30× slower, and squaring the whole batch first 3-4×)
        total = torch.zeros(a.shape[-1], dtype=a.dtype, device=a.device)
        squares = torch.zeros_like(total)
        for x in a:
            total += x.sum(dim=0)
            squares += (x * x).sum(dim=0)
        total, squares = total.double(), squares.double()
        per_window_max = a.amax(dim=1)  # [B, n]; a padded window's max over its real tokens only:
        short = padded.nonzero().squeeze(1)
        if len(short):
            short_acts, short_pad = a[short], ~mask[short][..., None]
            per_window_max[short] = short_acts.masked_fill(short_pad, float("-inf")).amax(dim=1)
        if self.mirrored:
            per_window_min = a.amin(dim=1)  # (aminmax, one op for both, is 4x slower on CPU)
            if len(short):
                per_window_min[short] = short_acts.masked_fill(short_pad, float("inf")).amin(dim=1)
            total, squares = torch.cat([total, -total]), torch.cat([squares, squares])
            per_window_max = torch.cat([per_window_max, -per_window_min], dim=1)
        self.sum += total
        self.sumsq += squares
        self._by_unit = None  # the batch transposed, made by `_columns` when it is worth it
        self._select(a, per_window_max.T, window_index)
        self._by_unit = None
        self._keep_sampled(a, window_index)

    def _update_compiled(self, a, mask, window_index) -> None:
        """`update` for dense units on the CPU, compiled (`selection_kernel`): the same kept sets, in one call."""
        import torch

        n, n_b = len(self.ids), a.shape[0]
        per_window_max = torch.empty((n, n_b), dtype=torch.float32)
        pilot = bool(self.quantile_k) and self.q_bounds is None
        sample_quantiles = bool(self.quantile_k) and not pilot
        if sample_quantiles:  # drawn as `_quantile_update` draws them: both paths keep the same samples
            priority = torch.randint(EMPTY_PRIORITY, (n, n_b), generator=self.q_rng)
            quantiles = (self.q_bounds, self.q_seen, self.q_priority, self.q_window, self.q_acts, priority)
        else:
            quantiles = _NO_QUANTILES
        update_batch(a.numpy(), mask.numpy(), window_index.numpy(), self.mirrored, sample_quantiles,
                     self.sum.numpy(), self.sumsq.numpy(), self.max.numpy(), per_window_max.numpy(),
                     self.top_max.numpy(), self.top_window.numpy(), self.top_acts.numpy(), self.top_min.numpy(),
                     *(x if isinstance(x, np.ndarray) else x.numpy() for x in quantiles))
        if pilot:
            self.pilot_max.append(per_window_max)
        self._keep_sampled(a, window_index, mask)

    def _note_nonfinite(self, counts, rows, window_index) -> None:
        """counts: [columns] tokens not finite in this batch; rows: [B, columns] whether each window held one."""
        import torch

        self.nonfinite += counts.to(self.nonfinite.dtype)
        seen = rows.any(dim=0)
        first = window_index[rows.to(torch.int8).argmax(dim=0)]  # the batch's first window holding one, per column
        new = seen & (self.nonfinite_window < 0)
        self.nonfinite_window[new] = first[new]

    def failed(self) -> dict[int, tuple[int, int]]:
        """Unit position (in `ids`) → (tokens whose activation was not finite, the first window holding one), for
        the units that had any: recorded as failed, never explained (a mirrored neuron's two sides both)."""
        counts, first = self.nonfinite.cpu().numpy(), self.nonfinite_window.cpu().numpy()
        out = {int(u): (int(counts[u]), int(first[u])) for u in np.nonzero(counts)[0]}
        if self.mirrored:
            out.update({u + self.read_width: found for u, found in list(out.items())})
        return out

    def _keep_sampled(self, a, window_index, mask=None) -> None:
        """The batch's windows that the random sample holds into it (mask: zero their padding first)."""
        for b, slot in self._sampled(window_index):
            x = (a[b] if mask is None else a[b].masked_fill(~mask[b][:, None], 0.0)).T
            self.sample_acts[: self.read_width, slot, :] = x
            if self.mirrored:
                self.sample_acts[self.read_width :, slot, :] = -x

    def _select(self, a, per_window_max, window_index) -> None:
        """The batch's windows into each unit's max, quantile samples and top k; per_window_max: [units, B]."""
        import torch

        self.max = torch.maximum(self.max, per_window_max.amax(dim=1))
        if self.quantile_k:
            self._quantile_update(a, per_window_max, window_index)
        self._top_k_update(a, per_window_max, window_index)

    def _update_sparse(self, s: SparseActivations, mask, window_index, token_ids) -> None:
        """`update` for units given as their nonzero entries (nonnegative units: a unit is 0 wherever it has no
        entry). Moments, token sums and per-window maxima are sums and maxima over the entries alone; only the
        windows that enter a unit's kept sets have their activations written out (`_sparse_columns`)."""
        import torch

        if self.mirrored or not self.nonnegative:
            raise ValueError("sparse activations are read for nonnegative, unmirrored units only.")
        s = s.only(mask[s.window, s.position])  # entries at real tokens only
        finite = torch.isfinite(s.value)
        if not bool(finite.all()):
            bad = ~finite
            rows = torch.zeros((s.batch, s.units), dtype=torch.bool, device=s.value.device)
            rows[s.window[bad], s.unit[bad]] = True
            self._note_nonfinite(torch.bincount(s.unit[bad], minlength=s.units), rows, window_index)
            s = s.only(finite)
        n, value = s.units, s.value
        if self._count_tokens(mask, token_ids) is not None:
            entry_rows = self._token_rows(token_ids[s.window, s.position])
            self.token_sum.view(-1).index_add_(0, entry_rows * n + s.unit, value.double())
        self.sum.index_add_(0, s.unit, value.double())
        self.sumsq.index_add_(0, s.unit, (value * value).double())
        per_window_max = torch.zeros(s.batch * n, dtype=value.dtype, device=value.device)
        per_window_max.scatter_reduce_(0, s.cell, value, reduce="amax")
        self._select(s, per_window_max.view(s.batch, n).T, window_index)
        for b, slot in self._sampled(window_index):
            here = s.window == b
            self.sample_acts[s.unit[here], slot, s.position[here]] = value[here]

    def _count_tokens(self, mask, token_ids):
        """Count the batch's real tokens and, with a token table, each token id's occurrences: the table's rows of
        the real tokens (in `mask` order), for the caller's activation sums; None without a table."""
        import torch

        self.count += int(mask.sum())
        if self.token_vocab is None:
            return None
        if token_ids is None:
            raise ValueError("this selection keeps a token table: update() needs the windows' token ids.")
        rows = self._token_rows(token_ids[mask])
        self.token_count.index_add_(0, rows, torch.ones_like(rows))
        return rows

    def _sampled(self, window_index):
        """(row in the batch, slot in the random sample) of each window of the batch that the sample holds."""
        for b, w in enumerate(window_index.tolist()):
            slot = self.sample_slot.get(w)
            if slot is not None:
                yield b, slot

    def _token_rows(self, ids):
        """The token table's rows of token ids `ids`."""
        import torch

        rows = self.token_row[ids.clamp(0, len(self.token_row) - 1)]
        rows = torch.where(ids < len(self.token_row), rows, torch.full_like(rows, -1))
        if bool((rows < 0).any()):
            raise ValueError("a window holds a token id missing from the token table's vocabulary.")
        return rows

    def _sparse_columns(self, s: SparseActivations, b, unit):
        """The activations [len(b), T] of units `unit` in windows `b` of the batch, from its entries."""
        import torch

        width = self.top_acts.shape[-1]
        if not len(b) or not len(s.value):
            return torch.zeros((len(b), width), dtype=torch.float32, device=s.value.device)
        # each entry's (window, unit) pair looked up among the distinct requested pairs (sorted)
        key, inverse = torch.unique(b * s.units + unit, return_inverse=True)
        at = torch.searchsorted(key, s.cell).clamp_max(len(key) - 1)
        hit = key[at] == s.cell
        found = torch.zeros((len(key), width), dtype=torch.float32, device=s.value.device)
        found[at[hit], s.position[hit]] = s.value[hit]
        return found[inverse]

    def _columns(self, a, b, unit):
        """The activations [len(b), T] of units `unit` in windows `b` of the batch (a mirrored unit of the second half
        is its first-half column negated; from a batch's nonzero entries, `_sparse_columns`).

        A unit's activations in a window are strided in `a` ([B, T, units]); for many columns at once (early in the
        pass, when most windows enter the kept sets) the batch is transposed once to [B, units, T] and rows are taken
        whole: 3× faster per column, and one transpose serves the top-k and the quantile samples of the batch."""
        import torch

        if isinstance(a, SparseActivations):
            return self._sparse_columns(a, b, unit)
        m = self.read_width
        negated = unit >= m if self.mirrored else None
        column = unit - m * negated if self.mirrored else unit
        if len(b) * TRANSPOSE_FROM_SHARE >= a.shape[0] * a.shape[2]:
            if self._by_unit is None:
                self._by_unit = a.transpose(1, 2).reshape(-1, a.shape[1])  # [B × units, T], contiguous
            out = self._by_unit.index_select(0, b * m + column)
        else:
            out = a[b, :, column]  # advanced indexing: a copy, safe to change in place
        if self.mirrored:
            out.mul_(torch.where(negated, -1.0, 1.0).to(out.dtype)[:, None])
        return out

    def _top_k_update(self, a, per_window_max, window_index) -> None:
        """Merge the batch into each neuron's kept windows, vectorized over neurons and windows.

        Only windows where the unit fired (max > 0) are candidates: the records keep no other top window, and a
        sparse latent (silent in most windows) then copies only the few windows where it fired. Only units where some
        such window of the batch reaches the weakest kept max take part (early in the pass that is all of them, later
        few): their k kept windows and the batch's B candidates are ordered by (max desc, window asc) on the scalars
        alone and the first k stay, so the kept set is the top k of every window seen so far whatever order the
        windows come in; only the windows that enter have their activations copied. A unit that fired in fewer than
        k windows keeps empty slots (window -1, max -inf)."""
        import torch

        fired = per_window_max > 0
        rows = ((per_window_max >= self.top_min[:, None]) & fired).any(dim=1).nonzero().squeeze(1)
        if not len(rows):
            return
        k, n_b = self.top_k, per_window_max.shape[1]
        cand_max = torch.cat([self.top_max[rows], per_window_max[rows]], dim=1)  # [r, k + B]
        cand_window = torch.cat([self.top_window[rows], window_index[None, :].expand(len(rows), n_b)], dim=1)
        # one int64 key per candidate whose ascending order is (max desc, window asc): the float's bits made
        # order-preserving (-0.0 folded into +0.0), negated, above the window index
        bits = (cand_max + 0.0).view(torch.int32)
        order_key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()
        key = (-order_key << 32) + (cand_window + 1)
        key[:, k:].masked_fill_(~fired[rows], NEVER_ENTERS)  # a silent window never enters
        # slots stay unordered until `finalize`, so only the entering windows' activations are copied
        row, slot, b, weakest = keep_smallest(key, k)
        if len(row):
            neuron = rows[row]
            self.top_acts[neuron, slot] = self._columns(a, b, neuron)
            self.top_max[neuron, slot] = per_window_max[neuron, b]
            self.top_window[neuron, slot] = window_index[b]
        self.top_min[rows] = cand_max.gather(1, weakest[:, None]).squeeze(1)

    def end_pilot(self) -> None:
        """Set each neuron's bucket boundaries from the pilot windows' maxima (quantile samples only)."""
        import torch

        if not self.quantile_k or self.q_bounds is not None:
            return
        maxima = torch.cat(self.pilot_max, dim=1) if self.pilot_max else torch.zeros((len(self.ids), 1))
        levels = torch.tensor(QUANTILE_LEVELS, dtype=torch.float32, device=maxima.device)
        self.q_bounds = (row_quantiles(maxima.float(), levels) if self.compiled
                         else torch.quantile(maxima.float(), levels, dim=1).T.contiguous())  # [n, levels]
        self.pilot_max = []

    def _quantile_update(self, a, per_window_max, window_index) -> None:
        """Pilot batches: remember the maxima. Later batches: each window into its bucket's uniform sample.

        The sample is a bottom-k one: every (unit, window) draws a random priority, and a bucket keeps the `quantile_k`
        windows of lowest priority among those it has seen, a uniform sample of them without replacement, as a
        reservoir keeps. A window enters only if its priority is below the largest one its bucket keeps (any, while
        the bucket has a free slot), so after the first windows a batch costs a comparison per window; the few that
        enter are merged by `keep_smallest`, as the top windows are, and the result does not depend on how the windows
        were batched."""
        import torch

        if self.q_bounds is None:
            self.pilot_max.append(per_window_max)
            return
        n, n_b = per_window_max.shape
        k, buckets = self.quantile_k, self.q_seen.shape[1]
        # [n, B]: how many of its unit's boundaries each max reaches (searchsorted(right=True), without a search)
        bucket = (self.q_bounds[:, None, :] <= per_window_max[:, :, None]).sum(dim=2)
        self.q_seen.scatter_add_(1, bucket, torch.ones_like(bucket))
        priority = torch.randint(EMPTY_PRIORITY, (n, n_b), generator=self.q_rng, device=per_window_max.device)
        enters = priority < self.q_priority.amax(dim=2).gather(1, bucket)
        neuron, b = enters.nonzero(as_tuple=True)
        if not len(neuron):
            return
        rows, column = torch.unique(neuron * buckets + bucket[neuron, b], return_inverse=True)  # (unit, bucket) rows
        key = torch.full((len(rows), k + n_b), NEVER_ENTERS, dtype=torch.long, device=rows.device)
        key[:, :k] = self.q_priority.view(-1, k)[rows]
        key[column, k + b] = priority[neuron, b]
        row, slot, entering, _ = keep_smallest(key, k)
        target = rows[row]  # (unit, bucket) rows of the slots taken
        self.q_priority.view(-1, k)[target, slot] = key[row, k + entering]
        self.q_window.view(-1, k)[target, slot] = window_index[entering]
        self.q_acts.view(-1, k, self.q_acts.shape[-1])[target, slot] = self._columns(a, entering, target // buckets)

    def quantile_samples(self):
        """(windows [n, buckets, k] with -1 for empty slots, activations [n, buckets, k, T], boundaries [n, levels],
        windows seen per bucket [n, buckets]); slots ordered by window index."""
        order = torch_sort_windows(self.q_window)
        windows = self.q_window.gather(2, order)
        acts = self.q_acts.gather(2, order[..., None].expand(-1, -1, -1, self.q_acts.shape[-1]))
        return windows.cpu().numpy(), acts.cpu().numpy(), self.q_bounds.cpu().numpy(), self.q_seen.cpu().numpy()

    def finalize(self) -> None:
        """Order each neuron's kept windows by max activation (desc), ties by lower window index."""
        import torch

        by_window = torch.sort(self.top_window, dim=1, stable=True).indices
        max_w = self.top_max.gather(1, by_window)
        order = by_window.gather(1, torch.sort(max_w, dim=1, descending=True, stable=True).indices)
        self.top_max = self.top_max.gather(1, order)
        self.top_window = self.top_window.gather(1, order)
        self.top_acts = self.top_acts.gather(1, order[..., None].expand(-1, -1, self.top_acts.shape[-1]))

    def fired(self) -> np.ndarray:
        """Per unit, whether it fired anywhere in the corpus (its max > 0) with finite activations everywhere; a unit
        that never fired is recorded dead, one whose activations were not finite somewhere failed (`failed`)."""
        fired = self.max.cpu().numpy() > 0
        fired[list(self.failed())] = False
        return fired

    def moments(self):
        mean = self.sum / max(self.count, 1)
        var = (self.sumsq / max(self.count, 1) - mean * mean).clamp_min(0.0)
        return mean.cpu().numpy(), var.cpu().numpy(), self.max.cpu().numpy()

    def token_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token_ids [V], counts [V], activation sums [V, neurons] float64) over every real token seen.

        Means are sums / counts; every id of `token_vocab` that the corpus holds has a count ≥ 1."""
        if self.token_vocab is None:
            raise ValueError("this selection keeps no token table (extract(..., token_table=True) keeps one).")
        sums = self.token_sum.cpu().numpy()
        if self.mirrored:
            sums = np.hstack([sums, -sums])
        return self.token_vocab.copy(), self.token_count.cpu().numpy(), sums


def row_quantiles(x, levels):
    """torch.quantile(x, levels, dim=1).T (linear interpolation) to the bit, for a CPU x [n, m]: the two values
    around each level's rank found by selection (`order_statistics`) instead of sorting every row, and interpolated
    as torch does (rank = level × (m - 1) in float32, then lerp); a row holding a NaN gives NaN. On the bundled model
    (3072 units × 1024 pilot windows per layer, 2 cores) 70 → 34 ms per layer."""
    import torch

    ranks = levels * (x.shape[1] - 1)
    below, above = ranks.long(), ranks.ceil().long()
    needed, where = torch.unique(torch.cat([below, above]), return_inverse=True)  # sorted, distinct
    nan = torch.isnan(x).any(dim=1)
    if bool(nan.any()):  # (selection needs comparable values; those rows' results are replaced below)
        x = x.masked_fill(nan[:, None], 0.0)
    values = torch.from_numpy(order_statistics(x.contiguous().numpy(), needed.numpy()))
    n_levels = len(levels)
    bounds = torch.lerp(values[:, where[:n_levels]], values[:, where[n_levels:]], (ranks - below).expand(len(x), -1))
    return bounds.masked_fill(nan[:, None], float("nan"))


def batch_inputs(windows: Windows, idx, prefix: list[int], suffix: list[int], pad_id: int):
    """Model inputs for windows `idx`: special tokens around each window, right-padded; (input_ids, attention_mask)."""
    lengths = windows.length[idx]
    width = len(prefix) + int(lengths.max()) + len(suffix)
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    attn = np.zeros((len(idx), width), dtype=np.int64)
    for r, (w, n) in enumerate(zip(idx, lengths)):
        row = prefix + windows.ids[w, :n].tolist() + suffix
        ids[r, : len(row)] = row
        attn[r, : len(row)] = 1
    return ids, attn


TRIM_EVERY_BATCHES = 32  # batches of a pass between heap trims: peak RSS stays flat with the corpus length


class _StopForward(Exception):
    """Raised by the last hook to read a batch: nothing above the last requested layer is computed."""


@dataclass
class ExtractionStats:
    tokens: int
    windows: int
    seconds: float
    batches: int = 0  # forward passes of the subject model (one per batch of windows)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def keep_smallest(key, k: int):
    """Per row of `key` ([rows, k + B] int64: a unit's k kept slots, then the batch's B windows), which k keys stay:
    the k smallest. Returns (row, slot, b, weakest): each slot whose window leaves, in its row, with the batch window
    b that takes it; and per row the column of the largest key kept. Equal keys are free slots (any of them may be
    taken) or batch windows keyed NEVER_ENTERS (no candidates: none enters).

    Late in a pass most rows have one batch window below their largest kept key: that window takes the largest key's
    slot, without ordering the row (measured on a whole-model layer: `topk` over the k + B keys of ~1800 rows took
    0.24 ms a call, the rows with several entering windows 0.04 ms)."""
    import torch

    kept = key[:, :k]
    slot = kept.argmax(dim=1)  # the largest kept key's
    below = key[:, k:] < kept.gather(1, slot[:, None])
    entering = below.sum(dim=1)
    one, many = (entering == 1).nonzero().squeeze(1), (entering > 1).nonzero().squeeze(1)
    row, taken, b = one, slot[one], below[one].int().argmax(dim=1)
    weakest = slot.clone()
    if len(one):
        largest = kept[one].scatter(1, taken[:, None], key[one, k + b][:, None]).argmax(dim=1)
        weakest[one] = torch.where(largest == taken, k + b, largest)  # the entering window, or a slot it left
    if len(many):
        pick = torch.topk(key[many], k, dim=1, largest=False, sorted=True).indices  # < k a kept slot, ≥ k a window
        chosen = torch.zeros((len(many), key.shape[1]), dtype=torch.bool, device=key.device).scatter_(1, pick, True)
        # each entering window takes the slot of one leaving window of its row (as many of each per row, in order)
        leaving_row, leaving_slot = (~chosen[:, :k]).nonzero(as_tuple=True)
        row = torch.cat([row, many[leaving_row]])
        taken = torch.cat([taken, leaving_slot])
        b = torch.cat([b, chosen[:, k:].nonzero(as_tuple=True)[1]])
        weakest[many] = pick[:, k - 1]
    return row, taken, b, weakest


def torch_sort_windows(windows):
    """Indices that order each row's slots by window index, empty slots (-1) last."""
    import torch

    key = torch.where(windows < 0, torch.full_like(windows, torch.iinfo(torch.long).max), windows)
    return torch.sort(key, dim=-1, stable=True).indices


def window_order(n_windows: int, quantile_k: int, seed: int, batch_size: int) -> tuple[np.ndarray, int]:
    """The order a pass takes the windows in, -1 where a batch is cut short, and how many batches the quantile
    pilot takes: with quantile_k, the pilot windows first (in batches of their own), then the others in index order;
    without, index order."""
    order = np.arange(n_windows)
    if not quantile_k:
        return order, 0
    pilot = pilot_windows(n_windows, seed)
    rest = np.setdiff1d(order, pilot, assume_unique=True)
    pad = np.full(-len(pilot) % batch_size, -1)  # keep pilot and the rest in separate batches
    return np.concatenate([pilot, pad, rest]), -(-len(pilot) // batch_size)


@dataclass(frozen=True)
class Keep:
    """What a selection keeps per unit: `top_k` top windows, a `random_k` sample of windows drawn with `seed`, and
    (token_table) the per-token table of the lookup baseline."""

    top_k: int = 20
    random_k: int = 20
    seed: int = 0
    token_table: bool = False


def extract(model, tokenizer, windows: Windows, layer_units: dict, top_k: int = 20,
            random_k: int = 20, seed: int = 0, batch_size: int = 16,
            progress: Callable[[int, int, float], None] | None = None, token_table: bool = False,
            quantile_k: int = 0, keep: dict | None = None):
    """Run the model once over all windows for every requested unit set; return (selections, stats), selections
    keyed as `layer_units`.

    layer_units: {layer: UnitSet} (see `units`), or {layer: [neuron indices]} for MLP neurons; or {key: UnitSet}
    with keys of the caller's (several unit sets of one layer, e.g. the neurons of one variant and the latents of
    another, read in the same pass).
    keep: {key: Keep} for the unit sets that keep other counts than `top_k`, `random_k`, `seed`, `token_table`.
    token_table=True also keeps, per unit set, each token id's count and each selected unit's activation sum on it
    (`LayerSelection.token_table`, `token_table_frame`), for the lookup-table baseline.
    quantile_k > 0 also keeps that many windows per activation-quantile bucket (see the module's docstring); the
    pilot windows (drawn with `seed`) that set the boundaries go through the model first, the others follow in
    index order."""
    import torch

    if not layer_units:
        raise NdxInputError("no layers were requested.")
    unit_sets = as_unit_sets(layer_units)
    keeps = {slot: (keep or {}).get(slot) or Keep(top_k, random_k, seed, token_table) for slot in unit_sets}
    most = max(k.top_k for k in keeps.values())
    if len(windows) < most:
        raise NdxInputError(
            f"the corpus has {len(windows)} windows of {windows.window_tokens} tokens, fewer than top_k={most}; "
            "give a larger corpus or a smaller top_k."
        )
    device = next(model.parameters()).device
    reuse_freed_heap()
    vocab = None
    if any(k.token_table for k in keeps.values()):
        real_tokens = np.arange(windows.window_tokens)[None, :] < windows.length[:, None]
        vocab = np.unique(windows.ids[real_tokens])
        cells = len(vocab) * sum(len(u.ids) for slot, u in unit_sets.items() if keeps[slot].token_table)
        if cells > TOKEN_TABLE_CELLS:
            raise NdxInputError(
                f"the lookup baseline's token table would hold {cells:,} cells (distinct tokens × units over the run's "
                f"layers; at most {TOKEN_TABLE_CELLS:,}): leave `lookup` out of the baselines for a run this wide, or "
                "choose fewer units.")
    selections = {
        slot: LayerSelection(units.ids, windows.window_tokens, keeps[slot].top_k,
                             random_windows(len(windows), keeps[slot].random_k, keeps[slot].seed), device,
                             token_vocab=vocab if keeps[slot].token_table else None, quantile_k=quantile_k,
                             seed=keeps[slot].seed, mirrored=units.mirrored, nonnegative=units.nonnegative)
        for slot, units in unit_sets.items()
    }
    order, pilot_batches = window_order(len(windows), quantile_k, seed, batch_size)
    prefix, suffix = special_token_wrap(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    state: dict = {}

    def consumer(slot):
        def consume(hooked):
            if hooked.dim() == 2:  # OPT flattens (batch, sequence) before its MLP
                hooked = hooked.view(state["batch"], -1, hooked.shape[-1])
            x = unit_sets[slot].read(hooked[:, state["lo"] : state["hi"], :])
            if state["pad"] and not isinstance(x, SparseActivations):
                x = torch.nn.functional.pad(x, (0, 0, 0, state["pad"]))
            selections[slot].update(x, state["mask"], state["window_index"], state["token_ids"])
            state["waiting"] -= 1
            if not state["waiting"]:  # every unit set has read this batch: nothing above is computed
                raise _StopForward

        return consume

    handles = [units.attach(model, consumer(slot)) for slot, units in unit_sets.items()]
    t = windows.window_tokens
    p = len(prefix)
    started = time.perf_counter()
    done_tokens = forward_passes = 0
    try:
        with torch.inference_mode():
            for batch_number, b0 in enumerate(range(0, len(order), batch_size)):
                if batch_number == pilot_batches and quantile_k:
                    for sel in selections.values():
                        sel.end_pilot()
                idx = order[b0 : b0 + batch_size]
                idx = idx[idx >= 0]
                lengths = windows.length[idx]
                ids, attn = batch_inputs(windows, idx, prefix, suffix, pad_id)
                real = int(lengths.max())
                mask = np.arange(real)[None, :] < lengths[:, None]
                if real < t:  # selections keep full-width windows; pad the token axis with masked columns
                    mask = np.pad(mask, ((0, 0), (0, t - real)))
                state["lo"], state["hi"] = p, p + real
                state["mask"] = torch.as_tensor(mask, device=device)
                state["window_index"] = torch.as_tensor(idx, device=device)
                state["token_ids"] = torch.as_tensor(windows.ids[idx], device=device) if vocab is not None else None
                state["pad"] = t - real
                state["batch"] = len(idx)
                state["waiting"] = len(handles)
                forward_passes += 1
                try:
                    model(input_ids=torch.as_tensor(ids, device=device),
                          attention_mask=torch.as_tensor(attn, device=device))
                except _StopForward:
                    pass
                done_tokens += int(lengths.sum())
                if batch_number % TRIM_EVERY_BATCHES == TRIM_EVERY_BATCHES - 1:
                    release_freed_heap()
                if progress:
                    progress(done_tokens, windows.total_tokens, time.perf_counter() - started)
    finally:
        for h in handles:
            h.remove()
    for sel in selections.values():
        sel.end_pilot()
        sel.finalize()
    stats = ExtractionStats(done_tokens, len(windows), time.perf_counter() - started, forward_passes)
    return selections, stats


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
