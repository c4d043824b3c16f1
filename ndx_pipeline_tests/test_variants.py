"""Variants side by side on one real Dagster instance and the real bundled model: nothing of one variant is touched by
another's run, extraction is shared by variants with equal extraction settings (no forward pass), a failure stays in
its own (layer, variant), the sensors act on their own variants, and `compare` reads them side by side."""

from __future__ import annotations

import hashlib
import json
import socket

import dagster as dg
import numpy as np
import polars as pl
import pytest

from ndx_pipeline.core.contract import (
    ACTIVATION_RECORDS,
    BASELINE_SIMULATIONS,
    CORPUS,
    DICTIONARY_LATENT,
    EXPLANATIONS,
    LAYER_ASSETS,
    MLP_NEURON,
    SCORES,
    SIMULATIONS,
    STATUS_FAILED,
    TOKEN_TABLE,
    TOP_EXCERPTS,
)
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.storage import asset_path, legacy_layer_files, migrate_storage, write_parquet_atomic
from ndx_pipeline.core.variants import (
    check_name,
    default_name,
    extraction_key,
    read_variants,
    record_variant,
    variants_file,
)
from ndx_pipeline.defs.partitions import EXTRACT_WITH_TAG

SMALL = {
    "subject_model": {"window_tokens": 24},
    "selection": {"neurons": [5, 77], "explain_excerpts": 2, "score_top_excerpts": 2, "score_random_excerpts": 1},
    "quality": {"baselines": ["lookup", "random"], "scorers": ["embedding"], "scorer_excerpts": 2,
                "calibration_top_excerpts": 1, "calibration_random_excerpts": 1},
}


def few_excerpts_settings(units: str = "positive") -> dict:
    """A variant's entry in the variants file (as a user writes one) with SMALL's excerpt counts instead of the CLI's
    defaults (5 to explain, 10 scored, 6 to calibrate): for the runs whose checks are not about the splits."""
    return {"selection": {"units": units, **{k: v for k, v in SMALL["selection"].items() if k.endswith("_excerpts")}},
            "quality": {k: v for k, v in SMALL["quality"].items() if k.startswith("calibration_")}}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def small_corpus(folder):
    from pydoc_data.topics import topics

    folder.mkdir()
    for name in ("assert", "break", "continue", "del", "pass", "global", "return", "if"):
        (folder / f"{name}.txt").write_text(topics[name])
    return folder


def part_of_the_bundled_corpus(folder, characters: int = 120_000):
    """The bundled corpus's first documents, about `characters` characters (a quarter of it, ~500 windows of the CLI's
    64 tokens): enough for the CLI's default top_k and random_k, at a quarter of a pass over all of it."""
    from pydoc_data.topics import topics

    folder.mkdir()
    written = 0
    for name, text in topics.items():
        if written >= characters:
            break
        (folder / f"{name}.txt").write_text(text)
        written += len(text)
    return folder


def run(instance, storage, corpus, variant, layers, **resources):
    """One run of the whole graph over `layers` (a contiguous range) of `variant`, as the CLI launches it."""
    from ndx_pipeline.definitions import build_definitions
    from ndx_pipeline.defs.automation import MAIN_JOB
    from ndx_pipeline.defs.partitions import add_variant, range_tags
    from ndx_pipeline.defs.versioning import observe_settings

    config = {"storage": {"config": {"storage_dir": str(storage)}}, "corpus_source": {"config": {"path": str(corpus)}}}
    for name, values in {**SMALL, **resources}.items():
        config[name] = {"config": values}
    add_variant(instance, variant)
    observe_settings(instance, storage, variant)  # as the CLI does before its runs
    job = build_definitions().resolve_job_def(MAIN_JOB)
    return job.execute_in_process(run_config={"resources": config}, instance=instance,
                                  tags=range_tags(variant, min(layers), max(layers)), raise_on_error=False)


def digests(storage, variant) -> dict[str, str]:
    """sha256 of every file of `variant` (Parquet files and viewer pages)."""
    out = {}
    for path in sorted(storage.rglob("*")):
        rel = path.relative_to(storage).as_posix()
        if path.is_file() and f"/{variant}/" in f"/{rel}":
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def metadata(instance, asset, layer, variant):
    from ndx_pipeline.defs.partitions import partition_key

    records = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey(asset), asset_partitions=[str(partition_key(layer, variant))]), limit=1).records
    return {k: getattr(v, "value", v) for k, v in records[0].asset_materialization.metadata.items()}


