"""`defs`: the Dagster Definitions of ndx-pipeline (assets, resources, the main job)."""

from __future__ import annotations

import dagster as dg

from .assets import build_assets, layer_partitions
from .resources import (
    CorpusResource,
    LLMResource,
    SelectionResource,
    StorageResource,
    SubjectModelResource,
)

MAIN_JOB = "explain_neurons"


def build_definitions() -> dg.Definitions:
    partitions = layer_partitions()
    assets = build_assets(partitions)
    main_job = dg.define_asset_job(MAIN_JOB, selection=dg.AssetSelection.assets(*assets), partitions_def=partitions,
                                   description="corpus → activation_records → … → scores for the chosen layers.")
    return dg.Definitions(
        assets=assets,
        jobs=[main_job],
        resources={
            "storage": StorageResource(),
            "corpus_source": CorpusResource(),
            "subject_model": SubjectModelResource(),
            "selection": SelectionResource(),
            "explainer_llm": LLMResource(),
            "simulator_llm": LLMResource(max_tokens=0, temperature=0.0),
        },
    )


defs = build_definitions()
