"""Top excerpts: the paper's interleaved, disjoint explain / score splits of each neuron's activation records.

With 20 top windows and 5 excerpts per split (stride 4): explain = top[0, 4, 8, 12, 16], score_top =
top[2, 6, 10, 14, 18]; offsets 1 and 3 stay free for calibration. score_random takes every third of the neuron's
random windows from offset 1 (random[1, 4, 7, 10, 13]) after dropping any random window that is also one of the
neuron's top windows, so no scored text was ever shown to the explainer.
"""

from __future__ import annotations

import polars as pl

from .errors import NdxInputError

TOP_STRIDE = 4
EXPLAIN_OFFSET = 0
SCORE_TOP_OFFSET = 2
RANDOM_STRIDE = 3
SCORE_RANDOM_OFFSET = 1

EXCERPT_SCHEMA = {
    "layer": pl.Int32,
    "neuron": pl.Int32,
    "excerpt_id": pl.String,
    "split": pl.String,
    "kind": pl.String,
    "rank": pl.Int32,
    "doc_id": pl.String,
    "token_start": pl.Int32,
    "tokens": pl.List(pl.String),
    "activations": pl.List(pl.Float32),
    "max_activation": pl.Float32,
    "window_index": pl.Int32,
    "char_start": pl.Int32,
    "char_end": pl.Int32,
}


def excerpt_id(layer: int, neuron: int, kind: str, rank: int) -> str:
    return f"{layer}/{neuron}/{kind}/{rank}"


def interleaved(n_items: int, count: int, stride: int, offset: int) -> list[int]:
    return [offset + stride * i for i in range(count) if offset + stride * i < n_items]


def split_excerpts(records: pl.DataFrame, explain_n: int = 5, score_top_n: int = 5,
                   score_random_n: int = 5) -> pl.DataFrame:
    """One row per excerpt used downstream, with its split."""
    if min(explain_n, score_top_n) <= 0 or score_random_n < 0:
        raise NdxInputError("excerpt counts must be positive (explain, score_top) and non-negative (score_random).")
    rows = []
    for (layer, neuron), group in records.sort(["layer", "neuron", "kind", "rank"]).group_by(
        ["layer", "neuron"], maintain_order=True
    ):
        top = group.filter(pl.col("kind") == "top").sort("rank").to_dicts()
        top_windows = {r["window_index"] for r in top}
        random = [r for r in group.filter(pl.col("kind") == "random").sort("rank").to_dicts()
                  if r["window_index"] not in top_windows]
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
        for split, source, picks in (("explain", top, explain), ("score_top", top, score_top),
                                     ("score_random", random, score_random)):
            for i in picks:
                r = source[i]
                rows.append({
                    "layer": layer, "neuron": neuron,
                    "excerpt_id": excerpt_id(layer, neuron, r["kind"], r["rank"]),
                    "split": split, "kind": r["kind"], "rank": r["rank"], "doc_id": r["doc_id"],
                    "token_start": r["token_start"], "tokens": r["tokens"], "activations": r["activations"],
                    "max_activation": r["max_activation"], "window_index": r["window_index"],
                    "char_start": r["char_start"], "char_end": r["char_end"],
                })
    return pl.DataFrame(rows, schema=EXCERPT_SCHEMA)
