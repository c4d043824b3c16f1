"""Best-of-k explanations: sample k candidates per neuron, simulate each on a calibration split that neither the
explainer nor the scoring uses (`excerpts.calibration_excerpts`), keep the one with the best calibration score.

Candidate c of a neuron is the explainer's answer at temperature 1 with a seed derived from (seed, c); candidate 0
uses exactly the seed a single explanation (k = 1) uses, so best-of-k only ever replaces the k = 1 explanation by
one that did better on calibration. Every candidate is kept, with its calibration score, and one row per neuron is
marked `selected`.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ndx_pipeline.core.contract import CALIBRATION, STATUS_OK
from ndx_pipeline.core.method.explainer import MAX_EXPLANATION_TOKENS, TEMPERATURE, explanation_work
from ndx_pipeline.core.method.scoring import score_layer
from ndx_pipeline.core.method.simulator import simulate_layer
from ndx_pipeline.core.method.work import Work, run_together
from ndx_pipeline.core.progress import Progress

CANDIDATE_SEED_STRIDE = 7919


def candidate_seed(seed: int, candidate: int) -> int:
    """The explainer seed of candidate `candidate` (candidate 0: `seed` itself)."""
    return seed + CANDIDATE_SEED_STRIDE * candidate


def candidates_work(excerpts: pl.DataFrame, backend, k: int = 3, max_tokens: int = MAX_EXPLANATION_TOKENS,
                    temperature: float = TEMPERATURE, seed: int = 0, digest: bool = True,
                    outputs=None) -> Work:
    """k explanations per neuron (explainer rows plus an Int32 `candidate` column), explanation_id
    `<layer>/<neuron>/explanation/<candidate>`, all asked at once (`outputs`: see `explanation_work`)."""
    if k < 1:
        raise ValueError(f"best-of-k needs k ≥ 1, not {k}")
    work = explanation_work(excerpts, backend, max_tokens, temperature, [candidate_seed(seed, c) for c in range(k)],
                            digest, outputs)
    if k == 1:  # the single explanation, as a candidate
        one = work.table
        work.table = lambda rows: one(rows).with_columns(pl.lit(0, dtype=pl.Int32).alias("candidate"))
    return work


def explain_candidates(excerpts: pl.DataFrame, backend, k: int = 3, max_tokens: int = MAX_EXPLANATION_TOKENS,
                       temperature: float = TEMPERATURE, seed: int = 0,
                       progress: Progress | None = None, digest: bool = True) -> pl.DataFrame:
    return run_together(backend, [candidates_work(excerpts, backend, k, max_tokens, temperature, seed, digest)],
                        progress)[0]


def no_calibration_scores() -> pl.DataFrame:
    """The calibration scores of a choice that was not made (k = 1): `choose` then keeps candidate 0."""
    return pl.DataFrame(schema={"explanation_id": pl.String, "score": pl.Float64, "status": pl.String})


def choose(candidates: pl.DataFrame, calibration_scores: pl.DataFrame) -> pl.DataFrame:
    """`candidates` plus calibration_score (Float64), calibration_status (String) and selected (Boolean).

    Per neuron the selected row is the ok candidate with the highest finite calibration score (ties: lowest
    candidate); when no ok candidate has one, the lowest ok candidate; when none is ok, candidate 0 (its row
    stays failed)."""
    cal = calibration_scores.select("explanation_id", pl.col("score").alias("calibration_score"),
                                    pl.col("status").alias("calibration_status"))
    out = candidates.drop(["calibration_score", "calibration_status", "selected"], strict=False)
    out = out.join(cal, on="explanation_id", how="left").with_columns(
        pl.col("calibration_score").cast(pl.Float64).fill_null(float("nan")))
    if "candidate" not in out.columns:
        out = out.with_columns(pl.lit(0, dtype=pl.Int32).alias("candidate"))
    out = out.sort(["layer", "neuron", "candidate"])
    selected = []
    for _, group in out.group_by(["layer", "neuron"], maintain_order=True):
        ok = group["status"].to_numpy() == STATUS_OK
        score = group["calibration_score"].to_numpy()
        finite = ok & np.isfinite(score)
        if finite.any():
            best = int(np.argmax(np.where(finite, score, -np.inf)))
        elif ok.any():
            best = int(np.argmax(ok))
        else:
            best = 0
        selected += [i == best for i in range(len(group))]
    return out.with_columns(pl.Series("selected", selected, dtype=pl.Boolean))


def select_best(candidates: pl.DataFrame, calibration: pl.DataFrame, simulator_backend,
                **simulate_kwargs) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Simulate every ok candidate on the neuron's `calibration` excerpts, score it (pooled Pearson, as the real
    score) and choose one per neuron. Returns (candidates with calibration_score / calibration_status / selected,
    the calibration simulations)."""
    ok = candidates.filter(pl.col("status") == STATUS_OK)
    sims = simulate_layer(ok, calibration, simulator_backend, splits=(CALIBRATION,), **simulate_kwargs)
    scores = score_layer(sims, ok, splits=(CALIBRATION,)) if len(ok) else no_calibration_scores()
    return choose(candidates, scores), sims
