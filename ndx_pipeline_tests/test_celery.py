"""The pipeline on Celery workers with a Redis broker, with real processes (README "Scale out", deploy/celery/).

Everything the README's "Scale out" commands start, started for real on this machine:
- Redis (Debian's `redis-server`) on a free 127.0.0.1 port, no persistence, as broker and result backend;
- two `dagster-celery worker start` processes, each in its own process group, on the queues of
  `ndx_pipeline.defs.queues`: `ndx-subject` on `gpu,llm,dagster` (the only worker that runs the subject model) and
  `ndx-llm` on `llm,dagster` (both take LLM steps, so either can finish one the other lost);
- one sqlite Dagster instance (the CLI's instance settings) in a DAGSTER_HOME that every process shares, and one
  storage folder for the Parquet files and the LLM cache;
- the run: `dagster job execute -m ndx_pipeline.scale_out -a celery_definitions -j explain_neurons` with
  deploy/celery/celery.yaml, two layers of the variant `neurons` in one run (the partition-range tags `0|neurons` …
  `1|neurons`; the variant made a key of the instance's variant dimension first, as the CLI does), two neurons
  each, small counts.

`test_two_workers_run_every_step_where_its_queue_says` checks that every step executed in a worker process (the
pid of its events is a worker's, never the launcher's), that the extraction step ran only on `ndx-subject`, and that
every Parquet file of the data contract (`<asset>/neurons/<layer>.parquet`) equals an in-process run of the same
config (`polars.DataFrame.equals`: scores to the last bit; only the `seconds` wall-time column is left out). It
prints both wall times.

`test_worker_killed_mid_llm_step_run_finishes_on_the_other` runs layer 0 alone and kills (SIGKILL, the whole
process group) the worker executing `explanations` right after its first LLM answer is cached (or, when answers
come in one batch, ~60 % into the step). The step's message
was not acknowledged (`task_acks_late`), so Redis hands it to the remaining worker once its visibility timeout has
passed (here ~6× this run's longest step, at least FAULT_VISIBILITY_TIMEOUT_S, in a copy of deploy/celery/celery.yaml
that changes only the Redis transport's timings); the step runs again there, answers what the killed attempt
finished from the LLM cache, and the run succeeds: the cache holds exactly one entry per distinct request, no
temporary file is left, and the files equal the in-process run's layer 0.

Marked `celery` (and `slow`): `pytest -m celery`. Skipped, with the reason, when `redis-server` or the `redis`
client is not installed (`scripts/install.sh test` installs both).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster._core.events import DagsterEventType

from ndx_pipeline.core.contract import CORPUS, EXPLANATIONS, PARQUET_ASSETS, SIMULATIONS
from ndx_pipeline.core.storage import asset_path, llm_cache_dir
from ndx_pipeline.core.variants import DEFAULT_VARIANT
from ndx_pipeline.defs.automation import MAIN_JOB
from ndx_pipeline.defs.partitions import add_variant, partition_key, range_tags
from ndx_pipeline.defs.queues import DEFAULT_QUEUE, GPU_QUEUE, LLM_QUEUE, STEP_QUEUES
from ndx_pipeline_tests.runs import execute_layers

pytestmark = [pytest.mark.celery, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CELERY_YAML = REPO / "deploy" / "celery" / "celery.yaml"
LAYERS = (0, 1)
VARIANT = DEFAULT_VARIANT  # "neurons"
NEURONS = [5, 9]
SUBJECT_WORKER, LLM_WORKER = "ndx-subject", "ndx-llm"
WORKER_QUEUES = {SUBJECT_WORKER: (GPU_QUEUE, LLM_QUEUE, DEFAULT_QUEUE), LLM_WORKER: (LLM_QUEUE, DEFAULT_QUEUE)}
WALL_TIME_COLUMNS = ("seconds",)
LLM_STEPS = (EXPLANATIONS, SIMULATIONS)
# The fault test's visibility timeout: FAULT_STEP_MARGIN × the in-process reference's longest step (a step of two
# layers; the fault run's steps cover one), at least FAULT_VISIBILITY_TIMEOUT_S. Longer than any of its steps by far,
# so a live step is never handed out twice; short, so that the lost step comes back quickly. Measured on two cores:
# the reference's longest step ~11 s, the fault run's longest Celery task (the rerun `explanations`) ~7 s, every
# other task under 4 s; so the timeout is ~33 s, about 5× the longest task. Production: deploy/celery/celery.yaml.
FAULT_VISIBILITY_TIMEOUT_S = 30
FAULT_STEP_MARGIN = 3
FAULT_LAYERS = (0,)
# The events of a step's execution; the launcher itself only writes ENGINE_EVENTs with a step key ("Submitting
# celery task for step …").
EXECUTION_EVENTS = {"STEP_START", "STEP_INPUT", "STEP_OUTPUT", "HANDLED_OUTPUT", "LOADED_INPUT",
                    "ASSET_MATERIALIZATION", "ASSET_CHECK_EVALUATION", "STEP_SUCCESS", "STEP_FAILURE",
                    "STEP_UP_FOR_RETRY", "STEP_RESTARTED", "RESOURCE_INIT_STARTED", "RESOURCE_INIT_SUCCESS",
                    "RESOURCE_INIT_FAILURE"}
RUN_TIMEOUT_S = 900


def run_config(storage: Path, corpus: Path) -> dict:
    """Two neurons per layer, two scored excerpts each, 16-token windows, one explainer call per neuron and the
    lookup baseline only (the simulated baselines would double the simulator's work), no scorer beside simulation
    (their steps still run on the workers; their files are written empty and compared all the same).

    The LLMs compute in float32, the exact path: the cluster's batches are not the in-process run's (the fault test
    runs one layer against the reference's two, and the step rerun after the kill batches only what is left), and in
    bfloat16 an explanation's wording can change with its batch's composition, and with it every request after it."""
    return {"resources": {
        "storage": {"config": {"storage_dir": str(storage)}},
        "corpus_source": {"config": {"path": str(corpus)}},
        "subject_model": {"config": {"window_tokens": 16}},
        "selection": {"config": {"neurons": NEURONS, "explain_excerpts": 2, "score_top_excerpts": 1,
                                 "score_random_excerpts": 1}},
        "quality": {"config": {"baselines": ["lookup"], "scorers": []}},
        "explainer_llm": {"config": {"max_tokens": 16, "dtype": "float32"}},
        "simulator_llm": {"config": {"dtype": "float32"}},
    }}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    import psutil

    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


def _kill_group(pgid: int, wait: float = 10) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------------------
# Redis, the workers, the launcher


def _redis_server_binary() -> str | None:
    """`redis-server` on PATH, else where Debian's package puts it."""
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class RedisServer:
    """`redis-server` on a free loopback port: no RDB snapshots, no AOF, its own process group."""

    def __init__(self, binary: str, root: Path):
        self.binary, self.root = binary, root
        self.log = root / "redis.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 30) -> None:
        import redis

        for attempt in range(3):
            self.port = _free_port()
            with open(self.log, "a") as log:
                self.proc = subprocess.Popen(
                    [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly",
                     "no", "--dir", str(self.root), "--daemonize", "no", "--protected-mode", "yes"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping():
                        return
                except redis.RedisError:
                    time.sleep(0.1)
            self.stop()  # the port was taken meanwhile, or it did not come up: another port
        raise RuntimeError(f"redis-server did not start:\n{_tail(self.log)}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(self.proc.pid)
        self.proc.wait()


class Worker:
    """`dagster-celery worker start` on some queues, in its own process group (the wrapper, the celery worker it
    starts and that one's pool process)."""

    def __init__(self, name: str, queues: tuple[str, ...], config_yaml: Path, env: dict[str, str], root: Path):
        self.name, self.queues, self.config_yaml, self.env = name, queues, config_yaml, env
        self.log = root / f"worker-{name}.log"
        self.proc: subprocess.Popen | None = None
        self.seen_pids: set[int] = set()

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app",
                 "-y", str(self.config_yaml), "-q", ",".join(self.queues), "-n", self.name],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited ({self.proc.returncode}):\n{_tail(self.log)}")
            if f"{self.name}@" in (text := _tail(self.log, 100_000)) and " ready." in text:
                self.pids()
                return
            time.sleep(0.5)
        raise RuntimeError(f"worker {self.name} not ready within {timeout}s:\n{_tail(self.log)}")

    def listening_queues(self) -> set[str]:
        """The queues the worker's banner lists (`.> <queue>   exchange=…`)."""
        text = _tail(self.log, 100_000)
        return {line.split()[1] for line in text.splitlines() if line.strip().startswith(".> ") and "exchange=" in line}

    def pids(self) -> set[int]:
        """Every pid of the worker's process tree seen so far (the pool process executes the steps)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            self.seen_pids |= {root.pid, *(c.pid for c in root.children(recursive=True))}
        except psutil.Error:
            pass
        return set(self.seen_pids)

    def kill(self) -> None:
        """kill -9 of the whole worker: the machine is gone, nothing gets to say goodbye."""
        self.pids()
        _kill_group(self.proc.pid)
        self.proc.wait()

    def stop(self) -> None:
        """Warm shutdown (SIGTERM to the celery worker, which its wrapper then reaps), then SIGKILL to whatever of
        the group is left."""
        if self.proc is None:
            return
        import psutil

        if self.proc.poll() is None:
            try:
                for child in psutil.Process(self.proc.pid).children():
                    child.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(self.proc.pid)
        self.proc.wait()


class Cluster:
    """Redis, the two workers, a shared DAGSTER_HOME and storage: what the README's Scale out section starts."""

    def __init__(self, root: Path, corpus: Path, celery_yaml: Path = CELERY_YAML):
        import dagster as dg
        import yaml

        from ndx_pipeline.cli import instance_settings

        self.root, self.celery_yaml = root, celery_yaml
        self.home, self.storage = root / "dagster_home", root / "storage"
        self.home.mkdir()
        (self.home / "dagster.yaml").write_text(instance_settings(self.home))
        # Create the instance's tables once, before several processes open it at the same time.
        self.instance = dg.DagsterInstance.from_config(str(self.home))
        add_variant(self.instance, VARIANT)  # a key of the variant dimension before a run names it (as the CLI does)
        self.run_yaml = root / "run.yaml"
        self.run_yaml.write_text(yaml.safe_dump(run_config(self.storage, corpus)))
        self.redis = RedisServer(_redis_server_binary(), root)
        self.workers: dict[str, Worker] = {}
        self.launcher: subprocess.Popen | None = None
        self.launcher_log = root / "launcher.log"

    def env(self) -> dict[str, str]:
        return {**os.environ, "DAGSTER_HOME": str(self.home), "NDX_CELERY_BROKER": self.redis.url(0),
                "NDX_CELERY_BACKEND": self.redis.url(1), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

    def start(self) -> None:
        self.redis.start()
        env = self.env()
        for name, queues in WORKER_QUEUES.items():
            self.workers[name] = Worker(name, queues, self.celery_yaml, env, self.root)
            self.workers[name].start()
        for worker in self.workers.values():
            worker.wait_ready()
            assert worker.listening_queues() == set(worker.queues), (worker.name, worker.listening_queues())

    def launch(self, layers=LAYERS) -> float:
        """Start one run of `layers` (the README's command); returns its start time."""
        tags = range_tags(VARIANT, layers[0], layers[-1])
        with open(self.launcher_log, "a") as log:
            self.launcher = subprocess.Popen(
                [str(VENV_BIN / "dagster"), "job", "execute", "-m", "ndx_pipeline.scale_out", "-a",
                 "celery_definitions", "-j", MAIN_JOB, "-c", str(self.celery_yaml), "-c", str(self.run_yaml),
                 "--tags", json.dumps(tags)],
                cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return time.perf_counter()

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.launcher.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run did not finish within {timeout}s:\n{self.diagnostics()}") from None

    def run_id(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = self.instance.get_runs()
            if runs:
                return runs[0].run_id
            if self.launcher.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"no run was created:\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        parts = [f"--- launcher\n{_tail(self.launcher_log)}"]
        parts += [f"--- worker {w.name}\n{_tail(w.log)}" for w in self.workers.values()]
        return "\n".join(parts)

    def stop(self) -> None:
        try:
            if self.launcher is not None and self.launcher.poll() is None:
                _kill_group(self.launcher.pid)
                self.launcher.wait()
            for worker in self.workers.values():
                worker.stop()
        finally:
            self.redis.stop()
            self.instance.dispose()
        for pgid in [w.proc.pid for w in self.workers.values() if w.proc] + \
                [p.pid for p in (self.launcher, self.redis.proc) if p]:
            assert not _group_alive(pgid), f"process group {pgid} survived"


# ---------------------------------------------------------------------------------------------------------------
# Reading a run back


def execution_events(records) -> list:
    """(step key, event type, pid, timestamp) of every event of a step's execution."""
    out = []
    for record in records:
        event = record.dagster_event
        if event is not None and event.step_key and event.event_type_value in EXECUTION_EVENTS:
            out.append((event.step_key, event.event_type_value, event.pid, record.timestamp))
    return out


def step_hosts(records) -> dict[str, list[str]]:
    """step key → the Celery node names that took its task, in order ("Executing steps … in celery worker")."""
    out: dict[str, list[str]] = {}
    for record in records:
        event = record.dagster_event
        if event is None or event.event_type_value != "ENGINE_EVENT":
            continue
        metadata = getattr(event.event_specific_data, "metadata", None) or {}
        if "Celery worker" in metadata:
            out.setdefault(event.step_key, []).append(metadata["Celery worker"].value)
    return out


def llm_accounting(events) -> dict[str, dict[str, int]]:
    """LLM step → its LLM counters (cache misses computed, cache hits), from the materialization metadata of the
    given DagsterEvents: per layer, or once for the layers a step's figures cover (`llm_accounting_covers_layers`)."""
    figures: dict[tuple[str, str], dict[str, int]] = {}
    for event in events:
        if event is None or event.event_type_value != "ASSET_MATERIALIZATION":
            continue
        asset, metadata = event.asset_key.to_user_string(), event.event_specific_data.materialization.metadata
        if asset not in LLM_STEPS or "llm_calls" not in metadata:
            continue
        covers = metadata["llm_accounting_covers_layers"].value if "llm_accounting_covers_layers" in metadata \
            else event.partition
        figures[(asset, covers)] = {key: int(metadata[key].value) for key in ("llm_calls", "llm_cache_hits")}
    out: dict[str, dict[str, int]] = {}
    for (asset, _), counts in figures.items():
        sums = out.setdefault(asset, {"llm_calls": 0, "llm_cache_hits": 0})
        for key, value in counts.items():
            sums[key] += value
    return out


def step_seconds(records) -> dict[str, float]:
    """step key → seconds from its first STEP_START to its STEP_SUCCESS."""
    started, out = {}, {}
    for record in records:
        event = record.dagster_event
        if event is not None and event.event_type_value == "STEP_START":
            started.setdefault(event.step_key, record.timestamp)
        elif event is not None and event.event_type_value == "STEP_SUCCESS":
            out[event.step_key] = record.timestamp - started[event.step_key]
    return out


def longest_task_seconds(cluster: Cluster) -> float:
    """The longest Celery task any worker finished (its log's "Task … succeeded in N s" lines): what the visibility
    timeout must exceed."""
    found = [float(m.group(1)) for w in cluster.workers.values()
             for m in re.finditer(r"\] Task \S+ succeeded in ([\d.]+)s", _tail(w.log, 10_000_000))]
    return max(found, default=0.0)


def cache_entries(storage: Path) -> set[str]:
    return {p.name for p in llm_cache_dir(storage).glob("??/*.json")}


def contract_files(storage: Path, layers=LAYERS) -> list[Path]:
    return [asset_path(storage, asset, None if asset == CORPUS else layer, None if asset == CORPUS else VARIANT)
            for asset in PARQUET_ASSETS for layer in (layers if asset != CORPUS else (None,))]


def assert_same_files(storage: Path, reference: Path, layers=LAYERS) -> None:
    """Every Parquet file of the contract for `layers` equals the reference's, value for value (wall-time columns
    aside)."""
    import polars as pl

    for ours, theirs in zip(contract_files(storage, layers), contract_files(reference, layers)):
        assert ours.exists(), f"{ours} is missing"
        a, b = pl.read_parquet(ours), pl.read_parquet(theirs)
        a, b = (f.drop([c for c in WALL_TIME_COLUMNS if c in f.columns]) for f in (a, b))
        assert a.schema == b.schema, ours
        assert a.equals(b), f"{ours.relative_to(storage)} differs from the in-process run's"
    scores = pl.read_parquet(asset_path(storage, "scores", layers[0], VARIANT))
    assert scores["score"].dtype == pl.Float64 and sorted(scores["neuron"].unique().to_list()) == NEURONS
    assert scores["explanation_id"].str.starts_with(f"{VARIANT}/{layers[0]}/").all()  # ids scoped by the variant


def assert_no_temporary_files(storage: Path) -> None:
    leftovers = [p for p in storage.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module", autouse=True)
def redis_installed() -> None:
    """Skip (before the in-process reference run) when Redis or its client is missing."""
    if _redis_server_binary() is None:
        pytest.skip("Debian's redis-server is not installed (scripts/install.sh test installs it)")
    pytest.importorskip("redis", reason="the redis client (dagster-celery[redis], in the test extra) is needed")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Six real documents (CPython's reference text)."""
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("corpus")
    for name in ["assert", "break", "continue", "del", "pass", "global"]:
        (folder / f"{name}.txt").write_text(topics[name])
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> dict:
    """The same config run in this process (`execute_in_process`): its storage, LLM accounting and wall time."""
    import dagster as dg

    from ndx_pipeline.definitions import build_definitions

    storage = tmp_path_factory.mktemp("reference") / "storage"
    job = build_definitions().resolve_job_def(MAIN_JOB)
    with dg.instance_for_test() as instance:
        started = time.perf_counter()
        result = execute_layers(job, instance, LAYERS, VARIANT, run_config=run_config(storage, corpus))
        seconds = time.perf_counter() - started
        assert result.success
        steps = step_seconds(instance.all_logs(result.run_id))
    events = list(result.all_events)
    entries = cache_entries(storage)
    accounting = llm_accounting(events)
    # Every answer was computed once: a fresh cache holds one entry per call (no request is made twice).
    assert sum(a["llm_calls"] for a in accounting.values()) == len(entries) > 0
    assert all(a["llm_cache_hits"] == 0 for a in accounting.values())
    return {"storage": storage, "seconds": seconds, "accounting": accounting, "cache_entries": entries,
            "step_seconds": steps}


@pytest.fixture
def cluster_factory(tmp_path, corpus):
    made: list[Cluster] = []

    def make(celery_yaml: Path = CELERY_YAML) -> Cluster:
        cluster = Cluster(tmp_path, corpus, celery_yaml)
        made.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


# ---------------------------------------------------------------------------------------------------------------
# The tests


def test_two_workers_run_every_step_where_its_queue_says(cluster_factory, reference):
    cluster = cluster_factory()
    started = cluster.launch()
    rc = cluster.wait()
    wall = time.perf_counter() - started
    assert rc == 0, f"the run failed:\n{cluster.diagnostics()}"

    import dagster as dg

    run_id = cluster.run_id()
    run = cluster.instance.get_run_by_id(run_id)
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert run.tags["dagster/asset_partition_range_start"] == str(partition_key(LAYERS[0], VARIANT)) == "0|neurons"
    assert run.tags["dagster/asset_partition_range_end"] == str(partition_key(LAYERS[-1], VARIANT))
    records = cluster.instance.all_logs(run_id)
    launcher_pid = cluster.launcher.pid
    run_start, run_end = (next(r for r in records if r.dagster_event and r.dagster_event.event_type == kind)
                          for kind in (DagsterEventType.RUN_START, DagsterEventType.RUN_SUCCESS))
    assert run_start.dagster_event.pid == launcher_pid  # the orchestration ran in the launcher …

    worker_pids = {name: w.pids() for name, w in cluster.workers.items()}
    assert not worker_pids[SUBJECT_WORKER] & worker_pids[LLM_WORKER]
    events = execution_events(records)
    # … and no step did: every event of every step's execution comes from one worker's pool process.
    steps = {step for step, *_ in events}
    assert steps == set(STEP_QUEUES), steps
    ran_on: dict[str, set[str]] = {}
    for step, kind, pid, _ in events:
        assert pid is not None and pid != launcher_pid, (step, kind, pid)
        owners = {name for name, pids in worker_pids.items() if pid in pids}
        assert len(owners) == 1, f"{step} {kind}: pid {pid} is no worker's ({worker_pids})"
        ran_on.setdefault(step, set()).update(owners)
    hosts = step_hosts(records)
    for step in STEP_QUEUES:
        kinds = [kind for s, kind, *_ in events if s == step]
        assert kinds.count("STEP_START") == kinds.count("STEP_SUCCESS") == 1, (step, kinds)
        assert len(ran_on[step]) == 1 and len(hosts[step]) == 1, (step, ran_on[step], hosts[step])
        (worker,) = ran_on[step]
        assert hosts[step][0].split("@")[0] == worker  # the node name in the step's engine event agrees
        assert STEP_QUEUES[step] in WORKER_QUEUES[worker], (step, worker)
    # The subject model ran only on the worker of the subject-model queue.
    assert {step for step, workers in ran_on.items() if GPU_QUEUE == STEP_QUEUES[step]} == {"activation_records"}
    assert ran_on["activation_records"] == {SUBJECT_WORKER}

    # The same files as the in-process run, and every LLM answer computed once.
    assert_same_files(cluster.storage, reference["storage"])
    assert_no_temporary_files(cluster.storage)
    accounting = llm_accounting(r.dagster_event for r in records)
    assert accounting == reference["accounting"]
    assert cache_entries(cluster.storage) == reference["cache_entries"]

    print(f"\n[celery] layers {list(LAYERS)} x {len(NEURONS)} neurons: in-process run {reference['seconds']:.1f} s; "
          f"two Celery workers {wall:.1f} s from the launcher's start "
          f"({run_end.timestamp - run_start.timestamp:.1f} s RUN_START→RUN_SUCCESS); "
          f"steps by worker: {dict(sorted((s, next(iter(w))) for s, w in ran_on.items()))}", flush=True)


def test_worker_killed_mid_llm_step_run_finishes_on_the_other(cluster_factory, reference, tmp_path):
    import math

    import yaml

    # deploy/celery/celery.yaml with only the Redis transport's timings shortened to this run's scale: one layer,
    # so each step takes about half of the reference's two-layer step; the visibility timeout is three times the
    # reference's longest step (about six times this run's, never under FAULT_VISIBILITY_TIMEOUT_S), so no live
    # step is handed out twice even when the machine is busy with other work.
    layers = FAULT_LAYERS
    visibility_timeout = max(FAULT_VISIBILITY_TIMEOUT_S,
                             math.ceil(FAULT_STEP_MARGIN * max(reference["step_seconds"].values())))
    settings = yaml.safe_load(CELERY_YAML.read_text())
    source = settings["execution"]["config"]["config_source"]
    assert source["task_acks_late"] is True and source["worker_prefetch_multiplier"] == 1
    assert source["worker_concurrency"] == 1 and source["task_reject_on_worker_lost"] is True
    assert source["broker_transport_options"]["visibility_timeout"] >= 3600
    source["broker_transport_options"].update(
        visibility_timeout=visibility_timeout, unacked_restore_interval=5, unacked_restore_throttle=1,
        unacked_mutex_expire=15)
    fault_yaml = tmp_path / "celery-fault.yaml"
    fault_yaml.write_text(yaml.safe_dump(settings))

    cluster = cluster_factory(fault_yaml)
    started = cluster.launch(layers)
    run_id = cluster.run_id()

    # Wait until a worker executes `explanations` and has cached its first LLM answer (or, should its answers come
    # in one batch at the end, until ~60 % of the step's expected time has passed), then kill that worker.
    patience = 0.3 * reference["step_seconds"][EXPLANATIONS]  # the reference's step covers two layers
    deadline = time.monotonic() + RUN_TIMEOUT_S
    victim = None
    while time.monotonic() < deadline:
        assert cluster.launcher.poll() is None, f"the run ended before the LLM step:\n{cluster.diagnostics()}"
        records = cluster.instance.all_logs(run_id)
        events = execution_events(records)
        assert not any(s == EXPLANATIONS and k == "STEP_SUCCESS" for s, k, *_ in events), \
            "explanations finished before the kill"
        taken = step_hosts(records).get(EXPLANATIONS)
        started_at = next((ts for s, k, _, ts in events if s == EXPLANATIONS and k == "STEP_START"), None)
        if taken and started_at and (cache_entries(cluster.storage) or time.time() - started_at > patience):
            victim = cluster.workers[taken[0].split("@")[0]]
            break
        time.sleep(0.2)
    assert victim is not None, f"no worker took explanations:\n{cluster.diagnostics()}"
    victim_pids = victim.pids()
    victim.kill()
    killed_at = time.time()
    finished_before_kill = cache_entries(cluster.storage)
    survivor = next(w for w in cluster.workers.values() if w is not victim)

    rc = cluster.wait()
    wall = time.perf_counter() - started
    assert rc == 0, f"the run failed after the kill:\n{cluster.diagnostics()}"
    assert survivor.proc.poll() is None and not _group_alive(victim.proc.pid)

    import dagster as dg

    assert cluster.instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
    records = cluster.instance.all_logs(run_id)
    events = execution_events(records)
    hosts = step_hosts(records)
    survivor_pids = survivor.pids()

    # The killed step started twice, first on the killed worker, then on the other, and finished there once.
    starts = [(pid, ts) for s, k, pid, ts in events if s == EXPLANATIONS and k == "STEP_START"]
    assert [h.split("@")[0] for h in hosts[EXPLANATIONS]] == [victim.name, survivor.name], hosts[EXPLANATIONS]
    assert len(starts) == 2 and starts[0][0] in victim_pids and starts[1][0] in survivor_pids, starts
    successes = [pid for s, k, pid, _ in events if s == EXPLANATIONS and k == "STEP_SUCCESS"]
    assert len(successes) == 1 and successes[0] in survivor_pids
    assert not [e for e in events if e[1] == "STEP_FAILURE"]
    # Every other step ran once, and everything after the kill ran on the survivor.
    durations = step_seconds(records)
    for step in STEP_QUEUES:
        if step != EXPLANATIONS:
            assert [k for s, k, *_ in events if s == step].count("STEP_START") == 1, \
                f"{step} was handed out twice: it ran longer ({durations.get(step)} s) than the visibility " \
                f"timeout ({visibility_timeout} s)"
    assert all(pid in survivor_pids for s, k, pid, ts in events if ts > killed_at)

    # No finished answer paid for twice: the rerun answered from the cache exactly what the killed attempt had
    # finished and computed only the rest, and every cache entry was computed once: by the killed attempt or by the
    # run's finished steps. Every request is one the in-process run made too.
    accounting = llm_accounting(r.dagster_event for r in records)
    entries = cache_entries(cluster.storage)
    assert accounting[EXPLANATIONS]["llm_cache_hits"] == len(finished_before_kill)
    assert accounting[SIMULATIONS]["llm_cache_hits"] == 0
    assert finished_before_kill <= entries <= reference["cache_entries"]
    assert len(entries) == sum(a["llm_calls"] for a in accounting.values()) + len(finished_before_kill)

    # No file half written: no temporary file anywhere, and every file equals the in-process run's.
    assert_no_temporary_files(cluster.storage)
    assert_same_files(cluster.storage, reference["storage"], layers)

    explainer_answers = len(finished_before_kill) + accounting[EXPLANATIONS]["llm_calls"]
    print(f"\n[celery fault] layer {list(layers)}: killed {victim.name} during explanations after "
          f"{len(finished_before_kill)} of {explainer_answers} explainer answers; {survivor.name} took the step "
          f"{starts[1][1] - killed_at:.1f} s later (visibility timeout {visibility_timeout} s, "
          f"{starts[1][1] - starts[0][1]:.1f} s after the first attempt started; longest Celery task "
          f"{longest_task_seconds(cluster):.1f} s) and the run succeeded; run wall time {wall:.1f} s", flush=True)
