"""The OpenAI-compatible backend, its retries, cache and accounting.

Unit tests of the pure parts run anywhere. Tests marked `llm_server` run against a real llama-cpp-python server
(bundled SmolLM2 GGUF) on 127.0.0.1, with a fault-injecting proxy in front of it that also counts requests.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import polars as pl
import pytest

from ndx_pipeline.core.llm.backend import (
    Completion,
    LLMBackend,
    PromptTooLongError,
    RecordableLLMError,
    map_concurrently,
)
from ndx_pipeline.core.llm.cache import LLMCache, LLMStats, cache_key
from ndx_pipeline.core.llm.local import LocalTransformersBackend
from ndx_pipeline.core.llm.openai import OpenAICompatibleBackend, RetryPolicy
from ndx_pipeline.core.llm.openai.backend import continuation_after, grammar_safe
from ndx_pipeline.core.llm.openai.logprobs import (
    LogprobAlignmentError,
    LogprobsUnavailableError,
    detect_logprob_alignment,
    slot_candidates,
    values_from_candidates,
)
from ndx_pipeline.core.llm.openai.transport import (
    LLMGaveUpError,
    LLMRejectedError,
    call_with_retries,
    parse_retry_after,
    redact_secret,
)
from ndx_pipeline.core.llm.sent_prompts import chat_messages_for_api, sent_prompt_sha256
from ndx_pipeline.core.method.explainer import LEAD_IN, explain_layer, explainer_messages, parse_explanation
from ndx_pipeline.core.method.simulator import expected_values, simulate_excerpt, simulation_prompt
from ndx_pipeline.core.method.simulator_json import (
    JSONSimulationError,
    JSONSimulationLengthError,
    JSONSimulationTokenError,
    JSONSimulationValueError,
    json_simulation_messages,
    json_simulation_request,
    parse_json_simulation,
)
from ndx_pipeline.core.models import bundled_gguf
from ndx_pipeline_tests.llm_server import (  # noqa: F401  (fault_proxy, llama_server: fixtures)
    TEST_API_KEY,
    Fault,
    FaultProxy,
    fault_proxy,
    gguf_with_bos,
    llama_server,
    run_llama_server,
)

SECRET_MARK = "SECRET123"  # part of TEST_API_KEY; must never show up in files, keys or logs

# ---------------------------------------------------------------------------------------------------------------
# Unit tests (no server)


def test_parse_retry_after():
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "soon"}) is None
    when = "Wed, 21 Oct 2015 07:28:10 GMT"
    from email.utils import parsedate_to_datetime

    assert parse_retry_after({"retry-after": when}, now=lambda: parsedate_to_datetime(when).timestamp() - 7) == 7


def _status_error(status: int, headers: dict | None = None):
    import httpx2
    import openai

    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/completions")
    response = httpx2.Response(status, headers=headers or {}, request=request)
    cls = {429: openai.RateLimitError, 400: openai.BadRequestError, 401: openai.AuthenticationError}.get(
        status, openai.InternalServerError if status >= 500 else openai.APIStatusError)
    return cls(f"Error code: {status}", response=response, body=None)


class FakeTime:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self):
        return self.now

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s


def test_retries_backoff_retry_after_and_deadline():
    t = FakeTime()
    errors = [_status_error(500), _status_error(503), _status_error(429, {"Retry-After": "7"})]

    def attempt(timeout):
        assert 0 < timeout <= 10
        t.now += 0.1
        if errors:
            raise errors.pop(0)
        return "ok"

    policy = RetryPolicy(max_attempts=5, initial_delay=1, multiplier=2, max_delay=30, timeout=10, deadline=100)
    assert call_with_retries(attempt, policy, sleep=t.sleep, clock=t.clock, rng=lambda: 1.0) == "ok"
    # backoff 1, 2 (equal jitter with rng=1 → the cap); then Retry-After 7 honoured (+10 % jitter at rng=1)
    assert t.sleeps == pytest.approx([1.0, 2.0, 7.7])

    # a 4xx that cannot succeed: one attempt, no wait
    t2, calls = FakeTime(), []

    def bad(timeout):
        calls.append(1)
        raise _status_error(400)

    with pytest.raises(LLMRejectedError) as err:
        call_with_retries(bad, policy, sleep=t2.sleep, clock=t2.clock)
    assert len(calls) == 1 and t2.sleeps == [] and err.value.status == 400

    # a Retry-After past the deadline: give up now instead of waiting
    t3 = FakeTime()

    def limited(timeout):
        raise _status_error(429, {"Retry-After": "500"})

    with pytest.raises(LLMGaveUpError, match="deadline"):
        call_with_retries(limited, policy, sleep=t3.sleep, clock=t3.clock)
    assert t3.sleeps == []

    # attempts run out
    t4 = FakeTime()
    with pytest.raises(LLMGaveUpError, match="after 5 attempts"):
        call_with_retries(lambda timeout: (_ for _ in ()).throw(_status_error(502)), policy, sleep=t4.sleep,
                          clock=t4.clock)

    # per-attempt timeout shrinks to what is left of the deadline
    t5, timeouts = FakeTime(), []

    def slow(timeout):
        timeouts.append(timeout)
        t5.now += timeout
        import httpx2
        import openai

        raise openai.APITimeoutError(httpx2.Request("POST", "http://127.0.0.1:9/"))

    with pytest.raises(LLMGaveUpError):
        call_with_retries(slow, RetryPolicy(max_attempts=10, initial_delay=0.5, timeout=4, deadline=10),
                          sleep=t5.sleep, clock=t5.clock, rng=lambda: 0.0)
    assert timeouts[0] == 4 and sum(timeouts) + sum(t5.sleeps) <= 10 + 1e-9


def test_map_concurrently_limit_order_and_errors():
    running, peak, lock = [0], [0], threading.Lock()

    def work(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        if i == 3:
            raise ValueError("item 3 is bad")
        return i * i

    seen = []
    out = map_concurrently(work, range(12), max_concurrency=3, on_done=lambda o: seen.append(o.index))
    assert peak[0] <= 3 and sorted(seen) == list(range(12))
    assert [o.value for o in out if o.ok] == [i * i for i in range(12) if i != 3]
    assert isinstance(out[3].error, ValueError) and not out[3].ok


def test_cache_key_is_stable_and_secret_free():
    req = {"model": "m", "prompt": "hi", "max_tokens": 1}
    k = cache_key("openai-compatible", "m", "completions", req)
    assert k == cache_key("openai-compatible", "m", "completions", dict(reversed(list(req.items()))))
    assert k != cache_key("openai-compatible", "m2", "completions", req)
    assert k != cache_key("openai-compatible", "m", "chat.completions", req)
    assert k == cache_key("openai-compatible", "m", "completions", {**req, "api_key": TEST_API_KEY})


def _hammer(directory: str, worker: int, n: int) -> None:
    cache = LLMCache(directory, durable=False)
    for i in range(n):
        shared = cache_key("k", "m", "e", {"i": i})
        cache.put(shared, "k", "m", "e", {"i": i}, {"answer": i, "pad": "x" * 5000})
        own = cache_key("k", "m", "e", {"i": i, "w": worker})
        cache.put(own, "k", "m", "e", {"i": i, "w": worker}, {"answer": i, "worker": worker})
        got = cache.get(shared)
        assert got is not None and got["response"]["answer"] == i


def test_cache_concurrent_writers_and_kill9(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = LLMCache(tmp_path)
    assert len(cache) == 40 + 4 * 40
    for i in range(40):
        assert cache.get(cache_key("k", "m", "e", {"i": i}))["response"]["answer"] == i
    # a writer killed with SIGKILL mid-stream leaves whole entries or none, never a broken one
    victim = ctx.Process(target=_hammer, args=(str(tmp_path / "killed"), 9, 100000))
    victim.start()
    time.sleep(1.0)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    killed = LLMCache(tmp_path / "killed")
    entries = list((tmp_path / "killed").glob("??/*.json"))
    assert entries
    for path in entries:
        assert killed.get(path.stem) is not None  # parses and carries its own key
    left = list((tmp_path / "killed").glob("??/.*.tmp"))  # what the killed writer had not yet renamed, if any
    assert killed.sweep_temporary_files(older_than_s=0) == len(left)
    assert not list((tmp_path / "killed").glob("??/.*.tmp"))  # swept, and the whole entries stay
    assert len(list((tmp_path / "killed").glob("??/*.json"))) == len(entries)


def test_stats_snapshot_and_difference():
    s = LLMStats()
    before = s.snapshot()
    s.add(calls=2, requests=3, retries=1, prompt_tokens=10)
    s.add(cache_hits=2)
    d = LLMStats.difference(s.snapshot(), before)
    assert d["requests"] == 3 and d["cache_hits"] == 2 and d["cache_hit_rate"] == 0.5


def test_parse_json_simulation():
    toks = ["a", " b", "\n"]
    good = json.dumps({"activations": [{"token": "a", "activation": 0}, {"token": " b", "activation": 10},
                                       {"token": "\\n", "activation": 2.5}]})
    assert parse_json_simulation(good, toks).tolist() == [0, 10, 2.5]
    assert parse_json_simulation(f"```json\n{good}\n```", toks).tolist() == [0, 10, 2.5]
    with pytest.raises(JSONSimulationLengthError, match="2 activations for 3 tokens"):
        parse_json_simulation(json.dumps({"activations": [{"token": "a", "activation": 0}] * 2}), toks)
    for bad in (11, -1, "5", None, True, float("nan")):
        doc = {"activations": [{"token": t, "activation": 0} for t in toks]}
        doc["activations"][1]["activation"] = bad
        with pytest.raises(JSONSimulationValueError):
            parse_json_simulation(json.dumps(doc), toks)
    with pytest.raises(JSONSimulationTokenError):
        parse_json_simulation(json.dumps({"activations": [{"token": t, "activation": 0}
                                                          for t in ["a", " c", "\n"]]}), toks)
    with pytest.raises(JSONSimulationError, match="not valid JSON"):
        parse_json_simulation('{"activations": [{"token": "a", "activation"', toks)
    with pytest.raises(JSONSimulationError):
        parse_json_simulation('{"values": []}', toks)
    # the prompt shows the target tokens as a JSON list
    msgs = json_simulation_messages("closing brackets", toks)
    assert msgs[-1]["content"].endswith(json.dumps(toks))


class CannedJSON(LLMBackend):
    """Answers every JSON chat with `answer` and records what it was sent; cannot pin the tokens in `unpinnable`."""

    name = "canned"

    def __init__(self, answer: str, unpinnable=()):
        self.answer, self.unpinnable, self.sent, self.stats = answer, set(unpinnable), [], LLMStats()

    def chat(self, messages, assistant_prefix, max_tokens, temperature, seed):
        raise NotImplementedError

    def value_probabilities(self, prompt):
        raise NotImplementedError

    def chat_json(self, messages, schema, max_tokens, seed):
        self.sent.append({"messages": messages, "schema": schema, "max_tokens": max_tokens, "seed": seed})
        return Completion(self.answer, 0, 0)

    def can_pin(self, token):
        return token not in self.unpinnable


def test_json_simulator_through_the_chat_json_seam():
    toks = ["a", "\\", "b"]
    answer = json.dumps({"activations": [{"token": t, "activation": v} for t, v in zip(["a", "x", "b"], [0, 3, 10])]})
    backend = CannedJSON(answer, unpinnable={"\\"})
    assert simulate_excerpt(backend, "dates", toks, mode="json").tolist() == [0, 3, 10]  # unpinned: not checked
    sent = backend.sent[0]
    assert sent["messages"] == json_simulation_messages("dates", toks)
    assert sent["max_tokens"] == 32 + 24 * len(toks) and sent["seed"] == 0
    items = sent["schema"]["properties"]["activations"]["prefixItems"]
    assert [i["properties"]["token"] for i in items] == [{"const": "a"}, {"type": "string"}, {"const": "b"}]
    assert backend.stats.snapshot()["failures"] == 0
    strict = CannedJSON(answer)  # every token pinned, so every token is checked
    with pytest.raises(JSONSimulationTokenError):
        simulate_excerpt(strict, "dates", toks, mode="json")
    assert strict.stats.snapshot()["failures"] == 1

    class NoJSON(CannedJSON):
        chat_json = LLMBackend.chat_json

    with pytest.raises(RecordableLLMError, match="no JSON mode"):
        simulate_excerpt(NoJSON(answer), "dates", toks, mode="json")


def test_json_request_body_per_server():
    """What the JSON simulator sends (and caches by): the same body as before the method/transport split."""
    toks = ["path", "\\", "."]
    for server, mode, kind in (("openai", None, "json_schema"), ("vllm", None, "json_schema"),
                               ("llama_cpp", None, "json_object"), ("openai", "json_object", "json_object"),
                               ("openai", "none", None)):
        backend = OpenAICompatibleBackend("http://127.0.0.1:9/v1", "m", TEST_API_KEY, server=server, json_mode=mode)
        body = _json_body(backend, toks)
        assert list(body)[:5] == ["model", "messages", "max_tokens", "temperature", "seed"]
        assert (body["model"], body["max_tokens"], body["temperature"], body["seed"]) == ("m", 32 + 24 * 3, 0.0, 0)
        assert body["messages"] == json_simulation_messages(SIM_EXPLANATION, toks)
        assert body.get("response_format", {}).get("type") == kind
        pinned = [i["properties"]["token"] for i in
                  body.get("response_format", {}).get("schema", {}).get("properties", {}).get("activations", {})
                  .get("prefixItems", [])]
        if server == "llama_cpp":  # llama.cpp's grammar converter cannot pin a backslash
            assert pinned == [{"const": "path"}, {"type": "string"}, {"const": "."}]
            assert not backend.can_pin("\\") and backend.can_pin("path")
        else:
            assert backend.can_pin("\\")
        backend.close()


class CannedValues(LLMBackend):
    """Answers fixed value probabilities on the scale it asks for (`top`) and records the prompt it was sent."""

    name = "canned-values"

    def __init__(self, top: int, probs):
        self.top, self.probs, self.prompts, self.stats = top, np.asarray(probs, dtype=float), [], LLMStats()

    def chat(self, messages, assistant_prefix, max_tokens, temperature, seed):
        raise NotImplementedError

    def simulation_top_value(self):
        return self.top

    def value_probabilities(self, prompt):
        self.prompts.append(prompt)
        return np.tile(self.probs, (len(prompt.slots), 1))


def test_the_0_to_9_scale_asks_for_9_and_stores_values_on_the_0_to_10_scale():
    """Issue 36: a backend that asks for 0–9 gets a prompt without the value 10 (its worked examples write 10 as 9),
    and the expected value comes back on the 0–10 scale; a stray "10" candidate is not read."""
    probs = [0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0.5, 0.3]
    nine = CannedValues(9, probs)
    assert simulate_excerpt(nine, "dates", ["May", " 4"]).tolist() == pytest.approx([5.0, 5.0])  # 4.5 · 10/9
    text = nine.prompts[0].text
    assert "from 0 (not at all) to 9 (as strongly" in text and "\t10\n" not in text and " and\t9\n" in text
    assert nine.prompts[0].segments[1:] == simulation_prompt("dates", ["May", " 4"]).segments[1:]  # same lines
    ten = CannedValues(10, probs)
    assert simulate_excerpt(ten, "dates", ["May", " 4"]).tolist() == pytest.approx([7.5 / 1.3] * 2)
    assert ten.prompts[0] == simulation_prompt("dates", ["May", " 4"])  # the method's own prompt, unchanged
    assert "\t10\n" in ten.prompts[0].text
    with pytest.raises(ValueError, match="top value"):
        simulation_prompt("dates", ["May"], top=11)
    with pytest.raises(ValueError, match="ten_probe must be one of auto, scale_9, per_slot, never"):
        OpenAICompatibleBackend("http://127.0.0.1:9/v1", "m", server="llama_cpp", ten_probe="always")
    from ndx_pipeline.core.errors import NdxInputError
    from ndx_pipeline.core.llm.registry import LLMSpec, build_backend

    with pytest.raises(NdxInputError, match="ten_probe 'always' is not known"):  # the setting, for any backend
        build_backend(LLMSpec(backend="local", ten_probe="always"))


def test_redact_secret():
    assert redact_secret(f"key {TEST_API_KEY} refused", TEST_API_KEY) == "key [redacted] refused"
    assert redact_secret("abc", "ab") == "abc" and redact_secret("abc", None) == "abc"


def test_lead_in_instruction_and_stripping():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    out = chat_messages_for_api(msgs, LEAD_IN)
    assert LEAD_IN in out[0]["content"] and msgs[0]["content"] == "S"  # the input is not modified
    assert continuation_after(f"{LEAD_IN} dates in March.", LEAD_IN) == " dates in March."
    assert continuation_after(f'"{LEAD_IN.lower()} dates', LEAD_IN) == " dates"
    assert continuation_after("dates in March.", LEAD_IN) == "dates in March."
    assert parse_explanation(continuation_after(f"{LEAD_IN} the word return.", LEAD_IN)) == "the word return"


def _synthetic_echo(prompt, pieces, dists, shift: bool):
    """An echo response for `prompt` tokenized as `pieces`; dists[i] is the true P(piece i | before)."""
    offsets, pos = [], 0
    for p in pieces:
        offsets.append(pos)
        pos += len(p)
    assert "".join(pieces) == prompt.text
    if shift:  # llama-cpp-python without BOS: entry i holds the distribution of token i+1, plus token i itself
        tops = [None] + [{**dists[i + 1], pieces[i]: -20.0} for i in range(1, len(pieces) - 1)] + [{"x": 0.0}]
    else:
        tops = [None] + [dists[i] for i in range(1, len(pieces))]
    return {"choices": [{"text": prompt.text, "logprobs": {"tokens": pieces, "text_offset": offsets,
                                                          "top_logprobs": tops,
                                                          "token_logprobs": [None] * len(pieces)}}]}


def test_slot_reading_under_both_alignments():
    prompt = simulation_prompt("dates", ["May", " 4"])
    head, rest = prompt.segments[0], prompt.segments[1:]
    # tokenize the head into words so that detection has votes: each word predicts itself confidently
    pieces = _words(head) + list(rest)
    dists = [{p: math.log(0.9), "zz": math.log(0.05)} for p in pieces]
    slot_idx = [len(_words(head)) + 1, len(_words(head)) + 3]  # the "unknown\n" piece after each "tok\t"
    dists[slot_idx[0]] = {"0": math.log(0.6), "1": math.log(0.1), "10": math.log(0.1), "unknown\n": math.log(.2)}
    dists[slot_idx[1]] = {"3": math.log(0.5), "unknown\n": math.log(0.5)}
    for shift, name in ((False, "openai"), (True, "llama_cpp")):
        resp = _synthetic_echo(prompt, pieces, dists, shift)
        assert detect_logprob_alignment(resp["choices"][0]["logprobs"]) == name
        for mode in (name, "auto"):
            cands, used = slot_candidates(resp, prompt, mode)
            assert used == name
            probs = np.stack([values_from_candidates(c) for c in cands])
            assert expected_values(probs).tolist() == pytest.approx([1.375, 3.0])  # REFERENCE.md's example
        wrong = "llama_cpp" if name == "openai" else "openai"
        cands, _ = slot_candidates(resp, prompt, wrong)
        assert expected_values(np.stack([values_from_candidates(c) for c in cands])).tolist() != \
            pytest.approx([1.375, 3.0])
    flat = _synthetic_echo(prompt, pieces, [{"q": 0.0}] * len(pieces), False)
    with pytest.raises(LogprobAlignmentError):
        detect_logprob_alignment(flat["choices"][0]["logprobs"])


def _words(text):
    out, cur = [], ""
    for ch in text:
        cur += ch
        if ch in " \n\t":
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Against a real llama-cpp-python server

SIM_EXPLANATION = "the word 'the'"
SIM_TOKENS = ["The", " cat", " sat", " on", " the", " mat", "."]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("llm_cache")


@pytest.fixture(scope="module", autouse=True)
def captured_logs():
    """Every log record of the module at DEBUG (openai, httpx2, ours), for the secret-leak check."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            try:
                records.append(self.format(record))
            except Exception:  # pragma: no cover
                records.append(str(record.msg))

    root = logging.getLogger()
    handler, level = Keep(logging.DEBUG), root.level
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield records
    root.removeHandler(handler)
    root.setLevel(level)


