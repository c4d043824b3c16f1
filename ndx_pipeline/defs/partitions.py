"""The partitions: every asset but the corpus is partitioned by layer × variant (a `MultiPartitionsDefinition`).

- `layer`: keys "0"…"N-1", N read from the configured subject model's config (never its weights) when the
  definitions load.
- `variant`: dynamic; a variant's key is added to the instance when it is first run (`add_variant`: the CLI, the
  dictionary sensor, the variants sensor).

A partition key reads `<layer>|<variant>` (Dagster orders dimensions by name: layer, then variant), e.g. `6|neurons`.
One run carries many layers of one variant (a single-run backfill): its range tags name the corners of the
rectangle, `0|neurons` … `2|neurons`, which Dagster expands to every layer between them of that variant.
"""

from __future__ import annotations

import dagster as dg

from ndx_pipeline.core.data.subject_model import num_layers
from ndx_pipeline.defs.resources import configured_subject_model

LAYER, VARIANT = "layer", "variant"


def layer_partitions(model: str | None = None) -> dg.StaticPartitionsDefinition:
    """Partition keys "0"…"N-1" of `model` (default: the configured subject model)."""
    return dg.StaticPartitionsDefinition([str(i) for i in range(num_layers(model or configured_subject_model()))])


layers = layer_partitions()
variants = dg.DynamicPartitionsDefinition(name=VARIANT)
layer_variant = dg.MultiPartitionsDefinition({LAYER: layers, VARIANT: variants})


def partition_key(layer: int, variant: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({LAYER: str(int(layer)), VARIANT: variant})


def layer_and_variant(key) -> tuple[int, str]:
    """(layer, variant) of a partition key (a MultiPartitionKey or its `<layer>|<variant>` string)."""
    if not isinstance(key, dg.MultiPartitionKey):
        key = layer_variant.get_partition_key_from_str(str(key))
    dims = key.keys_by_dimension
    return int(dims[LAYER]), dims[VARIANT]


def add_variant(instance: dg.DagsterInstance, variant: str) -> bool:
    """Make `variant` a key of the variant dimension on `instance` (True when it was new)."""
    if instance.has_dynamic_partition(VARIANT, variant):
        return False
    instance.add_dynamic_partitions(VARIANT, [variant])
    return True


def contiguous_ranges(layers) -> list[tuple[int, int]]:
    """Sorted layers as (first, last) runs of consecutive layers: one Dagster run (a partition range) each."""
    out: list[tuple[int, int]] = []
    for layer in sorted(set(layers)):
        if out and layer == out[-1][1] + 1:
            out[-1] = (out[-1][0], layer)
        else:
            out.append((layer, layer))
    return out


# a run tag: the other variants whose unit sets this run's extraction pass reads too (comma-separated names)
EXTRACT_WITH_TAG = "ndx/extract_with"


def range_tags(variant: str, lo: int, hi: int) -> dict:
    """The run tags that make one run carry layers lo…hi of one variant (a single-run backfill)."""
    return {"dagster/asset_partition_range_start": str(partition_key(lo, variant)),
            "dagster/asset_partition_range_end": str(partition_key(hi, variant))}
