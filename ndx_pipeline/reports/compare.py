"""Variants side by side (`ndx-pipeline compare`), from the `scores` files and the scorers' beside simulation alone.

`compare(storage, variants, layers)` gives, per layer and pooled over the chosen layers (`ALL`, units identified by
(layer, unit id)):
- per variant: its units (rows of its scores file), the units scored (a finite score), the mean and median score with
  a 95 % bootstrap interval of the mean, each baseline's mean score and each scorer's mean score (finite values);
- per pair of variants (A before B in the order given): the difference of the mean scores, B − A, with a 95 %
  bootstrap interval that resamples each side's units independently (unpaired: it holds for any two unit sets), and,
  over the units both score (same layer, unit id and kind of unit — a dictionary's latent 5 is not neuron 5 — and a
  finite score on each side), the paired comparison: how often
  B scores higher, lower or the same, and the mean of B − A with a 95 % bootstrap interval over the shared units.

The bootstrap, exactly (so it can be recomputed): every interval starts a fresh `numpy.random.default_rng(seed)`.
Values are in unit order ((layer, unit id) ascending). A resample of n values is one row of
`rng.integers(0, n, size=(resamples, n))` (drawn a chunk of rows at a time, which gives the same numbers as one
draw), its statistic the mean of the values at those indices; the interval is `numpy.quantile(statistics, QUANTILES)`
(linear interpolation). The unpaired difference draws A's rows first, then B's rows from the same generator, and
its statistics are B's resampled means minus A's, row by row. An interval with no values is (NaN, NaN).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
import polars as pl

from ndx_pipeline.core.contract import ACTIVATION_RECORDS, BASELINES, SCORER_ASSETS, SCORES, baseline_column
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.storage import asset_path, stored_variants, variant_layers
from ndx_pipeline.core.variants import control_of
from ndx_pipeline.reports.controls import control_lines, random_weight_lines, read_controls, read_random_weights
from ndx_pipeline.reports.lineage import json_safe

NAN = float("nan")
ALL = "all"  # the layer label of the figures pooled over the chosen layers
RESAMPLES = 2000
QUANTILES = (0.025, 0.975)  # a 95 % percentile interval
CHUNK = 1 << 22  # bootstrap indices drawn at once at most (32 MiB)
UNIT = ["layer", "neuron"]


def compare(storage_dir: str | os.PathLike, variants: Sequence[str] | None = None,
            layers: Sequence[int] | None = None, *, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """The comparison of `variants` (default: every variant with scores) over `layers` (default: every layer any of
    them has scores for), as one dict: the choices (`variants`, `layers`, `resamples`, `seed`), the `baselines` and
    `scorers` found, one `summary` row per (layer, variant) and one `pairs` row per (layer, pair of variants; by
    default none with a control variant, whose figures are the `controls`: per variant of its own, its planted and
    random-weight controls), each layer's rows in layer order and then the pooled ones (layer `ALL`). NdxInputError
    names a variant without scores or a layer none of the chosen variants has."""
    storage = Path(storage_dir)
    named = bool(variants)
    variants, layers = _choose(storage, variants, layers)
    if resamples < 1:
        raise NdxInputError(f"resamples {resamples}: the bootstrap needs at least one resample.")
    scores = {v: _read_scores(storage, v, layers) for v in variants}
    scorer_scores = {v: _read_scorer_scores(storage, v, layers) for v in variants}
    baselines = [b for b in BASELINES if any(baseline_column(b) in f.columns for f in scores.values())]
    scorers = [s for s in SCORER_ASSETS if any((f["scorer"] == s).any() for f in scorer_scores.values())]
    summary, pairs = [], []
    for layer in [*layers, ALL]:
        chosen = {v: _of_layer(scores[v], layer) for v in variants}
        for v in variants:
            summary.append(_summary_row(layer, v, chosen[v], _of_layer(scorer_scores[v], layer), baselines, scorers,
                                        resamples, seed))
        for a, b in combinations(variants, 2):
            if named or not (control_of(a) or control_of(b)):  # a control beside its variant: in `controls`
                pairs.append(_pair_row(layer, a, b, chosen[a], chosen[b], resamples, seed))
    controls = {v: {"planted": read_controls(storage, v), "random_weights": read_random_weights(storage, v)}
                for v in variants if not control_of(v)}
    controls = {v: found for v, found in controls.items() if any(found.values())}
    return {"storage": str(storage), "variants": variants, "layers": layers, "resamples": resamples, "seed": seed,
            "baselines": baselines, "scorers": scorers, "summary": summary, "pairs": pairs, "controls": controls}


def compare_json(result: dict) -> str:
    """`compare`'s result as JSON text (NaN → null)."""
    return json.dumps(json_safe(result), indent=2)