SERVER_CONTEXT = 2048  # the test server's n_ctx (llm_server.run_llama_server)


def _backend(base_url, cache=None, **kw):
    kw.setdefault("retry", RetryPolicy(max_attempts=6, initial_delay=0.05, max_delay=0.5, timeout=120,
                                       deadline=300))
    # known here, so that no test's planned faults are taken by a context probe (tests of the probe pass None)
    kw.setdefault("context_tokens", SERVER_CONTEXT)
    return OpenAICompatibleBackend(base_url, "smollm2-135m-instruct-q4_1", TEST_API_KEY, cache=cache,
                                   server="llama_cpp", **kw)


@pytest.fixture(scope="module")
def echo_run(llama_server, cache_root, captured_logs):
    """The all-at-once simulator run once on the real server through a counting proxy, with a cache."""
    proxy = FaultProxy(llama_server.port)
    try:
        backend = _backend(proxy.base_url, cache_root / "sim", ten_probe="per_slot")  # the exact 0–10 read
        prompt = simulation_prompt(SIM_EXPLANATION, SIM_TOKENS)
        started = time.perf_counter()
        candidates, alignment, layout = backend.slot_candidates(prompt)
        echo_s = time.perf_counter() - started
        probs = backend.value_probabilities(prompt)  # the echo again (from the cache) plus the "10" probes
        total_s = time.perf_counter() - started
        entry = backend.cache.get(cache_key("openai-compatible", backend.model, "completions",
                                            backend.echo_body(prompt), backend.origin))
        yield {"prompt": prompt, "candidates": candidates, "alignment": alignment, "layout": layout,
               "probs": probs, "requests": proxy.total(), "stats": backend.stats.snapshot(),
               "response": entry["response"], "echo_s": echo_s, "total_s": total_s, "base_url": proxy.base_url}
        backend.close()
    finally:
        proxy.close()


