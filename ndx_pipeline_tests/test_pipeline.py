"""The whole graph on the real bundled model through Dagster, and bad input through the same path."""

import math

import dagster as dg
import numpy as np
import polars as pl
import pytest

from ndx_pipeline.core.contract import ASSETS, RELEASE
from ndx_pipeline.core.partition_lock import LOCKS_DIR
from ndx_pipeline.core.storage import asset_path
from ndx_pipeline.definitions import build_definitions
from ndx_pipeline.defs.automation import MAIN_JOB
from ndx_pipeline.defs.versioning import GROUP_OF, SETTINGS_GROUPS
from ndx_pipeline_tests.runs import execute_layers
from ndx_pipeline_tests.test_variants import part_of_the_bundled_corpus

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


def run_job(storage, layer=1, **resources):
    config = {"storage": {"config": {"storage_dir": str(storage)}}}
    for name, values in resources.items():
        config[name] = {"config": values}
    job = build_definitions().resolve_job_def(MAIN_JOB)
    instance = dg.DagsterInstance.ephemeral()
    return execute_layers(job, instance, layer, run_config={"resources": config}), instance


def failure_text(result):
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            return (data.user_failure_data.description if data.user_failure_data else "") + str(data.error)
    return ""


def leftovers(storage):
    """The files a run left in storage, besides the steps' write locks (`core/partition_lock.py`: empty files that
    name nobody once released, never removed, as a waiting run may hold one open)."""
    return sorted(p.relative_to(storage).as_posix() for p in storage.rglob("*")
                  if p.is_file() and p.relative_to(storage).parts[0] != LOCKS_DIR)


def test_definitions_snapshot():
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    specs = {key.to_user_string(): node for key, node in ((k, graph.get(k)) for k in graph.get_all_asset_keys())}
    settings = {f"variant_settings/{group}" for group in SETTINGS_GROUPS}  # observed, partitioned by variant
    assert sorted(specs) == sorted([*ASSETS, RELEASE, *settings])  # the release: on demand (test_dataset_export)
    for key in settings:
        assert not specs[key].is_materializable and specs[key].partitions_def.name == "variant"
    deps = {k: sorted(p.to_user_string() for p in n.parent_keys if not p.to_user_string().startswith("variant_"))
            for k, n in specs.items() if k not in settings}
    assert {k: sorted(p.to_user_string() for p in n.parent_keys if p.to_user_string() in settings)
            for k, n in specs.items() if k not in settings} == {
        asset: [f"variant_settings/{GROUP_OF[asset]}"] if asset in GROUP_OF else [] for asset in (*ASSETS, RELEASE)}
    assert deps == {
        "corpus": [], "activation_records": ["corpus"], "token_table": ["corpus"],
        "output_tokens": ["activation_records"],
        "top_excerpts": ["activation_records"], "explanations": ["output_tokens", "top_excerpts"],
        "baseline_explanations": ["top_excerpts"], "calibration_simulations": ["top_excerpts"],
        "simulations": ["explanations", "top_excerpts"], "baseline_simulations": ["baseline_explanations",
                                                                                  "top_excerpts"],
        "scores": ["baseline_explanations", "baseline_simulations", "explanations", "simulations", "token_table",
                   "top_excerpts"],
        "scorer_excerpts": ["activation_records", "top_excerpts"],
        **{f"{scorer}_judgements": ["baseline_explanations", "explanations", "scorer_excerpts"]
           for scorer in ("detection", "fuzzing", "embedding")},
        **{f"{scorer}_scores": sorted(["baseline_explanations", "explanations", f"{scorer}_judgements"])
           for scorer in ("detection", "fuzzing", "embedding")},
        "neuron_viewer": ["activation_records", "corpus", "detection_judgements", "detection_scores",
                          "embedding_judgements", "embedding_scores", "explanations", "fuzzing_judgements",
                          "fuzzing_scores", "output_tokens", "scorer_excerpts", "scores", "simulations",
                          "top_excerpts"],
        "release": ["activation_records", "baseline_explanations", "corpus", "detection_judgements",
                    "detection_scores", "embedding_judgements", "embedding_scores", "explanations",
                    "fuzzing_judgements", "fuzzing_scores", "scores", "simulations", "top_excerpts"],
    }
    assert specs["release"].partitions_def is None
    assert specs["corpus"].partitions_def is None
    for name in ASSETS[1:]:  # layer × variant, the variants added on the instance (dynamic)
        dims = {d.name: d.partitions_def for d in specs[name].partitions_def.partitions_defs}
        assert dims["layer"].get_partition_keys() == [str(i) for i in range(30)]
        assert isinstance(dims["variant"], dg.DynamicPartitionsDefinition) and dims["variant"].name == "variant"