def bootstrap_interval(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The 95 % percentile-bootstrap interval of the mean of `values` (see the module's docstring)."""
    if not values.size:
        return NAN, NAN
    return _interval(_resampled_means(np.random.default_rng(seed), values, resamples))


def difference_interval(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES,
                        seed: int = 0) -> tuple[float, float]:
    """The 95 % percentile-bootstrap interval of mean(b) − mean(a), each side resampled independently (see the
    module's docstring)."""
    if not a.size or not b.size:
        return NAN, NAN
    rng = np.random.default_rng(seed)
    means_a = _resampled_means(rng, a, resamples)
    return _interval(_resampled_means(rng, b, resamples) - means_a)


def _resampled_means(rng: np.random.Generator, values: np.ndarray, resamples: int) -> np.ndarray:
    n = values.size
    rows = max(1, CHUNK // n)
    return np.concatenate([values[rng.integers(0, n, size=(min(rows, resamples - start), n))].mean(axis=1)
                           for start in range(0, resamples, rows)])


def _interval(statistics: np.ndarray) -> tuple[float, float]:
    low, high = np.quantile(statistics, QUANTILES)
    return float(low), float(high)


def _choose(storage: Path, variants: Sequence[str] | None, layers: Sequence[int] | None) -> tuple[list, list]:
    """The variants and layers to compare, checked against the stored scores files."""
    stored = stored_variants(storage, SCORES)
    if not stored:
        raise NdxInputError(f"no variant has {SCORES} files under {storage}: run the pipeline first.")
    variants = list(dict.fromkeys(variants or stored))
    unknown = [v for v in variants if v not in stored]
    if unknown:
        raise NdxInputError(f"no {SCORES} for variant {', '.join(map(repr, unknown))} under {storage} (variants with "
                            f"{SCORES}: {', '.join(stored)}).")
    available = sorted({layer for v in variants for layer in variant_layers(storage, SCORES, v)})
    layers = sorted({int(layer) for layer in layers}) if layers else available
    missing = [layer for layer in layers if layer not in available]
    if missing:
        raise NdxInputError(f"no {SCORES} for layer {', '.join(map(str, missing))} in variant {', '.join(variants)} "
                            f"(their layers with {SCORES}: {', '.join(map(str, available))}).")
    return variants, layers


def _read_scores(storage: Path, variant: str, layers: list[int]) -> pl.DataFrame:
    """`layer`, `neuron`, `score` and the baseline columns of the variant's scores files of `layers`, in unit order;
    a missing value is NaN, and so is a baseline column a file lacks."""
    frames = [pl.DataFrame(schema={"layer": pl.Int32, "neuron": pl.Int32, "unit_set": pl.String,
                                   "score": pl.Float64})]
    for layer in set(layers) & set(variant_layers(storage, SCORES, variant)):
        frame = pl.read_parquet(asset_path(storage, SCORES, layer, variant))
        columns = ["score", *(col for col in map(baseline_column, BASELINES) if col in frame.columns)]
        frames.append(frame.select(pl.lit(layer, pl.Int32).alias("layer"), pl.col("neuron").cast(pl.Int32),
                                   pl.lit(_unit_set(storage, layer, variant)).alias("unit_set"),
                                   *(pl.col(col).cast(pl.Float64) for col in columns)))
    return pl.concat(frames, how="diagonal").with_columns(pl.col(pl.Float64).fill_null(NAN)).sort(UNIT)


def _unit_set(storage: Path, layer: int, variant: str) -> str:
    """What the unit ids of a variant's layer name (the kinds and sources of its records' units): unit 5 of two
    variants is the same unit only where this is equal (a dictionary's latent 5 is not neuron 5)."""
    path = asset_path(storage, ACTIVATION_RECORDS, layer, variant)
    if not path.exists():
        return ""
    frame = pl.read_parquet(path, columns=[c for c in ("unit_kind", "unit_source")
                                           if c in pl.read_parquet_schema(path)])
    return "; ".join(sorted({" ".join(str(v) for v in row) for row in frame.unique().iter_rows()}))


def _read_scorer_scores(storage: Path, variant: str, layers: list[int]) -> pl.DataFrame:
    """`layer`, `scorer`, `score` of the rows of the variant's scorer files of `layers` (a scorer that was off has
    none)."""
    frames = [pl.DataFrame(schema={"layer": pl.Int32, "scorer": pl.String, "score": pl.Float64})]
    for layer in layers:
        for scorer, (_, asset) in SCORER_ASSETS.items():
            path = asset_path(storage, asset, layer, variant)
            if path.exists():
                frame = pl.read_parquet(path, columns=["score"])
                frames.append(frame.select(pl.lit(layer, pl.Int32).alias("layer"), pl.lit(scorer).alias("scorer"),
                                           pl.col("score").cast(pl.Float64).fill_null(NAN)))
    return pl.concat(frames)


def _of_layer(frame: pl.DataFrame, layer: int | str) -> pl.DataFrame:
    return frame if layer == ALL else frame.filter(pl.col("layer") == layer)


def _finite(series: pl.Series) -> np.ndarray:
    values = series.to_numpy()
    return values[np.isfinite(values)]


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else NAN


def _summary_row(layer: int | str, variant: str, scores: pl.DataFrame, scorer_scores: pl.DataFrame,
                 baselines: list[str], scorers: list[str], resamples: int, seed: int) -> dict:
    values = _finite(scores["score"])
    low, high = bootstrap_interval(values, resamples, seed)
    return {"layer": layer, "variant": variant, "units": len(scores), "scored": int(values.size), "mean": _mean(values),
            "median": float(np.median(values)) if values.size else NAN, "ci_low": low, "ci_high": high,
            "baselines": {b: _mean(_finite(scores[baseline_column(b)])) if baseline_column(b) in scores.columns
                          else NAN for b in baselines},
            "scorers": {s: _mean(_finite(scorer_scores.filter(pl.col("scorer") == s)["score"])) for s in scorers}}


def _pair_row(layer: int | str, a: str, b: str, scores_a: pl.DataFrame, scores_b: pl.DataFrame, resamples: int,
              seed: int) -> dict:
    values_a, values_b = _finite(scores_a["score"]), _finite(scores_b["score"])
    low, high = difference_interval(values_a, values_b, resamples, seed)
    shared = (scores_a.select(*UNIT, "unit_set", "score").join(scores_b.select(*UNIT, "unit_set", "score"),
                                                              on=[*UNIT, "unit_set"], suffix="_b")
              .filter(pl.col("score").is_finite() & pl.col("score_b").is_finite()).sort(UNIT))
    differences = (shared["score_b"] - shared["score"]).to_numpy()
    paired_low, paired_high = bootstrap_interval(differences, resamples, seed)
    return {"layer": layer, "a": a, "b": b, "diff": _mean(values_b) - _mean(values_a), "ci_low": low, "ci_high": high,
            "shared": int(differences.size), "wins_b": int((differences > 0).sum()),
            "wins_a": int((differences < 0).sum()), "ties": int((differences == 0).sum()),
            "paired_diff": _mean(differences), "paired_ci_low": paired_low, "paired_ci_high": paired_high}


def format_compare(result: dict) -> str:
    """`compare`'s result as plain-text tables for a terminal: the variants' scores, then (two variants or more)
    their differences; the pooled rows only when more than one layer was chosen."""
    shown = [*result["layers"], *([ALL] if len(result["layers"]) > 1 else [])]
    rows = [r for r in result["summary"] if r["layer"] in shown]
    head = ["layer", "variant", "units", "scored", "mean", "median", "lo95", "hi95", *result["baselines"],
            *result["scorers"]]
    body = [[str(r["layer"]), r["variant"], str(r["units"]), str(r["scored"]),
             *map(_number, (r["mean"], r["median"], r["ci_low"], r["ci_high"], *r["baselines"].values(),
                            *r["scorers"].values()))] for r in rows]
    lines = ["Scores by variant:", *_table(head, body, left={1}),
             (f"(units = rows of the variant's {SCORES} file; scored = units with a finite score; mean, median = of"
              " those scores, the pooled Pearson correlation of simulated and true activations; lo95..hi95 = 95 %"
              f" bootstrap interval of the mean over units ({result['resamples']} resamples, seed {result['seed']});"
              " then the mean score of each baseline and of each scorer beside simulation; all = pooled over the"
              " layers)")]
    pairs = [r for r in result["pairs"] if r["layer"] in shown]
    if pairs:
        head = ["layer", "A", "B", "diff", "lo95", "hi95", "shared", "B_wins", "A_wins", "ties", "paired", "lo95",
                "hi95"]
        body = [[str(r["layer"]), r["a"], r["b"], *map(_number, (r["diff"], r["ci_low"], r["ci_high"])),
                 *(str(r[k]) for k in ("shared", "wins_b", "wins_a", "ties")),
                 *map(_number, (r["paired_diff"], r["paired_ci_low"], r["paired_ci_high"]))] for r in pairs]
        lines += ["", "Differences between variants (B − A):", *_table(head, body, left={1, 2}),
                  ("(diff = B's mean score − A's, lo95..hi95 its 95 % bootstrap interval resampling each side's units"
                   " independently; shared = units (same layer and id) both score; B_wins / A_wins / ties = shared"
                   " units where B's score is higher / lower / equal; paired = mean of B − A over the shared units,"
                   " lo95..hi95 its 95 % bootstrap interval resampling them)")]
    for found in result.get("controls", {}).values():  # can each variant's judge be trusted at all?
        for text in (control_lines(found["planted"]), random_weight_lines(found["random_weights"])):
            lines += ["", *text] if text else []
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.3f}" if np.isfinite(value) else "nan"


def _table(head: list[str], body: list[list[str]], left: set[int]) -> list[str]:
    """Columns two spaces apart, each as wide as its widest cell: right-aligned, but the `left` ones."""
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return ["  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip() for row in [head, *body]]