@pytest.mark.llm_server
def test_explainer_chat(fault_proxy, cache_root):
    backend = _backend(fault_proxy.base_url, cache_root / "explain")
    excerpts = [(["We", " met", " in", " May", " and", " June"], [0, 0, 0, 9, 0, 7]),
                (["Due", " by", " April", " 3"], [0, 0, 8, 0])]
    messages = explainer_messages(excerpts)
    completion = backend.chat(messages, LEAD_IN, 60, 1.0, seed=7)
    assert fault_proxy.requests["/v1/chat/completions"] == 1
    assert not completion.text.strip().lower().startswith(LEAD_IN.lower())
    explanation = parse_explanation(completion.text)
    assert explanation and completion.prompt_tokens > 100 and completion.completion_tokens > 0
    entry = next((cache_root / "explain").glob("??/*.json"))
    stored = json.loads(entry.read_text())
    assert LEAD_IN in stored["request"]["messages"][0]["content"]  # the lead-in instruction was sent
    assert stored["request"]["seed"] == 7 and stored["request"]["temperature"] == 1.0
    # what rows hash (issue 16 item 7) is what the server got: the rewritten messages, no prefill
    assert sent_prompt_sha256(backend.sent_prompt(messages, LEAD_IN)) == \
        sent_prompt_sha256({"messages": stored["request"]["messages"]})
    print(f"\nexplainer: {explanation!r}, {completion.prompt_tokens}+{completion.completion_tokens} tokens")


