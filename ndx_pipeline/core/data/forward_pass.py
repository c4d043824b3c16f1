"""The forward pass that feeds the selection: one run of the subject model over every window, each batch's
activations at the requested unit sets' hook points handed to their `selection.LayerSelection` (`extract`).

A batch's forward stops at the last hook that reads it (nothing above the last requested layer is computed), several
unit sets of one layer (or of several variants) are read in the same pass, and with quantile samples the pilot
windows go through the model first (`selection.window_order`). The pass reports its progress (tokens done, total,
seconds) to the caller and its measures as `selection.ExtractionStats`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ndx_pipeline.core.data.selection import (
    ExtractionStats,
    LayerSelection,
    SparseActivations,
    random_windows,
    window_order,
)
from ndx_pipeline.core.data.units import as_unit_sets
from ndx_pipeline.core.data.windows import Windows
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.heap import release_freed_heap, reuse_freed_heap
from ndx_pipeline.core.models import special_token_wrap

TOKEN_TABLE_CELLS = 50_000_000  # distinct tokens × units, over the run's layers: ~400 MB of float64 sums
TRIM_EVERY_BATCHES = 32  # batches of a pass between heap trims: peak RSS stays flat with the corpus length


class _StopForward(Exception):
    """Raised by the last hook to read a batch: nothing above the last requested layer is computed."""


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
    (`LayerSelection.token_table`, `record_frames.token_table_frame`), for the lookup-table baseline.
    quantile_k > 0 also keeps that many windows per activation-quantile bucket (see `selection`); the
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
