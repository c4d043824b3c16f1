"""Which LLM backends exist, by the name a user writes in settings (`backend: local | openai`), and how one is built.

A new backend: implement `backend.LLMBackend`, answer through `cache.cached_call`, and add a builder here; the
settings, the CLI and the Dagster resources then offer it with nothing else to change.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.llm.backend import LLMBackend
from ndx_pipeline.core.llm.cache import LLMStats
from ndx_pipeline.core.llm.local import LocalTransformersBackend
from ndx_pipeline.core.llm.openai import OpenAICompatibleBackend, RetryPolicy


@dataclass(frozen=True)
class LLMSpec:
    """How to reach one LLM. `api_key` is the secret itself, read from the environment by the caller; it is handed
    to the backend's client and nowhere else."""

    backend: str = "local"
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = None
    server: str = "openai"
    max_concurrency: int = 4
    timeout_s: float = 120.0
    deadline_s: float = 600.0
    max_attempts: int = 8

    def __repr__(self) -> str:  # never the key
        return f"LLMSpec(backend={self.backend!r}, model={self.model!r}, base_url={self.base_url!r})"


def _local(spec: LLMSpec, cache_dir, stats) -> LLMBackend:
    return LocalTransformersBackend(spec.model, cache=cache_dir, stats=stats)


def _openai(spec: LLMSpec, cache_dir, stats) -> LLMBackend:
    if not spec.base_url:
        raise NdxInputError("the openai backend needs base_url (e.g. https://api.openai.com/v1).")
    retry = RetryPolicy(max_attempts=spec.max_attempts, timeout=spec.timeout_s, deadline=spec.deadline_s)
    return OpenAICompatibleBackend(spec.base_url, spec.model, spec.api_key, cache=cache_dir, stats=stats,
                                   server=spec.server, retry=retry, max_concurrency=spec.max_concurrency)


BACKENDS: dict[str, Callable[[LLMSpec, os.PathLike | None, LLMStats | None], LLMBackend]] = {
    "local": _local,
    "openai": _openai,
}


def build_backend(spec: LLMSpec, cache_dir: os.PathLike | None = None, stats: LLMStats | None = None) -> LLMBackend:
    """The backend `spec` names, answering through the cache under `cache_dir` (None: no cache)."""
    builder = BACKENDS.get(spec.backend)
    if builder is None:
        raise NdxInputError(f"LLM backend {spec.backend!r} is not known (available: {', '.join(BACKENDS)}).")
    return builder(spec, cache_dir, stats)
