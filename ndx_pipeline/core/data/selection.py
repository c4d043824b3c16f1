"""The streaming selection of a pass over the windows: what it keeps per unit, batch by batch (`LayerSelection`).

Per unit of a unit set, one pass over every window keeps

- the `top_k` windows with the highest max activation (ties: lower window index first),
- a seeded uniform random sample of windows (the same windows for every neuron of a layer),
- running count, mean, variance and max over every real (non-padding) token,
- optionally (`quantile_k > 0`), activation quantile samples as in the paper's released data: per neuron, windows
  bucketed by their max activation at the quantiles QUANTILE_LEVELS (5 buckets) and a uniform reservoir sample of
  `quantile_k` windows in each bucket. The bucket boundaries come from a seeded pilot of windows that the pass
  processes first (`window_order`; no extra forward); those pilot windows set the boundaries and are not themselves
  sampled, so the samples come from the other windows (stated in each row's kind, `quantile_<bucket>`),
- optionally (`token_vocab`), per token id of the corpus, the count of its occurrences and the running sum of each
  selected neuron's activation on it: the token lookup table behind the `baseline_lookup` score.

Dense units (MLP neurons) are given to the selection as [batch, tokens, units] blocks; sparse ones (dictionary
latents) as their nonzero entries (`SparseActivations`), so a batch costs what fires in it, not tokens × latents.

Memory is O(neurons × (top_k + random_k) × window) per unit set, independent of the corpus length. Dense units on
the CPU take one compiled call per layer and batch (`selection_kernel`, the compiled form of `update`); on a GPU, and
for sparse units, the update is vectorized torch here (the reference the tests hold the compiled one to). The token
table adds O(distinct token ids of the corpus × neurons) (≤ vocabulary × neurons). Kept activations are stored
exactly, as float32.

What feeds it: `forward_pass.extract` (the subject model's units) and `planted.planted_selection` (planted units, no
model); what reads it when the pass is done: `record_frames`. torch is imported where it is used, so that reading
the planted rules or these names does not load it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from ndx_pipeline.core.data.selection_kernel import order_statistics, update_batch

if TYPE_CHECKING:
    import torch

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


# stand-ins for the quantile samples' arrays when a batch is not merged into them (the compiled update's arguments)
_NO_QUANTILES = (np.zeros((1, 1), np.float32), *(np.zeros((1,) * d, np.int64) for d in (2, 3, 3)),
                 np.zeros((1, 1, 1, 1), np.float32), np.zeros((1, 1), np.int64))


@dataclass
class SparseActivations:
    """A batch of latent activations as its nonzero entries: entry i is unit `unit[i]` (a column of the unit set)
    firing `value[i]` (> 0) at position `position[i]` of window `window[i]` of the batch; every other activation of
    the [batch, positions, units] block is 0. What `LayerSelection.update` takes for nonnegative units
    (`dictionaries.Dictionary.encode_sparse` makes it)."""

    window: torch.Tensor  # [E] long
    position: torch.Tensor  # [E] long
    unit: torch.Tensor  # [E] long
    value: torch.Tensor  # [E] float32
    batch: int
    positions: int
    units: int

    def dense(self) -> torch.Tensor:
        """The [batch, positions, units] block."""
        import torch

        out = torch.zeros((self.batch, self.positions, self.units), dtype=self.value.dtype, device=self.value.device)
        out[self.window, self.position, self.unit] = self.value
        return out

    @cached_property
    def cell(self) -> torch.Tensor:
        """[E] each entry's (window, unit) cell, window × units + unit: its place among the batch's window maxima."""
        return self.window * self.units + self.unit

    def only(self, keep: torch.Tensor) -> SparseActivations:
        """The entries where `keep` [E] is set."""
        return SparseActivations(self.window[keep], self.position[keep], self.unit[keep], self.value[keep],
                                 self.batch, self.positions, self.units)


@dataclass
class ExtractionStats:
    """What a pass over the windows measured (`forward_pass.extract`, `planted.planted_selection`)."""

    tokens: int
    windows: int
    seconds: float
    batches: int = 0  # forward passes of the subject model (one per batch of windows)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


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
