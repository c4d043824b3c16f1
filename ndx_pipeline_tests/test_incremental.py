"""Incremental rematerialization: code versions follow what changes an output, data versions are content hashes.

Changing only the simulator makes `simulations` stale and nothing upstream; rematerializing simulations and scores
runs zero subject-model forwards and zero explainer calls (counted here)."""

import os

import dagster as dg
import polars as pl
import pytest

from ndx_pipeline.core.contract import ASSETS
from ndx_pipeline.core.llm.local import LocalTransformersBackend
from ndx_pipeline.core.models import bundled_gguf
from ndx_pipeline.core.storage import asset_path
from ndx_pipeline.core.variants import record_variant, variants_file
from ndx_pipeline.definitions import build_definitions
from ndx_pipeline.defs.automation import MAIN_JOB, stale_layers, stale_status_resolver
from ndx_pipeline.defs.partitions import partition_key
from ndx_pipeline_tests.runs import execute_layers
from ndx_pipeline_tests.test_variants import few_excerpts_settings, part_of_the_bundled_corpus

ALL = list(ASSETS)
VARIANT = "neurons"  # the default variant: the configured resources, as they are
LAYER0 = str(partition_key(0, VARIANT))  # "0|neurons"
# fewer excerpts than the defaults for the runs that call the LLMs, declared for the variant in the variants file as
# a user would (`few_excerpts`): applied over the resources as NDX_* bind them
FEW_EXCERPTS = few_excerpts_settings()


def statuses(instance, defs, partition=LAYER0):
    from dagster._core.definitions.data_version import StaleStatus  # noqa: F401

    resolver = stale_status_resolver(instance, defs.resolve_asset_graph())
    return {a: resolver.get_status(dg.AssetKey(a), None if a == "corpus" else partition).value for a in ALL}


