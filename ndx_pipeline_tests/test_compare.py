"""`ndx-pipeline compare` (reports/compare.py) on a storage folder of synthetic scores files: three variants (two that
share most units, one of negative sides that shares none), NaN scores, a baseline one variant lacks, one scorer
file with rows and one without. Every figure is recomputed here by hand, the bootstrap intervals by an independent
numpy re-implementation of the documented resampling."""

import json
import math
import statistics

import numpy as np
import polars as pl
import pytest

from ndx_pipeline.core import contract
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.storage import asset_path, write_parquet_atomic
from ndx_pipeline.reports import compare as cmp

NAN = float("nan")
R = 400  # resamples: enough to exercise the bootstrap, fast enough for a test

# variant → layer → unit id → (score, {baseline: score}); a baseline a variant lacks is absent from its file
SCORES = {
    "neurons": {
        0: {0: 0.1, 1: 0.5, 2: NAN, 3: 0.3, 4: 0.9, 5: 0.2},
        1: {0: 0.4, 1: NAN, 2: 0.6, 3: -0.1},
    },
    "explainer-b": {
        0: {0: 0.2, 1: NAN, 2: 0.7, 3: 0.3, 4: 0.6, 7: 0.8},
        1: {0: 0.5, 1: 0.1, 2: 0.6, 3: -0.3},
    },
    "neurons-negative": {
        0: {-1: 0.05, -2: NAN, -3: 0.45},
    },
}
BASELINES = {"neurons": ("lookup", "random", "token_list"), "explainer-b": ("random", "token_list"),
             "neurons-negative": ("lookup", "random", "token_list")}
DETECTION = [0.75, NAN, 0.5]  # explainer-b's detection scores of layer 0


def baseline_value(variant: str, baseline: str, layer: int, unit: int) -> float:
    """A baseline's synthetic score: one NaN, the rest distinct."""
    if (layer, unit) == (0, 4):
        return NAN
    return round(0.01 * (len(variant) + 3 * contract.BASELINES.index(baseline) + 2 * layer) + 0.001 * unit, 6)


@pytest.fixture
def storage(tmp_path):
    for variant, layers in SCORES.items():
        for layer, units in layers.items():
            ids = list(units)
            frame = pl.DataFrame({
                "layer": [layer] * len(ids), "neuron": ids,
                "explanation_id": [f"{variant}/{contract.explanation_id(layer, u)}" for u in ids],
                "explanation": ["an explanation"] * len(ids), "score": list(units.values()),
                "score_top": [0.0] * len(ids), "score_random": [0.0] * len(ids),
                "status": [contract.STATUS_FAILED if math.isnan(s) else contract.STATUS_OK for s in units.values()],
                "calibrated_ev": [0.0] * len(ids),
                **{contract.baseline_column(b): [baseline_value(variant, b, layer, u) for u in ids]
                   for b in BASELINES[variant]},
            }, schema_overrides={"layer": pl.Int32, "neuron": pl.Int32})
            write_parquet_atomic(frame, asset_path(tmp_path, contract.SCORES, layer, variant))
    detection = pl.DataFrame({"layer": [0] * 3, "neuron": [0, 1, 2], "scorer": [contract.DETECTION] * 3,
                              "metric": ["balanced_accuracy"] * 3, "score": DETECTION, "baseline_random": [0.5] * 3,
                              "baseline_token_list": [0.5] * 3, "status": [contract.STATUS_OK] * 3},
                             schema_overrides={"layer": pl.Int32, "neuron": pl.Int32})
    write_parquet_atomic(detection, asset_path(tmp_path, contract.DETECTION_SCORES, 0, "explainer-b"))
    embedding_off = pl.DataFrame(schema=contract.SCORER_SCORE_SCHEMA)  # a scorer that was off: an empty file
    write_parquet_atomic(embedding_off, asset_path(tmp_path, contract.EMBEDDING_SCORES, 0, "neurons"))
    return tmp_path


def finite_scores(variant: str, layers) -> list[float]:
    """The variant's finite scores in unit order ((layer, id) ascending)."""
    return [s for layer in sorted(layers) if layer in SCORES[variant]
            for _, s in sorted(SCORES[variant][layer].items()) if not math.isnan(s)]


def paired_differences(a: str, b: str, layers) -> list[float]:
    """B − A over the units both score, in unit order."""
    return [SCORES[b][layer][u] - s for layer in sorted(layers) if layer in SCORES[a] and layer in SCORES[b]
            for u, s in sorted(SCORES[a][layer].items())
            if not math.isnan(s) and not math.isnan(SCORES[b][layer].get(u, NAN))]


