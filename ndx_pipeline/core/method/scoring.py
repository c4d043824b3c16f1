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


def score_layer(simulations, explanations, baselines=None):
    """One row per explained neuron: pooled score over score_top + score_random, and over each split alone.

    When `explanations` holds best-of-k candidates (a boolean `selected` column), only the selected one of each
    neuron is scored. baselines: {name: score_layer output of a baseline} adds a Float64 column `baseline_<name>`
    per baseline (NaN where that baseline has no score for the neuron); see `baselines.with_baselines`."""
    explanations = contract.kept(explanations)
    rows = []
    for expl in explanations.sort(["layer", "neuron"]).iter_rows(named=True):
        row = {"layer": expl["layer"], "neuron": expl["neuron"], "explanation_id": expl["explanation_id"],
               "explanation": expl["explanation"]}
        sims = simulations.filter(pl.col("explanation_id") == expl["explanation_id"])
        failed = sims.filter(pl.col("status") != "ok") if "status" in sims.columns else sims.clear()
        reason = None
        if expl["status"] != "ok":
            reason = f"failed: explanation failed ({expl.get('error') or 'no reason given'})"
        elif sims.is_empty():
            reason = "failed: no simulations"
        elif len(failed):
            # A score over fewer excerpts would not be the pooled score: none rather than a different number.
            reason = (f"failed: {len(failed)} of {len(sims)} simulations failed "
                      f"({failed['error'][0] or 'no reason given'})")
        if reason:
            row.update(score=float("nan"), score_top=float("nan"), score_random=float("nan"),
                       rsquared=float("nan"), absolute_dev_explained=float("nan"), status=reason, scored_tokens=0)
            rows.append(row)
            continue
        true, sim = sims["true_activations"].to_list(), sims["simulated_activations"].to_list()
        pooled = pooled_correlation(true, sim)
        parts = {}
        for split in contract.SCORED_SPLITS:
            part = sims.filter(pl.col("split") == split)
            parts[split] = pooled_correlation(part["true_activations"].to_list(),
                                              part["simulated_activations"].to_list()).value
        row.update(score=pooled.value, score_top=parts["score_top"], score_random=parts["score_random"],
                   rsquared=rsquared(true, sim), absolute_dev_explained=absolute_dev_explained(true, sim),
                   status=pooled.status, scored_tokens=int(sum(len(t) for t in true)))
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
