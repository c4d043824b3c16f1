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
    conform,
    excerpt_id,
)
from ndx_pipeline.core.errors import NdxInputError

TOP_STRIDE = 4
EXPLAIN_OFFSET = 0
SCORE_TOP_OFFSET = 2
RANDOM_STRIDE = 3
SCORE_RANDOM_OFFSET = 1


def interleaved(n_items: int, count: int, stride: int, offset: int) -> list[int]:
    return [offset + stride * i for i in range(count) if offset + stride * i < n_items]


UNIT_KEY = ["layer", "neuron"]


def excerpt_row(layer: int, neuron: int, split: str, record: dict) -> dict:
    """An excerpt row built from one activation record (a dict), given its split and stable id."""
    return {**record, "layer": layer, "neuron": neuron, "split": split,
            "excerpt_id": excerpt_id(layer, neuron, record["kind"], record["rank"])}


def ranked_windows(records: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(top rows by rank, random rows in sampling order without the unit's own top windows): narrow frames (unit key,
    kind, rank, window, `_row`: the row in `records`) with `position`, the row's place in that list per unit. Units
    recorded as dead have neither. Only these narrow columns are sorted; `_gathered` fetches the wide rows once."""
    narrow = records.select([*UNIT_KEY, "kind", "rank", "window_index"]).with_row_index("_row")
    top = (narrow.filter(pl.col("kind") == TOP).sort([*UNIT_KEY, "rank"])
           .with_columns(pl.int_range(pl.len()).over(UNIT_KEY).alias("position")))
    random = (narrow.filter(pl.col("kind") == RANDOM)
              .join(top.select([*UNIT_KEY, "window_index"]), on=[*UNIT_KEY, "window_index"], how="anti")
              .sort([*UNIT_KEY, "rank"])
              .with_columns(pl.int_range(pl.len()).over(UNIT_KEY).alias("position")))
    return top, random


def _counts(top: pl.DataFrame, random: pl.DataFrame) -> pl.DataFrame:
    """Per unit with top windows: how many top and usable random windows it has."""
    return (top.group_by(UNIT_KEY).len("top")
            .join(random.group_by(UNIT_KEY).len("random"), on=UNIT_KEY, how="left")
            .with_columns(pl.col("random").fill_null(0)).sort(UNIT_KEY))


def _taken(rows: pl.DataFrame, split: str, count: int, stride: int, offset: int) -> pl.DataFrame:
    """The rows at positions offset, offset + stride, … (the first `count` of them), marked with `split`."""
    picked = rows.filter((pl.col("position") >= offset) & ((pl.col("position") - offset) % stride == 0)
                         & ((pl.col("position") - offset) // stride < count))
    return picked.with_columns(pl.lit(split).alias("split"))


def _gathered(records: pl.DataFrame, parts: list[pl.DataFrame]) -> pl.DataFrame:
    """The excerpts: per unit (ascending ids), splits in the order of `parts`, each by position; the wide columns
    of `records` gathered once, with each row's split and stable id."""
    if not parts:
        return pl.DataFrame(schema=EXCERPT_SCHEMA)
    order = (pl.concat([p.with_columns(pl.lit(i).alias("_part")) for i, p in enumerate(parts)])
             .sort([*UNIT_KEY, "_part", "position"]))
    return (records[order["_row"]]
            .with_columns(order["split"],
                          pl.format("{}/{}/{}/{}", "layer", "neuron", "kind", "rank").alias("excerpt_id"))
            .pipe(conform, EXCERPT_SCHEMA))


def split_excerpts(records: pl.DataFrame, explain_n: int = 5, score_top_n: int = 5,
                   score_random_n: int = 5) -> pl.DataFrame:
    """One row per excerpt used downstream, with its split (columnar: no Python per unit or row)."""
    if min(explain_n, score_top_n) <= 0 or score_random_n < 0:
        raise NdxInputError("excerpt counts must be positive (explain, score_top) and non-negative (score_random).")
    top, random = ranked_windows(records)
    need_random = RANDOM_STRIDE * (score_random_n - 1) + SCORE_RANDOM_OFFSET + 1 if score_random_n else 0
    need_top = max(TOP_STRIDE * (explain_n - 1) + EXPLAIN_OFFSET, TOP_STRIDE * (score_top_n - 1) + SCORE_TOP_OFFSET) + 1
    counts = _counts(top, random)
    if not len(counts):
        layers = sorted(set(records["layer"].to_list()))
        raise NdxInputError(f"no unit of layer(s) {layers} fired over the corpus (every one is recorded dead): "
                            "nothing to explain; choose other units or a larger corpus.")
    # a unit that fired in too few windows to fill the explain and score_top splits is left out (too sparse to
    # explain: its records say how often it fired); only when no unit has enough is it the corpus that is too small
    enough = counts.filter(pl.col("top") >= need_top)
    short = enough.filter(pl.col("random") < need_random) if len(enough) else counts
    if len(short):
        layer, neuron, n_top, n_random = short.row(0)
        raise NdxInputError(
            f"layer {layer} neuron {neuron} has {n_top} top and {n_random} usable random windows, too few "
            f"for {explain_n} explain, {score_top_n} score_top and {score_random_n} score_random excerpts "
            f"(needs top_k ≥ {TOP_STRIDE * (max(explain_n, score_top_n) - 1) + SCORE_TOP_OFFSET + 1} and "
            f"{RANDOM_STRIDE * (score_random_n - 1) + SCORE_RANDOM_OFFSET + 1} random windows outside the top "
            "ones): use a larger corpus or smaller excerpt counts."
        )
    top, random = (frame.join(enough.select(UNIT_KEY), on=UNIT_KEY, how="semi") for frame in (top, random))
    return _gathered(records, [
        _taken(top, EXPLAIN, explain_n, TOP_STRIDE, EXPLAIN_OFFSET),
        _taken(top, SCORE_TOP, score_top_n, TOP_STRIDE, SCORE_TOP_OFFSET),
        _taken(random, SCORE_RANDOM, score_random_n, RANDOM_STRIDE, SCORE_RANDOM_OFFSET),
    ])


CALIBRATION_TOP_STRIDE = 2  # odd top ranks 1, 3, 5, …: never explain (0 mod 4) nor score_top (2 mod 4)
CALIBRATION_TOP_OFFSET = 1


def calibration_excerpts(records: pl.DataFrame, top_n: int = 3, random_n: int = 3,
                         units: pl.DataFrame | None = None) -> pl.DataFrame:
    """Excerpts for choosing among candidate explanations (best-of-k), disjoint from every excerpt that
    `split_excerpts` puts in explain, score_top or score_random, whatever their counts.

    top[1, 3, 5, …] (the odd ranks: the paper's free offsets 1 and 3 of stride 4) and the random windows at
    positions 0, 2, 3, 5, … of the neuron's random list after dropping its top windows (score_random takes the
    positions 1, 4, 7, …). Same columns as `split_excerpts`, with split `calibration`. `units` (layer, neuron rows)
    limits it to those units: the ones the splits kept."""
    if top_n < 0 or random_n < 0 or top_n + random_n == 0:
        raise NdxInputError("calibration needs a non-negative number of top and random excerpts, not both zero.")
    top, random = ranked_windows(records)
    if units is not None:  # only these units (layer, neuron): those the splits kept
        top, random = (f.join(units, on=UNIT_KEY, how="semi") for f in (top, random))
    free_top = (pl.col("top") > CALIBRATION_TOP_OFFSET) & pl.lit(top_n > 0)
    free_random = (pl.col("random") > 0) & pl.lit(random_n > 0)
    none_free = _counts(top, random).filter(~(free_top | free_random))
    if len(none_free):
        layer, neuron, n_top, n_random = none_free.row(0)
        raise NdxInputError(
            f"layer {layer} neuron {neuron} has {n_top} top and {n_random} usable random windows: none is "
            "free for calibration (needs top_k ≥ 2 or random windows outside the top ones)."
        )
    unscored = random.filter(pl.col("position") % RANDOM_STRIDE != SCORE_RANDOM_OFFSET).with_columns(
        pl.int_range(pl.len()).over(UNIT_KEY).alias("position"))
    return _gathered(records, [
        _taken(top, CALIBRATION, top_n, CALIBRATION_TOP_STRIDE, CALIBRATION_TOP_OFFSET),
        _taken(unscored, CALIBRATION, random_n, 1, 0),
    ])
