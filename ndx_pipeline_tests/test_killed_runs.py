"""A killed run never blocks the next one (issue 37): the real `ndx-pipeline run` in subprocesses, on one Dagster
instance (sqlite, the template the CLI writes), the bundled model as subject and as explainer and simulator.

1. `test_killed_inside_explanations_then_inside_simulations[local|server]`: a run is killed with SIGKILL inside
   `explanations`, after some answers came back; the same command again names the killed run in one line, marks it
   FAILURE, frees its `llm` slot, keeps the files of the steps it had finished, and is killed in turn inside
   `simulations`; the third run finishes. No answer received before a kill is asked again: with the model served by
   llama-cpp-python (through a counting proxy), the server's log of answered requests holds no request twice; with
   the model in process, no LLM cache entry made before a kill is computed (written) again.
2. `test_a_run_blocked_by_a_live_runs_slot`: a live run, stopped (SIGSTOP, between two writes to the instance's
   sqlite files) inside `explanations` or `simulations`, holds the `llm` slot. Another run with `--wait 0` fails at
   once with the waiting sentence naming it; one without `--wait` says it waits every 10 s while using next to no CPU,
   and SIGTERM cancels it with its slots freed; one more, started beside it, waits until the holder is killed, then
   goes on and finishes.

3. `test_dagster_dev_frees_the_slot_of_a_run_whose_process_was_killed` (marked ui): the same kill under `dagster
   dev`, where the run carries no process tags: the code server marks it FAILURE and the daemon's run monitoring
   (the shipped instance settings) frees its slot.

Marked slow (the server case also llm_server); a few minutes each on two cores. Beside them, in seconds:
`test_only_a_run_whose_process_is_gone_is_released` (a real run holding the `llm` slot in another process) and
`test_an_instance_locked_by_another_process_is_one_sentence` (another process holds the instance's write lock:
`ndx-pipeline run` says so in one sentence).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from ndx_pipeline.cli import instance_settings
from ndx_pipeline.core.storage import asset_path, llm_cache_dir
from ndx_pipeline.defs.pools import INTERRUPTED_TAG, PID_TAG
from ndx_pipeline_tests.llm_server import MODEL_ALIAS, TEST_API_KEY, FaultProxy, llama_server  # noqa: F401
from ndx_pipeline_tests.test_ui_graphql import workdir  # noqa: F401  (fixture: a home with the CLI's template)

REPO = Path(__file__).resolve().parents[1]
NEURONS = [5, 9, 11]
# Small settings: a few short requests per neuron. In process the simulator answers in batches of 8, so the steps get
# enough requests for a kill to fall between two batches: 9 scored excerpts, and calibration excerpts simulated
# after the explanations, in their step. The explainer answers one neuron at a time (max_concurrency 1): in one batch
# its three answers would land together, and on a fast CPU the step could end before the kill.
SMALL = {"selection": {"explain_excerpts": 2, "score_top_excerpts": 2, "score_random_excerpts": 1},
         "quality": {"calibration_top_excerpts": 1, "calibration_random_excerpts": 1},
         "explainer_llm": {"max_tokens": 16, "max_concurrency": 1}}
# The server simulates an excerpt in many requests (the echo, then one per slot where "10" may begin): fewer units
# and excerpts; the proxy holds the requests where the kill is to fall.
SERVER_NEURONS = [5, 9]
SERVER_SMALL = {"selection": {"explain_excerpts": 2, "score_top_excerpts": 1, "score_random_excerpts": 0},
                "quality": {"calibration_top_excerpts": 0, "calibration_random_excerpts": 0},
                "explainer_llm": {"max_tokens": 16}}
GENERATION = ("/v1/chat/completions", "/v1/completions")  # what the server answers with the model
TIMEOUT = 900  # seconds for one run: two cores, shared with the server or other tests


@pytest.fixture
def corpus(tmp_path):
    """Twelve documents of the bundled corpus (CPython's reference text), as a folder."""
    import pydoc_data.topics as topics

    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in sorted(topics.topics)[:12]:
        (folder / f"{name}.txt").write_text(topics.topics[name], encoding="utf-8")
    return folder


def new_home(tmp_path: Path, variants: list[str], settings: dict = SMALL) -> Path:
    """A DAGSTER_HOME with the CLI's instance settings, its tables made once before several processes open them, and
    the variants file declaring `variants` with `settings`."""
    home = tmp_path / "home"
    (home / "storage").mkdir(parents=True)
    (home / "dagster.yaml").write_text(instance_settings(home))
    with dg.DagsterInstance.from_config(str(home)):
        pass
    (home / "storage" / "variants.yaml").write_text(yaml.safe_dump({v: settings for v in variants}))
    return home


class Cli:
    """`ndx-pipeline run --variant VARIANT …` in a subprocess, its output in a file."""

    def __init__(self, home: Path, corpus: Path, variant: str, *extra: str, env: dict | None = None,
                 neurons: list[int] = NEURONS):
        self.home, self.variant = home, variant
        self.log = home.parent / f"{variant}-{time.monotonic_ns()}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("NDX_")}
        environ.update(DAGSTER_HOME=str(home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                       PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
                       **(env or {}))
        args = ["--variant", variant, "--layers", "0", "--neurons", ",".join(map(str, neurons)), "--controls",
                "none", "--baselines", "none", "--scorers", "none", "--corpus", str(corpus), *extra]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ndx_pipeline.cli", "run", *args], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.variant}: no end within {timeout} s:\n{self.output()[-4000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)  # (a stopped process dies of SIGKILL all the same; this is tidy)
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(60)

    def run_id(self) -> str:
        """The run this process executes (or executed last), by its process tag."""
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            runs = instance.get_runs(dg.RunsFilter(tags={PID_TAG: str(self.pid)}), limit=1)
        assert runs, f"{self.variant}: no run of process {self.pid}:\n{self.output()[-3000:]}"
        return runs[0].run_id

    def wait_for(self, ready, what: str, timeout: float = TIMEOUT):
        """Poll `ready()` until it returns something truthy; fail (with the output) if the process ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = ready()
            if found:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.variant} ended ({self.proc.returncode}) before {what}:\n"
                                     f"{self.output()[-4000:]}")
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"{self.variant}: not {what} within {timeout} s:\n{self.output()[-4000:]}")

    def in_step(self, step: str) -> str:
        """Wait until this process's run has started `step`; its run id."""
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            def started():
                for run in instance.get_runs(dg.RunsFilter(tags={PID_TAG: str(self.pid)}), limit=1):
                    if any(e.step_key == step for e in instance.all_logs(run.run_id,
                                                                           of_type=dg.DagsterEventType.STEP_START)):
                        return run.run_id
                return None

            return self.wait_for(started, f"in {step}")

    def stop_holding(self, run_id: str, pool: str, timeout: float = 120) -> str:
        """SIGSTOP this process at a moment its run `run_id` holds a slot of `pool` (its steps are quick: it may be
        between two of them) and it holds no write lock on the instance's files; the step holding the slot."""
        def holding():
            stop_between_writes(self.pid)
            with dg.DagsterInstance.from_config(str(self.home)) as instance:
                info = instance.event_log_storage.get_concurrency_info(pool)
            steps = [slot.step_key for slot in info.claimed_slots if slot.run_id == run_id]
            if not steps:
                os.kill(self.pid, signal.SIGCONT)
            return steps[0] if steps else None

        return self.wait_for(holding, f"caught holding a slot of {pool}", timeout)


def stop_between_writes(pid: int, tries: int = 600) -> None:
    """SIGSTOP `pid` at a moment it holds no POSIX write lock (/proc/locks; sqlite's, not the steps' flocks):
    stopped inside a commit to the instance's sqlite files, it would keep every other process from them (their reads
    give "database is locked" after 30 s)."""
    for _ in range(tries):
        os.kill(pid, signal.SIGSTOP)
        held = [line.split() for line in Path("/proc/locks").read_text().splitlines()]
        if not any(len(f) > 4 and f[1:4] == ["POSIX", "ADVISORY", "WRITE"] and f[4] == str(pid) for f in held):
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError(f"process {pid} held a write lock at each of {tries} tries")


def status(home: Path, run_id: str) -> tuple[dg.DagsterRunStatus, dict]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_run_by_id(run_id)
        return run.status, dict(run.tags)


def pools_listing(home: Path, run_id: str) -> list[str]:
    """The pools that list `run_id`, holding a slot or waiting in their queue."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        storage = instance.event_log_storage
        infos = storage.get_concurrency_infos(sorted(storage.get_concurrency_keys()))
    return [pool for pool, info in infos.items()
            if any(s.run_id == run_id for s in info.claimed_slots) or any(p.run_id == run_id
                                                                          for p in info.pending_steps)]


def cache_files(storage: Path) -> dict[str, int]:
    """LLM cache entry → the time its file was written."""
    return {p.name: p.stat().st_mtime_ns for p in llm_cache_dir(storage).glob("??/*.json")}


def file_ids(storage: Path, assets, variant: str) -> dict[str, tuple[int, int]]:
    """asset → (inode, modification time) of its layer-0 file: a file written again changes both."""
    out = {}
    for asset in assets:
        st = asset_path(storage, asset, 0, variant).stat()
        out[asset] = (st.st_ino, st.st_mtime_ns)
    return out


def released_line(run_id: str) -> str:
    return f"an earlier run {run_id[:8]} was killed; marked failed and its `llm` slot released"


HOLDER = textwrap.dedent("""
    import sys
    import time
    import dagster as dg
    from ndx_pipeline.defs.pools import process_tags

    @dg.op(pool="llm")
    def hold():
        print("holding", flush=True)
        time.sleep(600)

    @dg.job
    def holding():
        hold()

    with dg.DagsterInstance.get() as instance:
        holding.execute_in_process(instance=instance, tags=process_tags() if sys.argv[1:] == ["tagged"] else {})
""")


def test_only_a_run_whose_process_is_gone_is_released(tmp_path):
    from ndx_pipeline.defs.pools import release_stale_runs

    home = new_home(tmp_path, [])
    env = {**os.environ, "DAGSTER_HOME": str(home),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, "tagged"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        with dg.DagsterInstance.from_config(str(home)) as instance:
            (run,) = instance.get_runs()
            assert release_stale_runs(instance) == []  # alive: left alone
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
        assert pools_listing(home, run.run_id) == ["llm"]
        proc.kill()
        proc.wait(30)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert release_stale_runs(instance) == [released_line(run.run_id)]
            assert release_stale_runs(instance) == []  # once
            after = instance.get_run_by_id(run.run_id)
            failure = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert after.status == dg.DagsterRunStatus.FAILURE
        assert after.tags[INTERRUPTED_TAG] == f"killed (process {proc.pid} on this host is gone)"
        assert f"process {proc.pid} on this host is gone" in failure[0].message
        assert pools_listing(home, run.run_id) == []
    finally:
        proc.kill()
        proc.wait(30)
    # a run without process tags (as `dagster dev` launches them) that its launcher marked failed when its process
    # died, still holding its slot: freed too
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        proc.kill()
        proc.wait(30)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            (other,) = [r for r in instance.get_runs() if r.run_id != run.run_id]
            assert release_stale_runs(instance) == []  # no process recorded: not judged
            instance.report_run_failed(other, "its process died")
            assert release_stale_runs(instance) == [f"an earlier run {other.run_id[:8]} ended (FAILURE) but still "
                                                    "held its `llm` slot; released"]
        assert pools_listing(home, other.run_id) == []
    finally:
        proc.kill()
        proc.wait(30)


def test_an_instance_locked_by_another_process_is_one_sentence(tmp_path):
    """Another process holds the write lock of the instance's runs table (as a run stopped with Ctrl-Z inside a
    commit would): `ndx-pipeline run` cannot record its run and says so in one sentence, no trace, exit 1."""
    import sqlite3

    home = new_home(tmp_path, [])
    writer = sqlite3.connect(home / "history" / "runs.db")
    writer.execute("BEGIN IMMEDIATE")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NDX_")}
        env.update(DAGSTER_HOME=str(home), HF_HUB_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
        done = subprocess.run([sys.executable, "-m", "ndx_pipeline.cli", "run", "--layers", "0", "--neurons", "5",
                               "--controls", "none", "--baselines", "none", "--scorers", "none"],
                              env=env, capture_output=True, text=True, timeout=300)
    finally:
        writer.rollback()
        writer.close()
    assert done.returncode == 1, done.stderr
    assert done.stderr == (f"error: the Dagster instance's sqlite files under {home} stayed locked: another process "
                           "(a run stopped with Ctrl-Z, a stuck `dagster dev`) is in the middle of writing them; "
                           "resume or end it and run the command again (many runs at once: put the instance on "
                           "Postgres, README \"Several machines\").\n")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", pytest.param("server", marks=pytest.mark.llm_server)])
def test_killed_inside_explanations_then_inside_simulations(backend, tmp_path, corpus, request):
    variant = "killed"
    home = new_home(tmp_path, [variant], SERVER_SMALL if backend == "server" else SMALL)
    storage = home / "storage"
    env, proxy, neurons = {}, None, NEURONS
    if backend == "server":
        neurons = SERVER_NEURONS
        server = request.getfixturevalue("llama_server")
        proxy = FaultProxy(server.port)
        request.addfinalizer(proxy.close)
        for stage in ("EXPLAINER", "SIMULATOR"):
            env.update({f"NDX_{stage}_BACKEND": "openai", f"NDX_{stage}_BASE_URL": proxy.base_url,
                        f"NDX_{stage}_MODEL": MODEL_ALIAS, f"NDX_{stage}_SERVER": "llama_cpp",
                        f"NDX_{stage}_API_KEY": TEST_API_KEY})

    def kill_inside(cli: Cli, step: str, asks: str) -> tuple[str, dict[str, int]]:
        """SIGKILL `cli` inside `step`, once at least one of the step's answers came back. With the server, the
        step's requests to `asks` after its first are held unanswered, and the kill waits until no request is at
        the server and every answer it gave is in the cache (the client had it). The killed run's id, and the LLM
        cache at the kill."""
        held, seen = (proxy.held, len(proxy.answered)) if proxy is not None else (0, 0)
        if proxy is not None and step == "explanations":  # its first requests: the explainer's, in a few seconds
            proxy.hold((asks,), after=1, seconds=TIMEOUT)
        run_id = cli.in_step(step)
        if proxy is None:
            before = cache_files(storage)
            cli.wait_for(lambda: cache_files(storage).keys() - before.keys(), f"answered in {step}")
        else:
            if step != "explanations":
                proxy.hold((asks,), after=1, seconds=TIMEOUT)

            def all_answers_kept():
                answered = {body for path, body in proxy.answered if path in GENERATION}
                return (proxy.held > held and proxy.in_flight == 0 and len(cache_files(storage)) >= len(answered)
                        and any(path == asks for path, _ in proxy.answered[seen:]))

            cli.wait_for(all_answers_kept, f"held by the proxy in {step}, every answer cached")
        cache = cache_files(storage)
        cli.kill()
        if proxy is not None:
            proxy.hold_off()
        assert not asset_path(storage, step, 0, variant).exists(), f"{step} had finished: the kill came too late"
        return run_id, cache

    # 1. killed inside explanations, after some of them came back
    first = Cli(home, corpus, variant, env=env, neurons=neurons)
    killed, cache = kill_inside(first, "explanations", "/v1/chat/completions")
    upstream = file_ids(storage, ("activation_records", "top_excerpts"), variant)

    # 2. the same command: the killed run released in one line, its finished steps kept; killed inside simulations
    second = Cli(home, corpus, variant, env=env, neurons=neurons)
    again, cache_again = kill_inside(second, "simulations", "/v1/completions")
    out = second.output()
    assert released_line(killed) in out, out[-3000:]
    assert f"resuming this command from run {killed[:8]}, killed (process {first.pid} on this host is gone)" in out
    run_status, tags = status(home, killed)
    assert run_status == dg.DagsterRunStatus.FAILURE and "is gone" in tags[INTERRUPTED_TAG]
    assert pools_listing(home, killed) == []
    assert file_ids(storage, upstream, variant) == upstream  # activation_records, top_excerpts: not written again
    assert all(cache_again[name] == at for name, at in cache.items())  # no answer before the kill computed again
    explained = file_ids(storage, ("explanations", "calibration_simulations"), variant)

    # 3. once more: it finishes
    third = Cli(home, corpus, variant, env=env, neurons=neurons)
    assert third.finish() == 0, third.output()[-4000:]
    out = third.output()
    assert released_line(again) in out, out[-3000:]
    assert status(home, again)[0] == dg.DagsterRunStatus.FAILURE
    assert status(home, third.run_id())[0] == dg.DagsterRunStatus.SUCCESS
    assert pools_listing(home, again) == [] and pools_listing(home, killed) == []
    assert file_ids(storage, upstream, variant) == upstream
    assert file_ids(storage, explained, variant) == explained
    after = cache_files(storage)
    assert all(after[name] == at for name, at in cache_again.items())
    scores = pl.read_parquet(asset_path(storage, "scores", 0, variant))
    assert sorted(scores["neuron"].to_list()) == neurons
    if proxy is not None:  # the server's log: every request it answered, answered once
        asked = Counter(body for path, body in proxy.answered if path in GENERATION)
        assert asked and max(asked.values()) == 1, [b[:200] for b, n in asked.items() if n > 1]
        print(f"\n[killed runs, server] {sum(asked.values())} requests answered, none twice, over three runs "
              "(two killed)")
    else:
        print(f"\n[killed runs, in process] {len(after)} answers computed, each once, over three runs (two killed)")


@pytest.mark.slow
def test_a_run_blocked_by_a_live_runs_slot(tmp_path, corpus):
    import psutil

    home = new_home(tmp_path, ["holder", "at-once", "patient", "after"])
    holder = Cli(home, corpus, "holder")
    others: list[Cli] = []
    try:
        held = holder.in_step("explanations")
        step = holder.stop_holding(held, "llm")  # alive, holding the llm slot, doing nothing
        holds = f"pool `llm` (limit 1): run {held[:8]} holds it ({step}; for "
        alive = f"process {holder.pid} on this host, alive)"

        # --wait 0: fails at once, saying who holds the slot
        at_once = Cli(home, corpus, "at-once", "--wait", "0")
        others.append(at_once)
        assert at_once.finish() == 1, at_once.output()[-4000:]
        out = at_once.output()
        mine = at_once.run_id()
        assert re.search(rf"error: explanations of run {mine[:8]} waited 0 s for a slot \(--wait 0\) and gave up: "
                         rf"{re.escape(holds)}[^;]*; {re.escape(alive)}", out), out[-3000:]
        assert status(home, mine)[0] == dg.DagsterRunStatus.FAILURE and pools_listing(home, mine) == []

        # no --wait: a line every 10 s, asleep in between; SIGTERM cancels it and frees its place. The run that
        # waits for the holder's death (`after`, below) starts with it, so that its start-up overlaps this one's wait
        # (not with `at-once`'s: started beside it, a --wait 0 run could find the subject-model slot taken).
        patient = Cli(home, corpus, "patient")
        after = Cli(home, corpus, "after")
        others += [patient, after]

        def lines():
            return re.findall(r"explanations: waiting (\d+) s for a slot of " + re.escape(holds), patient.output())

        patient.wait_for(lambda: len(lines()) >= 1, "waiting")
        cpu, wall = sum(psutil.Process(patient.pid).cpu_times()[:2]), time.monotonic()
        patient.wait_for(lambda: len(lines()) >= 2, "waiting for 10 s", timeout=120)
        busy = (sum(psutil.Process(patient.pid).cpu_times()[:2]) - cpu) / (time.monotonic() - wall)
        assert busy < 0.2, f"a waiting run used {busy:.0%} of a core"
        waited = [int(x) for x in lines()]
        assert waited[0] <= 1 and all(9 <= b - a <= 13 for a, b in zip(waited, waited[1:])), waited
        assert alive in patient.output()
        waiting = patient.run_id()
        os.kill(patient.pid, signal.SIGTERM)
        stopped_at = time.monotonic()
        assert patient.finish(timeout=120) == 130
        quit_s = time.monotonic() - stopped_at
        assert (f"error: run {waiting[:8]} was stopped by SIGTERM or Ctrl-C: marked canceled and its pool slots "
                "released") in patient.output()
        assert status(home, waiting)[0] == dg.DagsterRunStatus.CANCELED and pools_listing(home, waiting) == []

        # the holder is killed while a run waits for its slot: the waiting run releases it and goes on
        after.wait_for(lambda: "explanations: waiting" in after.output(), "waiting")
        holder.kill()
        assert after.finish() == 0, after.output()[-4000:]
        out = after.output()
        assert released_line(held) in out and status(home, held)[0] == dg.DagsterRunStatus.FAILURE
        assert status(home, after.run_id())[0] == dg.DagsterRunStatus.SUCCESS
        assert pools_listing(home, held) == []
        print(f"\n[blocked run] waiting lines at {waited} s, {busy:.1%} of a core while waiting; SIGTERM ended it "
              f"in {quit_s:.1f} s")
    finally:
        for cli in (holder, *others):
            cli.kill()


@pytest.mark.slow
@pytest.mark.ui
def test_dagster_dev_frees_the_slot_of_a_run_whose_process_was_killed(workdir):  # noqa: F811  (fixture)
    """`dagster dev` on the CLI's instance template (run monitoring on): a run launched through GraphQL is killed
    (SIGKILL of its process) inside `explanations`; the code server marks it FAILURE, and the daemon's run
    monitoring frees its `llm` slot within free_slots_after_run_end_seconds + poll_interval_seconds."""
    from ndx_pipeline.core.variants import DEFAULT_VARIANT
    from ndx_pipeline.defs.automation import MAIN_JOB
    from ndx_pipeline.defs.partitions import range_tags
    from ndx_pipeline_tests.test_ui_graphql import LOCATION, DagsterDev, _add_variant, _small_run_config

    home, storage = workdir / "dagster_home", workdir / "storage"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.run_monitoring_enabled
        settings = instance.run_monitoring_settings
    dev = DagsterDev(workdir, home, {k: "" for k in os.environ if k.startswith("NDX_")})
    try:
        dev.start()
        _add_variant(dev, DEFAULT_VARIANT)
        run_id = dev.client().submit_job_execution(MAIN_JOB, repository_location_name=LOCATION,
                                                   run_config=_small_run_config(storage, workdir / "corpus"),
                                                   tags=range_tags(DEFAULT_VARIANT, 0, 0))
        deadline = time.monotonic() + TIMEOUT
        pid = None
        while time.monotonic() < deadline and pid is None:
            with dg.DagsterInstance.from_config(str(home)) as instance:
                run = instance.get_run_by_id(run_id)
                assert not run.is_finished, f"run ended {run.status} before explanations:\n{dev.log_tail()}"
                events = instance.all_logs(run_id)
                if any(e.step_key == "explanations" and e.dagster_event and e.dagster_event.is_step_start
                       for e in events):
                    found = [re.search(r"in process \(pid: (\d+)\)", e.message or "") for e in events]
                    pid = next(int(m.group(1)) for m in found if m)
            time.sleep(0.2)
        assert pid is not None, f"explanations did not start:\n{dev.log_tail()}"
        assert pools_listing(home, run_id) == ["llm"]
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        limit = settings["free_slots_after_run_end_seconds"] + settings["poll_interval_seconds"] + 60
        failed_s = freed_s = None
        while time.monotonic() - killed_at < limit and freed_s is None:
            if failed_s is None and status(home, run_id)[0] == dg.DagsterRunStatus.FAILURE:
                failed_s = time.monotonic() - killed_at
            if failed_s is not None and pools_listing(home, run_id) == []:
                freed_s = time.monotonic() - killed_at
            time.sleep(1)
        assert failed_s is not None, f"the killed run is {status(home, run_id)[0]}:\n{dev.log_tail()}"
        assert freed_s is not None, f"its slot was not freed within {limit} s:\n{dev.log_tail()}"
        print(f"\n[dagster dev] killed run marked FAILURE {failed_s:.0f} s after the kill, its llm slot freed after "
              f"{freed_s:.0f} s")
    finally:
        dev.stop()
