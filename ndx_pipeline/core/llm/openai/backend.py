"""An LLM backend for any OpenAI-compatible server (OpenAI, vLLM, llama.cpp / llama-cpp-python, …).

- Explainer: chat completions. A chat API cannot prefill the assistant's answer with the lead-in, so the model is
  asked to write one sentence that starts with it, and the lead-in is cut off the reply when it is repeated.
- Simulator, "all at once": one `/v1/completions` request per excerpt with `echo=True` and `logprobs=k` on the
  simulation prompt; the distribution over the values at each slot is read from the echoed top logprobs
  (`logprobs.py`: the alignment is a named option, and `"auto"` tells servers apart from the response itself).
  When the server writes "10" as "1" + "0", one echo cannot give P(10) = P("1") · P("0" | "1"): each slot's
  P("0" | "1") needs its own prompt (the prompt up to that slot, then "1"), and no OpenAI-compatible API computes
  many such prompts from one sequence. `ten_probe` chooses what to pay (TEN_PROBES): by default the prompt asks
  for 0–9 instead (one request per excerpt); "per_slot" sends those prompts, one request each.
- JSON-constrained chat (`chat_json`), for the JSON simulator of chat-only models: the method builds the prompt
  and the schema and parses the answer (`core/method/simulator_json.py`); this module only knows how each server
  takes a schema (`JSON_MODES`) and which tokens llama.cpp's schema converter cannot pin (`grammar_safe`).
- Every request goes through the content-addressed cache (`cache.cached_call`, keyed by the server's identity
  too: its normalised base URL and kind) and the retry loop (`transport.call_with_retries`); only answers the
  stage can use are cached. The backend also bounds its in-flight requests (`max_concurrency`).
- Context: the window is the `context_tokens` setting, else what the server says (vLLM's `/v1/models`
  `max_model_len`, llama.cpp's `/props`), else what it says when it refuses a prompt as too long (llama-cpp-python
  says nothing before). Prompts are counted by the server where it can (llama-cpp-python's `/extras/tokenize/count`,
  vLLM's `/tokenize`) when an upper estimate does not already fit; one that cannot fit is never sent.

The API key is handed to the `openai` client and nowhere else: not in `name`, cache keys or entries, log lines or
exception messages (those are redacted in case a server echoes it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ndx_pipeline.core.llm.backend import (
    MESSAGE_OVERHEAD,
    VALUES,
    Completion,
    ExcerptSimulationError,
    LLMBackend,
    PromptTooLongError,
    SimulationPrompt,
    estimate_tokens,
)
from ndx_pipeline.core.llm.cache import LLMCache, LLMStats, cached_call
from ndx_pipeline.core.llm.openai.logprobs import (
    LOGPROB_ALIGNMENTS,
    LogprobsUnavailableError,
    NoValueCandidatesError,
    has_echoed_logprobs,
    has_top_logprobs,
    slot_candidates,
    ten_layout,
    values_from_candidates,
)
from ndx_pipeline.core.llm.openai.transport import (
    LLMRejectedError,
    LLMRequestError,
    MalformedResponseError,
    RateGate,
    RetryPolicy,
    call_with_retries,
    context_limit_in,
    redact_secret,
)
from ndx_pipeline.core.llm.sent_prompts import OPENAI_KIND, chat_messages_for_api, sent_prompt_sha256

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------------------------
# Explainer on a chat API (the messages it sends: `sent_prompts.chat_messages_for_api`)

def has_content(response: dict) -> bool:
    """Whether a chat answer carries text (only such answers are cached)."""
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return False
    return isinstance(content, str) and bool(content.strip())


def continuation_after(text: str, prefix: str) -> str:
    """What the model wrote after `prefix`; the text itself when it did not repeat the prefix."""
    stripped = text.lstrip().lstrip("\"'“”*").lstrip()
    if prefix and stripped.lower().startswith(prefix.strip().lower()):
        return stripped[len(prefix.strip()):]
    return text


# ---------------------------------------------------------------------------------------------------------------
# JSON-constrained chat

# How to ask the server for JSON: "json_schema" (OpenAI structured outputs, vLLM), "json_object_schema"
# (llama-cpp-python: {"type": "json_object", "schema": …}, enforced by a grammar), "json_object" (any valid JSON),
# "none" (rely on the prompt alone).
JSON_MODES = ("json_schema", "json_object_schema", "json_object", "none")

# The name OpenAI's structured outputs require for a schema. It is part of every cached JSON request body.
SCHEMA_NAME = "activations"


def grammar_safe(token: str) -> bool:
    """Whether llama-cpp-python's JSON-schema-to-grammar converter can pin this token as a constant: it does not
    escape backslashes, so a constant whose JSON text holds one (a backslash, a quote, a control character) makes a
    grammar that fails to parse, and that failure aborts the whole server process (seen with the token "\\")."""
    return "\\" not in json.dumps(token)


def response_format(mode: str, schema: dict) -> dict | None:
    """The `response_format` of a JSON-constrained chat request in `mode` (None: send none)."""
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "schema": schema, "strict": False}}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": schema}
    if mode == "json_object":
        return {"type": "json_object"}
    if mode == "none":
        return None
    raise ValueError(f"json_mode must be one of {JSON_MODES}, not {mode!r}")


# ---------------------------------------------------------------------------------------------------------------
# The server's identity and what it can tell


def normalize_base_url(base_url: str) -> str:
    """The server a base URL names, as one string: scheme and host in lower case, default port, user name,
    password, query and trailing slash dropped (so no credential written into a URL reaches a cache key)."""
    parts = urlsplit(base_url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    return urlunsplit((scheme, host, parts.path.rstrip("/"), "", ""))


# Where a model's context window is written in a `/v1/models` entry: vLLM, LM Studio, others.
MODEL_CONTEXT_FIELDS = ("max_model_len", "context_length", "max_context_length", "context_window")


def context_from_models(data: Mapping, model: str) -> int | None:
    """The context window a `/v1/models` answer gives for `model` (or for its only model), or None."""
    entries = [e for e in (data.get("data") or []) if isinstance(e, Mapping)]
    entry = next((e for e in entries if e.get("id") == model), entries[0] if len(entries) == 1 else None)
    for name in MODEL_CONTEXT_FIELDS:
        value = (entry or {}).get(name)
        if isinstance(value, int) and value > 0:
            return value
    return None


def context_from_props(data: Mapping) -> int | None:
    """The context window llama.cpp's server gives at `/props`, or None."""
    for value in ((data.get("default_generation_settings") or {}).get("n_ctx"), data.get("n_ctx")):
        if isinstance(value, int) and value > 0:
            return value
    return None


