"""Scoring and display-scale vectors from REFERENCE.md, exactly."""

import math

import numpy as np
import pytest

from ndx_pipeline.core.llm.openai.logprobs import values_from_candidates
from ndx_pipeline.core.method.display import display_scale
from ndx_pipeline.core.method.scoring import (
    STATUS_CONSTANT_SIMULATED,
    STATUS_CONSTANT_TRUE,
    STATUS_NO_TOKENS,
    absolute_dev_explained,
    fit_calibration,
    pooled_correlation,
    rsquared,
    score_layer,
)
from ndx_pipeline.core.method.simulator import expected_values

A_TRUE, A_SIM = [0.0, 0.0, 2.0, 0.0], [0.1, 0.0, 8.0, 1.0]
B_TRUE, B_SIM = [0.0, -0.1, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0]


def test_correlation_vectors():
    assert pooled_correlation([A_TRUE], [A_SIM]).value == pytest.approx(0.99313, abs=5e-6)
    assert pooled_correlation([B_TRUE], [B_SIM]).value == pytest.approx(0.3333, abs=5e-5)


def test_pooled_is_not_mean_of_excerpts():
    pooled = pooled_correlation([A_TRUE, B_TRUE], [A_SIM, B_SIM])
    assert pooled.status == "ok"
    assert pooled.value == pytest.approx(0.99210, abs=5e-6)
    assert pooled.value != pytest.approx((0.99313 + 0.3333) / 2, abs=1e-3)


def test_rsquared_and_absolute_dev_explained_vectors():
    assert rsquared([A_TRUE, B_TRUE], [A_SIM, B_SIM]) == pytest.approx(-8.29426, abs=5e-6)
    assert absolute_dev_explained([A_TRUE, B_TRUE], [A_SIM, B_SIM]) == pytest.approx(-2.66667, abs=5e-6)


def _layer(calibration_true, calibration_sim):
    """One neuron scored on excerpts A and B, with one calibration excerpt (none when calibration_true is None)."""
    import polars as pl

    expl = pl.DataFrame({"layer": [0], "neuron": [1], "explanation_id": ["0/1/explanation/0"], "explanation": ["x"],
                         "status": ["ok"], "error": [None]}, schema_overrides={"error": pl.String})
    rows = [("score_top", A_TRUE, A_SIM), ("score_random", B_TRUE, B_SIM)]
    if calibration_true is not None:
        rows.append(("calibration", calibration_true, calibration_sim))
    sims = pl.DataFrame({"explanation_id": ["0/1/explanation/0"] * len(rows), "split": [r[0] for r in rows],
                         "true_activations": [r[1] for r in rows], "simulated_activations": [r[2] for r in rows],
                         "status": ["ok"] * len(rows)})
    return score_layer(sims, expl).row(0, named=True)


def test_fit_calibration_is_the_least_squares_line():
    r, p = [0.0, 1.0, 3.0, 0.5, 2.0], [1.0, 2.0, 9.0, 0.0, 4.0]
    slope, intercept = np.polyfit(p, r, 1)
    fit = fit_calibration([r[:2], r[2:]], [p[:2], p[2:]])  # pooled over excerpts
    assert (fit.slope, fit.intercept, fit.status) == (pytest.approx(slope, abs=1e-12),
                                                      pytest.approx(intercept, abs=1e-12), "ok")
    constant = fit_calibration([[1.0, 3.0]], [[5.0, 5.0]])
    assert (constant.slope, constant.intercept) == (0.0, 2.0) and constant.status.startswith("ok")
    assert math.isnan(fit_calibration([], []).slope)


