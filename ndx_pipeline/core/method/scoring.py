"""Scoring: how well simulated activations track the real ones.

The score is the Pearson correlation of raw true activations (negatives kept) with simulated expected values,
computed once over all tokens of all scored excerpts pooled, never a mean of per-excerpt correlations. When either
side is constant the correlation is undefined: the score is NaN and the status says which side was constant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl

from ndx_pipeline.core import contract
from ndx_pipeline.core.contract import STATUS_OK

STATUS_CONSTANT_TRUE = "undefined: true activations are constant"
STATUS_CONSTANT_SIMULATED = "undefined: simulated activations are constant"
STATUS_NO_TOKENS = "undefined: no scored tokens"


@dataclass(frozen=True)
class Correlation:
    value: float
    status: str


def _flatten(excerpts) -> np.ndarray:
    parts = [np.asarray(e, dtype=np.float64).ravel() for e in excerpts]
    return np.concatenate(parts) if parts else np.zeros(0)


def pooled_correlation(true_excerpts, simulated_excerpts) -> Correlation:
    """Pearson correlation over every token of every excerpt, pooled."""
    r, p = _flatten(true_excerpts), _flatten(simulated_excerpts)
    if r.shape != p.shape:
        raise ValueError(f"true ({r.size} tokens) and simulated ({p.size} tokens) activations differ in length.")
    if r.size == 0:
        return Correlation(float("nan"), STATUS_NO_TOKENS)
    rc, pc = r - r.mean(), p - p.mean()
    sr, sp = np.sqrt((rc * rc).sum()), np.sqrt((pc * pc).sum())
    if sr == 0:
        return Correlation(float("nan"), STATUS_CONSTANT_TRUE)
    if sp == 0:
        return Correlation(float("nan"), STATUS_CONSTANT_SIMULATED)
    return Correlation(float(np.clip((rc * pc).sum() / (sr * sp), -1.0, 1.0)), STATUS_OK)


def rsquared(true_excerpts, simulated_excerpts) -> float:
    """1 − mean((r − p)²) / mean(r²), pooled (as reported by the reference implementation)."""
    r, p = _flatten(true_excerpts), _flatten(simulated_excerpts)
    denom = np.mean(r * r) if r.size else 0.0
    return float(1 - np.mean((r - p) ** 2) / denom) if denom > 0 else float("nan")


def absolute_dev_explained(true_excerpts, simulated_excerpts) -> float:
    """1 − mean|r − p| / mean|r|, pooled."""
    r, p = _flatten(true_excerpts), _flatten(simulated_excerpts)
    denom = np.mean(np.abs(r)) if r.size else 0.0
    return float(1 - np.mean(np.abs(r - p)) / denom) if denom > 0 else float("nan")


@dataclass(frozen=True)
class Calibration:
    """A least-squares line from simulated to true activations, fitted on a neuron's calibration excerpts (which
    neither the explainer nor the scoring sees); `apply` maps simulated values onto the true scale."""

    slope: float
    intercept: float
    status: str

    def apply(self, simulated) -> np.ndarray:
        return self.slope * _flatten(simulated) + self.intercept


CALIBRATION_NO_TOKENS = "undefined: no calibration excerpts were simulated"
CALIBRATION_CONSTANT = "ok: simulated activations constant on the calibration excerpts (mapped to their mean)"


def fit_calibration(true_excerpts, simulated_excerpts) -> Calibration:
    """The line true ≈ slope · simulated + intercept that minimises the squared error over all pooled tokens (the
    reference's linear calibrated simulator). A constant simulation maps to the true mean."""
    r, p = _flatten(true_excerpts), _flatten(simulated_excerpts)
    if r.shape != p.shape:
        raise ValueError(f"true ({r.size} tokens) and simulated ({p.size} tokens) activations differ in length.")
    if r.size == 0:
        return Calibration(float("nan"), float("nan"), CALIBRATION_NO_TOKENS)
    pc = p - p.mean()
    if not (pc * pc).sum() > 0:
        return Calibration(0.0, float(r.mean()), CALIBRATION_CONSTANT)
    slope = float((pc * (r - r.mean())).sum() / (pc * pc).sum())
    return Calibration(slope, float(r.mean() - slope * p.mean()), STATUS_OK)


def explained_variance(true_excerpts, predicted_excerpts) -> float:
    """1 − Σ(r − p)² / Σ(r − r̄)², pooled: the share of the true activations' variance the prediction explains
    (NaN when the true activations are constant)."""
    r, p = _flatten(true_excerpts), _flatten(predicted_excerpts)
    rc = r - r.mean() if r.size else r
    denom = float((rc * rc).sum())
    return float(1 - ((r - p) ** 2).sum() / denom) if denom > 0 else float("nan")


def _calibrated(row: dict, sims: pl.DataFrame, scored_true, scored_sim) -> None:
    """Fit the calibration on the neuron's calibration rows and add the calibrated metrics to `row`."""
    cal = sims.filter(pl.col("split") == contract.CALIBRATION)
    failed = cal.filter(pl.col("status") != STATUS_OK) if "status" in cal.columns else cal.clear()
    if len(failed):
        fit = Calibration(float("nan"), float("nan"),
                          f"failed: {len(failed)} of {len(cal)} calibration simulations failed")
    else:
        fit = fit_calibration(cal["true_activations"].to_list(), cal["simulated_activations"].to_list())
    predicted = [fit.apply(s) for s in scored_sim]
    row.update(calibrated_ev=explained_variance(scored_true, predicted), rsquared=rsquared(scored_true, predicted),
               absolute_dev_explained=absolute_dev_explained(scored_true, predicted),
               calibration_slope=fit.slope, calibration_intercept=fit.intercept, calibration_status=fit.status)


def unscored_reason(explanation: dict, judgements: pl.DataFrame, what: str) -> str | None:
    """Why an explanation gets no score from its `judgements` (simulations, or a scorer's verdicts), None when it
    gets one: its explanation failed, nothing was judged, or any judgement failed (a score over fewer excerpts
    would be another score: none rather than a different number)."""
    if explanation["status"] != STATUS_OK:
        return f"failed: explanation failed ({explanation.get('error') or 'no reason given'})"
    if judgements.is_empty():
        return f"failed: no {what}"
    failed = judgements.filter(pl.col("status") != STATUS_OK) if "status" in judgements.columns else judgements.clear()
    if len(failed):
        return f"failed: {len(failed)} of {len(judgements)} {what} failed ({failed['error'][0] or 'no reason given'})"
    return None


def score_layer(simulations, explanations, baselines=None, splits=contract.SCORED_SPLITS):
    """One row per explained neuron: the pooled score over the excerpts of `splits` (score_top + score_random),
    and over each scored split alone; then, from the calibration rows of the same simulations, the calibrated
    explained variance (and the reference's rsquared / absolute deviation explained, on calibrated predictions).

    When `explanations` holds best-of-k candidates (a boolean `selected` column), only the selected one of each
    neuron is scored. baselines: {name: score_layer output of a baseline} adds a Float64 column `baseline_<name>`
    per baseline (NaN where that baseline has no score for the neuron), see `with_baselines`."""
    explanations = contract.kept(explanations)
    undefined = {k: float("nan") for k in ("score", "score_top", "score_random", "calibrated_ev", "rsquared",
                                           "absolute_dev_explained", "calibration_slope", "calibration_intercept")}
    rows = []
    for expl in explanations.sort(["layer", "neuron"]).iter_rows(named=True):
        row = {"layer": expl["layer"], "neuron": expl["neuron"], "explanation_id": expl["explanation_id"],
               "explanation": expl["explanation"]}
        mine = simulations.filter(pl.col("explanation_id") == expl["explanation_id"])
        sims = mine.filter(pl.col("split").is_in(list(splits)))
        reason = unscored_reason(expl, sims, "simulations")
        if reason:
            rows.append({**row, **undefined, "status": reason, "scored_tokens": 0,
                         "calibration_status": "undefined: not scored"})
            continue
        true, sim = sims["true_activations"].to_list(), sims["simulated_activations"].to_list()
        pooled = pooled_correlation(true, sim)
        parts = {}
        for split in contract.SCORED_SPLITS:
            part = sims.filter(pl.col("split") == split)
            parts[split] = pooled_correlation(part["true_activations"].to_list(),
                                              part["simulated_activations"].to_list()).value
        row.update(score=pooled.value, score_top=parts[contract.SCORE_TOP], score_random=parts[contract.SCORE_RANDOM],
                   status=pooled.status, scored_tokens=int(sum(len(t) for t in true)))
        _calibrated(row, mine, true, sim)
        rows.append(row)
    frame = contract.frame(rows, contract.SCORE_SCHEMA)
    return with_baselines(frame, baselines) if baselines else frame


def with_baselines(scores: pl.DataFrame, baselines: Mapping[str, pl.DataFrame]) -> pl.DataFrame:
    """`scores` plus one Float64 column `baseline_<name>` per baseline: that baseline's `score` for the same
    (layer, neuron) (score_layer output of the baseline), NaN where it has none."""
    out = scores
    for name, frame in baselines.items():
        col = contract.baseline_column(name)
        part = frame.select(pl.col("layer").cast(pl.Int32), pl.col("neuron").cast(pl.Int32),
                            pl.col("score").cast(pl.Float64).alias(col)).unique(["layer", "neuron"], keep="first")
        out = out.drop(col, strict=False).join(part, on=["layer", "neuron"], how="left")
        out = out.with_columns(pl.col(col).fill_null(float("nan")))
    return out
