"""The LLM stages through Dagster against a real OpenAI-compatible server (llama-cpp-python serving the bundled
GGUF on 127.0.0.1): contract-conformant outputs, a rerun that makes zero requests, and a run killed with SIGKILL
midway through explanations that resumes without paying twice.
"""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import dagster as dg
import polars as pl
import pytest

from ndx_pipeline.core.contract import SCHEMAS
from ndx_pipeline.core.llm.sent_prompts import load_tokenizer
from ndx_pipeline.core.method.simulator import simulation_prompt
from ndx_pipeline.core.storage import asset_path
from ndx_pipeline.definitions import build_definitions
from ndx_pipeline.defs.partitions import add_variant, partition_key
from ndx_pipeline.defs.resources import (
    CorpusResource,
    LLMResource,
    QualityResource,
    SelectionResource,
    StorageResource,
    SubjectModelResource,
)
from ndx_pipeline_tests.llm_server import TEST_API_KEY, FaultProxy, llama_server  # noqa: F401  (fixture)

pytestmark = [pytest.mark.llm_server, pytest.mark.slow]
NEURONS = [11, 700]
VARIANT = "neurons"  # the default variant: the resources given, as they are
PARTITION = str(partition_key(0, VARIANT))  # "0|neurons"
# whole steps: an asset and the files its step writes beside it
UPSTREAM = ("corpus", "activation_records", "token_table", "top_excerpts")
EXPLANATION_STEP = ("explanations", "baseline_explanations", "calibration_simulations")
LLM_STAGES = (*EXPLANATION_STEP, "simulations", "baseline_simulations", "scores")


def materialize(stages, storage, **resources):
    every = build_definitions().assets
    by_key = {k.to_user_string(): a for a in every if isinstance(a, dg.AssetsDefinition) for k in a.keys}
    settings = [a for a in every if isinstance(a, dg.AssetSpec)]  # the variants' observed settings the stages read
    base = {
        "storage": StorageResource(storage_dir=str(storage)), "corpus_source": CorpusResource(),
        "subject_model": SubjectModelResource(window_tokens=16),
        # small counts: a 2-core CPU serves every request of these tests. The server reads a simulated excerpt in one
        # echo request of ~300 prompt tokens (~9 s there, most of it the prompt's fixed head), so each neuron has one
        # scored excerpt (its top one) and no calibration excerpt (they are simulated as the scored ones are; the
        # calibrated score on them: test_pipeline, in process); short explainer prompts. (8-token windows would
        # shorten the prompts by a tenth but double the windows the subject model reads for the upstream: 2 min
        # instead of 30 s.)
        "selection": SelectionResource(neurons=NEURONS, explain_excerpts=3, score_top_excerpts=1,
                                       score_random_excerpts=0),
        "explainer_llm": LLMResource(max_tokens=20), "simulator_llm": LLMResource(max_tokens=0, temperature=0.0),
        "quality": QualityResource(calibration_top_excerpts=0, calibration_random_excerpts=0),
    }
    base.update(resources)
    assets = list({id(by_key[s]): by_key[s] for s in stages}.values())
    instance = dg.DagsterInstance.ephemeral()
    add_variant(instance, VARIANT)
    result = dg.materialize([*assets, *settings], partition_key=PARTITION, resources=base, instance=instance,
                            raise_on_error=False, selection=list(stages))
    assert result.success, [str(e.step_failure_data.error) for e in result.all_events if e.is_step_failure]
    return instance


def partition_metadata(instance, stage):
    return instance.get_latest_materialization_event(dg.AssetKey(stage)).asset_materialization.metadata


def server_llm(proxy, **extra):
    return LLMResource(backend="openai", base_url=proxy.base_url, model="smollm2-135m-instruct-q4_1",
                       api_key_env="NDX_TEST_LLM_KEY", server="llama_cpp", max_concurrency=1, **extra)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    storage = tmp_path_factory.mktemp("upstream")
    materialize(UPSTREAM, storage)
    return storage