def reference_interval(values, seed: int) -> tuple[float, float]:
    """The documented bootstrap, drawn at once."""
    x = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(R, x.size))].mean(axis=1)
    return tuple(float(q) for q in np.quantile(means, [0.025, 0.975]))


def reference_difference_interval(a, b, seed: int) -> tuple[float, float]:
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means_a = xa[rng.integers(0, xa.size, size=(R, xa.size))].mean(axis=1)
    means_b = xb[rng.integers(0, xb.size, size=(R, xb.size))].mean(axis=1)
    return tuple(float(q) for q in np.quantile(means_b - means_a, [0.025, 0.975]))


def summary_row(result, layer, variant):
    (row,) = [r for r in result["summary"] if r["layer"] == layer and r["variant"] == variant]
    return row


def pair_row(result, layer, a, b):
    (row,) = [r for r in result["pairs"] if r["layer"] == layer and (r["a"], r["b"]) == (a, b)]
    return row


def test_defaults_choose_every_variant_and_layer(storage):
    result = cmp.compare(storage, resamples=R)
    assert result["variants"] == ["explainer-b", "neurons", "neurons-negative"]  # stored order: by name
    assert result["layers"] == [0, 1]
    assert result["baselines"] == ["lookup", "random", "token_list"]
    assert result["scorers"] == [contract.DETECTION]  # the empty embedding file is a scorer that was off
    assert [(r["layer"], r["variant"]) for r in result["summary"]] == [
        (layer, v) for layer in (0, 1, cmp.ALL) for v in result["variants"]]
    assert [(r["layer"], r["a"], r["b"]) for r in result["pairs"]] == [
        (layer, a, b) for layer in (0, 1, cmp.ALL)
        for a, b in (("explainer-b", "neurons"), ("explainer-b", "neurons-negative"), ("neurons", "neurons-negative"))]


@pytest.mark.parametrize("layer", [0, 1, cmp.ALL])
def test_summary_figures(storage, layer):
    variants = ["neurons", "explainer-b", "neurons-negative"]
    result = cmp.compare(storage, variants, resamples=R, seed=3)
    layers = [0, 1] if layer == cmp.ALL else [layer]
    for variant in variants:
        row = summary_row(result, layer, variant)
        values = finite_scores(variant, layers)
        units = [(lay, u) for lay in layers for u in SCORES[variant].get(lay, {})]
        assert (row["units"], row["scored"]) == (len(units), len(values))
        if not values:  # neurons-negative has no layer 1
            assert math.isnan(row["mean"]) and math.isnan(row["median"]) and math.isnan(row["ci_low"])
            continue
        assert row["mean"] == pytest.approx(sum(values) / len(values), rel=1e-12, abs=1e-15)
        assert row["median"] == pytest.approx(statistics.median(values), rel=1e-12, abs=1e-15)
        assert (row["ci_low"], row["ci_high"]) == reference_interval(values, seed=3)
        assert row["ci_low"] <= row["mean"] <= row["ci_high"]
        for baseline in result["baselines"]:
            expected = [baseline_value(variant, baseline, lay, u) for lay, u in units]
            expected = [x for x in expected if not math.isnan(x)]
            if baseline in BASELINES[variant]:
                assert row["baselines"][baseline] == pytest.approx(sum(expected) / len(expected), rel=1e-12)
            else:
                assert math.isnan(row["baselines"][baseline])  # the column is absent from its files
        detection = row["scorers"][contract.DETECTION]
        if variant == "explainer-b" and layer in (0, cmp.ALL):
            assert detection == pytest.approx((0.75 + 0.5) / 2)
        else:
            assert math.isnan(detection)


@pytest.mark.parametrize("layer", [0, 1, cmp.ALL])
def test_pairs_unpaired_and_paired(storage, layer):
    result = cmp.compare(storage, ["neurons", "explainer-b"], resamples=R, seed=5)
    layers = [0, 1] if layer == cmp.ALL else [layer]
    row = pair_row(result, layer, "neurons", "explainer-b")
    a, b = finite_scores("neurons", layers), finite_scores("explainer-b", layers)
    assert row["diff"] == pytest.approx(sum(b) / len(b) - sum(a) / len(a), rel=1e-12, abs=1e-15)
    assert (row["ci_low"], row["ci_high"]) == reference_difference_interval(a, b, seed=5)
    assert row["ci_low"] <= row["diff"] <= row["ci_high"]
    d = paired_differences("neurons", "explainer-b", layers)
    # layer 0 shares ids 0, 3, 4 (1 and 2 have a NaN on one side, 5 and 7 are on one side only); layer 1 shares 0, 2, 3
    assert row["shared"] == {0: 3, 1: 3, cmp.ALL: 6}[layer] == len(d)
    assert row["wins_b"] == sum(x > 0 for x in d)
    assert row["wins_a"] == sum(x < 0 for x in d)
    assert row["ties"] == sum(x == 0 for x in d) == {0: 1, 1: 1, cmp.ALL: 2}[layer]  # 0/3 and 1/2: equal scores
    assert (row["wins_b"], row["wins_a"]) == {0: (1, 1), 1: (1, 1), cmp.ALL: (2, 2)}[layer]
    assert row["paired_diff"] == pytest.approx(sum(d) / len(d), rel=1e-12, abs=1e-15)
    assert (row["paired_ci_low"], row["paired_ci_high"]) == reference_interval(d, seed=5)
    assert row["paired_ci_low"] <= row["paired_diff"] <= row["paired_ci_high"]