# The whole graph's run below: two neurons (each the other's random baseline's donor), a quarter of the bundled
# corpus, 24-token windows and fewer excerpts than the defaults (explain, score top, score random; calibration top,
# random): every split still drawn and kept apart, at a fraction of the default run's work.
ALL_ASSETS_NEURONS = [5, 900]
EXPLAIN, SCORE_TOP, SCORE_RANDOM, CALIBRATION_TOP, CALIBRATION_RANDOM = 3, 3, 2, 2, 1
WINDOW_TOKENS = 24


@pytest.mark.slow
def test_all_six_assets_on_the_bundled_model(tmp_path):
    storage = tmp_path / "storage"
    neurons = ALL_ASSETS_NEURONS
    corpus = part_of_the_bundled_corpus(tmp_path / "corpus")
    result, instance = run_job(storage, 1, subject_model={"window_tokens": WINDOW_TOKENS},
                               corpus_source={"path": str(corpus)},
                               selection={"neurons": neurons, "explain_excerpts": EXPLAIN,
                                          "score_top_excerpts": SCORE_TOP, "score_random_excerpts": SCORE_RANDOM},
                               quality={"scorers": ["detection", "fuzzing", "embedding"], "scorer_excerpts": 3,
                                        "scorer_batch": 6, "calibration_top_excerpts": CALIBRATION_TOP,
                                        "calibration_random_excerpts": CALIBRATION_RANDOM})
    assert result.success, failure_text(result)
    frames = {"corpus": pl.read_parquet(asset_path(storage, "corpus"))}
    for name in list(CONTRACT)[1:]:
        frames[name] = pl.read_parquet(asset_path(storage, name, 1, "neurons"))
    for name, columns in CONTRACT.items():
        for col, dtype in columns.items():
            assert frames[name].schema[col] == dtype, (name, col)

    records, excerpts = frames["activation_records"], frames["top_excerpts"]
    assert sorted(records["neuron"].unique()) == neurons
    texts = dict(zip(frames["corpus"]["doc_id"], frames["corpus"]["text"]))
    for row in records.head(30).iter_rows(named=True):
        assert texts[row["doc_id"]][row["char_start"] : row["char_end"]] == "".join(row["tokens"])
        assert len(row["tokens"]) == len(row["activations"]) <= WINDOW_TOKENS
    top = records.filter(pl.col("kind") == "top")
    assert top.group_by("neuron").len()["len"].to_list() == [20] * len(neurons)
    quantile = records.filter(pl.col("kind").str.starts_with("quantile_"))  # ≤ 4 per bucket, 5 buckets
    assert len(quantile) and quantile.group_by(["neuron", "kind"]).len()["len"].max() <= 4
    assert all(len(b) == 4 for b in quantile["quantile_boundaries"])
    for _, g in top.group_by("neuron"):
        assert g.sort("rank")["max_activation"].to_list() == sorted(g["max_activation"].to_list(), reverse=True)

    for _, g in excerpts.group_by("neuron"):
        explain = set(g.filter(pl.col("split") == "explain")["window_index"])
        scored = set(g.filter(pl.col("split").is_in(["score_top", "score_random"]))["window_index"])
        calibration = set(g.filter(pl.col("split") == "calibration")["window_index"])  # for best-of-k
        assert len(explain) == EXPLAIN and len(scored) == SCORE_TOP + SCORE_RANDOM and not explain & scored
        assert len(calibration) == CALIBRATION_TOP + CALIBRATION_RANDOM and not calibration & (explain | scored)

    expl = frames["explanations"]
    assert len(expl) == len(neurons) and expl["explainer"][0] == "local:bundled:SmolLM2-135M-Instruct"
    ok = expl.filter(pl.col("status") == "ok")
    assert len(ok) >= 1 and all(len(e) > 0 for e in ok["explanation"])
    assert all(len(h) == 64 for h in expl["prompt_sha256"])

    every = frames["simulations"]  # the scored excerpts and the calibration ones of each explained neuron
    calibrated = CALIBRATION_TOP + CALIBRATION_RANDOM
    assert len(every) == (SCORE_TOP + SCORE_RANDOM + calibrated) * len(ok)
    assert every.filter(pl.col("split") == "calibration").height == calibrated * len(ok)
    sims = every.filter(pl.col("split").is_in(["score_top", "score_random"]))
    for row in sims.iter_rows(named=True):
        assert len(row["simulated_activations"]) == len(row["true_activations"]) == len(row["tokens"])
        assert all(0.0 <= v <= 10.0 for v in row["simulated_activations"])
    assert np.std(np.concatenate([np.array(v) for v in sims["simulated_activations"]])) > 0

    scores = frames["scores"]
    assert len(scores) == len(neurons)
    from ndx_pipeline.core.method.scoring import pooled_correlation

    for row in scores.iter_rows(named=True):
        if row["status"] == "ok":
            assert -1 <= row["score"] <= 1
            mine = sims.filter(pl.col("neuron") == row["neuron"])  # scored excerpts only
            again = pooled_correlation(mine["true_activations"].to_list(), mine["simulated_activations"].to_list())
            assert row["score"] == pytest.approx(again.value, abs=1e-12)
            # calibrated on the calibration excerpts alone: the least-squares line refitted here gives the same EV
            cal = every.filter((pl.col("neuron") == row["neuron"]) & (pl.col("split") == "calibration"))
            r = np.concatenate([np.array(v) for v in cal["true_activations"]])
            p = np.concatenate([np.array(v) for v in cal["simulated_activations"]])
            slope, intercept = np.polyfit(p, r, 1)
            assert (row["calibration_slope"], row["calibration_intercept"]) == (
                pytest.approx(slope, rel=1e-4, abs=1e-6), pytest.approx(intercept, rel=1e-4, abs=1e-6))
            true = np.concatenate([np.array(v) for v in mine["true_activations"]])
            fitted = slope * np.concatenate([np.array(v) for v in mine["simulated_activations"]]) + intercept
            ev = 1 - ((true - fitted) ** 2).sum() / ((true - true.mean()) ** 2).sum()
            assert row["calibrated_ev"] == pytest.approx(ev, rel=1e-4, abs=1e-6)
        else:
            assert math.isnan(row["score"]) and row["status"]

    # the baselines beside every score: lookup table (no LLM: defined for every neuron), another neuron's
    # explanation, an explanation from the strongest tokens alone — each simulated and scored like ours
    assert {"baseline_lookup", "baseline_random", "baseline_token_list"} <= set(scores.columns)
    assert scores["baseline_lookup"].is_finite().all()
    table = pl.read_parquet(asset_path(storage, "token_table", 1, "neurons"))
    windows_tokens = records.filter(pl.col("kind") == "top")["tokens"].explode()
    first = windows_tokens[0]
    assert table.filter((pl.col("neuron") == 5) & (pl.col("token") == first))["count"][0] >= 1
    assert table.group_by("neuron").agg(pl.col("count").sum())["count"].n_unique() == 1  # every token, once each
    base_expl = pl.read_parquet(asset_path(storage, "baseline_explanations", 1, "neurons"))
    assert sorted(base_expl["baseline"].unique()) == ["random", "token_list"]
    for row in base_expl.filter((pl.col("baseline") == "random") & (pl.col("status") == "ok")).iter_rows(named=True):
        donor = expl.filter(pl.col("explanation") == row["explanation"])["neuron"].to_list()
        assert donor and row["neuron"] not in donor  # another neuron's explanation of the same layer
    base_sims = pl.read_parquet(asset_path(storage, "baseline_simulations", 1, "neurons"))
    assert set(base_sims["explanation_id"]) <= set(base_expl["explanation_id"])
    assert set(base_sims["excerpt_id"]) == set(sims["excerpt_id"]) or len(ok) < len(neurons)  # the same excerpts

    event = instance.get_latest_materialization_event(dg.AssetKey("scores"))
    assert event.dagster_event.partition == "1|neurons"
    meta = event.asset_materialization.metadata
    assert meta["neurons"].value == len(neurons) and "mean_score" in meta and "median_score" in meta
    assert "mean_baseline_lookup" in meta and "beats_lookup" in meta
    assert "SmolLM2-135M" in meta["note"].value and "capable model" in meta["note"].value
    assert not [p for p in leftovers(storage) if p.endswith(".tmp")]
    # `dtype: auto`: the precision measured faster on this machine, with both timings, in metadata and in the log
    for asset in ("explanations", "simulations"):
        llm_meta = instance.get_latest_materialization_event(dg.AssetKey(asset)).asset_materialization.metadata
        timings = {d: llm_meta[f"llm_dtype_calibration_s_{d}"].value for d in ("bfloat16", "float32")}
        assert llm_meta["llm_dtype_chosen_by"].value == "measurement" and all(t > 0 for t in timings.values())
        assert llm_meta["llm_dtype"].value == min(timings, key=timings.get)
    said = [e.user_message for e in instance.all_logs(result.run_id) if "precision auto → " in e.user_message]
    assert said and said[0].startswith(f"precision auto → {llm_meta['llm_dtype'].value} for bundled:SmolLM2-135M")

    check_scorers(storage, frames, expl, base_expl)

    index = storage / "neuron_viewer" / "neurons" / "index.html"
    assert index.exists() and (storage / "neuron_viewer" / "neurons" / "1" / "900.html").exists()
    assert "neurons" in (storage / "neuron_viewer" / "index.html").read_text()  # the index of variants
    index_html = index.read_text()
    assert 'id="model-note"' in index_html and "capable model" in index_html  # said where users look
    assert "mean lookup" in index_html and "baseline lookup" in index_html
    assert meta["neuron_viewer"].value == str(index)
    page = (storage / "neuron_viewer" / "neurons" / "1" / "900.html").read_text()
    runs = instance.get_latest_materialization_event(dg.AssetKey("activation_records")).run_id
    assert runs in page  # the lineage section names the run that produced the records
    assert 'id="scorers"' in page and "detection" in page and "fuzzing" in page and "embedding" in page
    assert 'id="scorers"' in index_html


