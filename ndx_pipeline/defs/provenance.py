"""What Dagster knows about how each stage's file was produced: run id, partition, code and data versions.

Feeds `reports.lineage` (which reads only Parquet) with the runs behind the files of a layer of a variant.
"""

from __future__ import annotations

import dagster as dg

from ndx_pipeline.core.contract import ACTIVATION_RECORDS, STAGES
from ndx_pipeline.core.variants import control_of
from ndx_pipeline.defs.metadata import content_hash
from ndx_pipeline.defs.partitions import add_variant, partition_key


def _info(record, partition: str | None) -> dict:
    mat = record.asset_materialization
    tags = mat.tags or {}
    info = {
        "run_id": record.run_id,
        "partition": partition,
        "code_version": tags.get("dagster/code_version"),
        "data_version": tags.get("dagster/data_version"),
        "timestamp": record.timestamp,
    }
    for key, value in (mat.metadata or {}).items():
        if key in ("subject_model", "explainer", "simulator", "source"):  # source: the corpus's
            info[key] = getattr(value, "value", value)
    return info


def stage_runs(instance: dg.DagsterInstance, layer: int, variant: str) -> dict[str, dict | None]:
    """Stage → the latest materialization of that stage for `layer` of `variant`, on the partition
    `<layer>|<variant>` (the corpus is unpartitioned)."""
    out: dict[str, dict | None] = {}
    for stage in STAGES:
        partition = None if stage == "corpus" else str(partition_key(layer, variant))
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(stage),
                                  asset_partitions=[partition] if partition is not None else None),
            limit=1,
        ).records
        out[stage] = _info(records[0], partition) if records else None
    return out


def recorded_subject_model(instance: dg.DagsterInstance, layers: dict[str, list[int]]) -> str | None:
    """The subject model the latest activation_records materialization of the first of `layers` (variant → its
    layers) recorded, a variant of its own before a control (whose weights may be re-initialized); None when no
    run recorded one (the Parquet files do not name it)."""
    for variant in sorted(layers, key=lambda v: (control_of(v) is not None, v)):
        for layer in layers[variant]:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(ACTIVATION_RECORDS),
                                      asset_partitions=[str(partition_key(layer, variant))]), limit=1).records
            if records:
                found = _info(records[0], None).get("subject_model")
                if found:
                    return str(found)
    return None


def latest_metadata(instance: dg.DagsterInstance, asset: str, layer: int, variant: str) -> dict:
    """The metadata of the latest materialization of `asset` on `<layer>|<variant>`, as plain values ({} when it
    was never materialized)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[str(partition_key(layer, variant))]),
        limit=1).records
    if not records:
        return {}
    return {key: getattr(value, "value", value) for key, value in (records[0].asset_materialization.metadata or
                                                                    {}).items()}


def record_imported(instance: dg.DagsterInstance, written, source: str) -> None:
    """Record files written outside a run (`ndx-pipeline import`: (asset, layer, variant, path) items, layer and
    variant None for the corpus) as materializations of their assets on their `<layer>|<variant>` partition, with a
    data version hashing their bytes, so lineage, staleness and the UI see them like any other. A variant not yet
    known to the instance is added."""
    for asset, layer, variant, path in written:
        if layer is not None:
            add_variant(instance, variant)
        instance.report_runless_asset_event(dg.AssetMaterialization(
            asset_key=asset, partition=None if layer is None else str(partition_key(layer, variant)),
            description=f"imported from {source}",
            metadata={"path": dg.MetadataValue.path(str(path)), "imported_from": source},
            tags={"dagster/data_version": content_hash([path])},
        ))
