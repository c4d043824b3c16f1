"""A persistent, content-addressed cache of LLM requests, and the counters that account for LLM work.

Key: sha256 of a canonical JSON of (backend kind, model, endpoint, the whole request body, and — for backends that
talk to a server — the server's identity, `origin`: its normalised base URL and kind, never a credential).
Credentials never enter a request body (they travel in HTTP headers), and `cache_key` drops any field that looks
like one, so a key and a stored entry can be shown to anyone.

Only answers a stage can use are stored (`cached_call(..., usable=...)`), and never one holding NaN or Infinity
(`NonFiniteAnswerError`): a bad answer fails its item once instead of failing every rerun from the cache.

Layout: one JSON file per key, `<directory>/<key[:2]>/<key>.json`, written to a temporary file in the same folder
and renamed over the target. Readers see either no entry or a whole one; concurrent writers (threads or
processes) of the same key write identical content and the last rename wins; a process killed midway leaves at
most a stray `*.tmp` file, which is ignored (and swept by `sweep_temporary_files`). No locks, no database, works
on any file system that renames atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ndx_pipeline.core.llm.errors import NonFiniteAnswerError

CACHE_FORMAT = 1

# Request fields that may carry credentials in some client libraries; they never belong in a key or an entry.
SECRET_FIELDS = frozenset({"api_key", "apikey", "authorization", "headers", "extra_headers", "password", "token_auth"})


def _scrub(request: Mapping[str, Any]) -> dict:
    return {k: v for k, v in request.items() if k.lower() not in SECRET_FIELDS}


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(kind: str, model: str, endpoint: str, request: Mapping[str, Any], origin: Any = None) -> str:
    """The content address of one LLM request; `origin` (None for in-process backends, whose keys predate it) names
    the server that answers."""
    material = {"format": CACHE_FORMAT, "kind": kind, "model": model, "endpoint": endpoint,
                "request": _scrub(request)}
    if origin is not None:
        material["origin"] = origin
    return hashlib.sha256(canonical_json(material).encode("utf-8")).hexdigest()


def non_finite_at(value: Any, path: str = "answer") -> str | None:
    """Where in `value` the first NaN or ±Infinity is (e.g. "answer.choices[0].logprobs"), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, Mapping):
        return next((p for k, v in value.items() if (p := non_finite_at(v, f"{path}.{k}"))), None)
    if isinstance(value, list | tuple):
        return next((p for i, v in enumerate(value) if (p := non_finite_at(v, f"{path}[{i}]"))), None)
    return None


class LLMCache:
    """Request → response JSON, one file per content address under `directory`."""

    def __init__(self, directory: str | os.PathLike, durable: bool = True):
        self.directory = Path(directory)
        self.durable = durable  # fsync each entry before the rename (survives power loss, not only kill -9)

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError("an LLM cache key is a lowercase sha256 hex digest")
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The stored entry (with its `response`), or None when absent or unreadable."""
        try:
            with open(self.path(key), encoding="utf-8") as f:
                entry = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # cannot happen with rename-on-write; a damaged file counts as a miss and is rewritten
        if not isinstance(entry, dict) or entry.get("key") != key or "response" not in entry:
            return None
        return entry

    def lookup(self, key: str, stats: "LLMStats") -> tuple[bool, Any]:
        """(True, response) on a hit, counted in `stats`; (False, None) on a miss."""
        entry = self.get(key)
        if entry is None:
            return False, None
        stats.add(cache_hits=1)
        return True, entry["response"]

    def put(self, key: str, kind: str, model: str, endpoint: str, request: Mapping[str, Any],
            response: Any, origin: Any = None) -> Path:
        """Store one entry atomically; returns its path."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        entry = {"key": key, "format": CACHE_FORMAT, "kind": kind, "model": model, "endpoint": endpoint,
                 "request": _scrub(request), "response": response, "stored_at": time.time()}
        if origin is not None:
            entry["origin"] = origin
        data = canonical_json(entry).encode("utf-8")
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return target

    def __contains__(self, key: str) -> bool:
        return self.path(key).exists()

    def __len__(self) -> int:
        if not self.directory.exists():
            return 0
        return sum(1 for _ in self.directory.glob("??/*.json"))

    def sweep_temporary_files(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary files left by killed writers (only old ones: a live writer may own a fresh one)."""
        removed, now = 0, time.time()
        for tmp in self.directory.glob("??/.*.tmp"):
            try:
                if now - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()
                    removed += 1
            except OSError:
                pass
        return removed


@dataclass
class LLMStats:
    """Thread-safe counters of LLM work.

    calls: logical requests that went to the network (cache misses); requests: HTTP attempts sent (calls plus
    retries); cache_hits: logical requests answered by the cache; failures: logical requests or answers that
    ended in an error (transport gave up, or the answer was unusable); tokens as reported by the server for the
    attempts that succeeded; seconds: time spent in network calls, waits included, summed over concurrent requests
    (so it can exceed the wall time of a partition).
    """

    calls: int = 0
    requests: int = 0
    retries: int = 0
    cache_hits: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            out = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        lookups = out["cache_hits"] + out["calls"]
        out["cache_hit_rate"] = out["cache_hits"] / lookups if lookups else None
        return out

    @staticmethod
    def difference(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
        """Counters accrued between two snapshots (e.g. one partition's share of a shared backend)."""
        out = {k: after[k] - before.get(k, 0) for k in after if k != "cache_hit_rate"}
        lookups = out["cache_hits"] + out["calls"]
        out["cache_hit_rate"] = out["cache_hits"] / lookups if lookups else None
        return out


def cached_call(cache: LLMCache | None, stats: LLMStats, kind: str, model: str, endpoint: str,
                request: Mapping[str, Any], compute: Callable[[], Any], *,
                usable: Callable[[Any], bool] | None = None, origin: Any = None) -> Any:
    """The answer to one logical request: from `cache` when it holds one (counted as a hit in `stats`), else
    `compute()` — which accounts for its own calls, retries and tokens — stored under the request's content address.
    Every backend answers through here, so a rerun costs nothing whatever the backend.

    usable: whether the stage can use an answer (e.g. it has the logprobs the simulator reads). An answer it cannot
    use is returned (the caller fails that item with its own reason) but not stored, and a stored one is asked
    again. An answer holding NaN or Infinity raises NonFiniteAnswerError (counted as a failure), never stored.
    origin: the answering server's identity, part of the key (see `cache_key`)."""
    key = cache_key(kind, model, endpoint, request, origin)
    if cache is not None:
        entry = cache.get(key)
        if entry is not None and (usable is None or usable(entry["response"])):
            stats.add(cache_hits=1)
            return entry["response"]
    response = compute()
    where = non_finite_at(response)
    if where is not None:
        stats.add(failures=1)
        raise NonFiniteAnswerError(
            f"the {endpoint} answer holds a number JSON cannot represent (NaN or Infinity, at {where}); it is not "
            "used or cached")
    if cache is not None and (usable is None or usable(response)):
        cache.put(key, kind, model, endpoint, request, response, origin)
    return response
