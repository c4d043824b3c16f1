"""The whole graph on the real bundled model through Dagster, and bad input through the same path."""

import math

import dagster as dg
import numpy as np
import polars as pl
import pytest

from ndx_pipeline.core.storage import asset_path
from ndx_pipeline.definitions import MAIN_JOB, build_definitions

CONTRACT = {
    "corpus": {"doc_id": pl.String, "source": pl.String, "text": pl.String},
    "activation_records": {"layer": pl.Int32, "neuron": pl.Int32, "kind": pl.String, "rank": pl.Int32,
                           "doc_id": pl.String, "token_start": pl.Int32, "tokens": pl.List(pl.String),
                           "activations": pl.List(pl.Float32)},
    "top_excerpts": {"layer": pl.Int32, "neuron": pl.Int32, "excerpt_id": pl.String, "split": pl.String,
                     "doc_id": pl.String, "token_start": pl.Int32, "tokens": pl.List(pl.String),
                     "activations": pl.List(pl.Float32), "max_activation": pl.Float32},
    "explanations": {"layer": pl.Int32, "neuron": pl.Int32, "explanation_id": pl.String, "explanation": pl.String,
                     "explainer": pl.String, "prompt_sha256": pl.String, "status": pl.String, "error": pl.String},
    "simulations": {"layer": pl.Int32, "neuron": pl.Int32, "explanation_id": pl.String, "excerpt_id": pl.String,
                    "split": pl.String, "tokens": pl.List(pl.String), "true_activations": pl.List(pl.Float32),
                    "simulated_activations": pl.List(pl.Float32), "simulator": pl.String},
    "scores": {"layer": pl.Int32, "neuron": pl.Int32, "explanation_id": pl.String, "explanation": pl.String,
               "score": pl.Float64, "score_top": pl.Float64, "score_random": pl.Float64, "status": pl.String},
}


def run_job(storage, partition="1", **resources):
    config = {"storage": {"config": {"storage_dir": str(storage)}}}
    for name, values in resources.items():
        config[name] = {"config": values}
    job = build_definitions().resolve_job_def(MAIN_JOB)
    instance = dg.DagsterInstance.ephemeral()
    result = job.execute_in_process(run_config={"resources": config}, instance=instance, partition_key=partition,
                                    raise_on_error=False)
    return result, instance


def failure_text(result):
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            return (data.user_failure_data.description if data.user_failure_data else "") + str(data.error)
    return ""


def leftovers(storage):
    return sorted(p.relative_to(storage).as_posix() for p in storage.rglob("*") if p.is_file())


def test_definitions_snapshot():
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    specs = {key.to_user_string(): node for key, node in ((k, graph.get(k)) for k in graph.get_all_asset_keys())}
    assert sorted(specs) == sorted([*CONTRACT, "neuron_viewer"])
    deps = {k: sorted(p.to_user_string() for p in n.parent_keys) for k, n in specs.items()}
    assert deps == {
        "corpus": [], "activation_records": ["corpus"], "top_excerpts": ["activation_records"],
        "explanations": ["top_excerpts"], "simulations": ["explanations", "top_excerpts"],
        "scores": ["explanations", "simulations"], "neuron_viewer": ["scores"],
    }
    assert specs["corpus"].partitions_def is None
    for name in [*list(CONTRACT)[1:], "neuron_viewer"]:
        assert specs[name].partitions_def.get_partition_keys() == [str(i) for i in range(30)]