@pytest.mark.llm_server
def test_all_at_once_alignment_matches_in_process_model(echo_run):
    """The server's echoed logprobs, read with the detected alignment, give the same value distributions as
    the in-process transformers model on the same prompt; read with the other alignment they give none."""
    assert echo_run["alignment"] == "llama_cpp"  # SmolLM2 has no BOS: llama-cpp-python echoes one entry later
    assert echo_run["layout"] == "split"  # SmolLM2 writes 10 as "1" "0"
    lp = echo_run["response"]["choices"][0]["logprobs"]
    tokens, tops = lp["tokens"], lp["top_logprobs"]
    same = sum(max(t, key=t.get) == tokens[i] for i, t in enumerate(tops[:-1]) if t)
    nxt = sum(max(t, key=t.get) == tokens[i + 1] for i, t in enumerate(tops[:-1]) if t)
    print(f"\nalignment votes: predicts own token {same}, predicts next token {nxt}; echo {echo_run['echo_s']:.1f}s,"
          f" with probes {echo_run['total_s']:.1f}s, {echo_run['requests']} requests")
    assert nxt > 5 * max(same, 1)

    server = echo_run["probs"]
    local = LocalTransformersBackend(dtype="float32").value_probabilities(echo_run["prompt"])
    assert server.shape == local.shape == (len(SIM_TOKENS), 11)
    present = server > 0
    assert present[:, :3].all() and (server[:, 10] > 0).all()  # 0, 1, 2 and (via the probe) 10 everywhere
    rel = np.abs(server[present] - local[present]) / local[present]
    print("server P(v):\n", np.round(server, 3), "\nlocal P(v):\n", np.round(local, 3))
    corr = np.corrcoef(server[present], local[present])[0, 1]
    ev_server, ev_local = expected_values(server), expected_values(local)
    print(f"P(v) server vs in-process: r = {corr:.4f}, median relative difference {np.median(rel):.3f}; expected "
          f"values server {np.round(ev_server, 2).tolist()} vs in-process {np.round(ev_local, 2).tolist()}")
    assert corr > 0.95
    assert np.median(rel) < 0.35  # Q4_1 weights in llama.cpp vs their float32 de-quantization in torch
    # expected values agree where the server's top candidates cover most of the local value mass
    assert np.abs(ev_server - ev_local).max() < 1.0

    # the same response read with the other alignment: the slot entries predict what follows "unknown"
    cands, _ = slot_candidates(echo_run["response"], echo_run["prompt"], "openai")
    wrong = np.stack([values_from_candidates(c) for c in cands])
    print("read as 'openai':\n", np.round(wrong, 3))
    assert (wrong.sum(axis=1) < 0.25 * server.sum(axis=1)).all()


@pytest.mark.llm_server
def test_auto_alignment_follows_the_served_model(llama_server, tmp_path):
    """llama-cpp-python's echo alignment depends on the model: with a BOS token (same weights, metadata flipped)
    it is OpenAI's; "auto" follows, where a fixed "llama_cpp" would read the wrong positions."""
    model = gguf_with_bos(bundled_gguf(), tmp_path / "smollm2-bos.gguf")
    prompt = simulation_prompt(SIM_EXPLANATION, ["The", " cat", " sat"])
    with run_llama_server(tmp_path / "logs", model_path=str(model)) as server:
        backend = _backend(server.base_url, None)
        started = time.perf_counter()
        data = backend.request("completions", backend.echo_body(prompt))
        seconds = time.perf_counter() - started
    cands, used = slot_candidates(data, prompt, "auto")
    assert used == "openai"
    right = np.stack([values_from_candidates(c) for c in cands])
    wrong = np.stack([values_from_candidates(c) for c in slot_candidates(data, prompt, "llama_cpp")[0]])
    assert (right[:, :3] > 0).all() and (wrong.sum(axis=1) < 0.25 * right.sum(axis=1)).all()
    print(f"\nwith BOS: detected {used!r}; echo {seconds:.1f}s")