def token_count(usage: Mapping, name: str) -> int:
    """A token count the server reported; 0 when it is missing or not a finite number (the answer is then
    refused as a whole by the cache's check, not here)."""
    value = usage.get(name) if isinstance(usage, Mapping) else None
    return int(value) if isinstance(value, int | float) and math.isfinite(value) else 0


def sent_of(body: Mapping) -> dict:
    """The prompt part of a request body, in `sent_prompt` form."""
    return {"messages": body["messages"]} if "messages" in body else {"prompt": body.get("prompt", "")}


# ---------------------------------------------------------------------------------------------------------------
# The backend

# How the simulator reads the value 10 when the server's tokenizer writes "10" as "1" then "0" (SmolLM2, Llama 2,
# Mistral, Qwen: every tokenizer that splits digits), and what each costs per simulated excerpt (measured on the
# bundled model with llama-cpp-python: benchmarks/server_requests.py, README):
#   "auto"      ask the server once how it writes "10" (one short echo per backend, cached); where "10" is one token,
#               the 0–10 prompt as it is; where it is split, "scale_9". One request per excerpt.
#   "scale_9"   the prompt asks for 0–9, every value one token: one request per excerpt, no probe; the model
#               answers a different prompt, and its expected values move (by how much: README).
#   "per_slot"  the 0–10 prompt, and P(10) = P("1") · P("0" | "1") read exactly, one more request per slot where
#               P("1") is at least probe_threshold of the value mass, each re-sending the prompt up to that slot:
#               up to 1 + tokens requests and about tokens/2 times the prompt's tokens. A server-side prefix cache
#               (llama-cpp-python reuses its last prompt's prefix; vLLM --enable-prefix-caching; OpenAI's prompt
#               caching) saves the server the recomputation, not the requests or the billed tokens.
#   "never"     the 0–10 prompt, "1" read as 1 and P(10) = 0 on such servers: one request, but the top value lost.
TEN_PROBES = ("auto", "scale_9", "per_slot", "never")
# What "auto" echoes to see how the server writes "10": a line as the simulator's prompts hold them.
TEN_LAYOUT_TEXT = "value\t10\n"

