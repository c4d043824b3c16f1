"""The layer partitions: keys "0"…"N-1", N read from the configured subject model's config (never its weights)
when the definitions load. Every asset but the corpus is partitioned by layer."""

from __future__ import annotations

import dagster as dg

from ndx_pipeline.core.data.subject_model import num_layers
from ndx_pipeline.defs.resources import configured_subject_model


def layer_partitions(model: str | None = None) -> dg.StaticPartitionsDefinition:
    """Partition keys "0"…"N-1" of `model` (default: the configured subject model)."""
    return dg.StaticPartitionsDefinition([str(i) for i in range(num_layers(model or configured_subject_model()))])


layers = layer_partitions()


def contiguous_ranges(layers) -> list[tuple[int, int]]:
    """Sorted layers as (first, last) runs of consecutive layers: one Dagster run (a partition range) each."""
    out: list[tuple[int, int]] = []
    for layer in sorted(set(layers)):
        if out and layer == out[-1][1] + 1:
            out[-1] = (out[-1][0], layer)
        else:
            out.append((layer, layer))
    return out


def range_tags(lo: int, hi: int) -> dict:
    """The run tags that make one run carry the layer partitions lo…hi (a single-run backfill)."""
    return {"dagster/asset_partition_range_start": str(lo), "dagster/asset_partition_range_end": str(hi)}