@pytest.mark.llm_server
def test_cache_rerun_makes_zero_requests(echo_run, cache_root):
    # the same endpoint (the cache key names it), with the network cut: nothing may get past the cache
    backend = _backend(echo_run["base_url"], cache_root / "sim", ten_probe="per_slot")
    backend._send = lambda *args, **kwargs: pytest.fail("a cached request reached the network")
    again = backend.value_probabilities(echo_run["prompt"])
    np.testing.assert_array_equal(again, echo_run["probs"])
    stats = backend.stats.snapshot()
    assert stats["calls"] == stats["requests"] == 0 and stats["cache_hits"] >= 1
    assert stats["cache_hit_rate"] == 1.0
    print(f"\nfirst run: {echo_run['requests']} requests; rerun: 0 requests, {stats['cache_hits']} cache hits")


# Issue 36: what one simulated excerpt costs where the server writes "10" as "1" then "0" (SmolLM2 does), counted
# from the server's own log. Two excerpts (prose, code): each costs an echo per mode, ~9 s here; two already tell
# "one request per excerpt plus one probe" (3) from "two per excerpt" (4).
SPLIT_EXCERPTS = (SIM_TOKENS, ["if", " x", ":", "\n", "   ", " return", " None"])
# |Δ expected value| (0–10 scale) on SPLIT_EXCERPTS, (max, mean) bounds; measured 2026-12-07 (README, issue 36) on
# these and a third excerpt: the server against the in-process float32 model on the same prompt (the Q4_1 weights,
# 100 candidates per position): per_slot max 0.31, mean 0.08; auto (0–9) max 0.39, mean 0.09. The server's 0–9
# answers against the in-process 0–10 ones: max 1.14, mean 0.67 (the scale's part). On these two alone: per_slot
# 0.31, 0.09; auto 0.39, 0.10; 0–9 against 0–10 1.14, 0.69.
SAME_PROMPT_BOUND = (0.6, 0.2)
SCALE_9_BOUND = (1.6, 1.0)


def _deviation(values, reference):
    d = np.concatenate([np.abs(v - r) for v, r in zip(values, reference)])
    return float(d.max()), float(d.mean())


@pytest.mark.llm_server
def test_one_request_per_excerpt_where_the_server_splits_ten(llama_server, tmp_path):
    """ten_probe "auto" asks the server once how it writes "10" and then one request per excerpt on the 0–9 scale,
    sending no more prompt tokens than the 0–10 prompt's own; "per_slot" reads P("0" | "1") exactly at a request
    per slot. Each reads what the in-process float32 model answers to the same prompt; the 0–9 answers move by
    the stated amount against the 0–10 ones. A rerun from the cache sends nothing."""
    local = LocalTransformersBackend(dtype="float32")
    ten = [expected_values(local.value_probabilities_unbatched(simulation_prompt(SIM_EXPLANATION, tokens)))
           for tokens in SPLIT_EXCERPTS]
    nine = [expected_values(local.value_probabilities_unbatched(simulation_prompt(SIM_EXPLANATION, tokens, 9))[:, :10])
            * 10 / 9 for tokens in SPLIT_EXCERPTS]
    own = sum(local.count_tokens({"prompt": simulation_prompt(SIM_EXPLANATION, t).text}) for t in SPLIT_EXCERPTS)
    found = {}
    for mode in ("auto", "per_slot"):
        backend = _backend(llama_server.base_url, tmp_path / mode, ten_probe=mode)
        before = llama_server.logged_requests()
        values = [simulate_excerpt(backend, SIM_EXPLANATION, tokens) for tokens in SPLIT_EXCERPTS]
        logged = llama_server.logged_requests() - before
        stats = backend.stats.snapshot()
        assert sum(logged.values()) == logged["POST /v1/completions 200"] == stats["requests"], logged
        found[mode] = (stats["requests"], stats["prompt_tokens"], values, backend.simulation_top_value())
        print(f"\n{mode}: {stats['requests']} requests, {stats['prompt_tokens']} prompt tokens for "
              f"{len(SPLIT_EXCERPTS)} excerpts ({own} tokens in their 0–10 prompts); |Δ expected value| (max, mean) "
              f"against in-process float32 0–10: {_deviation(values, ten)}, 0–9: {_deviation(values, nine)}")
        backend.close()
    requests, tokens, values, top = found["auto"]
    assert top == 9 and requests == 1 + len(SPLIT_EXCERPTS) <= 2 * len(SPLIT_EXCERPTS)
    assert tokens <= 2 * own
    probes, probe_tokens, exact, exact_top = found["per_slot"]
    assert exact_top == 10 and probes > 3 * len(SPLIT_EXCERPTS) and probe_tokens > 3 * own  # its cost
    for served, reference in ((values, nine), (exact, ten)):
        assert all(a < b for a, b in zip(_deviation(served, reference), SAME_PROMPT_BOUND))
    assert all(a < b for a, b in zip(_deviation(values, ten), SCALE_9_BOUND))  # the price of one request
    assert all(a < b for a, b in zip(_deviation(nine, ten), SCALE_9_BOUND))  # (the scale's own part, in process)

    # a rerun on the same cache: the tokenization probe and every echo answered by it, nothing sent
    again = _backend(llama_server.base_url, tmp_path / "auto")
    before = llama_server.logged_requests()
    for tokens in SPLIT_EXCERPTS:
        simulate_excerpt(again, SIM_EXPLANATION, tokens)
    assert llama_server.logged_requests() == before and again.stats.snapshot()["requests"] == 0