# Server presets: (logprob_alignment, json_mode, top_logprobs). OpenAI's legacy completions endpoint returns at
# most 5 candidates per position; vLLM's default limit is 20 (`--max-logprobs` raises it); llama-cpp-python has none,
# and 100 are asked of it: a value outside the candidates counts as 0, and on the bundled model 20 left out enough
# to move expected values by 1.07 on average against the in-process model, 100 by 0.35 (ten_probe "per_slot",
# benchmarks/server_requests.py, README), in the same time (its echo's cost is elsewhere); a cached echo of a
# 64-token excerpt then takes ~1.3 MB instead of ~0.3 MB.
# (logprob alignment, JSON mode, top logprobs, requests in flight). In flight: OpenAI's API takes many at once
# within its rate limits (429s are waited out); a vLLM server batches whatever arrives, so dozens keep it busy;
# llama-cpp-python's server answers one request at a time unless started with more slots, so more than two only
# queue there (and time out sooner).
SERVER_PRESETS = {
    "openai": ("openai", "json_schema", 5, 16),
    "vllm": ("openai", "json_schema", 20, 48),
    "llama_cpp": ("auto", "json_object_schema", 100, 2),
}


class OpenAICompatibleBackend(LLMBackend):
    """Explainer and simulators on an OpenAI-compatible HTTP server.

    base_url: e.g. "https://api.openai.com/v1", "http://127.0.0.1:8000/v1"; model: the model name sent with every
    request (and part of every cache key: with llama.cpp, which ignores it, name the weights you serve);
    api_key: passed to the client only (None: a placeholder, for servers without auth).
    cache: an LLMCache or a directory for one (None: no cache). stats: shared counters (a fresh LLMStats if None).
    server: a preset for logprob_alignment, json_mode and top_logprobs ("openai", "vllm", "llama_cpp"; see
    SERVER_PRESETS); explicit values win.
    top_logprobs: candidates per position for the simulator.
    ten_probe: how the simulator reads the value 10 when the server's tokenizer writes "10" as "1" + "0" (see
    TEN_PROBES); probe_threshold: with "per_slot", the share of a slot's value mass P("1") must reach for a probe.
    max_empty_slot_fraction: above this share of slots without any value candidate, the excerpt fails
    (NoValueCandidatesError); below it such slots predict 0, as in the reference method.
    max_concurrency: the most requests this backend has in flight at once (all threads together), and the
    default width of `map` (None: the server preset's, see SERVER_PRESETS).
    context_tokens: the model's context window in tokens (None: ask the server, see the module docstring).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *,
                 cache: LLMCache | str | os.PathLike | None = None, stats: LLMStats | None = None,
                 server: str | None = None, logprob_alignment: str | None = None, json_mode: str | None = None,
                 top_logprobs: int | None = None, ten_probe: str = "auto", probe_threshold: float = 0.01,
                 max_empty_slot_fraction: float = 0.5, retry: RetryPolicy | None = None,
                 max_concurrency: int | None = None, context_tokens: int | None = None):
        import openai

        preset = SERVER_PRESETS.get(server or "openai")
        if preset is None:
            raise ValueError(f"server must be one of {sorted(SERVER_PRESETS)}, not {server!r}")
        self.logprob_alignment = logprob_alignment or preset[0]
        self.json_mode = json_mode or preset[1]
        if self.logprob_alignment not in LOGPROB_ALIGNMENTS:
            raise ValueError(f"logprob_alignment must be one of {LOGPROB_ALIGNMENTS}, not {logprob_alignment!r}")
        if self.json_mode not in JSON_MODES:
            raise ValueError(f"json_mode must be one of {JSON_MODES}, not {json_mode!r}")
        if ten_probe not in TEN_PROBES:
            raise ValueError(f"ten_probe must be one of {', '.join(TEN_PROBES)}, not {ten_probe!r}")
        self.base_url = base_url
        self.server = server or "openai"
        # Part of every cache key: the same model name on another server, or another kind of server at the same
        # address, answers differently (changing this invalidates older entries of this backend, not the local one's)
        self.origin = {"base_url": normalize_base_url(base_url), "server": self.server}
        self.context_tokens = int(context_tokens) if context_tokens else None
        self._context_lock = threading.Lock()
        self._probed: list[int | None] = []  # [the server's answer] once asked
        self._learned: int | None = None  # from a refusal
        self._counts: dict[str, int] = {}
        self._ten_lock = threading.Lock()
        self._ten_layout: str | None = None  # how the server writes "10", once asked (ten_probe "auto")
        self.model = model
        self.top_logprobs = int(top_logprobs or preset[2])
        self.ten_probe = ten_probe
        self.probe_threshold = float(probe_threshold)
        self.max_empty_slot_fraction = float(max_empty_slot_fraction)
        self.retry = retry or RetryPolicy()
        self.max_concurrency = max(1, int(max_concurrency or preset[3]))
        self.cache = LLMCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.stats = stats if stats is not None else LLMStats()
        self._gate = RateGate()
        self._in_flight = threading.BoundedSemaphore(self.max_concurrency)
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key or "no-key", max_retries=0,
                                     timeout=self.retry.timeout)

    # -- identity, lifecycle -----------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return f"{OPENAI_KIND}:{self.model}"

    def __repr__(self) -> str:
        return f"OpenAICompatibleBackend(base_url={self.origin['base_url']!r}, model={self.model!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _redact(self, text: str) -> str:
        return redact_secret(text, getattr(self._client, "api_key", None))

    # -- requests ----------------------------------------------------------------------------------------------

    def _send(self, endpoint: str, body: dict, timeout: float) -> dict:
        resource = self._client.chat.completions if endpoint == "chat.completions" else self._client.completions
        with self._in_flight:
            raw = resource.with_raw_response.create(**body, timeout=timeout)
            text = raw.text
        try:
            data = json.loads(text)
        except ValueError:
            raise MalformedResponseError(
                f"the server's answer to {endpoint} is not valid JSON ({len(text)} bytes; truncated?)") from None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
            raise MalformedResponseError(f"the server's answer to {endpoint} has no choices")
        return data

    def request(self, endpoint: str, body: dict, usable: Callable[[dict], bool] | None = None,
                what: str = "prompt") -> dict:
        """One logical request (`endpoint` "chat.completions" or "completions"): from the cache, else from the
        server with retries, then cached when `usable` accepts it. Raises LLMRequestError when no answer could be
        had, PromptTooLongError when the prompt (`what`, in reasons) cannot fit the context window."""
        return cached_call(self.cache, self.stats, OPENAI_KIND, self.model, endpoint, body,
                           lambda: self._fetch(endpoint, body, what), usable=usable, origin=self.origin)

    def _fetch(self, endpoint: str, body: dict, what: str = "prompt") -> dict:
        """The server's answer to one logical request, with retries, accounted in `stats`."""
        try:
            self.check_fits(sent_of(body), int(body.get("max_tokens") or 0), what)
        except PromptTooLongError:
            self.stats.add(failures=1)
            raise
        started = time.monotonic()
        try:
            data = call_with_retries(
                lambda timeout: self._send(endpoint, body, timeout), self.retry, gate=self._gate,
                on_attempt=lambda: self.stats.add(requests=1), on_retry=self._log_retry, redact=self._redact)
        except LLMRequestError as exc:
            self.stats.add(failures=1, seconds=time.monotonic() - started)
            log.warning("LLM request to %s failed: %s", endpoint, self._redact(str(exc)))
            limit = context_limit_in(exc.reason) if isinstance(exc, LLMRejectedError) and exc.status == 400 else None
            if limit is not None:
                with self._context_lock:
                    self._learned = min(limit, self._learned or limit)
                raise PromptTooLongError(f"the {what} does not fit the model's context window of {limit} tokens "
                                         f"({exc.reason})", limit) from None
            raise
        usage = data.get("usage") or {}
        self.stats.add(calls=1, seconds=time.monotonic() - started, prompt_tokens=token_count(usage, "prompt_tokens"),
                       completion_tokens=token_count(usage, "completion_tokens"))
        return data

    def _log_retry(self, reason: str, delay: float) -> None:
        self.stats.add(retries=1)
        log.warning("LLM request failed (%s); retrying in %.1fs", reason, delay)

    # -- context -----------------------------------------------------------------------------------------------

    def context_window(self) -> int | None:
        """The `context_tokens` setting, else what the server says (asked once), else what it said when it refused
        a prompt as too long; the smallest of them when several are known. None: not known (yet)."""
        with self._context_lock:
            if not self._probed and not self.context_tokens:
                self._probed.append(self._probe_context())
            known = [c for c in (self.context_tokens or (self._probed[0] if self._probed else None), self._learned)
                     if c]
        return min(known) if known else None

    def _root_url(self) -> str:
        root = self.base_url.rstrip("/")
        return root[: -len("/v1")] if root.endswith("/v1") else root

    def _get_json(self, url: str) -> dict | None:
        try:
            data = self._client.get(url, cast_to=object, options={"timeout": min(10.0, self.retry.timeout)})
        except Exception as exc:  # any failure only means "the server did not say"
            log.debug("no answer from %s: %s", normalize_base_url(url), self._redact(str(exc))[:200])
            return None
        return data if isinstance(data, dict) else None

    def _post_json(self, url: str, body: dict) -> dict | None:
        try:
            data = self._client.post(url, cast_to=object, body=body,
                                     options={"timeout": min(10.0, self.retry.timeout)})
        except Exception as exc:
            log.debug("no answer from %s: %s", normalize_base_url(url), self._redact(str(exc))[:200])
            return None
        return data if isinstance(data, dict) else None

    def _probe_context(self) -> int | None:
        """What the server says its context window is: `/v1/models` (vLLM: `max_model_len`), then llama.cpp's
        `/props`. llama-cpp-python's server says it nowhere (its refusals say it, see `_fetch`)."""
        found = context_from_models(self._get_json(f"{self.base_url.rstrip('/')}/models") or {}, self.model)
        if found is None and self.server == "llama_cpp":
            found = context_from_props(self._get_json(f"{self._root_url()}/props") or {})
        if found is not None:
            log.info("the LLM server at %s says its context window is %d tokens", self.origin["base_url"], found)
        return found

    def count_tokens(self, sent: Mapping, limit: int | None = None) -> int:
        """An upper estimate of the prompt tokens of `sent`; when it does not fit `limit`, the server's own count
        where it gives one (llama-cpp-python, vLLM), with room for the chat template."""
        estimate = estimate_tokens(sent)
        if limit is None or estimate <= limit:
            return estimate
        key = sent_prompt_sha256(sent)
        known = self._counts.get(key)  # one read: another thread may clear the counts at any time
        if known is not None:
            return known
        exact = self._count_on_server(sent)
        if exact is None:
            return estimate
        if len(self._counts) > 10_000:
            self._counts.clear()
        self._counts[key] = exact
        return exact

    def _count_on_server(self, sent: Mapping) -> int | None:
        messages = sent.get("messages")
        overhead = MESSAGE_OVERHEAD * (len(messages) + 1) if isinstance(messages, list) else MESSAGE_OVERHEAD
        if self.server == "llama_cpp":
            text = "\n".join(m.get("content") or "" for m in messages) if isinstance(messages, list) else \
                str(sent.get("prompt", ""))
            data = self._post_json(f"{self._root_url()}/extras/tokenize/count", {"model": self.model, "input": text})
        elif self.server == "vllm":
            body = {"model": self.model, **({"messages": messages} if isinstance(messages, list) else
                                           {"prompt": str(sent.get("prompt", ""))})}
            data = self._post_json(f"{self._root_url()}/tokenize", body)
        else:
            return None
        count = (data or {}).get("count")
        return int(count) + overhead if isinstance(count, int) else None

    # -- explainer ---------------------------------------------------------------------------------------------

    def sent_prompt(self, messages: list[dict], assistant_prefix: str) -> dict:
        """The messages as sent: the system message asks for the lead-in, which a chat API cannot prefill."""
        return {"messages": chat_messages_for_api(messages, assistant_prefix)}

    def chat_body(self, messages: list[dict], assistant_prefix: str, max_tokens: int, temperature: float,
                  seed: int) -> dict:
        return {"model": self.model, "messages": chat_messages_for_api(messages, assistant_prefix),
                "max_tokens": int(max_tokens), "temperature": float(temperature), "seed": int(seed)}

    def chat(self, messages, assistant_prefix, max_tokens, temperature, seed) -> Completion:
        completion = self._chat_completion(self.chat_body(messages, assistant_prefix, max_tokens, temperature,
                                                          seed), "explainer prompt")
        return dataclasses.replace(completion, text=continuation_after(completion.text, assistant_prefix))

    def _chat_completion(self, body: dict, what: str) -> Completion:
        """The assistant's text of one chat request, with the token counts the server reported."""
        data = self.request("chat.completions", body, usable=has_content, what=what)
        message = (data["choices"][0] or {}).get("message") or {}
        usage = data.get("usage") or {}
        return Completion(message.get("content") or "", token_count(usage, "prompt_tokens"),
                          token_count(usage, "completion_tokens"))

    # -- simulator, all at once --------------------------------------------------------------------------------

    def echo_body(self, prompt: SimulationPrompt) -> dict:
        return {"model": self.model, "prompt": prompt.text, "max_tokens": 1, "temperature": 0.0, "echo": True,
                "logprobs": self.top_logprobs}

    def _probe_after_one(self, prefix: str) -> dict[str, float]:
        body = {"model": self.model, "prompt": prefix + "1", "max_tokens": 1, "temperature": 0.0,
                "logprobs": self.top_logprobs}
        data = self.request("completions", body, usable=has_top_logprobs, what="simulation prompt")
        try:
            tops = data["choices"][0]["logprobs"]["top_logprobs"]
            return dict(tops[0])
        except (KeyError, IndexError, TypeError):
            raise LogprobsUnavailableError("the server returned no logprobs for a P(\"0\" | \"1\") probe") from None

    def slot_candidates(self, prompt: SimulationPrompt) -> tuple[list[dict], str, str]:
        """Per slot, the value candidates (token → logprob) as the server returned them; the alignment used; and
        how the server writes "10" ("single", "split", "unknown")."""
        data = self.request("completions", self.echo_body(prompt), usable=has_echoed_logprobs,
                            what="simulation prompt of this excerpt")
        candidates, alignment = slot_candidates(data, prompt, self.logprob_alignment)
        return candidates, alignment, ten_layout(data, prompt)

    def simulation_top_value(self) -> int:
        """9 with ten_probe "scale_9", and with "auto" when the server writes "10" as two tokens; else 10."""
        if self.ten_probe == "scale_9" or (self.ten_probe == "auto" and self.server_ten_layout() != "single"):
            return 9
        return VALUES[-1]

    def server_ten_layout(self) -> str:
        """How the server writes "10" ("single", "split", "unknown": see `logprobs.ten_layout`), from one short echo
        asked once per backend (and cached like every answer). Raises LLMRequestError when it cannot be had."""
        with self._ten_lock:
            if self._ten_layout is None:
                body = {"model": self.model, "prompt": TEN_LAYOUT_TEXT, "max_tokens": 1, "temperature": 0.0,
                        "echo": True, "logprobs": 1}
                data = self.request("completions", body, usable=has_echoed_logprobs, what="tokenization probe")
                self._ten_layout = ten_layout(data, SimulationPrompt((TEN_LAYOUT_TEXT,), ()))
                log.info("the LLM server at %s writes \"10\" as %s", self.origin["base_url"],
                         {"single": "one token", "split": '"1" then "0"'}.get(self._ten_layout, "unknown tokens"))
            return self._ten_layout

    def value_probabilities(self, prompt: SimulationPrompt) -> np.ndarray:
        """[slots, 11] probabilities of the values 0..10 at each slot, from the top logprobs (values outside the
        top candidates get 0; `expected_values` renormalizes over the rest). With ten_probe "per_slot", P(10) is
        read with one more request per slot where the server writes "10" as "1" + "0"."""
        try:
            candidates, _, layout = self.slot_candidates(prompt)
            probs = np.stack([values_from_candidates(c) for c in candidates]) if candidates else \
                np.zeros((0, len(VALUES)))
            empty = int((probs.sum(axis=1) <= 0).sum())
            if candidates and empty > self.max_empty_slot_fraction * len(candidates):
                raise NoValueCandidatesError(
                    f"{empty} of {len(candidates)} slots have no value 0-10 among the top {self.top_logprobs} "
                    "candidates")
            if self.ten_probe == "per_slot" and layout != "single" and len(candidates):
                self._split_ten(prompt, probs)
        except ExcerptSimulationError:
            self.stats.add(failures=1)
            raise
        return probs

    def _split_ten(self, prompt: SimulationPrompt, probs: np.ndarray) -> None:
        """Where "10" is "1" then "0": P(10) = P("1")·P("0" | "1"), P(1) = P("1")·P(no digit | "1")."""
        text, offsets = prompt.text, prompt.slot_offsets()
        mass = probs.sum(axis=1)
        todo = [k for k in range(len(offsets))
                if probs[k, 1] > 0 and probs[k, 1] >= self.probe_threshold * mass[k]]
        outcomes = self.map(lambda k: self._probe_after_one(text[: offsets[k]]), todo)
        for outcome in outcomes:
            if not outcome.ok:
                raise outcome.error
            k, after = outcome.item, outcome.value
            digits = values_from_candidates({t: v for t, v in after.items() if len(t.strip()) == 1})
            p_one = probs[k, 1]
            probs[k, 10] += p_one * digits[0]
            probs[k, 1] = p_one * max(0.0, 1.0 - digits[:10].sum())

    # -- JSON-constrained chat ---------------------------------------------------------------------------------

    def json_body(self, messages: list[dict], schema: dict, max_tokens: int, seed: int) -> dict:
        body = {"model": self.model, "messages": messages, "max_tokens": int(max_tokens), "temperature": 0.0,
                "seed": int(seed)}
        fmt = response_format(self.json_mode, schema)
        if fmt is not None:
            body["response_format"] = fmt
        return body

    def chat_json(self, messages: list[dict], schema: dict, max_tokens: int, seed: int) -> Completion:
        """A greedy chat answer, constrained per `json_mode` (to `schema` where the server takes one). Raises
        LLMRequestError when no answer could be had."""
        return self._chat_completion(self.json_body(messages, schema, max_tokens, seed), "JSON simulation prompt")

    def can_pin(self, token: str) -> bool:
        """False for the tokens llama-cpp-python's schema converter cannot pin (see `grammar_safe`)."""
        return self.json_mode != "json_object_schema" or grammar_safe(token)