def copy_upstream(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(asset_path(src, "corpus"), asset_path(dst, "corpus"))
    for stage in UPSTREAM[1:]:
        asset_path(dst, stage, 0, VARIANT).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(asset_path(src, stage, 0, VARIANT), asset_path(dst, stage, 0, VARIANT))


@pytest.fixture(scope="module")
def module_proxy(llama_server):  # noqa: F811
    """One proxy in front of the server for the whole module: the LLM cache keys an answer by the endpoint's address,
    so runs through it on copies of one storage share their answers (`explained`)."""
    p = FaultProxy(llama_server.port)
    yield p
    p.close()


@pytest.fixture
def proxy(module_proxy, llama_server):  # noqa: F811
    """The module's proxy with its counts reset."""
    llama_server.assert_alive()
    module_proxy.reset_counts()
    yield module_proxy
    assert module_proxy.pending() == 0, "a planned fault was left for the next test"
    llama_server.assert_alive()  # a test that crashed the server fails itself, not the next one


@pytest.fixture(scope="module")
def explained(upstream, module_proxy, llama_server, tmp_path_factory):  # noqa: F811
    """The upstream with the explanation step run through the server (our explanations and the baselines'), once for
    the module: the runs on a copy of it (through the same proxy) take each explanation from its LLM cache. The
    step's instance and the requests it made (the proxy's count, and the server's log)."""
    storage = tmp_path_factory.mktemp("explained")
    copy_upstream(upstream, storage)
    module_proxy.reset_counts()
    before = llama_server.logged_requests()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NDX_TEST_LLM_KEY", TEST_API_KEY)
        instance = materialize(EXPLANATION_STEP, storage, explainer_llm=server_llm(module_proxy, max_tokens=20))
    return {"storage": storage, "instance": instance, "requests": module_proxy.total(),
            "logged": llama_server.logged_requests() - before}


def test_the_planted_control_judged_by_the_server(tmp_path, proxy, monkeypatch):
    """The judge's control with the server as explainer and simulator: a planted unit (the word "if", a token rule)
    through every stage, simulated from its explanation, its true one and a wrong one; the controls read from the
    files."""
    from ndx_pipeline.reports.controls import control_lines, read_controls

    monkeypatch.setenv("NDX_TEST_LLM_KEY", TEST_API_KEY)
    storage = tmp_path / "planted"
    # one unit (each more costs an explanation and three echo requests, ~35 s here), scored on its top excerpt
    # alone (16 tokens: "if" is on some of them and not on others, so every score is defined), simulated from its
    # three explanations: 3 echo requests
    materialize((*UPSTREAM, *LLM_STAGES), storage,
                selection=SelectionResource(units="planted", neurons=[0], explain_excerpts=3,
                                            score_top_excerpts=1, score_random_excerpts=0),
                quality=QualityResource(baselines=[], scorers=[], calibration_top_excerpts=0,
                                        calibration_random_excerpts=0),
                explainer_llm=server_llm(proxy, max_tokens=20),
                simulator_llm=server_llm(proxy, max_tokens=0, temperature=0.0))
    base = pl.read_parquet(asset_path(storage, "baseline_simulations", 0, VARIANT))
    assert set(base["explanation_id"].str.extract(r"/(planted_\w+)$")) == {"planted_true", "planted_wrong"}
    assert set(base["simulator"]) == {"openai-compatible:smollm2-135m-instruct-q4_1"}
    found = read_controls(storage, VARIANT)  # a variant of planted units is its own control
    sim = found["judges"]["simulation"]
    assert sim["units"] == 1 and 0.0 <= sim["auc_lo"] <= sim["auc"] <= sim["auc_hi"] <= 1.0
    assert control_lines(found)[1].startswith("  simulation: right vs wrong explanations AUC ")
    print("\n" + "\n".join(control_lines(found)))


def test_every_llm_stage_on_the_server_then_a_free_rerun(explained, tmp_path, proxy, monkeypatch,
                                                          llama_server):  # noqa: F811
    """(The same stages in process, on the bundled model: test_pipeline's end-to-end test.) The explanation step
    ran through the server in `explained` (shared with the JSON simulator's test); here every LLM stage runs on a
    copy of it, the explanations from its cache."""
    from ndx_pipeline.cli import cost_lines

    monkeypatch.setenv("NDX_TEST_LLM_KEY", TEST_API_KEY)
    meta = partition_metadata(explained["instance"], "explanations")
    assert meta["llm_requests"].value >= len(NEURONS) and meta["llm_cache_hits"].value == 0
    # at least one explanation request per neuron reached the server, and only chats
    assert explained["logged"]["POST /v1/chat/completions 200"] >= len(NEURONS)
    assert "POST /v1/completions 200" not in explained["logged"], dict(explained["logged"])
    server = tmp_path / "server"
    shutil.copytree(explained["storage"], server)
    before = llama_server.logged_requests()
    instance = materialize(LLM_STAGES, server, explainer_llm=server_llm(proxy, max_tokens=20),
                           simulator_llm=server_llm(proxy, max_tokens=0, temperature=0.0))
    logged = llama_server.logged_requests() - before
    first = explained["requests"] + proxy.total()
    assert partition_metadata(instance, "explanations")["llm_requests"].value == 0  # all from the cache

    for stage in LLM_STAGES:  # the contract's columns and types, on every neuron (no calibration without best-of-k)
        frame = pl.read_parquet(asset_path(server, stage, 0, VARIANT))
        assert {c: frame.schema.get(c) for c in SCHEMAS[stage]} == SCHEMAS[stage], stage
        assert sorted(frame["neuron"].unique()) == ([] if stage == "calibration_simulations" else NEURONS), stage
    scores = pl.read_parquet(asset_path(server, "scores", 0, VARIANT))  # every score beside its three baselines
    assert {"baseline_lookup", "baseline_random", "baseline_token_list"} <= set(scores.columns)
    assert scores["baseline_lookup"].is_finite().all()  # no LLM in it: defined for every neuron
    expl = pl.read_parquet(asset_path(server, "explanations", 0, VARIANT))
    assert set(expl["explainer"]) == {"openai-compatible:smollm2-135m-instruct-q4_1"}
    assert expl["explanation_id"].str.starts_with(f"{VARIANT}/0/").all()  # ids scoped to the variant
    sims = pl.read_parquet(asset_path(server, "simulations", 0, VARIANT))
    for row in sims.filter(pl.col("status") == "ok").iter_rows(named=True):
        assert len(row["simulated_activations"]) == len(row["tokens"])
        assert all(0 <= v <= 10 for v in row["simulated_activations"])
    # issue 36: the server writes "10" as "1" "0"; every simulated excerpt (ours and the baselines') cost one
    # request on the 0–9 scale, plus one tokenization probe for the wave: counted by the server itself (simulation
    # is the only stage that asks /v1/completions)
    sim = partition_metadata(instance, "simulations")
    both = pl.concat([sims, pl.read_parquet(asset_path(server, "baseline_simulations", 0, VARIANT))])
    simulated = len(both)
    # ours, the random and the token-list baselines' on each neuron's scored excerpt
    assert (len(sims), simulated) == (len(NEURONS), len(NEURONS) * 3), \
        both.select("neuron", "explanation_id", "excerpt_id").rows()
    requests = sim["llm_requests"].value
    assert logged["POST /v1/completions 200"] == requests, dict(logged)
    # (a prompt asked twice in the wave — the random baseline may draw the same explanation — is the cache's)
    assert requests + sim["llm_cache_hits"].value == simulated + 1
    assert sim["llm_requests_per_excerpt"].value == round(requests / simulated, 3) <= 2
    assert sim["llm_requests_per_unit"].value == round(requests / len(NEURONS), 3)
    # prompt tokens sent: at most twice the 0–10 simulation prompts' own length (the bundled model's tokenizer)
    texts = dict(pl.concat([expl.select("explanation_id", "explanation"), pl.read_parquet(
        asset_path(server, "baseline_explanations", 0, VARIANT)).select("explanation_id", "explanation")]).iter_rows())
    own = sum(len(load_tokenizer(None).encode(simulation_prompt(texts[i], t).text, add_special_tokens=False))
              for i, t in both.select("explanation_id", "tokens").iter_rows())
    assert sim["prompt_tokens_per_excerpt"].value == round(sim["prompt_tokens"].value / simulated, 1)
    assert 0 < sim["prompt_tokens"].value <= 2 * own
    assert sim["simulator_scale"].value == "0–9"
    lines = cost_lines(instance, [0], VARIANT)
    assert lines[2].split() == ["simulations", f"{sim['llm_requests_per_excerpt'].value:.2f}", "requests,",
                                f"{sim['prompt_tokens_per_excerpt'].value:.0f}", "prompt", "tokens", "per", "excerpt",
                                "(0–9", "scale);", "layers", "[0]"], lines
    print("\n".join(lines))

    # the same stages again: every answer from the cache, not one request
    proxy.reset_counts()
    instance = materialize(LLM_STAGES, server, explainer_llm=server_llm(proxy, max_tokens=20),
                           simulator_llm=server_llm(proxy, max_tokens=0, temperature=0.0))
    # nothing to generate; the explainer only asks the server for its context window (which llama-cpp-python
    # does not say) before fitting its prompts
    assert set(proxy.requests) <= {"/v1/models", "/props"}, dict(proxy.requests)
    for stage in ("explanations", "simulations"):
        meta = partition_metadata(instance, stage)
        assert meta["llm_requests"].value == 0 and meta["llm_cache_hit_rate"].value == 1.0
    assert partition_metadata(instance, "simulations")["llm_requests_per_excerpt"].value == 0
    assert cost_lines(instance, [0], VARIANT) == []  # nothing sent, nothing to say
    print(f"\nserver run: {first} requests; rerun: no LLM requests ({dict(proxy.requests)}), cache hit rate 100 %")

    # the key is nowhere on disk
    for path in server.rglob("*"):
        if path.is_file():
            assert TEST_API_KEY.encode() not in path.read_bytes(), path


def test_json_simulator_through_dagster(explained, tmp_path, proxy, monkeypatch, llama_server):  # noqa: F811
    monkeypatch.setenv("NDX_TEST_LLM_KEY", TEST_API_KEY)
    storage = tmp_path / "json"
    shutil.copytree(explained["storage"], storage)  # the explanations (the server's) in its LLM cache
    # the JSON simulator on our explanations alone: the baselines' simulations go the same way (first test)
    before = llama_server.logged_requests()
    instance = materialize(LLM_STAGES, storage, explainer_llm=server_llm(proxy, max_tokens=20),
                           simulator_llm=server_llm(proxy, max_tokens=0, temperature=0.0, simulator_mode="json"),
                           quality=QualityResource(baselines=["lookup"], scorers=[], calibration_top_excerpts=0,
                                                   calibration_random_excerpts=0))
    logged = llama_server.logged_requests() - before
    sims = pl.read_parquet(asset_path(storage, "simulations", 0, VARIANT))
    assert len(sims) == len(NEURONS)  # each neuron's scored excerpt
    # one chat request per excerpt, counted by the server (the explainer's chats are the rest)
    sim, expl = partition_metadata(instance, "simulations"), partition_metadata(instance, "explanations")
    assert logged["POST /v1/chat/completions 200"] == sim["llm_requests"].value + expl["llm_requests"].value
    assert sim["llm_requests"].value == len(sims) and sim["llm_requests_per_excerpt"].value == 1.0
    assert "simulator_scale" not in sim
    print(f"\nJSON simulator: {sim['llm_requests_per_excerpt'].value} requests and "
          f"{sim['prompt_tokens_per_excerpt'].value} prompt tokens per excerpt, "
          f"{sim['llm_requests_per_unit'].value} requests per unit")
    for row in sims.iter_rows(named=True):
        if row["status"] == "ok":
            assert len(row["simulated_activations"]) == len(row["tokens"])
        else:  # a malformed answer is recorded, never silently zero
            assert row["error"] and row["simulated_activations"] == []
    scores = pl.read_parquet(asset_path(storage, "scores", 0, VARIANT))
    assert len(scores) == len(NEURONS)


KILLED_RUN = textwrap.dedent("""
    import sys
    import dagster as dg
    from ndx_pipeline.definitions import build_definitions
    from ndx_pipeline.defs.partitions import add_variant, partition_key
    from ndx_pipeline.defs.resources import LLMResource, QualityResource, StorageResource
    storage, base_url = sys.argv[1], sys.argv[2]
    llm = LLMResource(backend="openai", base_url=base_url, model="smollm2-135m-instruct-q4_1",
                      api_key_env="NDX_TEST_LLM_KEY", server="llama_cpp", max_concurrency=1, max_tokens=20)
    every = build_definitions().assets
    explanations = next(a for a in every if isinstance(a, dg.AssetsDefinition) and dg.AssetKey("explanations") in a.keys)
    settings = [a for a in every if isinstance(a, dg.AssetSpec)]
    instance = dg.DagsterInstance.ephemeral()
    add_variant(instance, "neurons")
    dg.materialize([explanations, *settings], partition_key=str(partition_key(0, "neurons")), selection=[explanations],
                   resources={"storage": StorageResource(storage_dir=storage), "explainer_llm": llm,
                              "simulator_llm": llm, "quality": QualityResource(baselines=[])},
                   instance=instance)
""")


def test_kill9_midway_through_explanations_then_rerun_pays_only_for_the_rest(upstream, tmp_path, proxy, monkeypatch):
    monkeypatch.setenv("NDX_TEST_LLM_KEY", TEST_API_KEY)
    storage = tmp_path / "killed"
    copy_upstream(upstream, storage)
    # more neurons for this one: the upstream has 2; explanations only read top_excerpts, so widen it to 4
    excerpts = pl.read_parquet(asset_path(storage, "top_excerpts", 0, VARIANT))
    widened = pl.concat([excerpts.with_columns(pl.col("neuron") + 10_000 * k) for k in range(2)])
    widened.write_parquet(asset_path(storage, "top_excerpts", 0, VARIANT))
    n = widened["neuron"].n_unique()
    log = tmp_path / "killed_run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(storage), proxy.base_url],
                                stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 300
        while proxy.forwarded["/v1/chat/completions"] < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # the first answer is surely cached; the second perhaps
    finally:
        proc.wait(30)
    tail = log.read_text(errors="replace")[-3000:]
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, dict(proxy.forwarded), tail)
    assert not asset_path(storage, "explanations", 0, VARIANT).exists()  # nothing half-written
    paid = proxy.forwarded["/v1/chat/completions"]
    assert 2 <= paid < n, (paid, n)  # (a request takes seconds: the kill lands long before the last one)

    proxy.reset_counts()
    instance = materialize(EXPLANATION_STEP, storage, explainer_llm=server_llm(proxy, max_tokens=20),
                           quality=QualityResource(baselines=[]))
    rerun = proxy.requests["/v1/chat/completions"]
    meta = partition_metadata(instance, "explanations")
    assert meta["llm_cache_hits"].value >= 1
    assert rerun == n - meta["llm_cache_hits"].value <= n - 1
    assert len(pl.read_parquet(asset_path(storage, "explanations", 0, VARIANT))) == n
    print(f"\nkilled after {paid} of {n} explanation requests; rerun made {rerun}, "
          f"{meta['llm_cache_hits'].value} from the cache")