@pytest.mark.llm_server
def test_llama_cpp_python_refuses_a_list_of_prompts(llama_server):
    """Why the per-slot probes cannot be one request there: llama-cpp-python's /v1/completions takes one prompt
    (a list of two fails with HTTP 500; vLLM and OpenAI take lists)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", llama_server.port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": ["The cat", "A dog"], "max_tokens": 1}),
                     headers={"Authorization": f"Bearer {TEST_API_KEY}", "Content-Type": "application/json"})
        status = conn.getresponse().status
    finally:
        conn.close()
    assert status == 500 and llama_server.logged_requests()["POST /v1/completions 500"] >= 1


@pytest.mark.llm_server
@pytest.mark.slow
def test_the_server_requests_benchmark_runs_small():
    """benchmarks/server_requests.py on two short excerpts (its own server): the last line is the JSON the issue
    asks for, the requests counted from the server's log."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "server_requests.py"
    done = subprocess.run([sys.executable, str(script), "--excerpts", "2", "--tokens", "8"], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    print("\n" + done.stdout)
    assert found["requests_logged"] == found["requests_counted_by_backend"] == 3  # the probe, then one per excerpt
    assert found["requests_per_excerpt"] == 1.5 and found["scale"] == "0-9"
    assert 0 < found["prompt_tokens_per_excerpt"] and found["prompt_tokens_ratio"] <= 2
    assert found["excerpts_per_s"] > 0 and 0 < found["max_abs_dev"] < SCALE_9_BOUND[0] + SAME_PROMPT_BOUND[0]
    assert 0 <= found["in_process_scale_max_abs_dev"] < SCALE_9_BOUND[0]


def _json_body(backend, tokens):
    return backend.json_body(**json_simulation_request(backend, SIM_EXPLANATION, tokens))


@pytest.mark.llm_server
def test_json_simulator(fault_proxy, cache_root):
    backend = _backend(fault_proxy.base_url, cache_root / "json")
    tokens = ["The", " cat", " sat", "."]
    started = time.perf_counter()
    values = simulate_excerpt(backend, SIM_EXPLANATION, tokens, mode="json")
    seconds = time.perf_counter() - started
    assert values.shape == (4,) and ((values >= 0) & (values <= 10)).all()
    assert fault_proxy.forwarded["/v1/chat/completions"] == 1
    real = backend.cache.get(cache_key("openai-compatible", backend.model, "chat.completions",
                                       _json_body(backend, tokens), backend.origin))["response"]
    print(f"\njson simulator: {values.tolist()} in {seconds:.1f}s")

    # malformed answers (served by the proxy from the real one, edited): each raises its own error
    def answer(content):
        doc = json.loads(json.dumps(real))
        doc["choices"][0]["message"]["content"] = content
        return Fault.respond(doc)

    entries = json.loads(real["choices"][0]["message"]["content"])["activations"]
    bad_value = [dict(e) for e in entries]
    bad_value[2]["activation"] = 12
    fault_proxy.plan(answer(json.dumps({"activations": entries[:3]})), answer(json.dumps({"activations": bad_value})),
                     answer("The neuron fires on 'the'."))
    uncached = _backend(fault_proxy.base_url, None)
    with pytest.raises(JSONSimulationLengthError):
        simulate_excerpt(uncached, SIM_EXPLANATION, tokens, mode="json")
    with pytest.raises(JSONSimulationValueError):
        simulate_excerpt(uncached, SIM_EXPLANATION, tokens, mode="json")
    with pytest.raises(JSONSimulationError):
        simulate_excerpt(uncached, SIM_EXPLANATION, tokens, mode="json")
    assert uncached.stats.snapshot()["failures"] == 3



@pytest.mark.llm_server
def test_json_simulator_survives_tokens_the_grammar_converter_cannot_escape(fault_proxy, llama_server):
    """llama-cpp-python turns the JSON schema into a grammar without escaping backslashes; a token pinned as a
    constant whose JSON holds one (here a lone backslash, a quote, a newline, non-ASCII) made a grammar that failed
    to parse and aborted the whole server (CI, 2026-11-22). Such tokens are left unpinned; the server lives."""
    backend = _backend(fault_proxy.base_url, None)
    tokens = ["path", "\\", "\"", "\n", " café", "."]
    assert not any(grammar_safe(t) for t in tokens[1:5]) and grammar_safe("path")
    values = simulate_excerpt(backend, SIM_EXPLANATION, tokens, mode="json")
    assert values.shape == (len(tokens),) and ((values >= 0) & (values <= 10)).all()
    assert llama_server.process.poll() is None, llama_server.log_path.read_text()[-2000:]
    pinned = _json_body(backend, tokens)["response_format"]["schema"]
    items = pinned["properties"]["activations"]["prefixItems"]
    assert items[0]["properties"]["token"] == {"const": "path"}
    assert items[1]["properties"]["token"] == {"type": "string"}


CHEAP = {"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0.0}


@pytest.mark.llm_server
def test_faults_are_retried_or_reported(fault_proxy):
    policy = RetryPolicy(max_attempts=8, initial_delay=0.05, max_delay=0.4, timeout=1.5, deadline=20)
    backend = _backend(fault_proxy.base_url, None, retry=policy)
    body = {"model": backend.model, **CHEAP}
    reasons, log_retry = [], backend._log_retry
    backend._log_retry = lambda reason, delay: (reasons.append(reason), log_retry(reason, delay))

    # every transient fault once, then the real answer
    fault_proxy.plan(Fault.rate_limited(1), Fault.server_error(500), Fault.stall(3), Fault.truncate(),
                     Fault.cut(), Fault.server_error(503))
    started = time.perf_counter()
    data = backend.request("completions", body)
    elapsed = time.perf_counter() - started
    assert data["choices"][0]["text"] is not None
    assert fault_proxy.total() == 7 and fault_proxy.forwarded["/v1/completions"] == 3  # truncate, cut, final
    assert elapsed >= 1.0 + 1.5  # Retry-After honoured, stall cut at the timeout
    stats = backend.stats.snapshot()
    assert stats["requests"] == 7 and stats["retries"] == 6 and stats["calls"] == 1 and stats["failures"] == 0
    expected = ["HTTP 429", "HTTP 500", "timed out", "not valid JSON", "connection error", "HTTP 503"]
    assert len(reasons) == 6 and all(e in r for e, r in zip(expected, reasons)), reasons
    print(f"\nsix faults then success: {fault_proxy.total()} requests, {elapsed:.1f}s; retried for: {reasons}")

    # a 4xx that cannot succeed: no retry
    fault_proxy.reset_counts()
    fault_proxy.plan(Fault.client_error(400))
    with pytest.raises(LLMRejectedError, match="400"):
        backend.request("completions", body)
    assert fault_proxy.total() == 1

    # a wrong key: the real server says 401, not retried, and the message carries no key
    wrong = OpenAICompatibleBackend(fault_proxy.base_url, backend.model, "sk-test-WRONG456", retry=policy,
                                    context_tokens=SERVER_CONTEXT)
    fault_proxy.reset_counts()
    with pytest.raises(LLMRejectedError) as err:
        wrong.request("completions", body)
    assert err.value.status == 401 and "WRONG456" not in str(err.value) and fault_proxy.total() == 1

    # persistent 5xx: gives up after max_attempts
    fault_proxy.reset_counts()
    fault_proxy.plan(*[Fault.server_error(502)] * 8)
    with pytest.raises(LLMGaveUpError, match="after 8 attempts"):
        backend.request("completions", body)
    assert fault_proxy.total() == 8

    # Retry-After beyond the deadline: fails at once instead of sleeping
    fault_proxy.reset_counts()
    fault_proxy.plan(Fault.rate_limited(120))
    started = time.perf_counter()
    with pytest.raises(LLMGaveUpError, match="deadline"):
        backend.request("completions", body)
    assert time.perf_counter() - started < 5 and fault_proxy.total() == 1
    # …and the pause it asked for holds for every later request of this backend (a shared rate gate)
    with pytest.raises(LLMGaveUpError, match="asked to wait"):
        backend.request("completions", body)
    assert fault_proxy.total() == 1

    # a batch: one item fails for good, the others complete, the failure is recorded per item
    fault_proxy.reset_counts()
    fault_proxy.plan(*[Fault.server_error(500)] * 8)
    prompts = ["One, two,", "Red, green,", "Monday, Tuesday,"]
    backend = _backend(fault_proxy.base_url, None, retry=policy)
    before = backend.stats.snapshot()
    outcomes = map_concurrently(
        lambda p: backend.request("completions", {"model": backend.model, **CHEAP, "prompt": p}), prompts, 1)
    assert [o.ok for o in outcomes] == [False, True, True]
    assert isinstance(outcomes[0].error, LLMGaveUpError)
    assert LLMStats.difference(backend.stats.snapshot(), before)["failures"] == 1


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from ndx_pipeline.core.llm.openai import OpenAICompatibleBackend
    from ndx_pipeline.core.method.explainer import LEAD_IN, explainer_messages
    base_url, cache, key = sys.argv[1], sys.argv[2], sys.argv[3]
    backend = OpenAICompatibleBackend(base_url, "smollm2-135m-instruct-q4_1", key, cache=cache, server="llama_cpp")
    for neuron in range(int(sys.argv[4])):
        words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
        msgs = explainer_messages([(["We", " saw", " " + words[neuron]], [0, 0, 9])])
        backend.chat(msgs, LEAD_IN, 12, 1.0, seed=neuron)
        print("done", neuron, flush=True)
""")


def _neuron_messages(neuron):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    return explainer_messages([(["We", " saw", " " + words[neuron]], [0, 0, 9])])


@pytest.mark.llm_server
def test_kill9_midway_then_rerun_calls_only_for_the_rest(fault_proxy, cache_root):
    cache = cache_root / "kill9"
    n = 6
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, fault_proxy.base_url, str(cache), TEST_API_KEY,
                             str(n)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = []
    try:
        for line in proc.stdout:
            if line.startswith("done"):
                done.append(int(line.split()[1]))
            if len(done) == 3:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(30)
    assert len(done) == 3
    before_rerun = fault_proxy.requests["/v1/chat/completions"]
    backend = _backend(fault_proxy.base_url, cache)
    outcomes = backend.map(lambda i: backend.chat(_neuron_messages(i), LEAD_IN, 12, 1.0, seed=i), range(n))
    assert all(o.ok for o in outcomes)
    stats = backend.stats.snapshot()
    rerun_requests = fault_proxy.requests["/v1/chat/completions"] - before_rerun
    assert stats["cache_hits"] >= 3 and rerun_requests == n - stats["cache_hits"] <= 3
    # and once more: everything from the cache
    again = _backend(fault_proxy.base_url, cache)
    before = fault_proxy.total()
    again.map(lambda i: again.chat(_neuron_messages(i), LEAD_IN, 12, 1.0, seed=i), range(n))
    assert fault_proxy.total() == before and again.stats.snapshot()["cache_hit_rate"] == 1.0
    print(f"\nkilled after {len(done)} of {n}; rerun made {rerun_requests} requests, "
          f"{stats['cache_hits']} cache hits; third run 0 requests")


# ---------------------------------------------------------------------------------------------------------------
# Issue 16: the defects an outside review found, on the real server (unit versions in test_llm_defects.py)


@pytest.mark.llm_server
def test_answer_without_logprobs_is_not_cached_and_each_server_has_its_own_entries(fault_proxy, llama_server,
                                                                                    cache_root):
    """One echo reaches the server (~9 s there); the proxy serves the answers the test only needs to be sent: an
    HTTP 200 without logprobs, and the server's own answer again at another address."""
    cache = cache_root / "poison"
    prompt = simulation_prompt(SIM_EXPLANATION, ["The", " cat"])
    backend = _backend(fault_proxy.base_url, cache)

    # an HTTP 200 without the logprobs the simulator reads (a server that ignores `logprobs`)
    fault_proxy.plan(Fault.respond({"id": "cmpl-0", "object": "text_completion", "created": 0, "model": backend.model,
                                    "choices": [{"text": prompt.text, "index": 0, "logprobs": None,
                                                 "finish_reason": "length"}],
                                    "usage": {"prompt_tokens": 60, "completion_tokens": 1, "total_tokens": 61}}))
    with pytest.raises(LogprobsUnavailableError):
        backend.value_probabilities(prompt)
    assert len(LLMCache(cache)) == 0 and fault_proxy.requests["/v1/completions"] == 1
    probs = backend.value_probabilities(prompt)  # asked again, not failed from the cache
    assert probs.shape == (2, 11) and probs[:, 0].min() > 0
    assert fault_proxy.forwarded["/v1/completions"] == 1 and len(LLMCache(cache)) == 1
    served = backend.cache.get(cache_key("openai-compatible", backend.model, "completions", backend.echo_body(prompt),
                                         backend.origin))["response"]
    # the same model name at another address is another endpoint: nothing of the first one's answers (the proxy
    # there gives the server's answer again, so the request has to leave the cache to be answered)
    other = FaultProxy(llama_server.port)
    try:
        other.plan(Fault.respond(served))
        again = _backend(other.base_url, cache)
        np.testing.assert_array_equal(again.value_probabilities(prompt), probs)
        assert other.requests["/v1/completions"] == 1 and again.stats.snapshot()["cache_hits"] == 0
        assert len(LLMCache(cache)) == 2  # each endpoint its own entry
    finally:
        other.close()


@pytest.mark.llm_server
def test_non_finite_number_in_an_answer_fails_that_neuron_only(fault_proxy, cache_root):
    backend = _backend(fault_proxy.base_url, cache_root / "nan", max_concurrency=1)

    def poison(doc):
        doc["usage"]["prompt_tokens"] = float("nan")  # the proxy writes it as the bare JSON literal NaN
        return doc

    fault_proxy.plan(Fault.rewriting(poison))
    excerpts = pl.DataFrame([{"layer": 0, "neuron": n, "excerpt_id": f"0/{n}/top/0", "split": "explain", "rank": 0,
                              "tokens": ["We", " met", " in", word], "activations": [0.0, 0.0, 0.0, 5.0]}
                             for n, word in ((1, " May"), (2, " June"))])
    rows = explain_layer(excerpts, backend, max_tokens=12)
    assert rows["status"].to_list() == ["failed", "ok"], rows["error"].to_list()
    assert "NaN" in rows["error"][0] and rows["explanation"][1]
    assert len(LLMCache(cache_root / "nan")) == 1


@pytest.fixture(scope="module")
def default_excerpts():
    """Layer 0, neuron 5 of the bundled model with the default excerpt settings: one neuron of the run of issue 16
    item 9, whose explainer prompts (~2.2k tokens) did not fit a 2048-token llama.cpp server."""
    from ndx_pipeline.core import stages

    records = stages.activation_records(stages.corpus(), None, [0], neurons=[5], token_table=False)
    return stages.top_excerpts(records.layers[0].records)


@pytest.mark.llm_server
def test_explainer_prompt_is_fitted_to_a_2048_token_server(fault_proxy, default_excerpts, cache_root):
    """The backend knows nothing of the context (llama-cpp-python says it nowhere but in a refusal): the first
    prompt is refused, the context is read from the refusal, and the explanation succeeds on a fitted prompt whose
    row says what was left out and hashes what was sent. (One neuron: each answered prompt of ~2k tokens costs
    ~12 s here.)"""
    cache = cache_root / "fit"
    backend = _backend(fault_proxy.base_url, cache, context_tokens=None, max_concurrency=1)
    started = time.perf_counter()
    rows = explain_layer(default_excerpts, backend)
    seconds = time.perf_counter() - started
    for row in rows.iter_rows(named=True):
        print(f"\nneuron {row['neuron']}: {row['status']} {row['explanation'] or row['error']!r}; "
              f"{row['excerpts_shown']} excerpts shown; {row['prompt_fitted']}; {row['prompt_tokens']} prompt tokens")
    assert rows["status"].to_list() == ["ok"], rows["error"].to_list()
    assert backend.context_window() == SERVER_CONTEXT
    assert all(1 <= n < 5 for n in rows["excerpts_shown"]) and all("left out" in f for f in rows["prompt_fitted"])
    assert all(t + 60 <= SERVER_CONTEXT for t in rows["prompt_tokens"])
    assert fault_proxy.requests["/v1/chat/completions"] == 2  # one refused, then the fitted one answered
    sent = {sent_prompt_sha256({"messages": json.loads(p.read_text())["request"]["messages"]})
            for p in cache.glob("??/*.json")}
    assert set(rows["prompt_sha256"]) == sent
    print(f"explained in {seconds:.1f}s; requests: {dict(fault_proxy.requests)}")

    # a fresh backend given the context: fitted up front to the same prompts, every answer from the cache
    fault_proxy.reset_counts()
    again = explain_layer(default_excerpts, _backend(fault_proxy.base_url, cache, context_tokens=SERVER_CONTEXT))
    assert again["prompt_sha256"].to_list() == rows["prompt_sha256"].to_list()
    assert again["explanation"].to_list() == rows["explanation"].to_list()
    assert fault_proxy.requests["/v1/chat/completions"] == 0


@pytest.mark.llm_server
def test_simulation_prompt_too_long_fails_that_excerpt_with_a_reason(fault_proxy):
    backend = _backend(fault_proxy.base_url, None, context_tokens=None)
    tokens = [" cat"] * 1500
    with pytest.raises(PromptTooLongError, match="simulation prompt of this excerpt does not fit .* 2048 tokens"):
        simulate_excerpt(backend, SIM_EXPLANATION, tokens)
    sent = fault_proxy.forwarded["/v1/completions"]
    with pytest.raises(PromptTooLongError, match="2048 tokens"):  # now known: not sent at all
        simulate_excerpt(backend, SIM_EXPLANATION, tokens)
    assert fault_proxy.forwarded["/v1/completions"] == sent
    assert simulate_excerpt(backend, SIM_EXPLANATION, ["The", " cat"]).shape == (2,)  # short ones still go


@pytest.mark.llm_server
def test_api_key_never_leaks(fault_proxy, cache_root, captured_logs, capsys):
    """Last on purpose: checks every cache file, key, and log line this module produced."""
    backend = _backend(fault_proxy.base_url, cache_root / "leak")
    backend.request("completions", {"model": backend.model, **CHEAP})
    fault_proxy.plan(Fault.server_error(500), Fault.client_error(403))
    with pytest.raises(LLMRejectedError) as err:
        backend.request("completions", {"model": backend.model, **CHEAP, "prompt": "Paris is in"})
    # the key was used (only) as the bearer token
    assert fault_proxy.auth_headers and all(h == f"Bearer {TEST_API_KEY}" for h in fault_proxy.auth_headers)
    assert SECRET_MARK not in str(err.value) and SECRET_MARK not in repr(backend) and SECRET_MARK not in backend.name
    # a server that echoes the key in an error body: the reason is redacted
    fault_proxy.plan(Fault.respond({"error": {"message": f"key {TEST_API_KEY} is not allowed"}}, status=403))
    with pytest.raises(LLMRejectedError) as err:
        backend.request("completions", {"model": backend.model, **CHEAP, "prompt": "Rome is in"})
    assert SECRET_MARK not in str(err.value) and "[redacted]" in str(err.value)
    # …also when the message is long enough to be cut inside the key (issue 16 item 3: 15 of 17 characters)
    # ("Error code: 403 - " and 165 x: the old cut at 200 characters kept "sk-test-SECRET1")
    fault_proxy.plan(Fault.respond({"error": {"message": "x" * 165 + f" {TEST_API_KEY} is not allowed"}}, status=403))
    with pytest.raises(LLMRejectedError) as err:
        backend.request("completions", {"model": backend.model, **CHEAP, "prompt": "Oslo is in"})
    assert not [TEST_API_KEY[i:i + 6] for i in range(len(TEST_API_KEY) - 5) if TEST_API_KEY[i:i + 6] in str(err.value)]
    files = [p for p in cache_root.rglob("*") if p.is_file()]
    assert len(files) >= 5
    for path in files:
        assert SECRET_MARK not in path.name and SECRET_MARK not in path.read_text(errors="replace"), path
    assert captured_logs, "no log records were captured"
    assert not [r for r in captured_logs if SECRET_MARK in r]
    out = capsys.readouterr()
    assert SECRET_MARK not in out.out + out.err


def test_an_error_the_retry_loop_does_not_know_leaves_it_redacted():
    """Exceptions call_with_retries does not classify propagated unredacted: a key in their message reached the
    run's failure text."""
    secret = "sk-test-SECRET123"

    def attempt(timeout):
        raise ValueError(f"could not build the request headers: Authorization: Bearer {secret}")

    def plain(timeout):
        raise KeyError("no such field")

    class Unmakeable(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a} {b}")

    def exotic(timeout):
        raise Unmakeable("token", secret)

    redact = lambda text: redact_secret(text, secret)  # noqa: E731
    with pytest.raises(ValueError) as err:
        call_with_retries(attempt, RetryPolicy(), redact=redact)
    assert secret not in str(err.value) and "SECRET" not in str(err.value) and "Bearer" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    with pytest.raises(KeyError, match="no such field"):  # nothing to redact: the exception as it was
        call_with_retries(plain, RetryPolicy(), redact=redact)
    with pytest.raises(RuntimeError, match="^Unmakeable: token") as err:
        call_with_retries(exotic, RetryPolicy(), redact=redact)
    assert "SECRET" not in str(err.value)
