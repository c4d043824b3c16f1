"""The corpus-folder sensor, the nightly schedule, the jobs and the automation conditions."""

import json
import os

import dagster as dg

from ndx_pipeline.core.contract import ASSETS
from ndx_pipeline.definitions import build_definitions
from ndx_pipeline.defs.automation import (
    EXPLAIN_AND_SCORE_JOB,
    EXTRACTION_JOB,
    MAIN_JOB,
    ON_DEMAND_ASSETS,
    corpus_sensor,
    nightly_rescore,
)


def materialize_runless(instance, asset, partitions, code_version=None):
    for p in partitions:
        tags = {"dagster/code_version": code_version} if code_version else None
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=asset, partition=p, tags=tags))


def tick(sensor, instance, cursor):
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor)
    result = sensor(ctx)
    return result, ctx.cursor


def test_corpus_sensor_cursor_and_run_keys(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("one")
    sensor = corpus_sensor(str(folder))
    instance = dg.DagsterInstance.ephemeral()

    result, cursor = tick(sensor, instance, None)
    assert isinstance(result, dg.SkipReason) and "started watching 1 corpus files" in result.skip_message
    result, cursor = tick(sensor, instance, cursor)
    assert isinstance(result, dg.SkipReason) and result.skip_message == "corpus unchanged"

    (folder / "b.md").write_text("new file")  # new file, no layer yet: the corpus alone
    result, cursor = tick(sensor, instance, cursor)
    assert [r.run_key for r in result] == ["corpus-1"]
    assert result[0].asset_selection == [dg.AssetKey("corpus")]

    instance.add_dynamic_partitions("variant", ["neurons", "sae"])
    materialize_runless(instance, "activation_records", ["0|neurons", "1|neurons", "3|neurons", "1|sae"])
    (folder / "a.txt").write_text("one, changed")  # changed file: corpus + every variant's layers with records
    result, cursor = tick(sensor, instance, cursor)
    assert [r.run_key for r in result] == ["corpus-2-neurons-layers-0-1", "corpus-2-neurons-layers-3-3",
                                           "corpus-2-sae-layers-1-1"]
    assert result[0].tags["dagster/asset_partition_range_start"] == "0|neurons"
    assert result[0].tags["dagster/asset_partition_range_end"] == "1|neurons"
    assert result[2].tags["dagster/asset_partition_range_start"] == result[2].tags[
        "dagster/asset_partition_range_end"] == "1|sae"
    assert all(r.run_config in ({}, None) for r in result)  # each variant's settings come from its own declaration

    (folder / "b.md").unlink()  # removed file
    result, cursor = tick(sensor, instance, cursor)
    assert {r.run_key for r in result} == {"corpus-3-neurons-layers-0-1", "corpus-3-neurons-layers-3-3",
                                           "corpus-3-sae-layers-1-1"}
    (folder / "b.md").write_text("new file")  # back to an earlier set of files: still a new run key
    os.utime(folder / "b.md", ns=(1, 1))
    result, cursor = tick(sensor, instance, cursor)
    assert {r.run_key for r in result} == {"corpus-4-neurons-layers-0-1", "corpus-4-neurons-layers-3-3",
                                           "corpus-4-sae-layers-1-1"}
    assert json.loads(cursor)["generation"] == 4


def test_variants_file_sensor_adds_the_declared_variants(tmp_path):
    from ndx_pipeline.core.variants import record_variant, variants_file
    from ndx_pipeline.defs.automation import variants_file_sensor
    from ndx_pipeline.defs.resources import StorageResource

    instance = dg.DagsterInstance.ephemeral()
    resources = {"storage": StorageResource(storage_dir=str(tmp_path))}
    result = variants_file_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert isinstance(result, dg.SkipReason)
    record_variant(variants_file(tmp_path), "explainer-b", {"explainer_llm": {"temperature": 0.5}})
    result = variants_file_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert result.dynamic_partitions_requests[0].partition_keys == ["explainer-b"] and not result.run_requests
    # the versions of its settings, one per group of stages, observed on that variant's partition
    assert sorted(e.asset_key.to_user_string() for e in result.asset_events) == sorted(
        f"variant_settings/{g}" for g in ("extraction", "output", "excerpts", "explainer", "simulator", "scoring",
                                                "scorers"))
    assert {e.partition for e in result.asset_events} == {"explainer-b"}
    instance.add_dynamic_partitions("variant", ["explainer-b"])
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    assert isinstance(variants_file_sensor(dg.build_sensor_context(instance=instance, resources=resources)),
                      dg.SkipReason)  # nothing new, nothing changed
    record_variant(variants_file(tmp_path), "explainer-b", {"explainer_llm": {"temperature": 0.7}})
    result = variants_file_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert [e.asset_key.to_user_string() for e in result.asset_events] == ["variant_settings/explainer"]
    variants_file(tmp_path).write_text("[broken\n")
    skip = variants_file_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert isinstance(skip, dg.SkipReason) and "not readable YAML" in skip.skip_message


def test_corpus_sensor_without_a_folder_skips():
    result, _ = tick(corpus_sensor(None), dg.DagsterInstance.ephemeral(), None)
    assert isinstance(result, dg.SkipReason)


def test_nightly_schedule_skips_when_nothing_is_stale():
    import datetime

    defs = build_definitions()
    with dg.instance_for_test() as instance:
        with dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def(),
                                       scheduled_execution_time=datetime.datetime(2026, 11, 23, 3, 0)) as ctx:
            result = nightly_rescore(ctx)
    assert isinstance(result, dg.SkipReason) and result.skip_message == "no stale layer"
    # the stale case runs on real materializations in test_incremental.py


def test_jobs_and_automation_conditions():
    defs = build_definitions()
    assert {j.name for j in defs.jobs} == {MAIN_JOB, EXTRACTION_JOB, EXPLAIN_AND_SCORE_JOB}
    extract = defs.resolve_job_def(EXTRACTION_JOB)
    assert {k.to_user_string() for k in extract.asset_layer.executable_asset_keys} == {
        "corpus", "activation_records", "token_table", "output_tokens", "top_excerpts"}
    llm = defs.resolve_job_def(EXPLAIN_AND_SCORE_JOB)
    assert {k.to_user_string() for k in llm.asset_layer.executable_asset_keys} == {
        "explanations", "baseline_explanations", "calibration_simulations", "simulations", "baseline_simulations",
        "scores", "scorer_excerpts", "detection_judgements", "detection_scores", "fuzzing_judgements",
        "fuzzing_scores", "embedding_judgements", "embedding_scores", "neuron_viewer"}
    main = defs.resolve_job_def(MAIN_JOB)  # every asset but the on-demand ones (the release)
    assert {k.to_user_string() for k in main.asset_layer.executable_asset_keys} == set(ASSETS)
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        cond = graph.get(key).automation_condition
        if key.to_user_string() in ("corpus", *ON_DEMAND_ASSETS) or not graph.get(key).is_materializable:
            assert cond is None  # (observed settings: none either)
        else:
            assert cond is not None and cond.label in ("follow upstream updates", "re-extract layers already "
                                                                                  "materialized")