def causes(instance, defs, asset, partition=LAYER0):
    resolver = stale_status_resolver(instance, defs.resolve_asset_graph())
    return [(c.category.value, c.reason) for c in resolver.get_stale_causes(dg.AssetKey(asset), partition)]


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """Storage, two neurons per layer and a quarter of the bundled corpus (its first documents), from NDX_*."""
    monkeypatch.setenv("NDX_STORAGE", str(tmp_path / "storage"))
    monkeypatch.delenv("NDX_VARIANTS", raising=False)
    monkeypatch.setenv("NDX_NEURONS_PER_LAYER", "2")
    monkeypatch.setenv("NDX_CORPUS", str(part_of_the_bundled_corpus(tmp_path / "corpus")))
    for var in ("NDX_SIMULATOR_MODEL", "NDX_EXPLAINER_MODEL", "NDX_SUBJECT_MODEL"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture
def few_excerpts(settings):
    record_variant(variants_file(settings / "storage"), VARIANT, FEW_EXCERPTS)
    return settings


@pytest.fixture
def counters(monkeypatch):
    from ndx_pipeline.core import stages

    counts = {"subject_model_loads": 0, "extractions": 0, "explainer_calls": 0, "simulator_calls": 0}
    real_load, real_extract = stages.load_subject_model, stages.forward_pass.extract
    real_chat, real_values = LocalTransformersBackend.chat, LocalTransformersBackend.value_probabilities

    def load(*a, **k):
        counts["subject_model_loads"] += 1
        return real_load(*a, **k)

    def extract(*a, **k):
        counts["extractions"] += 1
        return real_extract(*a, **k)

    def chat(self, *a, **k):
        counts["explainer_calls"] += 1
        return real_chat(self, *a, **k)

    def values(self, *a, **k):
        counts["simulator_calls"] += 1
        return real_values(self, *a, **k)

    monkeypatch.setattr(stages, "load_subject_model", load)
    monkeypatch.setattr(stages.forward_pass, "extract", extract)
    monkeypatch.setattr(LocalTransformersBackend, "chat", chat)
    monkeypatch.setattr(LocalTransformersBackend, "value_probabilities", values)
    return counts


def run(defs, instance, selection=None, layer=0):
    job = defs.resolve_job_def(MAIN_JOB)
    result = execute_layers(job, instance, layer, variant=VARIANT,
                            asset_selection=[dg.AssetKey(a) for a in selection] if selection else None)
    assert result.success
    return result


@pytest.mark.slow
def test_changing_only_the_simulator_reruns_only_simulations_and_scores(few_excerpts, counters, tmp_path, monkeypatch):
    with dg.instance_for_test() as instance:
        _simulator_change(instance, few_excerpts, counters, tmp_path, monkeypatch)


def _simulator_change(instance, settings, counters, tmp_path, monkeypatch):
    defs_a = build_definitions()
    run(defs_a, instance)
    assert set(statuses(instance, defs_a).values()) == {"FRESH"}
    # one load for the forward pass, one with the unembedding for output_tokens; 2 explanations + 2 token-list
    # baseline explanations (the explainer reading only the strongest tokens)
    assert counters["subject_model_loads"] == 2 and counters["explainer_calls"] == 4

    # A different simulator: the same weights under another path are another model as far as versions go. Its
    # precision is set to the one `auto` chose for the bundled file (auto would time both precisions again for a
    # model it has not seen, ~15 s): a simulator setting too, versioned with the model.
    other = tmp_path / "simulator"
    other.mkdir()
    os.symlink(bundled_gguf(), other / bundled_gguf().name)
    monkeypatch.setenv("NDX_SIMULATOR_MODEL", str(other / bundled_gguf().name))
    simulated_with = instance.get_latest_materialization_event(dg.AssetKey("simulations")).asset_materialization
    monkeypatch.setenv("NDX_SIMULATOR_DTYPE", simulated_with.metadata["llm_dtype"].value)
    defs_b = build_definitions()
    va, vb = code_versions(defs_a), code_versions(defs_b)
    assert [a for a in ALL if va[a] != vb[a]] == ["simulations", "baseline_simulations"]

    before = statuses(instance, defs_b)
    assert before["simulations"] == "STALE"
    assert ("CODE", "has a new code version") in causes(instance, defs_b, "simulations")
    assert all(before[a] == "FRESH" for a in ["corpus", "activation_records", "top_excerpts", "explanations"])
    assert stale_layers(instance, defs_b.resolve_asset_graph()) == {VARIANT: [0]}
    import datetime

    from ndx_pipeline.defs.automation import nightly_rescore

    # closed here: the instance the schedule context opens would otherwise outlive this test's instance and stay
    # Dagster's current defs-state storage, which a later definitions load in this process then fails to resolve
    with dg.build_schedule_context(instance=instance, repository_def=defs_b.get_repository_def(),
                                   scheduled_execution_time=datetime.datetime(2026, 11, 23, 3, 0)) as ctx:
        requests = nightly_rescore(ctx)  # the nightly schedule re-scores exactly the stale layer
    assert [(r.run_key, r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
            for r in requests] == [("rescore-20261123-neurons-layers-0-0", LAYER0, LAYER0)]

    for key in counters:
        counters[key] = 0
    run(defs_b, instance, selection=["simulations", "baseline_simulations", "scores"])
    assert counters["subject_model_loads"] == counters["extractions"] == counters["explainer_calls"] == 0
    storage = settings / "storage"
    simulated = sum(int((pl.read_parquet(asset_path(storage, name, 0, VARIANT))["status"] == "ok").sum())
                    for name in ("explanations", "baseline_explanations"))
    ours = int((pl.read_parquet(asset_path(storage, "explanations", 0, VARIANT))["status"] == "ok").sum())
    excerpts = pl.read_parquet(asset_path(storage, "top_excerpts", 0, VARIANT))
    calibration = excerpts.filter(pl.col("split") == "calibration").group_by("neuron").len()["len"].unique().to_list()
    # the scored excerpts for each usable explanation: ours and the random / token-list baselines' (4–6 in all); ours
    # also on its neuron's calibration excerpts (the calibrated scores' fit)
    assert len(calibration) == 1 and calibration[0] >= 1
    scored = FEW_EXCERPTS["selection"]["score_top_excerpts"] + FEW_EXCERPTS["selection"]["score_random_excerpts"]
    assert counters["simulator_calls"] == scored * simulated + calibration[0] * ours and simulated >= 2
    sims = pl.read_parquet(asset_path(settings / "storage", "simulations", 0, VARIANT))
    assert set(sims["simulator"]) == {f"local:{other / bundled_gguf().name}"}
    after = statuses(instance, defs_b)
    assert after["simulations"] == "FRESH" and after["scores"] == "FRESH"
    print(f"\nbefore rerun: {before}\nafter rerun:  {after}")


@pytest.mark.slow
def test_unchanged_output_keeps_children_fresh(few_excerpts, counters):
    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions()
    run(defs, instance, selection=["corpus", "activation_records", "token_table", "top_excerpts", "explanations",
                                   "baseline_explanations", "calibration_simulations"])
    first = instance.get_latest_materialization_event(dg.AssetKey("top_excerpts")).asset_materialization.tags
    # same input, same content: split from the stored records, where the first run split the records in memory
    run(defs, instance, selection=["top_excerpts"])
    second = instance.get_latest_materialization_event(dg.AssetKey("top_excerpts")).asset_materialization.tags
    assert first["dagster/data_version"] == second["dagster/data_version"]
    assert counters["subject_model_loads"] == counters["extractions"] == 1  # alone, it ran no model
    assert statuses(instance, defs)["explanations"] == "FRESH"


@pytest.mark.slow
def test_extraction_step_writes_the_assets_selected(settings, monkeypatch):
    """activation_records, token_table and top_excerpts share a step: each run writes what it selected;
    top_excerpts is not split from records whose blocking check failed (as a blocking check stops later steps), and
    a split the corpus cannot fill fails the step with its one-line reason after the records are materialized."""
    import ndx_pipeline.core.validation as validation

    defs = build_definitions()
    storage = settings / "storage"
    with dg.instance_for_test() as instance:
        run(defs, instance, selection=["corpus", "activation_records"])
        assert [asset_path(storage, a, 0, VARIANT).exists()
                for a in ("activation_records", "token_table", "top_excerpts")] == [True, False, False]
        assert materialized(instance) == {"corpus", "activation_records"}

        job = defs.resolve_job_def(MAIN_JOB)
        with monkeypatch.context() as patch:
            patch.setattr(validation, "record_counts", lambda *a: (False, "made to fail", {}))
            result = execute_layers(job, instance, 0, variant=VARIANT,
                                    asset_selection=[dg.AssetKey("activation_records"), dg.AssetKey("top_excerpts")])
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        assert failure.step_failure_data.user_failure_data.description == (
            "top_excerpts not written for layer 0: activation_records check record_counts failed")
        assert not asset_path(storage, "top_excerpts", 0, VARIANT).exists()
        assert materialized(instance) == {"corpus", "activation_records"}

        # a split the corpus cannot fill: the records stand (materialized), only top_excerpts has to run again
        records = instance.get_latest_materialization_event(dg.AssetKey("activation_records")).run_id
        result = execute_layers(job, instance, 0, variant=VARIANT,
                                run_config={"resources": {"selection": {"config": {"explain_excerpts": 50}}}},
                                asset_selection=[dg.AssetKey("activation_records"), dg.AssetKey("top_excerpts")])
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        assert failure.step_failure_data.user_failure_data.description.startswith(
            "top_excerpts not written for layer 0: layer 0 neuron ")
        assert "too few for 50 explain" in failure.step_failure_data.user_failure_data.description
        latest = instance.get_latest_materialization_event(dg.AssetKey("activation_records")).run_id
        assert latest == result.run_id != records and materialized(instance) == {"corpus", "activation_records"}


def code_versions(defs=None) -> dict[str, str]:
    """asset → its code version in `defs`, else in definitions built now (from the NDX_* variables as they are)."""
    g = (defs or build_definitions()).resolve_asset_graph()
    return {k.to_user_string(): g.get(k).code_version for k in g.get_all_asset_keys()
            if g.get(k).is_materializable}  # (the variants' observed settings have no code)


def changed_since(base: dict[str, str]) -> list[str]:
    """The assets whose code version in definitions built now differs from `base`, in the graph's order."""
    now = code_versions()
    return [a for a in ALL if now[a] != base[a]]


def materialized(instance) -> set[str]:
    return {k.to_user_string() for k in instance.get_asset_keys()
            if instance.get_latest_materialization_event(k) is not None}


def test_code_versions_follow_prompt_and_model_settings(settings, monkeypatch):
    base = code_versions()
    assert len(set(base.values())) == len(base)
    monkeypatch.setenv("NDX_EXPLAINER_MODEL", "/models/other.gguf")  # it also writes the token-list baseline
    assert changed_since(base) == ["explanations", "baseline_explanations"]
    monkeypatch.delenv("NDX_EXPLAINER_MODEL")
    monkeypatch.setenv("NDX_NEURONS_PER_LAYER", "3")
    # which units: their records, their token table and their output tokens
    assert changed_since(base) == ["activation_records", "token_table", "output_tokens"]
    monkeypatch.setenv("NDX_NEURONS_PER_LAYER", "2")
    import ndx_pipeline.core.method.explainer as explainer_mod

    monkeypatch.setattr(explainer_mod, "SYSTEM", explainer_mod.SYSTEM + " Be brief.")
    assert changed_since(base) == ["explanations"]


def test_ten_probe_versions_an_openai_simulator_alone(settings, monkeypatch):
    """ten_probe (issue 36) is a server's affair: set for the in-process simulator, the explainer or the scorer it
    changes nothing; for an openai simulator it versions its two simulation assets alone."""
    base = code_versions()
    for stage in ("SIMULATOR", "EXPLAINER", "SCORER"):
        monkeypatch.setenv(f"NDX_{stage}_TEN_PROBE", "per_slot")
    assert code_versions() == base
    monkeypatch.setenv("NDX_SIMULATOR_BACKEND", "openai")
    monkeypatch.setenv("NDX_SIMULATOR_BASE_URL", "http://127.0.0.1:8000/v1")
    exact = code_versions()
    monkeypatch.setenv("NDX_SIMULATOR_TEN_PROBE", "auto")
    assert changed_since(exact) == ["simulations", "baseline_simulations"]


def test_changing_one_scorer_changes_only_its_own_assets(settings, monkeypatch):
    """Each scorer beside simulation is versioned apart: its prompt or its model changes its judgements' code
    version alone (its scores follow as stale children); switching one on or off touches only its two assets."""
    monkeypatch.setenv("NDX_SCORERS", "detection,fuzzing,embedding")
    base = code_versions()
    import ndx_pipeline.core.method.detection as detection_mod

    with monkeypatch.context() as m:
        m.setattr(detection_mod, "DETECTION_SYSTEM", detection_mod.DETECTION_SYSTEM + " Be strict.")
        assert changed_since(base) == ["detection_judgements"]
    with monkeypatch.context() as m:
        m.setenv("NDX_SCORER_MODEL", "/models/other.gguf")  # the scorer LLM judges detection and fuzzing
        assert changed_since(base) == ["detection_judgements", "fuzzing_judgements"]
    with monkeypatch.context() as m:
        m.setenv("NDX_EMBEDDING_MODEL", "/models/other-embedder")
        assert changed_since(base) == ["embedding_judgements"]
    with monkeypatch.context() as m:
        m.setenv("NDX_SCORERS", "detection,embedding")
        assert changed_since(base) == ["fuzzing_judgements", "fuzzing_scores"]
