"""The in-process backend computes what many threads ask for together (issue 15): the batcher routes every answer
to its asker, and the batched simulator and explainer give what the plain one-at-a-time paths give."""

import threading
import time

import numpy as np
import pytest
import torch

from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.llm.batching import Batcher
from ndx_pipeline.core.llm.local import LocalTransformersBackend
from ndx_pipeline.core.method.explainer import FEW_SHOTS, LEAD_IN, explainer_messages
from ndx_pipeline.core.method.simulator import expected_values, simulation_prompt
from ndx_pipeline.core.models import llm_dtype


def test_batcher_routes_answers_and_steps_down():
    seen = []

    def compute(requests):
        seen.append(list(requests))
        time.sleep(0.05)
        return [r * 10 if r != 13 else ValueError("thirteen") for r in requests]

    batcher = Batcher(compute, max_batch=4, gather_s=0.02)
    results, errors = {}, {}

    def ask(r):
        try:
            results[r] = batcher.submit(r)
        except ValueError as e:
            errors[r] = str(e)

    threads = [threading.Thread(target=ask, args=(r,)) for r in range(10, 20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert results == {r: r * 10 for r in range(10, 20) if r != 13} and errors == {13: "thirteen"}
    assert all(len(b) <= 4 for b in seen) and sorted(r for b in seen for r in b) == list(range(10, 20))
    assert max(len(b) for b in seen) == 4  # requests that arrive together are computed together


def test_a_failing_batch_fails_each_of_its_requests():
    batcher = Batcher(lambda requests: 1 / 0, max_batch=2)
    with pytest.raises(ZeroDivisionError):
        batcher.submit(1)


@pytest.fixture(scope="module")
def backend():
    return LocalTransformersBackend(batch_size=4, dtype="float32")  # the exact path


EXCERPTS = [
    ["def", " load", "(", "path", "):", "\n", "   ", " return", " open", "(", "path", ")"],
    ["We", " met", " in", " early", " March", " and", " again", " in", " June", "."],
    ["print", "(", "len", "(", "items", "))", " +", " max", "(", "a", ")"],
    ["Salt", " and", " pepper", " are", " on", " the", " table", ",", " bread", " and", " butter"],
    ["x", " =", " 10", "\n", "if", " x", ":", "\n", "    ", " pass"],
]


def test_batched_simulation_equals_one_at_a_time(backend):
    # two explanations (two prompt heads) in one batch of work, as a stage asks for them
    prompts = [simulation_prompt(e, tokens) for e in ('the word "return"', "month names") for tokens in EXCERPTS]
    alone = [backend.value_probabilities_unbatched(p) for p in prompts]
    together = backend.map(backend.value_probabilities, prompts)
    assert all(o.ok for o in together)
    assert max(float(np.abs(a - o.value).max()) for a, o in zip(alone, together)) <= 1e-4
    assert max(backend._simulations.batches) > 1  # they really went together
    assert all(a.shape == (len(p.slots), 11) for a, p in zip(alone, prompts))


def test_batched_explanations_equal_one_at_a_time(backend):
    jobs = [(explainer_messages(list(shot.excerpts)), 100 + i) for i, shot in enumerate(FEW_SHOTS)]
    alone = [backend.chat_unbatched(m, LEAD_IN, 12, 1.0, seed).text for m, seed in jobs]
    together = backend.map(lambda j: backend.chat(j[0], LEAD_IN, 12, 1.0, j[1]), jobs)
    assert [o.value.text for o in together] == alone
    assert len({o.value.completion_tokens for o in together}) > 1  # a finished row left the batch before others
    assert max(backend._chats.batches) > 1


def test_a_precision_is_one_of_the_known_ones():
    assert llm_dtype("float32") == "float32" and llm_dtype("bfloat16") == "bfloat16" and llm_dtype("auto") == "auto"
    with pytest.raises(NdxInputError, match="simulator_llm.dtype must be one of float32, bfloat16, float16, not "
                                            "'float64'"):
        llm_dtype("float64", "simulator_llm.dtype")


def test_bfloat16_simulation_stays_close_to_float32(backend):
    """The faster precision computes in bfloat16 for real and says nearly what float32 says: value probabilities
    within a few hundredths, expected activations that rise and fall together."""
    fast = LocalTransformersBackend(batch_size=4, dtype="bfloat16")
    assert fast._lm()[0].dtype == torch.bfloat16 and backend._lm()[0].dtype == torch.float32
    prompts = [simulation_prompt(e, tokens) for e in ('the word "return"', "month names") for tokens in EXCERPTS]
    exact = [backend.value_probabilities_unbatched(p) for p in prompts]
    quick = [o.value for o in fast.map(fast.value_probabilities, prompts)]
    dp = max(float(np.abs(a - b).max()) for a, b in zip(exact, quick))
    ev_exact = np.concatenate([expected_values(a) for a in exact])
    ev_quick = np.concatenate([expected_values(b) for b in quick])
    assert 0 < dp < 0.1  # bfloat16 really differs, and only by rounding
    assert np.corrcoef(ev_exact, ev_quick)[0, 1] > 0.95


def test_answers_are_cached_per_precision(tmp_path):
    prompt = simulation_prompt("month names", EXCERPTS[1])
    exact = LocalTransformersBackend(cache=tmp_path, dtype="float32")
    exact.value_probabilities(prompt)
    quick = LocalTransformersBackend(cache=tmp_path, dtype="bfloat16")
    quick.value_probabilities(prompt)
    assert quick.stats.cache_hits == 0  # a float32 answer is not served for bfloat16
    again = LocalTransformersBackend(cache=tmp_path, dtype="float32")
    again.value_probabilities(prompt)
    assert again.stats.cache_hits == 1