def test_unit_sets_that_share_nothing(storage):
    result = cmp.compare(storage, ["neurons", "neurons-negative"], resamples=R)
    row = pair_row(result, 0, "neurons", "neurons-negative")
    a, b = finite_scores("neurons", [0]), finite_scores("neurons-negative", [0])
    assert row["diff"] == pytest.approx(sum(b) / len(b) - sum(a) / len(a))
    assert (row["shared"], row["wins_b"], row["wins_a"], row["ties"]) == (0, 0, 0, 0)
    assert all(math.isnan(row[k]) for k in ("paired_diff", "paired_ci_low", "paired_ci_high"))
    missing = pair_row(result, 1, "neurons", "neurons-negative")  # neurons-negative has no layer 1
    assert all(math.isnan(missing[k]) for k in ("diff", "ci_low", "ci_high"))


def test_bootstrap_is_reproducible_and_chunked_draws_change_nothing(storage, monkeypatch):
    first = cmp.compare_json(cmp.compare(storage, resamples=R, seed=11))
    assert cmp.compare_json(cmp.compare(storage, resamples=R, seed=11)) == first
    assert cmp.compare_json(cmp.compare(storage, resamples=R, seed=12)) != first
    monkeypatch.setattr(cmp, "CHUNK", 7)  # a few rows of indices at a time
    assert cmp.compare_json(cmp.compare(storage, resamples=R, seed=11)) == first


def test_json_is_safe(storage):
    text = cmp.compare_json(cmp.compare(storage, resamples=R))
    assert "NaN" not in text
    data = json.loads(text)
    row = next(r for r in data["summary"] if r["layer"] == 0 and r["variant"] == "explainer-b")
    assert row["baselines"]["lookup"] is None
    assert row["scorers"]["detection"] == pytest.approx(0.625)
    assert [r["layer"] for r in data["summary"]][-1] == "all"


def test_format(storage):
    result = cmp.compare(storage, ["neurons", "explainer-b"], resamples=R)
    text = cmp.format_compare(result)
    lines = text.splitlines()
    head = lines[1].split()
    assert head == ["layer", "variant", "units", "scored", "mean", "median", "lo95", "hi95", "lookup", "random",
                    "token_list", "detection"]
    table = lines[1:8]  # header, layers 0 and 1 and all, two variants each
    assert len({len(line) for line in table}) == 1  # right-aligned columns end together
    row = summary_row(result, 0, "explainer-b")
    cells = table[2].split()
    assert cells[:4] == ["0", "explainer-b", "6", "5"]
    assert cells[4] == f"{row['mean']:.3f}" and cells[8] == "nan"  # no lookup baseline in explainer-b
    assert table[-1].split()[:2] == ["all", "explainer-b"]
    assert lines[8].startswith("(units = ")
    assert "Differences between variants (B − A):" in lines
    pairs = lines[lines.index("Differences between variants (B − A):") + 1:]
    assert pairs[0].split()[:4] == ["layer", "A", "B", "diff"]
    assert pairs[1].split()[:3] == ["0", "neurons", "explainer-b"]
    assert pairs[-1].startswith("(diff = ")
    one = cmp.format_compare(cmp.compare(storage, ["neurons"], [0], resamples=R)).splitlines()
    # one layer: no pooled row; one variant: no pairs
    assert len(one) == 4 and one[2].split()[:3] == ["0", "neurons", "6"]


def test_errors_name_what_is_missing(storage, tmp_path_factory):
    with pytest.raises(NdxInputError, match=r"variant 'nope'.*explainer-b, neurons, neurons-negative"):
        cmp.compare(storage, ["neurons", "nope"])
    with pytest.raises(NdxInputError, match=r"layer 1, 7 in variant neurons-negative.*layers with scores: 0\)"):
        cmp.compare(storage, ["neurons-negative"], [0, 1, 7])
    with pytest.raises(NdxInputError, match="no variant has scores"):
        cmp.compare(tmp_path_factory.mktemp("empty"))
