"""Regression tests for the LLM defects of issue 16 (items 3–9), without a server: the OpenAI-compatible backend
is driven through its one network seam (`_send`, replaced by a scripted server), the in-process backend through
its tokenizer. Each test failed on the code before the fix it pins; the real-server counterparts are in
test_openai_backend.py (marked llm_server).
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import polars as pl
import pytest

from ndx_pipeline.core.contract import EXPLANATION_SCHEMA
from ndx_pipeline.core.llm.backend import Completion, LLMBackend, RecordableLLMError
from ndx_pipeline.core.llm.cache import LLMCache, LLMStats
from ndx_pipeline.core.llm.openai import OpenAICompatibleBackend, RetryPolicy
from ndx_pipeline.core.llm.openai.backend import TEN_LAYOUT_TEXT
from ndx_pipeline.core.llm.openai.transport import LLMRejectedError, call_with_retries, redact_secret
from ndx_pipeline.core.method.explainer import LEAD_IN, explain_layer, explainer_messages
from ndx_pipeline.core.method.simulator import simulate_excerpt, simulation_prompt
from ndx_pipeline.core.method.token_list import explain_token_lists

KEY = "sk-test-SECRET123"  # 17 characters, as in the reproduction
MODEL = "smollm2-135m-instruct-q4_1"
FAST = RetryPolicy(max_attempts=2, initial_delay=0.0, max_delay=0.0, timeout=5, deadline=30)


def key_fragments(text: str, shortest: int = 6) -> list[str]:
    """Every run of at least `shortest` characters of KEY that occurs in `text`."""
    return [KEY[i:i + shortest] for i in range(len(KEY) - shortest + 1) if KEY[i:i + shortest] in text]


def status_error(status: int, message: str):
    import httpx2
    import openai

    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    response = httpx2.Response(status, request=request)
    cls = {400: openai.BadRequestError, 401: openai.AuthenticationError, 403: openai.PermissionDeniedError}.get(
        status, openai.APIStatusError)
    return cls(message, response=response, body=None)


class ScriptedServer:
    """Stands in for the HTTP server behind `OpenAICompatibleBackend._send`: records every body it is sent and
    answers with `answer(endpoint, body)` (a dict, or an exception to raise)."""

    def __init__(self, answer):
        self.answer = answer
        self.bodies: list[tuple[str, dict]] = []

    def __call__(self, endpoint, body, timeout):
        self.bodies.append((endpoint, json.loads(json.dumps(body))))
        out = self.answer(endpoint, body)
        if isinstance(out, BaseException):
            raise out
        return out

    def count(self, endpoint=None):
        return sum(1 for e, _ in self.bodies if endpoint in (None, e))


def scripted_backend(answer, base_url="http://127.0.0.1:9/v1", cache=None, server="llama_cpp", **kw):
    kw.setdefault("logprob_alignment", "llama_cpp")  # what echo_answer's layout is
    backend = OpenAICompatibleBackend(base_url, MODEL, KEY, cache=cache, server=server, retry=FAST,
                                      max_concurrency=1, **kw)
    fake = ScriptedServer(answer)
    backend._send = fake
    if "context_tokens" not in kw:
        backend._probe_context = lambda: None  # no server to ask
    return backend, fake


def chat_answer(text="the word \"and\".", prompt_tokens=100):
    return {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 5}}


def echo_answer(body, with_logprobs=True):
    """A llama-cpp-python-like echo answer: the prompt split in characters, each predicting "0" strongly."""
    text = body["prompt"]
    tokens = list(text)
    offsets = list(range(len(text)))
    tops = [None] + [{"0": math.log(0.9), tok: math.log(0.05)} for tok in tokens[1:]]
    logprobs = {"tokens": tokens, "text_offset": offsets, "top_logprobs": tops,
                "token_logprobs": [None] * len(tokens)} if with_logprobs else None
    return {"choices": [{"text": text, "logprobs": logprobs}], "usage": {"prompt_tokens": len(tokens)}}


def excerpts_frame(n_neurons=2, n_excerpts=5, length=64, layer=0):
    """Explain excerpts shaped like the default run's: 5 per neuron, 64 tokens each, sparse activations."""
    words = ("for while return import class def with yield lambda pass break continue global assert raise "
             "try except finally elif else if not and or is in as from del print len range open").split()
    rows = []
    rng = np.random.default_rng(0)
    for neuron in range(n_neurons):
        for rank in range(n_excerpts):
            toks = [" " + words[(rank * 7 + i * 3 + neuron) % len(words)] for i in range(length)]
            acts = [float(rng.uniform(1, 4)) if rng.random() < 0.08 else 0.0 for _ in toks]
            acts[(rank * 5) % length] = 4.0 - 0.3 * rank
            rows.append({"layer": layer, "neuron": neuron, "excerpt_id": f"{layer}/{neuron}/top/{rank}",
                         "split": "explain", "rank": rank, "tokens": toks, "activations": acts})
    return pl.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------