def test_detection_and_fuzzing_on_the_server_a_malformed_answer_fails_its_batch(upstream, proxy, monkeypatch,
                                                                                  llama_server):  # noqa: F811
    """The chat-only scorers through the OpenAI-compatible backend (no logprobs asked): one request per batch, a
    malformed answer fails exactly that batch's rows with the reason, a rerun asks nothing, the key is not kept."""
    from ndx_pipeline.core import stages
    from ndx_pipeline.core.contract import (
        BASELINE_EXPLANATIONS,
        EXPLANATION_SCHEMA,
        empty,
        frame,
    )
    from ndx_pipeline.core.llm.registry import LLMSpec, build_backend
    from ndx_pipeline.core.method.scorers import make_scorer
    from ndx_pipeline_tests.llm_server import Fault

    monkeypatch.setenv("NDX_TEST_LLM_KEY", TEST_API_KEY)
    records = pl.read_parquet(asset_path(upstream, "activation_records", 0, VARIANT))
    excerpts = pl.read_parquet(asset_path(upstream, "top_excerpts", 0, VARIANT))
    held = stages.scorer_excerpts(records, excerpts, 2)
    ours = frame([{"layer": 0, "neuron": n, "explanation_id": f"ours-{n}", "explanation": "punctuation marks",
                     "explainer": "test", "prompt_sha256": "0" * 64, "status": "ok", "error": None, "selected": True}
                    for n in NEURONS], EXPLANATION_SCHEMA)
    theirs = empty(BASELINE_EXPLANATIONS)
    # (the context given: no context probe takes the planned fault meant for the first chat)
    spec = LLMSpec(backend="openai", base_url=proxy.base_url, model="smollm2-135m-instruct-q4_1",
                   api_key_env="NDX_TEST_LLM_KEY", server="llama_cpp", max_concurrency=1, context_tokens=2048)
    cache = upstream.parent / f"scorer-cache-{os.getpid()}"
    for name in ("detection", "fuzzing"):
        scorer = make_scorer(name, batch_size=4)
        backend = build_backend(spec, cache)
        proxy.reset_counts()
        proxy.plan(Fault.respond({"id": "x", "object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "I cannot tell."}, "finish_reason": "stop"}]}))
        before = llama_server.logged_requests()
        found = stages.judged(scorer, ours, theirs, held, backend)
        backend.close()
        judged = found.judgements
        assert proxy.requests["/v1/chat/completions"] == 2  # one batch of 4 per neuron
        # the server saw one of them (the proxy answered the other); what a unit cost, from the server's usage
        assert (llama_server.logged_requests() - before)["POST /v1/chat/completions 200"] == 1
        stats = backend.stats.snapshot()
        print(f"\n{name}: {stats['requests'] / len(NEURONS):.1f} request per unit (a batch of "
              f"{len(judged) // len(NEURONS)} judgements); the one the server answered counted {stats['prompt_tokens']}"
              " prompt tokens")
        batches = judged.group_by(["neuron", "prompt"]).agg(pl.col("status").unique())
        assert len(batches) == 2 and all(len(s) == 1 for s in batches["status"])
        failed = judged.filter(pl.col("status") == "failed")
        # the planned answer fails its batch; the 135M model may fail the other batch's form too, with a reason
        assert len(failed) >= 4 and failed["error"].str.contains("verdict").all()
        ok = judged.filter(pl.col("status") == "ok")
        assert ok["verdict"].is_not_null().all() and set(ok["scorer"]) <= {backend.name}
        scores = found.scores
        assert scores.filter(pl.col("status").str.starts_with("failed"))["neuron"].len() == len(failed) // 4
        # again: every answer from the cache (the malformed one too: an answer is kept as the server gave it),
        # the same judgements
        proxy.reset_counts()
        backend = build_backend(spec, cache)
        again = stages.judged(scorer, ours, theirs, held, backend).judgements
        backend.close()
        assert proxy.requests.get("/v1/chat/completions", 0) == 0
        assert again.sort(["neuron", "excerpt_id", "label"]).equals(judged.sort(["neuron", "excerpt_id", "label"]))
    for path in cache.rglob("*"):
        if path.is_file():
            assert TEST_API_KEY.encode() not in path.read_bytes(), path