# ------------------------------------------------------------------------------------------ plain functions


def test_variant_names_settings_and_the_variants_file(tmp_path):
    assert default_name("positive") == "neurons" and default_name("both") == "neurons-both"
    assert default_name("dictionary", "/saes/layer 6 (res)") == "layer-6-res"
    for bad in ("", "a|b", "../x", "x/y", "-x"):
        with pytest.raises(NdxInputError, match="not usable"):
            check_name(bad)
    path = variants_file(tmp_path)
    assert path == tmp_path / "variants.yaml" and read_variants(path) == {}
    assert record_variant(path, "a", {"selection": {"units": "both", "timeout_s": 3}, "storage": {"x": 1}})
    assert not record_variant(path, "a", {"selection": {"units": "both"}})  # unchanged
    record_variant(path, "b", {"simulator_llm": {"dtype": "float32", "api_key_env": "NDX_SIMULATOR_API_KEY"}})
    assert read_variants(path) == {"a": {"selection": {"units": "both"}},
                                   "b": {"simulator_llm": {"dtype": "float32"}}}  # no key variable recorded
    # what a run does not record but a user wrote by hand (how fast, which key variable) stays through a new record
    path.write_text(path.read_text().replace("dtype: float32", "dtype: float32\n    max_concurrency: 1"))
    assert record_variant(path, "b", {"simulator_llm": {"dtype": "bfloat16", "max_concurrency": 8}})
    assert read_variants(path)["b"] == {"simulator_llm": {"dtype": "bfloat16", "max_concurrency": 1}}
    path.write_text("a:\n  storage: {storage_dir: /x}\n")
    with pytest.raises(NdxInputError, match="cannot set"):
        read_variants(path)
    path.write_text("a: [unclosed\n")
    with pytest.raises(NdxInputError, match="not readable YAML"):
        read_variants(path)
    same = extraction_key({"model": "m"}, {"corpus": "d"}, {"units": "positive", "explain_excerpts": 5}, True)
    assert same == extraction_key({"model": "m", "device": "cuda"}, {"corpus": "d"},
                                  {"units": "positive", "explain_excerpts": 3}, True)  # split counts, device: no
    assert same != extraction_key({"model": "m"}, {"corpus": "d"}, {"units": "both"}, True)


def test_a_layer_file_always_belongs_to_a_variant(tmp_path):
    with pytest.raises(ValueError, match="belongs to a variant"):
        asset_path(tmp_path, SCORES, 1)
    assert asset_path(tmp_path, SCORES, 1, "v") == tmp_path / "scores" / "v" / "1.parquet"
    assert asset_path(tmp_path, CORPUS) == tmp_path / "corpus.parquet"