# Item 3: the key survived a cut to 200 characters before redaction


def test_key_cut_by_truncation_is_redacted():
    message = "x" * 183 + " " + KEY + " was refused"  # the cut at 200 characters keeps 15 of the key's 17
    exc = status_error(401, message)

    def attempt(timeout):
        raise exc

    with pytest.raises(LLMRejectedError) as err:
        call_with_retries(attempt, FAST, redact=lambda s: redact_secret(s, KEY), sleep=lambda s: None)
    assert key_fragments(str(err.value)) == [], str(err.value)

    # the same through the backend, into an explanation row's `error` (hence Parquet and the viewer)
    backend, _ = scripted_backend(lambda endpoint, body: status_error(401, message))
    rows = explain_layer(excerpts_frame(1, 1, 8), backend)
    assert rows["status"].to_list() == ["failed"]
    assert key_fragments(rows["error"][0]) == [] and "[redacted]" in rows["error"][0]


@pytest.mark.parametrize("text", [
    f"key {KEY[:11]}… refused",            # a prefix
    f"…{KEY[-9:]} is not valid",            # a suffix
    f"partial {KEY[3:12]} echoed",          # a run from the middle
    f"twice: {KEY} and {KEY[:-2]}",         # whole and cut
])
def test_redact_secret_removes_any_long_run_of_the_key(text):
    assert key_fragments(redact_secret(text, KEY)) == []
    assert "[redacted]" in redact_secret(text, KEY)


def test_redact_secret_leaves_ordinary_text_alone():
    assert redact_secret("the sk- prefix and the number 123", KEY) == "the sk- prefix and the number 123"
    assert redact_secret("abc", "ab") == "abc" and redact_secret("abc", None) == "abc"


# ---------------------------------------------------------------------------------------------------------------
# Item 4: an unusable 200 answer was cached; the key ignored the server


def test_answer_without_logprobs_is_not_cached(tmp_path):
    broken = {"on": True}
    backend, fake = scripted_backend(lambda endpoint, body: echo_answer(body, with_logprobs=not broken["on"]),
                                     cache=tmp_path)
    prompt = simulation_prompt("the word 'the'", ["The", " cat"])
    with pytest.raises(RecordableLLMError, match="logprobs"):
        backend.value_probabilities(prompt)
    assert len(LLMCache(tmp_path)) == 0  # nothing the simulator cannot use is stored
    broken["on"] = False  # the server is fixed (or another one answers under the same model name)
    probs = backend.value_probabilities(prompt)
    assert probs.shape == (2, 11) and fake.count("completions") >= 2