@pytest.mark.slow
def test_all_six_assets_on_the_bundled_model(tmp_path):
    storage = tmp_path / "storage"
    result, instance = run_job(storage, "1", selection={"neurons": [5, 77, 900, 1500]})
    assert result.success, failure_text(result)
    frames = {"corpus": pl.read_parquet(asset_path(storage, "corpus"))}
    for name in list(CONTRACT)[1:]:
        frames[name] = pl.read_parquet(asset_path(storage, name, 1))
    for name, columns in CONTRACT.items():
        for col, dtype in columns.items():
            assert frames[name].schema[col] == dtype, (name, col)

    records, excerpts = frames["activation_records"], frames["top_excerpts"]
    assert sorted(records["neuron"].unique()) == [5, 77, 900, 1500]
    texts = dict(zip(frames["corpus"]["doc_id"], frames["corpus"]["text"]))
    for row in records.head(30).iter_rows(named=True):
        assert texts[row["doc_id"]][row["char_start"] : row["char_end"]] == "".join(row["tokens"])
        assert len(row["tokens"]) == len(row["activations"]) <= 64
    top = records.filter(pl.col("kind") == "top")
    assert top.group_by("neuron").len()["len"].to_list() == [20] * 4
    for _, g in top.group_by("neuron"):
        assert g.sort("rank")["max_activation"].to_list() == sorted(g["max_activation"].to_list(), reverse=True)

    for _, g in excerpts.group_by("neuron"):
        explain = set(g.filter(pl.col("split") == "explain")["window_index"])
        scored = set(g.filter(pl.col("split") != "explain")["window_index"])
        assert len(explain) == 5 and len(scored) == 10 and not explain & scored

    expl = frames["explanations"]
    assert len(expl) == 4 and expl["explainer"][0] == "local:bundled:SmolLM2-135M-Instruct"
    ok = expl.filter(pl.col("status") == "ok")
    assert len(ok) >= 1 and all(len(e) > 0 for e in ok["explanation"])
    assert all(len(h) == 64 for h in expl["prompt_sha256"])

    sims = frames["simulations"]
    assert len(sims) == 10 * len(ok)
    for row in sims.iter_rows(named=True):
        assert len(row["simulated_activations"]) == len(row["true_activations"]) == len(row["tokens"])
        assert all(0.0 <= v <= 10.0 for v in row["simulated_activations"])
    assert np.std(np.concatenate([np.array(v) for v in sims["simulated_activations"]])) > 0

    scores = frames["scores"]
    assert len(scores) == 4
    from ndx_pipeline.core.scoring import pooled_correlation

    for row in scores.iter_rows(named=True):
        if row["status"] == "ok":
            assert -1 <= row["score"] <= 1
            mine = sims.filter(pl.col("neuron") == row["neuron"])
            again = pooled_correlation(mine["true_activations"].to_list(), mine["simulated_activations"].to_list())
            assert row["score"] == pytest.approx(again.value, abs=1e-12)
        else:
            assert math.isnan(row["score"]) and row["status"]

    event = instance.get_latest_materialization_event(dg.AssetKey("scores"))
    assert event.dagster_event.partition == "1"
    meta = event.asset_materialization.metadata
    assert meta["neurons"].value == 4 and "mean_score" in meta and "median_score" in meta
    assert not [p for p in leftovers(storage) if p.endswith(".tmp")]

    index = storage / "neuron_viewer" / "index.html"
    assert index.exists() and (storage / "neuron_viewer" / "1" / "900.html").exists()
    assert meta["neuron_viewer"].value == str(index)
    page = (storage / "neuron_viewer" / "1" / "900.html").read_text()
    runs = instance.get_latest_materialization_event(dg.AssetKey("activation_records")).run_id
    assert runs in page  # the lineage section names the run that produced the records


def test_missing_corpus_fails_clearly_and_writes_nothing(tmp_path):
    storage = tmp_path / "storage"
    result, _ = run_job(storage, corpus_source={"path": str(tmp_path / "nope")})
    assert not result.success
    assert f"corpus path {tmp_path / 'nope'} does not exist" in failure_text(result)
    assert leftovers(storage) == [] if storage.exists() else True


@pytest.mark.slow
def test_zero_neurons_and_tiny_corpus_fail_clearly_and_write_nothing(tmp_path):
    storage = tmp_path / "storage"
    result, _ = run_job(storage, selection={"neurons_per_layer": 0})
    assert not result.success and "neurons_per_layer=0" in failure_text(result)
    assert leftovers(storage) == ["corpus.parquet"]

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "a.txt").write_text("A short note about Python lists and tuples, " * 8)
    result, _ = run_job(storage, corpus_source={"path": str(tiny)})
    assert not result.success
    assert "fewer than top_k=20" in failure_text(result)
    assert not (storage / "activation_records").exists()
