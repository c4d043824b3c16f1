"""Top excerpts: the paper's interleaved, disjoint explain / score splits of each neuron's activation records.

With 20 top windows and 5 excerpts per split (stride 4): explain = top[0, 4, 8, 12, 16], score_top =
top[2, 6, 10, 14, 18]; offsets 1 and 3 stay free for calibration (`calibration_excerpts`). score_random takes every
third of the neuron's random windows from offset 1 (random[1, 4, 7, 10, 13]) after dropping any random window that is
also one of the neuron's top windows, so no scored text was ever shown to the explainer.
"""

from __future__ import annotations

import polars as pl

from ndx_pipeline.core.contract import (
    CALIBRATION,
    EXCERPT_SCHEMA,
    EXPLAIN,
    RANDOM,
    SCORE_RANDOM,
    SCORE_TOP,
    TOP,
    excerpt_id,
    frame,
)
from ndx_pipeline.core.errors import NdxInputError

TOP_STRIDE = 4
EXPLAIN_OFFSET = 0
SCORE_TOP_OFFSET = 2
RANDOM_STRIDE = 3
SCORE_RANDOM_OFFSET = 1


def interleaved(n_items: int, count: int, stride: int, offset: int) -> list[int]:
    return [offset + stride * i for i in range(count) if offset + stride * i < n_items]


def per_neuron_windows(records: pl.DataFrame):
    """(layer, neuron, top rows by rank, random rows in sampling order without the neuron's top windows)."""
    for (layer, neuron), group in records.sort(["layer", "neuron", "kind", "rank"]).group_by(
        ["layer", "neuron"], maintain_order=True
    ):
        top = group.filter(pl.col("kind") == TOP).sort("rank").to_dicts()
        top_windows = {r["window_index"] for r in top}
        random = [r for r in group.filter(pl.col("kind") == RANDOM).sort("rank").to_dicts()
                  if r["window_index"] not in top_windows]
        yield layer, neuron, top, random


def excerpt_row(layer: int, neuron: int, split: str, record: dict) -> dict:
    """A top_excerpts row: one activation record of the neuron, given its split and stable id."""
    return {**record, "layer": layer, "neuron": neuron, "split": split,
            "excerpt_id": excerpt_id(layer, neuron, record["kind"], record["rank"])}


def split_excerpts(records: pl.DataFrame, explain_n: int = 5, score_top_n: int = 5,
                   score_random_n: int = 5) -> pl.DataFrame:
    """One row per excerpt used downstream, with its split."""
    if min(explain_n, score_top_n) <= 0 or score_random_n < 0:
        raise NdxInputError("excerpt counts must be positive (explain, score_top) and non-negative (score_random).")
    rows = []
    for layer, neuron, top, random in per_neuron_windows(records):
        explain = interleaved(len(top), explain_n, TOP_STRIDE, EXPLAIN_OFFSET)
        score_top = interleaved(len(top), score_top_n, TOP_STRIDE, SCORE_TOP_OFFSET)
        score_random = interleaved(len(random), score_random_n, RANDOM_STRIDE, SCORE_RANDOM_OFFSET)
        if len(explain) < explain_n or len(score_top) < score_top_n or len(score_random) < score_random_n:
            raise NdxInputError(
                f"layer {layer} neuron {neuron} has {len(top)} top and {len(random)} usable random windows, too few "
                f"for {explain_n} explain, {score_top_n} score_top and {score_random_n} score_random excerpts "
                f"(needs top_k ≥ {TOP_STRIDE * (max(explain_n, score_top_n) - 1) + SCORE_TOP_OFFSET + 1} and "
                f"{RANDOM_STRIDE * (score_random_n - 1) + SCORE_RANDOM_OFFSET + 1} random windows outside the top "
                "ones): use a larger corpus or smaller excerpt counts."
            )
        for split, source, picks in ((EXPLAIN, top, explain), (SCORE_TOP, top, score_top),
                                     (SCORE_RANDOM, random, score_random)):
            rows += [excerpt_row(layer, neuron, split, source[i]) for i in picks]
    return frame(rows, EXCERPT_SCHEMA)


CALIBRATION_TOP_STRIDE = 2  # odd top ranks 1, 3, 5, …: never explain (0 mod 4) nor score_top (2 mod 4)
CALIBRATION_TOP_OFFSET = 1


def calibration_random_positions(n_items: int, count: int) -> list[int]:
    """Positions in a neuron's filtered random list that score_random never takes (≢ 1 mod 3): 0, 2, 3, 5, …"""
    picks = [i for i in range(n_items) if i % RANDOM_STRIDE != SCORE_RANDOM_OFFSET]
    return picks[:count]


def calibration_excerpts(records: pl.DataFrame, top_n: int = 3, random_n: int = 3) -> pl.DataFrame:
    """Excerpts for choosing among candidate explanations (best-of-k), disjoint from every excerpt that
    `split_excerpts` puts in explain, score_top or score_random, whatever their counts.

    top[1, 3, 5, …] (the odd ranks: the paper's free offsets 1 and 3 of stride 4) and the random windows at
    positions 0, 2, 3, 5, … of the neuron's random list after dropping its top windows (score_random takes the
    positions 1, 4, 7, …). Same columns as `split_excerpts`, with split `calibration`."""
    if top_n < 0 or random_n < 0 or top_n + random_n == 0:
        raise NdxInputError("calibration needs a non-negative number of top and random excerpts, not both zero.")
    rows = []
    for layer, neuron, top, random in per_neuron_windows(records):
        picks = [top[i] for i in interleaved(len(top), top_n, CALIBRATION_TOP_STRIDE, CALIBRATION_TOP_OFFSET)]
        picks += [random[i] for i in calibration_random_positions(len(random), random_n)]
        if not picks:
            raise NdxInputError(
                f"layer {layer} neuron {neuron} has {len(top)} top and {len(random)} usable random windows: none is "
                "free for calibration (needs top_k ≥ 2 or random windows outside the top ones)."
            )
        rows += [excerpt_row(layer, neuron, CALIBRATION, r) for r in picks]
    return frame(rows, EXCERPT_SCHEMA)