def check_scorers(storage, frames, expl, base_expl):
    """Detection, fuzzing and embedding beside simulation: held-out excerpts the explainer never saw, judged for our
    explanation and each baseline's; each score recomputed from its judgements."""
    from ndx_pipeline.core.method.metrics import classification, roc_auc

    records, excerpts = frames["activation_records"], frames["top_excerpts"]
    held = pl.read_parquet(asset_path(storage, "scorer_excerpts", 1, "neurons"))
    assert held.group_by(["neuron", "split"]).len()["len"].to_list() == [3] * 2 * len(ALL_ASSETS_NEURONS)
    for (neuron,), g in held.group_by(["neuron"]):
        seen = set(excerpts.filter((pl.col("neuron") == neuron) & pl.col("split").is_in(["explain", "calibration"]))
                   ["window_index"])
        assert not seen & set(g["window_index"])
        bounds = records.filter(pl.col("neuron") == neuron)["quantile_boundaries"][0]
        assert g.filter(pl.col("split") == "activating")["max_activation"].min() >= bounds[1] * (1 - 1e-6)
        assert g.filter(pl.col("split") == "non_activating")["max_activation"].max() < bounds[0]
        for row in g.iter_rows(named=True):  # the very window of the records
            rec = records.filter((pl.col("neuron") == neuron) & (pl.col("window_index") == row["window_index"]))
            assert rec["tokens"][0].to_list() == row["tokens"]
    judged_ids = set(expl.filter(pl.col("status") == "ok")["explanation_id"]) | set(
        base_expl.filter((pl.col("status") == "ok") & pl.col("baseline").is_in(["random", "token_list"]))
        ["explanation_id"])
    for scorer in ("detection", "fuzzing", "embedding"):
        judgements = pl.read_parquet(asset_path(storage, f"{scorer}_judgements", 1, "neurons"))
        scores = pl.read_parquet(asset_path(storage, f"{scorer}_scores", 1, "neurons"))
        assert set(judgements["explanation_id"]) == judged_ids, scorer
        assert set(judgements["excerpt_id"]) <= set(held["excerpt_id"])
        assert len(scores) == len(ALL_ASSETS_NEURONS)
        assert {"baseline_random", "baseline_token_list"} <= set(scores.columns)
        for row in scores.filter(pl.col("status") == "ok").iter_rows(named=True):
            mine = judgements.filter(pl.col("explanation_id") == row["explanation_id"])
            if scorer == "embedding":
                assert row["score"] == pytest.approx(roc_auc(mine["label"], mine["similarity"]))
                assert len(mine) == 6
            else:
                assert row["score"] == pytest.approx(classification(mine["label"], mine["verdict"]).balanced_accuracy)
                assert mine["prompt_sha256"].n_unique() == 1  # 6 excerpts in one prompt
        failed = judgements.filter(pl.col("status") != "ok")
        assert failed["error"].is_not_null().all()
        if scorer == "fuzzing":  # each activating excerpt once rightly marked, once not
            assert judgements.filter(pl.col("label"))["marked"].list.len().min() >= 1
            assert (judgements.group_by(["explanation_id", "excerpt_id"]).len()["len"] == 2).all()


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


