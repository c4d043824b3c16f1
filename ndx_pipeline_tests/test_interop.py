"""Interop with OpenAI neuron-explainer JSON: export a layer, import NeuronRecords, and round-trip."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ndx_pipeline.core.contract import RECORD_SCHEMA
from ndx_pipeline.core.data.excerpts import split_excerpts
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.storage import asset_path, write_parquet_atomic
from ndx_pipeline.reports.interop import export_layer, import_neuron_records, neuron_record_files, write_imported


def _load_fixture_builder():
    spec = importlib.util.spec_from_file_location("ndx_lineage_fixture", Path(__file__).with_name("test_lineage.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIXTURE = _load_fixture_builder()
V = FIXTURE.V  # the variant the fixture store holds

# Field names of neuron-explainer's dataclasses (besides `dataclass_name`), as its loader expects them.
NEURON_RECORD_FIELDS = {"neuron_id", "random_sample", "random_sample_by_quantile", "quantile_boundaries", "mean",
                        "variance", "skewness", "kurtosis", "most_positive_activation_records"}
SIMULATION_FIELDS = {
    "NeuronSimulationResults": {"neuron_id", "scored_explanations"},
    "ScoredExplanation": {"explanation", "scored_simulation"},
    "ScoredSimulation": {"scored_sequence_simulations", "ev_correlation_score", "rsquared_score",
                         "absolute_dev_explained_score"},
    "ScoredSequenceSimulation": {"simulation", "true_activations", "ev_correlation_score", "rsquared_score",
                                 "absolute_dev_explained_score"},
    "SequenceSimulation": {"tokens", "expected_activations", "activation_scale", "distribution_values",
                           "distribution_probabilities", "uncalibrated_simulation"},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return FIXTURE.build_store(tmp_path_factory.mktemp("interop"))


@pytest.fixture(scope="module")
def exported(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export")
    for layer in (0, 1):
        export_layer(store, layer, out, variant=V)
    return out


def _fields(obj: dict) -> set:
    return set(obj) - {"dataclass_name"}


def test_export_writes_neuron_records_in_openai_shapes(store, exported):
    path = exported / "collated-activations" / "0" / "3.json"
    rec = json.loads(path.read_text())
    assert rec["dataclass_name"] == "NeuronRecord" and _fields(rec) == NEURON_RECORD_FIELDS
    assert rec["neuron_id"] == {"dataclass_name": "NeuronId", "layer_index": 0, "neuron_index": 3}
    top = rec["most_positive_activation_records"]
    assert len(top) == FIXTURE.TOP_K and len(rec["random_sample"]) == FIXTURE.RANDOM_K
    assert all(r["dataclass_name"] == "ActivationRecord" and _fields(r) == {"tokens", "activations"} for r in top)
    maxima = [max(r["activations"]) for r in top]
    assert maxima == sorted(maxima, reverse=True)
    records = pl.read_parquet(asset_path(store, "activation_records", 0, V)).filter(pl.col("neuron") == 3)
    assert rec["mean"] == pytest.approx(records["neuron_mean"][0])
    assert rec["variance"] == pytest.approx(records["neuron_variance"][0])
    assert rec["random_sample_by_quantile"] is None and rec["skewness"] is None
    assert sorted(p.name for p in (exported / "collated-activations" / "0").iterdir()) == ["3.json", "7.json"]


def test_export_writes_simulation_results_with_our_scores(store, exported):
    lines = (exported / "explanations" / "0" / "7.jsonl").read_text().splitlines()
    assert len(lines) == 1
    nsr = json.loads(lines[0])

    def check(obj):
        if isinstance(obj, dict):
            if "dataclass_name" in obj and obj["dataclass_name"] in SIMULATION_FIELDS:
                assert _fields(obj) == SIMULATION_FIELDS[obj["dataclass_name"]], obj["dataclass_name"]
            for v in obj.values():
                check(v)
        elif isinstance(obj, list):
            for v in obj:
                check(v)

    check(nsr)
    assert nsr["neuron_id"] == {"dataclass_name": "NeuronId", "layer_index": 0, "neuron_index": 7}
    (scored,) = nsr["scored_explanations"]
    score = pl.read_parquet(asset_path(store, "scores", 0, V)).filter(pl.col("neuron") == 7).row(0, named=True)
    assert scored["explanation"] == score["explanation"]
    assert scored["scored_simulation"]["ev_correlation_score"] == pytest.approx(score["score"], abs=1e-6)
    assert math.isnan(score["rsquared"])  # no calibration excerpts in this store: nothing calibrated to report
    assert scored["scored_simulation"]["rsquared_score"] is None
    seqs = scored["scored_simulation"]["scored_sequence_simulations"]
    assert len(seqs) == 4
    for s in seqs:
        sim = s["simulation"]
        assert sim["activation_scale"] == "simulated_normalized_activations"
        assert len(sim["tokens"]) == len(sim["expected_activations"]) == len(s["true_activations"])
    # A neuron whose explanation failed has nothing to report.
    assert not (exported / "explanations" / "1" / "5.jsonl").exists()


def test_export_round_trips_through_import(store, exported, tmp_path):
    imported = import_neuron_records(exported)
    assert imported.layers() == [0, 1]
    for layer in (0, 1):
        original = pl.read_parquet(asset_path(store, "activation_records", layer, V))
        back = imported.records.filter(pl.col("layer") == layer).select(list(RECORD_SCHEMA))
        key = ["neuron", "kind", "rank"]
        assert back.schema == original.schema
        assert back.sort(key).equals(original.sort(key)), f"layer {layer} does not round-trip"
    # The exported documents come back too, so the imported rows resolve to text in a fresh store, in the variant
    # the import names.
    fresh = tmp_path / "fresh"
    written = write_imported(fresh, imported, variant="imported")
    assert [(asset, layer, variant) for asset, layer, variant, _ in written] == [
        ("corpus", None, None), ("activation_records", 0, "imported"), ("token_table", 0, "imported"),
        ("activation_records", 1, "imported"), ("token_table", 1, "imported")]
    assert [path for *_, path in written] == [
        fresh / "corpus.parquet", *(fresh / asset / "imported" / f"{layer}.parquet"
                                    for layer in (0, 1) for asset in ("activation_records", "token_table"))]
    corpus = pl.read_parquet(asset_path(fresh, "corpus"))
    texts = dict(zip(corpus["doc_id"], corpus["text"]))
    for r in pl.read_parquet(asset_path(fresh, "activation_records", 0, "imported")).iter_rows(named=True):
        assert texts[r["doc_id"]][r["char_start"]:r["char_end"]] == "".join(r["tokens"])


def test_export_reads_the_variant_it_is_given(store, tmp_path):
    """Two variants in one store: each exports its own records and explanations; a variant without the layer is a
    clear error."""
    copy = tmp_path / "storage"
    shutil.copytree(store, copy)
    FIXTURE.copy_variant(copy, V, "other", layers=[0])
    path = asset_path(copy, "explanations", 0, "other")
    write_parquet_atomic(pl.read_parquet(path).with_columns(pl.lit("another explanation").alias("explanation")), path)
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    export_layer(copy, 0, mine, variant=V)
    export_layer(copy, 0, theirs, variant="other")
    assert (mine / "collated-activations" / "0" / "3.json").read_text() == (
        theirs / "collated-activations" / "0" / "3.json").read_text()  # the same records, copied
    explained = [json.loads((out / "explanations" / "0" / "7.jsonl").read_text())["scored_explanations"][0]
                 ["explanation"] for out in (mine, theirs)]
    assert explained == ["the keyword return in code", "another explanation"]
    with pytest.raises(NdxInputError, match=r"layer 1 of variant other has no activation_records"):
        export_layer(copy, 1, theirs, variant="other")


def _released_style_record(layer: int, neuron: int) -> dict:
    """A NeuronRecord as OpenAI's released collated activations hold it: GPT-2 style tokens, quantile samples,
    NaN moments, no provenance."""
    def ar(tokens, acts):
        return {"dataclass_name": "ActivationRecord", "tokens": tokens, "activations": acts}

    shared = ar([" the", " cat", " sat", "."], [0.0, 0.1, -0.05, 0.0])
    top = [ar([" I", " love", " <", "b", ">", " &", "amp", ";"], [0.0, 0.2, 3.5, 1.0, 0.4, 2.0, 0.1, 0.0]),
           ar([" Tom", " &", " Jerry"], [0.0, 2.9, 0.1]), shared]
    top += [ar([f" w{i}", " &", " x"], [0.0, 2.5 - 0.1 * i, 0.0]) for i in range(20)]
    random = [shared] + [ar([f" r{i}", " y"], [0.01 * i, -0.02]) for i in range(20)]
    return {
        "dataclass_name": "NeuronRecord",
        "neuron_id": {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": neuron},
        "random_sample": random,
        "random_sample_by_quantile": [[ar([" q", str(i)], [0.1 * i, 0.0])] for i in range(5)],
        "quantile_boundaries": [0.0, 0.1, 0.5, 1.2],
        "mean": 0.02, "variance": 0.09, "skewness": float("nan"), "kurtosis": None,
        "most_positive_activation_records": top,
    }


def test_import_of_released_collated_activations(tmp_path):
    src = tmp_path / "collated-activations" / "12"
    src.mkdir(parents=True)
    for n in (40, 7):
        (src / f"{n}.json").write_text(json.dumps(_released_style_record(12, n)))
    imported = import_neuron_records(tmp_path / "collated-activations")
    rec = imported.records
    assert set(RECORD_SCHEMA) <= set(rec.columns)
    assert rec.select(list(RECORD_SCHEMA)).schema == pl.Schema(RECORD_SCHEMA)
    assert rec["neuron"].unique().sort().to_list() == [7, 40] and imported.layers() == [12]
    n7 = rec.filter(pl.col("neuron") == 7)
    assert n7.filter(pl.col("kind") == "top")["rank"].to_list() == list(range(23))
    assert sorted(k for k in n7["kind"].unique() if k.startswith("quantile_")) == [f"quantile_{i}" for i in range(5)]
    first = n7.row(0, named=True)
    assert first["kind"] == "top" and first["max_activation"] == pytest.approx(3.5)
    assert first["neuron_max"] == pytest.approx(3.5) and first["neuron_mean"] == pytest.approx(0.02)
    assert math.isnan(first["neuron_skewness"]) and math.isnan(first["neuron_kurtosis"])
    assert first["quantile_boundaries"] == [0.0, 0.1, 0.5, 1.2]
    # Every row points at a document whose text is its tokens; the same sequence is the same window.
    texts = dict(zip(imported.corpus["doc_id"], imported.corpus["text"]))
    for r in n7.iter_rows(named=True):
        assert texts[r["doc_id"]][r["char_start"]:r["char_end"]] == "".join(r["tokens"])
        assert r["token_start"] == 0
    shared = n7.filter(pl.col("tokens").list.join("") == " the cat sat.")
    assert shared["kind"].sort().to_list() == ["random", "top"] and shared["window_index"].n_unique() == 1
    # The imported rows feed the next stage as they are: the shared window is not scored as a random excerpt.
    excerpts = split_excerpts(rec.select(list(RECORD_SCHEMA)))
    for n in (7, 40):
        mine = excerpts.filter(pl.col("neuron") == n)
        assert mine.filter(pl.col("split") == "explain")["rank"].to_list() == [0, 4, 8, 12, 16]
        scored_random = mine.filter(pl.col("split") == "score_random")
        assert " the cat sat." not in scored_random["tokens"].list.join("").to_list()
    # Written into a store, they become the layer's activation_records and corpus documents.
    storage = tmp_path / "storage"
    write_imported(storage, imported, variant=V)
    assert pl.read_parquet(asset_path(storage, "activation_records", 12, V)).height == rec.height
    assert pl.read_parquet(asset_path(storage, "corpus")).height == imported.corpus.height
    write_imported(storage, imported, variant="again")  # importing again (another variant) adds no document
    assert pl.read_parquet(asset_path(storage, "corpus")).height == imported.corpus.height
    assert pl.read_parquet(asset_path(storage, "activation_records", 12, "again")).equals(
        pl.read_parquet(asset_path(storage, "activation_records", 12, V)))


def test_import_rejects_bad_files_with_the_file_named(tmp_path):
    bad = tmp_path / "bad" / "0"
    bad.mkdir(parents=True)
    (bad / "1.json").write_text("{not json")
    with pytest.raises(NdxInputError, match=r"1\.json is not valid JSON"):
        import_neuron_records(tmp_path / "bad")
    record = _released_style_record(0, 1)
    record["most_positive_activation_records"][0]["activations"].pop()
    (bad / "1.json").write_text(json.dumps(record))
    with pytest.raises(NdxInputError, match=r"most_positive_activation_records\[0\] has 8 tokens but 7"):
        import_neuron_records(tmp_path / "bad")
    (bad / "1.json").write_text(json.dumps({"explanation": "not a record"}))
    with pytest.raises(NdxInputError, match="not a NeuronRecord"):
        import_neuron_records(bad / "1.json")
    with pytest.raises(NdxInputError, match="does not exist"):
        neuron_record_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NdxInputError, match="holds no NeuronRecord files"):
        neuron_record_files(tmp_path / "empty")


def test_export_writes_the_calibrated_simulation_beside_the_raw_one():
    from ndx_pipeline.core.method.scoring import Calibration
    from ndx_pipeline.reports.interop import simulation_results

    expl = pl.DataFrame({"layer": [0], "neuron": [3], "explanation_id": ["0/3/explanation/0"],
                         "explanation": ["commas"], "status": ["ok"]})
    sims = pl.DataFrame({"layer": [0, 0, 0], "neuron": [3, 3, 3], "explanation_id": ["0/3/explanation/0"] * 3,
                         "excerpt_id": ["a", "b", "c"], "split": ["score_top", "score_random", "calibration"],
                         "tokens": [["x", ","], ["y", "z"], ["w", ","]], "true_activations": [[0.0, 2.0], [0.0, 0.5],
                                                                                             [0.0, 1.0]],
                         "simulated_activations": [[1.0, 9.0], [0.0, 3.0], [0.0, 5.0]]})
    out = simulation_results(0, 3, sims, expl, {"0/3/explanation/0": Calibration(0.25, -0.5, "ok")})
    (scored,) = out["scored_explanations"]
    seqs = scored["scored_simulation"]["scored_sequence_simulations"]
    assert len(seqs) == 2  # the calibration excerpt is not a scored one
    first = seqs[0]["simulation"]
    assert first["activation_scale"] == "neuron_activations" and first["expected_activations"] == [-0.25, 1.75]
    assert first["uncalibrated_simulation"]["expected_activations"] == [1.0, 9.0]
    assert first["uncalibrated_simulation"]["activation_scale"] == "simulated_normalized_activations"
    true = np.array([0.0, 2.0, 0.0, 0.5])
    predicted = 0.25 * np.array([1.0, 9.0, 0.0, 3.0]) - 0.5
    assert scored["scored_simulation"]["rsquared_score"] == pytest.approx(
        1 - np.mean((true - predicted) ** 2) / np.mean(true ** 2), abs=1e-6)


def test_imported_files_are_recorded_on_their_variant_partition(store, exported, tmp_path):
    """`record_imported` reports each written file on its `<layer>|<variant>` partition (the corpus unpartitioned),
    adding the variant to the instance; `stage_runs` finds them for that variant only."""
    import dagster as dg

    from ndx_pipeline.defs.partitions import VARIANT
    from ndx_pipeline.defs.provenance import record_imported, stage_runs

    written = write_imported(tmp_path / "storage", import_neuron_records(exported, layers=[1]), variant="imported")
    with dg.DagsterInstance.ephemeral() as instance:
        record_imported(instance, written, source=str(exported))
        assert instance.get_dynamic_partitions(VARIANT) == ["imported"]
        runs = stage_runs(instance, 1, "imported")
        assert runs["activation_records"]["partition"] == "1|imported" and runs["corpus"]["partition"] is None
        assert runs["activation_records"]["data_version"] and runs["scores"] is None
        assert stage_runs(instance, 1, V)["activation_records"] is None
        assert stage_runs(instance, 0, "imported")["activation_records"] is None
