"""Which LLM backends exist, by the name a user writes in settings (`backend: local | openai`), and how one is built.

A new backend: implement `backend.LLMBackend`, answer through `cache.cached_call`, and add a builder here; the
settings, the CLI and the Dagster resources then offer it with nothing else to change.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.llm.backend import LLMBackend
from ndx_pipeline.core.llm.cache import LLMStats
from ndx_pipeline.core.llm.local import LocalTransformersBackend
from ndx_pipeline.core.llm.openai import OpenAICompatibleBackend, RetryPolicy
from ndx_pipeline.core.llm.openai.backend import TEN_PROBES
from ndx_pipeline.core.models import AUTO_DTYPE

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class LLMSpec:
    """How to reach one LLM. `api_key_env` is the NAME of the environment variable holding the API key (None: no
    key); the key is read from it when the backend is built, handed to the backend's client and nowhere else.
    `context_tokens`: the model's context window (None: ask the model or server)."""

    backend: str = "local"
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    server: str = "openai"
    max_concurrency: int | None = None  # None: the backend's own default (a server preset's, a batch)
    timeout_s: float = 120.0
    deadline_s: float = 600.0
    max_attempts: int = 8
    context_tokens: int | None = None
    dtype: str = AUTO_DTYPE  # local backend: the precision the model computes in (see LocalTransformersBackend)
    ten_probe: str = "auto"  # openai backend: how the simulator reads the value 10 (openai.backend.TEN_PROBES)

    def __repr__(self) -> str:
        return f"LLMSpec(backend={self.backend!r}, model={self.model!r}, base_url={self.base_url!r})"


# what API keys start with (OpenAI, Groq, Hugging Face, xAI, Google, GitHub, GitLab, Stripe-like, Replicate,
# Perplexity, Anthropic, Together …): a value like these is a key, never a variable's name
KEY_PREFIXES = ("sk-", "sk_", "gsk_", "hf_", "xai-", "AIza", "ghp_", "gho_", "github_pat_", "glpat-", "pk_", "rk_",
                "r8_", "pplx-", "key-", "fw_", "nvapi-", "tgp_")
PASTED = ("api_key_env must be the NAME of an environment variable that holds the API key (e.g. "
          "NDX_EXPLAINER_API_KEY), not the key itself; the value given is not shown here. A key typed into run config "
          "is stored with the run: revoke it.")


def looks_like_a_key(value: str) -> bool:
    """Whether `value` (given where a variable's name goes) looks like a credential rather than a name: a key's
    prefix, a long hex string, or a long mix of lower-case letters and digits (names of variables are words)."""
    if value.startswith(KEY_PREFIXES) or re.fullmatch(r"[0-9a-fA-F]{32,}", value):
        return True
    return (len(value) >= 20 and any(ch.isdigit() for ch in value) and any(ch.islower() for ch in value)
            and sum(ch.isdigit() for ch in value) >= 4)


def api_key(spec: LLMSpec) -> str | None:
    """The API key from the variable `spec.api_key_env` names (None when it names none). A value that is not a
    variable's name, or is not a set variable and looks like a key (a key pasted where its name goes), is refused
    without being repeated."""
    name = spec.api_key_env
    if not name:
        return None
    if not ENV_NAME.fullmatch(name):
        raise NdxInputError(PASTED)
    value = os.environ.get(name)
    if not value and looks_like_a_key(name):
        raise NdxInputError(PASTED)
    if not value:
        raise NdxInputError(f"api_key_env names the environment variable {name}, which is not set where the run "
                            "executes: set it there (or leave api_key_env empty for a server without keys).")
    return value


def _local(spec: LLMSpec, cache_dir, stats) -> LLMBackend:
    batch = {"batch_size": spec.max_concurrency} if spec.max_concurrency else {}
    return LocalTransformersBackend(spec.model, cache=cache_dir, stats=stats, context_tokens=spec.context_tokens,
                                    dtype=spec.dtype, **batch)


def _openai(spec: LLMSpec, cache_dir, stats) -> LLMBackend:
    if not spec.base_url:
        raise NdxInputError("the openai backend needs base_url (e.g. https://api.openai.com/v1).")
    retry = RetryPolicy(max_attempts=spec.max_attempts, timeout=spec.timeout_s, deadline=spec.deadline_s)
    return OpenAICompatibleBackend(spec.base_url, spec.model, api_key(spec), cache=cache_dir, stats=stats,
                                   server=spec.server, retry=retry, max_concurrency=spec.max_concurrency,
                                   context_tokens=spec.context_tokens, ten_probe=spec.ten_probe)


BACKENDS: dict[str, Callable[[LLMSpec, os.PathLike | None, LLMStats | None], LLMBackend]] = {
    "local": _local,
    "openai": _openai,
}


def build_backend(spec: LLMSpec, cache_dir: os.PathLike | None = None, stats: LLMStats | None = None) -> LLMBackend:
    """The backend `spec` names, answering through the cache under `cache_dir` (None: no cache)."""
    builder = BACKENDS.get(spec.backend)
    if builder is None:
        raise NdxInputError(f"LLM backend {spec.backend!r} is not known (available: {', '.join(BACKENDS)}).")
    if spec.ten_probe not in TEN_PROBES:
        raise NdxInputError(f"ten_probe {spec.ten_probe!r} is not known (available: {', '.join(TEN_PROBES)}; "
                            "see README).")
    return builder(spec, cache_dir, stats)