@pytest.mark.slow
def test_best_of_k_through_dagster_keeps_the_best_calibrated_candidate(tmp_path):
    """explanation_candidates=2 on the bundled model: both candidates stored with their calibration scores (computed
    on calibration excerpts only: two top ones and a random one each), the best kept, and only the kept one simulated
    and scored."""
    storage = tmp_path / "storage"
    result, instance = run_job(storage, 0, selection={"neurons": [3, 40], "score_top_excerpts": 2,
                                                        "score_random_excerpts": 1},
                               subject_model={"window_tokens": 24},
                               corpus_source={"path": str(part_of_the_bundled_corpus(tmp_path / "corpus"))},
                               quality={"explanation_candidates": 2, "baselines": ["lookup"],
                                        "calibration_top_excerpts": 2, "calibration_random_excerpts": 1})
    assert result.success, failure_text(result)
    expl = pl.read_parquet(asset_path(storage, "explanations", 0, "neurons"))
    assert sorted(zip(expl["neuron"], expl["candidate"])) == [(3, 0), (3, 1), (40, 0), (40, 1)]
    assert expl.group_by("neuron").agg(pl.col("selected").sum())["selected"].to_list() == [1, 1]
    excerpts = pl.read_parquet(asset_path(storage, "top_excerpts", 0, "neurons"))
    calibration_ids = set(excerpts.filter(pl.col("split") == "calibration")["excerpt_id"])
    cal_sims = pl.read_parquet(asset_path(storage, "calibration_simulations", 0, "neurons"))
    assert set(cal_sims["excerpt_id"]) <= calibration_ids and len(cal_sims)
    from ndx_pipeline.core.method.scoring import pooled_correlation

    for row in expl.filter(pl.col("status") == "ok").iter_rows(named=True):  # each calibration score recomputed
        mine = cal_sims.filter(pl.col("explanation_id") == row["explanation_id"])
        again = pooled_correlation(mine["true_activations"].to_list(), mine["simulated_activations"].to_list())
        assert (math.isnan(again.value) and math.isnan(row["calibration_score"])) or \
            row["calibration_score"] == pytest.approx(again.value, abs=1e-9)
    for _, group in expl.group_by("neuron"):
        ok = group.filter((pl.col("status") == "ok") & pl.col("calibration_score").is_finite())
        kept = group.filter(pl.col("selected"))
        if len(ok):
            assert kept["calibration_score"][0] == ok["calibration_score"].max()
    kept_ids = set(expl.filter(pl.col("selected"))["explanation_id"])
    sims = pl.read_parquet(asset_path(storage, "simulations", 0, "neurons"))
    assert set(sims["explanation_id"]) <= kept_ids
    # the kept one is also simulated on the calibration excerpts (its calibrated scores' fit), marked as such
    scored = sims.filter(pl.col("split") != "calibration")
    assert not set(scored["excerpt_id"]) & calibration_ids
    assert set(sims.filter(pl.col("split") == "calibration")["excerpt_id"]) <= calibration_ids
    scores = pl.read_parquet(asset_path(storage, "scores", 0, "neurons"))
    assert set(scores["explanation_id"]) == kept_ids and "baseline_lookup" in scores.columns
    meta = instance.get_latest_materialization_event(dg.AssetKey("explanations")).asset_materialization.metadata
    assert meta["candidates_per_neuron"].value == 2 and meta["neurons"].value == 2