def test_scores_are_calibrated_on_the_calibration_split():
    # calibration excerpt: simulated = 4 · true + 2 exactly, so the fitted line is true = 0.25 · sim − 0.5
    cal_true = [0.0, 1.0, 2.0, 0.5]
    row = _layer(cal_true, [4 * x + 2 for x in cal_true])
    assert (row["calibration_slope"], row["calibration_intercept"]) == (pytest.approx(0.25), pytest.approx(-0.5))
    r = np.array(A_TRUE + B_TRUE)
    predicted = 0.25 * np.array(A_SIM + B_SIM) - 0.5
    assert row["calibrated_ev"] == pytest.approx(1 - ((r - predicted) ** 2).sum() / ((r - r.mean()) ** 2).sum())
    assert row["rsquared"] == pytest.approx(1 - np.mean((r - predicted) ** 2) / np.mean(r * r))
    assert row["absolute_dev_explained"] == pytest.approx(1 - np.mean(np.abs(r - predicted)) / np.mean(np.abs(r)))
    # the correlation is the pooled one over score_top + score_random, whatever the calibration
    other = _layer(cal_true, [-3 * x + 9 for x in cal_true])
    assert row["score"] == other["score"] == pytest.approx(0.99210, abs=5e-6)
    assert other["calibrated_ev"] != pytest.approx(row["calibrated_ev"])
    assert row["calibration_status"] == "ok"


def test_without_calibration_excerpts_the_calibrated_metrics_are_undefined_with_a_reason():
    row = _layer(None, None)
    assert row["score"] == pytest.approx(0.99210, abs=5e-6) and row["status"] == "ok"
    assert math.isnan(row["calibrated_ev"]) and math.isnan(row["rsquared"])
    assert row["calibration_status"].startswith("undefined")


def test_constant_inputs_are_nan_with_a_reason_never_zero():
    c = pooled_correlation([[1, 1, 1]], [[0, 5, 2]])
    assert math.isnan(c.value) and c.status == STATUS_CONSTANT_TRUE
    c = pooled_correlation([[0, 1, 3]], [[2, 2, 2]])
    assert math.isnan(c.value) and c.status == STATUS_CONSTANT_SIMULATED
    c = pooled_correlation([], [])
    assert math.isnan(c.value) and c.status == STATUS_NO_TOKENS


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in length"):
        pooled_correlation([[0, 1]], [[0, 1, 2]])


def test_display_scale_vectors():
    assert display_scale([-1, 0, 0.5, 0.99, 1, 2], 1) == [0, 0, 5, 9, 10, 10]
    assert display_scale([0, 0.3, 3], 3) == [0, 1, 10]
    assert display_scale([-2, -1], 0) == [0, 0]
    assert display_scale([-2, -1], -1) == [0, 0]


def test_expected_value_vector():
    lp = {"0": math.log(0.6), "1": math.log(0.1), "10": math.log(0.1), " the": math.log(0.2)}
    assert expected_values(values_from_candidates(lp)[None, :])[0] == pytest.approx(1.375, abs=1e-12)
    assert expected_values(values_from_candidates({"x": 0.0})[None, :])[0] == 0.0
    probs = np.zeros((2, 11))
    probs[0, [0, 1, 10]] = [0.6, 0.1, 0.1]
    assert expected_values(probs).tolist() == pytest.approx([1.375, 0.0])


def test_score_layer_pools_splits_and_reports_failures():
    import polars as pl

    expl = pl.DataFrame({
        "layer": [0, 0], "neuron": [1, 2], "explanation_id": ["0/1/explanation/0", "0/2/explanation/0"],
        "explanation": ["x", None], "status": ["ok", "failed"], "error": [None, "no text"],
    })
    sims = pl.DataFrame({
        "explanation_id": ["0/1/explanation/0", "0/1/explanation/0"], "split": ["score_top", "score_random"],
        "true_activations": [A_TRUE, B_TRUE], "simulated_activations": [A_SIM, B_SIM],
    })
    out = score_layer(sims, expl).sort("neuron")
    assert out["score"][0] == pytest.approx(0.99210, abs=5e-6)
    assert out["score_top"][0] == pytest.approx(0.99313, abs=5e-6)
    assert out["score_random"][0] == pytest.approx(0.3333, abs=5e-5)
    assert out["status"][0] == "ok" and out["scored_tokens"][0] == 8
    assert math.isnan(out["score"][1]) and out["status"][1].startswith("failed") and "no text" in out["status"][1]
