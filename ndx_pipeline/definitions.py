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
    api_key_from_env,
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
            "explainer_llm": LLMResource(api_key=api_key_from_env("NDX_EXPLAINER_API_KEY", "OPENAI_API_KEY")),
            "simulator_llm": LLMResource(max_tokens=0, temperature=0.0,
                                         api_key=api_key_from_env("NDX_SIMULATOR_API_KEY", "OPENAI_API_KEY")),
        },
    )


defs = build_definitions()
