"""The judge's controls, computed from the scores of planted units (`core/data/planted.py`).

- Each planted unit gets two explanations beside the explainer's own: the true one, written from its rule
  (`planted_true`), and a wrong one, another planted unit's (`planted_wrong`). They are simulated and judged
  exactly like any explanation (`planted_explanations` makes their rows).
- **Judge separation**, per scorer (simulation, detection, fuzzing, embedding): over the planted units, the ROC AUC of
  the true explanations' scores against the wrong ones' (the chance that a true explanation outscores a wrong one:
  0.5 is chance, 1 a perfect judge) and the mean paired gap (true − wrong), each with a 95 % percentile-bootstrap
  interval over the units.
- **Explainer recovery**: the explainer's own explanations' mean score as a share of the true explanations' mean
  score (ratio of means, with its interval), and how many of them name the rule (`PlantedRule.named_in`).
- **Trained minus random weights** (`trained_minus_random`): the same units explained and scored on the subject
  model and on a copy with re-initialized weights; per layer (and pooled), the mean paired difference of the scores
  with its bootstrap interval. A score that a random-weight model reaches as well says little about training.

A judge whose AUC interval includes 0.5 cannot be trusted to rank explanations of real units either; the report
says so in those words.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from ndx_pipeline.core import contract
from ndx_pipeline.core.contract import (
    BASELINE_EXPLANATION_SCHEMA,
    PLANTED_TRUE,
    PLANTED_WRONG,
    STATUS_OK,
    baseline_column,
    control_explanation_id,
)
from ndx_pipeline.core.data.planted import RULES, PlantedRule, wrong_rule
from ndx_pipeline.core.method.metrics import roc_auc

RESAMPLES = 2000
CHANCE = 0.5
PLANTED_EXPLAINER = "planted rule"  # the `explainer` of the true and wrong explanations: written from the rules
SIMULATION = "simulation"


def planted_explanations(explanations: pl.DataFrame, rules: tuple[PlantedRule, ...] = RULES) -> pl.DataFrame:
    """The `planted_true` and `planted_wrong` rows (baseline_explanations' schema) of every planted unit that has a
    kept explanation of ours; `neuron` is the rule's index."""
    rows = []
    for row in contract.kept(explanations).select("layer", "neuron").unique().sort("layer", "neuron").iter_rows():
        layer, unit = row
        for baseline, rule in ((PLANTED_TRUE, rules[unit]), (PLANTED_WRONG, wrong_rule(unit, rules))):
            rows.append({"layer": layer, "neuron": unit, "baseline": baseline, "explanation": rule.explanation,
                         "explanation_id": control_explanation_id(layer, unit, baseline),
                         "explainer": PLANTED_EXPLAINER, "status": STATUS_OK})
    return pl.DataFrame(rows, schema=BASELINE_EXPLANATION_SCHEMA) if rows else pl.DataFrame(
        schema=BASELINE_EXPLANATION_SCHEMA)


def _interval(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not values.size:
        return math.nan, math.nan
    low, high = np.quantile(values, (0.025, 0.975))
    return float(low), float(high)


def separation(true: np.ndarray, wrong: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """AUC of `true` against `wrong` (per-unit scores, paired by position; units where either is not finite are
    left out) and the mean paired gap, each with its bootstrap interval over the units."""
    true, wrong = np.asarray(true, dtype=np.float64), np.asarray(wrong, dtype=np.float64)
    keep = np.isfinite(true) & np.isfinite(wrong)
    true, wrong = true[keep], wrong[keep]
    n = int(true.size)
    out = {"units": n, "auc": math.nan, "auc_lo": math.nan, "auc_hi": math.nan, "gap": math.nan,
           "gap_lo": math.nan, "gap_hi": math.nan}
    if not n:
        return out
    labels = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    aucs = np.array([roc_auc(labels, np.r_[true[d], wrong[d]]) for d in draws])
    gaps = (true[draws] - wrong[draws]).mean(axis=1)
    out.update(auc=roc_auc(labels, np.r_[true, wrong]), gap=float((true - wrong).mean()))
    out["auc_lo"], out["auc_hi"] = _interval(aucs)
    out["gap_lo"], out["gap_hi"] = _interval(gaps)
    return out


def recovery(ours: np.ndarray, true: np.ndarray, explanations: list[str | None], units: list[int],
             rules: tuple[PlantedRule, ...] = RULES, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """The explainer's own explanations against the true ones: mean(ours) / mean(true) over the units where both
    scores are finite, with its bootstrap interval, and how many of its explanations name their unit's rule."""
    ours, true = np.asarray(ours, dtype=np.float64), np.asarray(true, dtype=np.float64)
    keep = np.isfinite(ours) & np.isfinite(true)
    named = sum(rules[u].named_in(text) for u, text in zip(units, explanations, strict=True))
    out = {"units": int(keep.sum()), "share": math.nan, "share_lo": math.nan, "share_hi": math.nan,
           "names_rule": int(named), "explained": len(units)}
    ours, true = ours[keep], true[keep]
    if not ours.size or true.mean() <= 0:
        return out
    draws = np.random.default_rng(seed).integers(0, ours.size, size=(resamples, ours.size))
    means_true = true[draws].mean(axis=1)
    shares = np.where(means_true > 0, ours[draws].mean(axis=1) / np.where(means_true > 0, means_true, 1), np.nan)
    out["share"] = float(ours.mean() / true.mean())
    out["share_lo"], out["share_hi"] = _interval(shares)
    return out


def judge_controls(scores: pl.DataFrame, scorer_scores: dict[str, pl.DataFrame] | None = None,
                   resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """From a planted variant's `scores` (simulation) and each scorer's scores frame: per judge its separation,
    and the explainer's recovery under the simulation score. Judges whose frames lack the control columns (planted
    units not scored) are left out."""
    judges = {SIMULATION: scores, **(scorer_scores or {})}
    out = {"judges": {}, "recovery": None}
    cols = baseline_column(PLANTED_TRUE), baseline_column(PLANTED_WRONG)
    for name, frame in judges.items():
        if frame is None or frame.is_empty() or not set(cols) <= set(frame.columns):
            continue
        frame = frame.sort("layer", "neuron")
        out["judges"][name] = separation(frame[cols[0]].to_numpy(), frame[cols[1]].to_numpy(), resamples, seed)
    if SIMULATION in out["judges"]:
        frame = scores.sort("layer", "neuron")
        out["recovery"] = recovery(frame["score"].to_numpy(), frame[cols[0]].to_numpy(),
                                   frame["explanation"].to_list(), frame["neuron"].to_list(), resamples=resamples,
                                   seed=seed)
    return out


def verdict(found: dict) -> str:
    """A judge's separation in words: whether it tells right explanations from wrong ones."""
    lo, hi = found.get("auc_lo", math.nan), found.get("auc_hi", math.nan)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "not measured (no planted unit was scored)"
    if lo > CHANCE:
        return "tells right from wrong"
    if hi < CHANCE:
        return "ranks wrong explanations above right ones"
    return "no better than chance"


def includes_chance(found: dict) -> bool:
    lo, hi = found.get("auc_lo", math.nan), found.get("auc_hi", math.nan)
    return not (math.isfinite(lo) and math.isfinite(hi)) or lo <= CHANCE <= hi


def trained_minus_random(trained: pl.DataFrame, random: pl.DataFrame, column: str = "score",
                         resamples: int = RESAMPLES, seed: int = 0) -> list[dict]:
    """Per layer, then pooled (layer "all"): the units scored on both (same layer and id, `column` finite in
    each), mean(trained) − mean(random) over them with the 95 % bootstrap interval of the mean paired difference,
    and each side's mean."""
    both = trained.select("layer", "neuron", pl.col(column).alias("trained")).join(
        random.select("layer", "neuron", pl.col(column).alias("random")), on=["layer", "neuron"])
    both = both.filter(pl.col("trained").is_finite() & pl.col("random").is_finite()).sort("layer", "neuron")
    rows = []
    groups = [(layer, both.filter(pl.col("layer") == layer)) for layer in both["layer"].unique().sort()]
    for layer, part in [*groups, *([("all", both)] if len(groups) > 1 else [])]:
        diff = (part["trained"] - part["random"]).to_numpy()
        row = {"layer": layer, "units": len(part), "trained": math.nan, "random": math.nan, "diff": math.nan,
               "diff_lo": math.nan, "diff_hi": math.nan}
        if len(part):
            draws = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
            row.update(trained=float(part["trained"].mean()), random=float(part["random"].mean()),
                       diff=float(diff.mean()))
            row["diff_lo"], row["diff_hi"] = _interval(diff[draws].mean(axis=1))
        rows.append(row)
    return rows