def test_cache_key_holds_the_endpoint_identity(tmp_path):
    prompt = simulation_prompt("the word 'the'", ["The", " cat"])
    a, fake_a = scripted_backend(lambda endpoint, body: echo_answer(body), base_url="http://127.0.0.1:9/v1",
                                 cache=tmp_path)
    a.value_probabilities(prompt)
    # the same model name on another server: its own answers, not the first server's
    b, fake_b = scripted_backend(lambda endpoint, body: echo_answer(body), base_url="http://10.0.0.7:8000/v1",
                                 cache=tmp_path)
    b.value_probabilities(prompt)
    assert fake_b.count() >= 1 and b.stats.snapshot()["cache_hits"] == 0
    # …and another server kind at the same address
    c, fake_c = scripted_backend(lambda endpoint, body: echo_answer(body), base_url="http://127.0.0.1:9/v1",
                                 cache=tmp_path, server="vllm")
    c.value_probabilities(prompt)
    assert fake_c.count() >= 1 and c.stats.snapshot()["cache_hits"] == 0
    # the same server written differently is the same endpoint: all from the cache
    d, fake_d = scripted_backend(lambda endpoint, body: echo_answer(body), base_url="HTTP://127.0.0.1:9/v1/",
                                 cache=tmp_path)
    d.value_probabilities(prompt)
    assert fake_d.count() == 0 and d.stats.snapshot()["cache_hits"] >= 1


def test_cache_entries_name_the_endpoint_without_secrets(tmp_path):
    backend, _ = scripted_backend(lambda endpoint, body: chat_answer(),
                                  base_url=f"https://user:{KEY}@example.org/v1?api-key={KEY}", cache=tmp_path)
    backend.chat([{"role": "user", "content": "hi"}], LEAD_IN, 10, 0.0, 0)
    (entry,) = list(tmp_path.glob("??/*.json"))
    text = entry.read_text()
    assert key_fragments(text) == [] and "example.org" in text and "llama_cpp" in text


def test_in_process_cache_keys_are_unchanged():
    """The local backend's cached answers on users' disks stay valid: its keys are what they were."""
    from ndx_pipeline.core.llm.cache import cache_key

    request = {"messages": [{"role": "user", "content": "hi"}], "assistant_prefix": LEAD_IN, "max_tokens": 60,
               "temperature": 1.0, "seed": 3}
    material = {"format": 1, "kind": "local-transformers", "model": "m", "endpoint": "chat", "request": request}
    old = hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":"),
                                    ensure_ascii=False).encode()).hexdigest()
    assert cache_key("local-transformers", "m", "chat", request) == old


