"""`defs`: the Dagster Definitions of ndx-pipeline (assets, checks, resources, jobs, sensor, schedule)."""

from __future__ import annotations

import warnings

import dagster as dg

# backfill_policy and partitioned checks are marked beta/preview in Dagster 1.13; we rely on them knowingly.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

from ndx_pipeline.defs.assets import build_assets, layer_partitions
from ndx_pipeline.defs.automation import MAIN_JOB, corpus_sensor, jobs, nightly_rescore
from ndx_pipeline.defs.resources import default_resources
from ndx_pipeline.defs.versioning import code_versions, explainer_prompt_sha, simulator_prompt_sha

__all__ = ["MAIN_JOB", "build_definitions", "defs"]


def build_definitions() -> dg.Definitions:
    """Definitions from the environment's settings (NDX_* variables; see README): the layer partitions come from
    the subject model's config, the code versions from the configured models, counts and prompt templates."""
    partitions = layer_partitions()
    resources = default_resources()
    versions = code_versions(resources)
    versions.update(explainer_prompt=explainer_prompt_sha(), simulator_prompt=simulator_prompt_sha())
    return dg.Definitions(
        assets=build_assets(partitions, versions),
        jobs=jobs(partitions),
        sensors=[corpus_sensor(resources["corpus_source"].path)],
        schedules=[nightly_rescore],
        resources=resources,
    )


defs = build_definitions()
