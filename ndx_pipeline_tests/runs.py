"""Launching the graph in tests as the CLI does: the variant made a key of the instance's variant dimension, then one
run carrying a contiguous range of its layers (a single-run backfill)."""

from __future__ import annotations

import dagster as dg

from ndx_pipeline.core.variants import DEFAULT_VARIANT
from ndx_pipeline.defs.partitions import add_variant, range_tags


def execute_layers(job, instance: dg.DagsterInstance, layers, variant: str = DEFAULT_VARIANT, **kwargs):
    """`job.execute_in_process` over `layers` (an int, or a contiguous range) of `variant` on `instance`."""
    layers = [layers] if isinstance(layers, int) else sorted(layers)
    if layers != list(range(layers[0], layers[-1] + 1)):
        raise ValueError(f"one run carries a contiguous range of layers, not {layers}")
    add_variant(instance, variant)
    tags = {**kwargs.pop("tags", {}), **range_tags(variant, layers[0], layers[-1])}
    kwargs.setdefault("raise_on_error", False)
    return job.execute_in_process(instance=instance, tags=tags, **kwargs)