def test_storage_from_before_variants_is_moved_by_one_command(tmp_path, monkeypatch, capsys):
    """Layer files of the old layout are refused by every command until `migrate` moves them into a variant, ids
    scoped; then they are read as that variant and recorded on the instance."""
    from ndx_pipeline.cli import main

    storage = tmp_path / "storage"
    old = pl.DataFrame({"layer": [1], "neuron": [5], "explanation_id": ["1/5/explanation/0"], "score": [0.5],
                        "status": ["ok"]})
    write_parquet_atomic(old, storage / "scores" / "1.parquet")
    write_parquet_atomic(pl.DataFrame({"excerpt_id": ["1/5/top/0"]}), storage / "top_excerpts" / "1.parquet")
    (storage / "neuron_viewer" / "1").mkdir(parents=True)
    (storage / "neuron_viewer" / "1" / "5.html").write_text("<p>page</p>")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(["compare", "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert "layout from before variants" in err and "ndx-pipeline migrate" in err and err.count("\n") == 1
    assert main(["migrate", "--storage", str(storage)]) == 0
    said = capsys.readouterr().out
    assert "scores layer 1 ->" in said and "into variant neurons" in said
    assert not legacy_layer_files(storage)
    moved = pl.read_parquet(asset_path(storage, SCORES, 1, "neurons"))
    assert moved["explanation_id"].to_list() == ["neurons/1/5/explanation/0"]
    assert pl.read_parquet(asset_path(storage, TOP_EXCERPTS, 1, "neurons"))["excerpt_id"][0] == "neurons/1/5/top/0"
    assert (storage / "neuron_viewer" / "neurons" / "1" / "5.html").exists()
    with dg.DagsterInstance.get() as instance:
        assert instance.get_materialized_partitions(dg.AssetKey(SCORES)) == {"1|neurons"}
    assert main(["migrate", "--storage", str(storage)]) == 0
    assert "nothing to move" in capsys.readouterr().out
    with pytest.raises(NdxInputError, match="already has"):
        write_parquet_atomic(old, storage / "scores" / "1.parquet")
        migrate_storage(storage, "neurons")


# ------------------------------------------------------------------------------- the real model, end to end


# `two_variants`: the session's shared run of two variants (conftest.py)


@pytest.mark.slow
def test_a_variant_that_differs_in_its_simulator_runs_no_forward_pass(two_variants):
    instance, storage = two_variants["instance"], two_variants["storage"]
    assert two_variants["extract_calls"] == []  # the subject model never ran for the second variant
    for layer in (0, 1, 2):
        mine, theirs = metadata(instance, ACTIVATION_RECORDS, layer, "sim-f32"), metadata(
            instance, ACTIVATION_RECORDS, layer, "neurons")
        assert mine["subject_model_forward_passes"] == 0 and mine["shared_from_variant"] == "neurons"
        assert theirs["subject_model_forward_passes"] > 0 and mine["extraction_key"] == theirs["extraction_key"]
        a, b = (asset_path(storage, ACTIVATION_RECORDS, layer, v) for v in ("neurons", "sim-f32"))
        assert a.read_bytes() == b.read_bytes()
        # the same excerpts under each variant's own ids; each variant's explanations and scores its own
        ex_a, ex_b = (pl.read_parquet(asset_path(storage, TOP_EXCERPTS, layer, v)) for v in ("neurons", "sim-f32"))
        assert ex_a.drop("excerpt_id").equals(ex_b.drop("excerpt_id"))
        assert ex_b["excerpt_id"].str.starts_with("sim-f32/").all() and ex_a["excerpt_id"].str.starts_with(
            "neurons/").all()
        for v in ("neurons", "sim-f32"):
            sims = pl.read_parquet(asset_path(storage, SIMULATIONS, layer, v))
            assert sims["explanation_id"].str.starts_with(f"{v}/").all()
            assert sims["excerpt_id"].str.starts_with(f"{v}/").all()
    assert metadata(instance, SIMULATIONS, 0, "sim-f32")["llm_dtype"] == "float32"


@pytest.mark.slow
def test_a_random_weight_control_runs_the_same_units_through_the_same_pipeline(two_variants):
    """`neurons.random-weights`: the same units and settings as `neurons` on layer 0, the subject model re-initialized;
    its own extraction (other activations, the same windows' tokens), scored, and trained − random per layer."""
    from ndx_pipeline.core.variants import control_name, random_weights_settings
    from ndx_pipeline.reports.controls import random_weight_lines, read_random_weights

    instance, storage, corpus = two_variants["instance"], two_variants["storage"], two_variants["corpus"]
    control = control_name("neurons", "random-weights")
    record_variant(variants_file(storage), control, random_weights_settings({}))
    assert run(instance, storage, corpus, control, [0], quality={**SMALL["quality"], "scorers": []}).success
    mine, theirs = (metadata(instance, ACTIVATION_RECORDS, 0, v) for v in (control, "neurons"))
    assert mine["subject_model_forward_passes"] > 0 and mine["extraction_key"] != theirs["extraction_key"]
    records = {v: pl.read_parquet(asset_path(storage, ACTIVATION_RECORDS, 0, v)) for v in (control, "neurons")}
    assert sorted(records[control]["neuron"].unique()) == sorted(records["neurons"]["neuron"].unique()) == [5, 77]
    random_rows = {(r["kind"], r["rank"], r["neuron"]): r for r in records[control].iter_rows(named=True)}
    same = [(r, random_rows[r["kind"], r["rank"], r["neuron"]]) for r in records["neurons"].iter_rows(named=True)
            if r["kind"] == "random"]  # the seeded random windows: the same windows on both models
    assert same and all(a["window_index"] == b["window_index"] and a["tokens"] == b["tokens"] for a, b in same)
    assert any(a["activations"] != b["activations"] for a, b in same)
    found = read_random_weights(storage, "neurons")
    row = found["judges"]["simulation"][0]
    assert row["layer"] == 0 and row["units"] >= 1 and np.isfinite(row["diff"])
    scores = {v: pl.read_parquet(asset_path(storage, SCORES, 0, v)) for v in (control, "neurons")}
    both = scores["neurons"].select("neuron", "score").join(
        scores[control].select("neuron", pl.col("score").alias("untrained")), on="neuron").filter(
        pl.col("score").is_finite() & pl.col("untrained").is_finite())
    assert row["diff"] == pytest.approx(float((both["score"] - both["untrained"]).mean()))
    assert random_weight_lines(found)[1].startswith("  simulation: layer 0 ")


@pytest.mark.slow
def test_changing_a_variants_settings_makes_only_that_variant_stale(two_variants):
    """A new simulator setting for sim-f32: its simulations turn stale, layer by layer; its extraction and
    explanations stay fresh, and nothing of the neurons variant changes."""
    from ndx_pipeline.definitions import build_definitions
    from ndx_pipeline.defs.automation import stale_status_resolver
    from ndx_pipeline.defs.partitions import partition_key
    from ndx_pipeline.defs.versioning import observe_settings

    instance, storage = two_variants["instance"], two_variants["storage"]
    graph = build_definitions().resolve_asset_graph()

    def statuses():
        resolver = stale_status_resolver(instance, graph)
        return {(asset, layer, v): resolver.get_status(dg.AssetKey(asset), partition_key(layer, v)).value
                for asset in (ACTIVATION_RECORDS, EXPLANATIONS, SIMULATIONS, BASELINE_SIMULATIONS)
                for layer in (0, 2) for v in ("neurons", "sim-f32")}

    assert set(statuses().values()) == {"FRESH"}
    assert observe_settings(instance, storage, "sim-f32") == []  # unchanged settings: nothing observed
    path = variants_file(storage)
    before = path.read_text()
    try:
        record_variant(path, "sim-f32", {"simulator_llm": {"dtype": "bfloat16"}})
        assert observe_settings(instance, storage, "sim-f32") == ["simulator"]
        stale = {key for key, status in statuses().items() if status == "STALE"}
        assert stale == {(asset, layer, "sim-f32") for asset in (SIMULATIONS, BASELINE_SIMULATIONS)
                         for layer in (0, 2)}
    finally:
        path.write_text(before)
        observe_settings(instance, storage, "sim-f32")


@pytest.mark.slow
def test_compare_prints_the_paired_comparison_recomputed_from_the_files(two_variants, capsys, monkeypatch):
    from ndx_pipeline.cli import main

    storage = two_variants["storage"]
    monkeypatch.setenv("DAGSTER_HOME", str(storage.parent / "home"))
    assert main(["compare", "neurons", "sim-f32", "--storage", str(storage), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    scores = {v: pl.concat([pl.read_parquet(asset_path(storage, SCORES, layer, v)) for layer in (0, 1, 2)])
              for v in ("neurons", "sim-f32")}
    for layer in (0, 1, 2, "all"):
        pair = next(p for p in result["pairs"] if p["layer"] == layer)
        a, b = (s if layer == "all" else s.filter(pl.col("layer") == layer) for s in scores.values())
        both = a.join(b, on=["layer", "neuron"], suffix="_b").filter(
            pl.col("score").is_finite() & pl.col("score_b").is_finite())
        diffs = (both["score_b"] - both["score"]).to_numpy()
        assert pair["shared"] == len(both) > 0
        assert pair["paired_diff"] == pytest.approx(float(np.mean(diffs)), abs=1e-12)
        assert pair["wins_b"] == int((diffs > 0).sum()) and pair["wins_a"] == int((diffs < 0).sum())
        assert pair["paired_ci_low"] <= pair["paired_diff"] <= pair["paired_ci_high"]
        for v, frame in (("neurons", a), ("sim-f32", b)):
            row = next(r for r in result["summary"] if r["layer"] == layer and r["variant"] == v)
            finite = frame.filter(pl.col("score").is_finite())["score"]
            assert row["scored"] == len(finite) and row["mean"] == pytest.approx(finite.mean(), abs=1e-12)
    assert main(["compare", "--storage", str(storage)]) == 0
    text = capsys.readouterr().out
    assert "neurons" in text and "sim-f32" in text and "paired" in text


@pytest.mark.slow
def test_a_dictionary_on_the_same_layer_leaves_the_neuron_variant_untouched(two_variants, tmp_path):
    """Neurons, then a dictionary's latents on layer 1: every file of the neuron variant is byte-identical; then a
    dictionary run whose explainer is down leaves no partition holding two variants' rows."""
    from ndx_pipeline_tests.test_units import saelens_folder

    instance, storage, corpus = two_variants["instance"], two_variants["storage"], two_variants["corpus"]
    rng = np.random.default_rng(0)
    W = rng.standard_normal((576, 8)).astype(np.float32)
    W /= np.linalg.norm(W, axis=0, keepdims=True)
    folder = saelens_folder(tmp_path, "l1-saes", "standard", W, np.full(8, -0.5, np.float32),
                            np.zeros(576, np.float32), "blocks.1.hook_resid_post")
    name = default_name("dictionary", str(folder))
    record_variant(variants_file(storage), name, {"selection": {"units": "dictionary", "dictionary": str(folder),
                                                                "neurons": [5, 6, 7]}})
    done = run(instance, storage, corpus, name, [1])
    assert done.success
    assert digests(storage, "neurons") == two_variants["before"]  # not one byte of the neuron variant changed
    latents = pl.read_parquet(asset_path(storage, ACTIVATION_RECORDS, 1, name))
    assert set(latents["unit_kind"]) == {DICTIONARY_LATENT}
    neurons = pl.read_parquet(asset_path(storage, ACTIVATION_RECORDS, 1, "neurons"))
    assert set(neurons["unit_kind"]) == {MLP_NEURON}
    from ndx_pipeline.reports.compare import compare

    both = compare(storage, ["neurons", name], [1], resamples=50)  # both listed; latent 5 is not paired with neuron 5
    assert {r["variant"] for r in both["summary"]} == {"neurons", name}
    assert [p["shared"] for p in both["pairs"]] == [0, 0]

    broken = "broken-explainer"
    record_variant(variants_file(storage), broken, {
        "selection": {"units": "dictionary", "dictionary": str(folder), "neurons": [5, 6, 7]},
        "explainer_llm": {"backend": "openai", "base_url": f"http://127.0.0.1:{closed_port()}/v1",
                          "model": "nobody-home"}})
    # how many attempts is the run's to say (a variant never records it): one, so each request fails at the closed
    # port at once instead of retrying through its backoff (8 attempts, ~50 s)
    failed = run(instance, storage, corpus, broken, [1], explainer_llm={"max_attempts": 1})
    assert not failed.success
    assert digests(storage, "neurons") == two_variants["before"]
    for variant in ("neurons", "sim-f32", name, broken):  # every file holds its own variant's rows only
        for asset in LAYER_ASSETS:
            path = asset_path(storage, asset, 1, variant)
            if not path.exists():
                continue
            frame = pl.read_parquet(path)
            for column in ("excerpt_id", "explanation_id"):
                if column in frame.columns and len(frame):
                    assert frame[column].str.starts_with(f"{variant}/").all(), (variant, asset, column)
            if "unit_kind" in frame.columns:
                kind = MLP_NEURON if variant in ("neurons", "sim-f32") else DICTIONARY_LATENT
                assert set(frame["unit_kind"]) == {kind}, (variant, asset)
    assert not asset_path(storage, SCORES, 1, broken).exists()  # stopped at its explanations, and said so
    assert metadata(instance, EXPLANATIONS, 1, broken)["failed"] == 3
    errors = pl.read_parquet(asset_path(storage, EXPLANATIONS, 1, broken))["error"]
    assert errors.str.starts_with("gave up after 1 attempts").all()  # the run's one attempt, not the default 8


@pytest.mark.slow
def test_the_sensors_act_on_their_own_variants(two_variants, tmp_path):
    from ndx_pipeline.defs.automation import corpus_sensor, dictionary_sensor
    from ndx_pipeline.defs.partitions import layer_and_variant
    from ndx_pipeline.defs.resources import StorageResource
    from ndx_pipeline_tests.test_units import saelens_folder

    instance, storage, corpus = two_variants["instance"], two_variants["storage"], two_variants["corpus"]
    resources = {"storage": StorageResource(storage_dir=str(storage))}
    watched = tmp_path / "dictionaries"
    watched.mkdir()
    sensor = dictionary_sensor(str(watched))
    context = dg.build_sensor_context(instance=instance, resources=resources)
    assert isinstance(sensor(context), dg.SkipReason)
    rng = np.random.default_rng(1)
    W = rng.standard_normal((576, 4)).astype(np.float32)
    saelens_folder(watched, "layer2-sae", "standard", W, np.zeros(4, np.float32), np.zeros(576, np.float32),
                   "blocks.2.hook_resid_post")
    context = dg.build_sensor_context(instance=instance, cursor=context.cursor, resources=resources)
    result = sensor(context)
    assert [layer_and_variant(r.partition_key) for r in result.run_requests] == [(2, "layer2-sae")]
    assert result.run_requests[0].run_config in ({}, None)  # its settings are the variant's, in the variants file
    assert result.dynamic_partitions_requests[0].partition_keys == ["layer2-sae"]
    declared = read_variants(variants_file(storage))
    assert declared["layer2-sae"]["selection"]["units"] == "dictionary"
    assert set(declared) >= {"sim-f32", "layer2-sae"}  # the others are kept as they were

    corpus_watch = corpus_sensor(str(corpus))
    context = dg.build_sensor_context(instance=instance)
    assert isinstance(corpus_watch(context), dg.SkipReason)  # started watching
    (corpus / "new.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    requests = corpus_watch(dg.build_sensor_context(instance=instance, cursor=context.cursor))
    ranges = {(r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
              for r in requests}
    assert {("0|neurons", "2|neurons"), ("0|sim-f32", "2|sim-f32")} <= ranges  # each variant, its own layers
    assert all(r.run_config in ({}, None) for r in requests)  # each run takes its variant's own settings
    # one extraction pass for every variant: the first variant's runs read the others' unit sets too
    variant_of = {id(r): layer_and_variant(r.tags["dagster/asset_partition_range_start"])[1] for r in requests}
    first = variant_of[id(requests[0])]
    for r in requests:
        others = set(variant_of.values()) - {first} if variant_of[id(r)] == first else None
        assert (set(r.tags[EXTRACT_WITH_TAG].split(",")) if EXTRACT_WITH_TAG in r.tags else None) == others


@pytest.mark.slow
def test_variants_run_together_take_one_forward_pass(tmp_path, monkeypatch, capsys):
    """`run --variant neurons --variant neurons-negative`: two unit sets of the same layers, one pass of the subject
    model; the second variant's records are those a pass of its own keeps, and both variants are scored."""
    from ndx_pipeline.cli import main
    from ndx_pipeline.core import stages
    from ndx_pipeline.core.data import forward_pass
    from ndx_pipeline.defs.resources import default_resources

    passes, real = [], forward_pass.extract
    monkeypatch.setattr(forward_pass, "extract", lambda *a, **k: passes.append(list(a[3])) or real(*a, **k))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    storage, corpus = tmp_path / "storage", part_of_the_bundled_corpus(tmp_path / "corpus")
    for variant, units in (("neurons", "positive"), ("neurons-negative", "negative")):
        record_variant(variants_file(storage), variant, few_excerpts_settings(units))
    code = main(["run", "--variant", "neurons", "--variant", "neurons-negative", "--layers", "0-1", "--neurons",
                 "5,9", "--baselines", "lookup", "--scorers", "none", "--controls", "none", "--storage", str(storage),
                 "--corpus", str(corpus)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert passes == [[(None, 0), (None, 1), ("neurons-negative", 0), ("neurons-negative", 1)]]  # one pass
    with dg.DagsterInstance.get() as instance:
        for layer in (0, 1):
            mine, theirs = (metadata(instance, ACTIVATION_RECORDS, layer, v) for v in ("neurons-negative", "neurons"))
            assert mine["subject_model_forward_passes"] == 0 and mine["extracted_with_variant"] == "neurons"
            assert theirs["subject_model_forward_passes"] > 0
            assert theirs["pass_read_also_for_variants"] == "neurons-negative"
            assert mine["extraction_key"] != theirs["extraction_key"]
            runs = instance.fetch_materializations(dg.AssetRecordsFilter(
                asset_key=dg.AssetKey(ACTIVATION_RECORDS), asset_partitions=[f"{layer}|neurons"]), limit=1).records
            assert mine["extracted_in_run"] == runs[0].run_id
    assert not any((storage / "joint_extractions").rglob("*.parquet"))  # each handed-over file was taken
    # what a pass of its own keeps, with the same settings
    subject, selection = default_resources()["subject_model"], default_resources()["selection"]
    alone = stages.activation_records(
        stages.corpus(str(corpus)), None, [0, 1], units="negative", neurons=[5, 9], top_k=selection.top_k,
        random_k=selection.random_k, quantile_k=selection.quantile_k, seed=selection.seed,
        window_tokens=subject.window_tokens, dtype=subject.dtype, batch_size=subject.batch_size)
    for layer in (0, 1):
        records = pl.read_parquet(asset_path(storage, ACTIVATION_RECORDS, layer, "neurons-negative"))
        assert records.equals(alone.layers[layer].records)
        table = pl.read_parquet(asset_path(storage, TOKEN_TABLE, layer, "neurons-negative"))
        assert table.equals(alone.layers[layer].token_table)
        assert set(records["polarity"]) == {-1}
        for variant, units in (("neurons", [5, 9]), ("neurons-negative", [-10, -6])):  # a negative side: -(n + 1)
            scores = pl.read_parquet(asset_path(storage, SCORES, layer, variant))
            assert sorted(scores["neuron"]) == units


@pytest.mark.slow
def test_one_bad_layer_stops_alone_and_the_cli_says_so(tmp_path, monkeypatch, capsys):
    """A run over layers 0-2 in which every explanation of layer 1 fails ends with layers 0 and 2 scored, layer 1
    failed with its reason, and a non-zero exit."""
    import ndx_pipeline.core.stages as stages
    from ndx_pipeline.cli import main

    real = stages.explanations

    def explainer_down_for_layer_1(excerpts, *args, **kwargs):  # the fault: every explanation of layer 1 fails
        made = real(excerpts, *args, **kwargs)
        one = pl.col("layer") == 1
        made.explanations = made.explanations.with_columns(
            pl.when(one).then(pl.lit(STATUS_FAILED)).otherwise(pl.col("status")).alias("status"),
            pl.when(one).then(pl.lit("explainer down (injected)")).otherwise(pl.col("error")).alias("error"),
            pl.when(one).then(None).otherwise(pl.col("explanation")).alias("explanation"))
        return made

    monkeypatch.setattr(stages, "explanations", explainer_down_for_layer_1)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    storage, corpus = tmp_path / "storage", part_of_the_bundled_corpus(tmp_path / "corpus")
    record_variant(variants_file(storage), "neurons", few_excerpts_settings())
    code = main(["run", "--layers", "0-2", "--neurons", "5,9", "--baselines", "lookup", "--scorers", "none",
                 "--controls", "none", "--storage", str(storage), "--corpus", str(corpus)])
    out = capsys.readouterr()
    assert code == 1
    stopped = [line for line in out.err.splitlines() if line.startswith("error: layer")]
    assert stopped == ["error: layer 1 of variant neurons failed: explanations failure_share: every one of the 2 "
                       "explanations failed"]  # its own reason, not the other layers' check results
    for layer in (0, 2):
        scores = pl.read_parquet(asset_path(storage, SCORES, layer, "neurons"))
        assert sorted(scores["neuron"]) == [5, 9] and scores["score"].is_finite().any()
    assert not asset_path(storage, SIMULATIONS, 1, "neurons").exists()
    assert not asset_path(storage, SCORES, 1, "neurons").exists()
    with dg.DagsterInstance.get() as instance:
        scored = instance.get_materialized_partitions(dg.AssetKey(SCORES))
    assert scored == {"0|neurons", "2|neurons"}


def test_the_one_pass_benchmark_runs_small():
    """benchmarks/variants.py on two layers and a few units: one pass for three variants, a third of the passes."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "variants.py"
    done = subprocess.run([sys.executable, str(script), "--layers", "0-1", "--neurons", "4", "--dictionary", "32",
                           "--characters", "8000"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["forward_passes_separate"] == 3 * found["forward_passes_joint"] > 0
    assert found["joint_over_separate"] == pytest.approx(found["joint_seconds"] / found["separate_seconds"], rel=0.05)
