"""Configuration of the pipeline as Dagster resources: what the launchpad shows and run config sets."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from .core.backends import LLMBackend, LocalTransformersBackend
from .core.errors import NdxInputError
from .core.subject_model import BUNDLED_MODEL

SUBJECT_MODEL_ENV = "NDX_SUBJECT_MODEL"


def configured_subject_model() -> str:
    """The subject model named at definitions-load time (it sets the layer partitions)."""
    return os.environ.get(SUBJECT_MODEL_ENV) or BUNDLED_MODEL


def default_dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home")


class StorageResource(dg.ConfigurableResource):
    """Where the data contract's Parquet files go."""

    storage_dir: str | None = Field(default=None, description="Default: $DAGSTER_HOME/storage.")

    def path(self) -> Path:
        return Path(self.storage_dir).expanduser() if self.storage_dir else default_dagster_home() / "storage"


class CorpusResource(dg.ConfigurableResource):
    """The text corpus: a folder of .txt/.md files, a .jsonl (field `text`) or a .parquet (column `text`)."""

    path: str | None = Field(default=None, description="Default: CPython's pydoc_data.topics.")


class SubjectModelResource(dg.ConfigurableResource):
    """The model whose neurons are explained, and how it is run over the corpus."""

    model: str = Field(default_factory=configured_subject_model,
                       description="HF model id (local cache only), local folder, .gguf file, or the bundled default.")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda, cuda:1 …")
    dtype: str = Field(default="float32", description="float32, bfloat16 or float16 (stored values are float32).")
    batch_size: int = 16
    window_tokens: int = 64

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


class SelectionResource(dg.ConfigurableResource):
    """Which neurons are explained, and how many excerpts each keeps and uses."""

    neurons_per_layer: int = Field(default=16, description="Neurons per layer, chosen with `seed`.")
    neurons: list[int] | None = Field(default=None, description="Explicit neuron indices (overrides the count).")
    seed: int = 0
    top_k: int = 20
    random_k: int = 20
    explain_excerpts: int = 5
    score_top_excerpts: int = 5
    score_random_excerpts: int = 5


class LLMResource(dg.ConfigurableResource):
    """An LLM for one stage (explainer or simulator)."""

    backend: str = Field(default="local", description="local: an in-process transformers chat model.")
    model: str = Field(default=BUNDLED_MODEL, description="Model id, folder or .gguf for the backend.")
    max_tokens: int = 60
    temperature: float = 1.0
    seed: int = 0

    def build(self) -> LLMBackend:
        if self.backend == "local":
            return LocalTransformersBackend(self.model)
        raise NdxInputError(f"LLM backend {self.backend!r} is not known (available: local).")