def test_empty_chat_answer_is_not_cached(tmp_path):
    answers = iter([chat_answer(""), chat_answer("the word \"and\".")])
    backend, fake = scripted_backend(lambda endpoint, body: next(answers), cache=tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    assert backend.chat(messages, LEAD_IN, 10, 0.0, 0).text == ""
    assert backend.chat(messages, LEAD_IN, 10, 0.0, 0).text == 'the word "and".'
    assert fake.count() == 2 and len(LLMCache(tmp_path)) == 1


# ---------------------------------------------------------------------------------------------------------------
# Item 6: a NaN in an answer aborted the layer


def test_non_finite_number_fails_one_item_not_the_layer(tmp_path):
    def answer(endpoint, body):
        if "Neuron 5" in body["messages"][-1]["content"] and " while" in body["messages"][-1]["content"]:
            out = chat_answer()
            out["choices"][0]["logprobs"] = {"content": [{"token": "x", "logprob": float("nan")}]}
            return out
        return chat_answer()

    backend, _ = scripted_backend(answer, cache=tmp_path)
    excerpts = excerpts_frame(2, 1, 8)
    rows = explain_layer(excerpts, backend)  # raised ValueError("Out of range float values…") before
    by_status = dict(zip(rows["neuron"].to_list(), rows["status"].to_list()))
    assert sorted(by_status.values()) == ["failed", "ok"], rows
    error = rows.filter(pl.col("status") == "failed")["error"][0]
    assert "NaN" in error or "non-finite" in error
    assert len(LLMCache(tmp_path)) == 1  # only the usable answer is stored
    assert backend.stats.snapshot()["failures"] == 1


def test_non_finite_echo_fails_that_excerpt(tmp_path):
    def answer(endpoint, body):
        out = echo_answer(body)
        out["choices"][0]["logprobs"]["top_logprobs"][3] = {"0": float("inf")}
        return out

    backend, _ = scripted_backend(answer, cache=tmp_path)
    with pytest.raises(RecordableLLMError, match="NaN|non-finite"):
        simulate_excerpt(backend, "x", ["The", " cat"])
    assert len(LLMCache(tmp_path)) == 0


# ---------------------------------------------------------------------------------------------------------------
# Item 7: the stored prompt hash was of the template, not of what was sent


def sha(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def test_openai_prompt_hash_is_of_the_messages_sent():
    backend, fake = scripted_backend(lambda endpoint, body: chat_answer())
    rows = explain_layer(excerpts_frame(1, 2, 8), backend)
    (_, body), = fake.bodies
    assert rows["prompt_sha256"][0] == sha({"messages": body["messages"]})
    assert backend.sent_prompt(explainer_messages([(["a"], [1.0])]), LEAD_IN)["messages"][0]["content"].endswith(
        "Write nothing else.")  # the rewritten system message, no prefill


def test_token_list_prompt_hash_is_of_the_messages_sent():
    backend, fake = scripted_backend(lambda endpoint, body: chat_answer())
    rows = explain_token_lists(excerpts_frame(1, 2, 8), backend)
    (_, body), = fake.bodies
    assert rows["prompt_sha256"][0] == sha({"messages": body["messages"]})


def test_local_sent_prompt_is_the_chat_template_text_with_the_prefill():
    from ndx_pipeline.core.llm.local import LocalTransformersBackend

    backend = LocalTransformersBackend()
    messages = explainer_messages([(["a", " b"], [0.0, 1.0])])
    sent = backend.sent_prompt(messages, LEAD_IN)
    assert set(sent) == {"text"} and sent["text"].endswith(LEAD_IN) and "<|im_start|>" in sent["text"]


# ---------------------------------------------------------------------------------------------------------------
# Item 8: an API key typed into the launchpad was stored in run config


def test_llm_resource_takes_only_the_name_of_a_variable(monkeypatch):
    from ndx_pipeline.defs.resources import LLMResource, default_resources

    assert "api_key" not in LLMResource.model_fields
    assert "environment variable" in LLMResource.model_fields["api_key_env"].description
    monkeypatch.setenv("NDX_TEST_KEY_VAR", KEY)
    resource = LLMResource(backend="openai", base_url="http://127.0.0.1:9/v1", model=MODEL,
                           api_key_env="NDX_TEST_KEY_VAR", server="llama_cpp")
    assert resource.spec().api_key_env == "NDX_TEST_KEY_VAR" and KEY not in repr(resource.spec())
    backend = resource.build()
    assert backend._client.api_key == KEY
    backend.close()
    # a key pasted where the name goes is refused, and not repeated
    with pytest.raises(Exception) as err:
        LLMResource(backend="openai", base_url="http://127.0.0.1:9/v1", model=MODEL, api_key_env=KEY).build()
    assert key_fragments(str(err.value)) == []
    # a named variable that is not set is an error, not a silent anonymous request
    monkeypatch.delenv("NDX_TEST_KEY_VAR")
    with pytest.raises(Exception, match="NDX_TEST_KEY_VAR"):
        resource.build()
    # the definitions name the variable; the configuration holds no key
    monkeypatch.setenv("NDX_EXPLAINER_API_KEY", KEY)
    monkeypatch.delenv("NDX_SIMULATOR_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    res = default_resources()
    assert res["explainer_llm"].api_key_env == "NDX_EXPLAINER_API_KEY"
    assert res["simulator_llm"].api_key_env is None
    assert KEY not in json.dumps(res["explainer_llm"].model_dump(), default=str)


@pytest.mark.parametrize("pasted", [
    "gsk_4f9aQ2mZ7xW1pL8kR3tY6uV0bN5cD",  # Groq
    "hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ012345",  # Hugging Face
    "d41d8cd98f00b204e9800998ecf8427e",  # hex, starting with a letter
    "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStU",  # Google
    "abc123def456ghi789jkl012",  # a long mix of letters and digits
])
def test_a_pasted_key_that_looks_like_a_variable_name_is_not_repeated(pasted, monkeypatch):
    """Keys that match the variable-name pattern were echoed in the next error ("api_key_env names the environment
    variable <KEY>…"), which became the run's failure text."""
    from ndx_pipeline.core.llm.registry import LLMSpec, api_key

    monkeypatch.delenv(pasted, raising=False)
    with pytest.raises(Exception) as err:
        api_key(LLMSpec(backend="openai", base_url="http://127.0.0.1:9/v1", api_key_env=pasted))
    assert pasted not in str(err.value) and pasted[:8] not in str(err.value)
    assert "not shown here" in str(err.value)
    # a real variable's name is still named when it is not set, and read when it is
    with pytest.raises(Exception, match="NDX_EXPLAINER_API_KEY_2"):
        api_key(LLMSpec(api_key_env="NDX_EXPLAINER_API_KEY_2"))
    monkeypatch.setenv(pasted, "the-key")  # a variable of that name that is set: it is a name after all
    assert api_key(LLMSpec(api_key_env=pasted)) == "the-key"


# ---------------------------------------------------------------------------------------------------------------
# Item 9: the explainer prompt was never fitted to the model's context


class SmallContext(LLMBackend):
    """A backend with a small context that counts one token per 2 characters of what it is sent; it answers only
    prompts that fit and records what they were."""

    def __init__(self, context):
        self.context_tokens = context
        self.stats = LLMStats()
        self.sent = []

    name = "small-context"

    def count_tokens(self, sent, limit=None):
        return len(json.dumps(sent)) // 2

    def chat(self, messages, assistant_prefix, max_tokens, temperature, seed):
        need = self.count_tokens(self.sent_prompt(messages, assistant_prefix)) + max_tokens
        assert need <= self.context_tokens, f"{need} > {self.context_tokens}"
        self.sent.append(messages)
        return Completion(" the word \"and\".", need, 3)

    def value_probabilities(self, prompt):
        raise NotImplementedError


def test_explainer_prompt_is_fitted_and_the_row_says_what_was_left_out():
    excerpts = excerpts_frame(1, 5, 64)
    shown = [(r["tokens"], r["activations"]) for r in excerpts.iter_rows(named=True)]
    full = SmallContext(10_000).count_tokens({"messages": explainer_messages(shown), "assistant_prefix": LEAD_IN})
    backend = SmallContext(full - 700)
    rows = explain_layer(excerpts, backend)
    assert set(EXPLANATION_SCHEMA) <= set(rows.columns)
    row = rows.row(0, named=True)
    assert row["status"] == "ok", row["error"]
    assert 1 <= row["excerpts_shown"] < 5
    assert "repeat" in row["prompt_fitted"] and "of 5" in row["prompt_fitted"]
    # nothing left out where it fits
    roomy = explain_layer(excerpts, SmallContext(full + 100)).row(0, named=True)
    assert roomy["excerpts_shown"] == 5 and roomy["prompt_fitted"] is None


def test_explainer_prompt_that_cannot_fit_fails_that_neuron_with_a_reason():
    rows = explain_layer(excerpts_frame(1, 5, 64), SmallContext(300))
    row = rows.row(0, named=True)
    assert row["status"] == "failed" and "context" in row["error"] and "300" in row["error"]


def test_server_context_learned_from_its_refusal():
    """llama-cpp-python says nothing of its context until a prompt is too long; then the explainer refits."""
    limit = 1200  # the full prompt needs ~1630 tokens at this server's count (characters / 3)

    def answer(endpoint, body):
        chars = sum(len(m["content"]) for m in body["messages"])
        tokens = chars // 3
        if tokens + body["max_tokens"] > limit:
            return status_error(400, f"This model's maximum context length is {limit} tokens. However, you "
                                     f"requested {tokens + body['max_tokens']} tokens ({tokens} in the messages, "
                                     f"{body['max_tokens']} in the completion). Please reduce the length.")
        return chat_answer()

    backend, fake = scripted_backend(answer, server="openai")
    backend._probe_context = lambda: None  # this server says nothing about its context up front
    rows = explain_layer(excerpts_frame(2, 5, 64), backend)
    assert rows["status"].to_list() == ["ok", "ok"], rows["error"].to_list()
    assert all(n < 5 for n in rows["excerpts_shown"]) and all(rows["prompt_fitted"].is_not_null())
    assert backend.context_window() == limit


def test_simulation_prompt_that_cannot_fit_fails_that_excerpt():
    backend, fake = scripted_backend(lambda endpoint, body: echo_answer(body), server="openai",
                                     context_tokens=100)
    with pytest.raises(RecordableLLMError, match="context"):
        simulate_excerpt(backend, "the word 'the'", ["The", " cat"] * 200)
    # the simulation prompt was never sent; only the short echo that asks how the server writes "10" (ten_probe auto)
    assert [body["prompt"] for endpoint, body in fake.bodies if endpoint == "completions"] == [TEN_LAYOUT_TEXT]


def test_a_count_cleared_by_another_thread_meanwhile_is_counted_again():
    """count_tokens read its cache twice (a membership test, then the value): a clear by another thread in between
    raised KeyError. The clear is staged here between the two reads."""
    from ndx_pipeline.core.llm.openai import OpenAICompatibleBackend
    from ndx_pipeline.core.llm.sent_prompts import sent_prompt_sha256

    class ClearedAfterTheTest(dict):
        def __contains__(self, key):  # the other thread clears right after this thread looked
            found = super().__contains__(key)
            self.clear()
            return found

    backend = OpenAICompatibleBackend("http://127.0.0.1:9/v1", "m", None, server="llama_cpp")
    sent = {"messages": [{"role": "user", "content": "word " * 400}]}
    backend._counts = ClearedAfterTheTest({sent_prompt_sha256(sent): 77})
    backend._count_on_server = lambda s: 99  # what the server would say, asked again
    assert backend.count_tokens(sent, limit=10) in (77, 99)


def test_new_weights_under_the_same_name_are_not_answered_from_the_old_ones_cache(tmp_path):
    """The in-process backends keyed their cache by the model's name as written: new weights in the same folder
    reused the old answers. Now the weights' files (path, size, modification time) are part of the key."""
    import os

    from ndx_pipeline.core.llm.embeddings import LocalEmbedder
    from ndx_pipeline.core.llm.local import LocalTransformersBackend

    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"first weights")
    computed = []

    def answer():
        computed.append(1)
        return {"text": f"answer {len(computed)}", "prompt_tokens": 1, "completion_tokens": 1}

    def ask():
        backend = LocalTransformersBackend(str(folder), cache=tmp_path / "cache", dtype="float32")
        return backend._cached("chat", {"messages": ["hello"]}, answer)["text"]

    assert ask() == "answer 1" and ask() == "answer 1" and len(computed) == 1  # the same weights: from the cache
    weights.write_bytes(b"second weights, retrained")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert ask() == "answer 2" and len(computed) == 2  # new weights: asked again
    assert ask() == "answer 2" and len(computed) == 2
    embedder = LocalEmbedder(str(folder))
    assert embedder.origin == {"model": {"weights": [["model.safetensors", weights.stat().st_size,
                                                      weights.stat().st_mtime_ns]]}}
