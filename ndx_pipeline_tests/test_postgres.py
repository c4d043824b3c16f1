"""A Postgres-backed Dagster instance (deploy/postgres/dagster.yaml) under several layer runs at once.

A real PostgreSQL server (Debian's `postgresql` package) is initialised into a temporary folder and started on
127.0.0.1 with a free port and a password login; the instance is built from the repository's yaml with the
connection read from DAGSTER_PG_* environment variables. One run writes the corpus, the variant `neurons` is made
a key of the instance's variant dimension, then three processes each run one layer × variant partition
(`<layer>|neurons`: activation_records → top_excerpts) at the same time against the same database. The test then
reads everything back: each run succeeded, every Dagster event a run emitted is in the event log (counted by type),
one materialization per asset per partition with the right partition key, and each partition's Parquet file
(`<asset>/neurons/<layer>.parquet`) is readable and holds that layer only, its ids scoped to the variant.

Run with `pytest -m postgres`. Skipped, with the reason, when PostgreSQL's server programs are not installed
and cannot be installed (`apt-get install postgresql` needs root).

Run as a module (`python -m ndx_pipeline_tests.test_postgres LAYER STORAGE CORPUS OUT.json`) it is the worker
one of those processes runs (partition `<LAYER>|neurons`).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PG_YAML = REPO / "deploy" / "postgres" / "dagster.yaml"
LAYERS = ["0", "1", "2"]
VARIANT = "neurons"  # the default variant (`core.variants.DEFAULT_VARIANT`)
LAYER_ASSETS = ["activation_records", "token_table", "top_excerpts"]  # all three written by the extraction step
NEURONS = [5, 9]
PG_USER = "ndx_dagster"
PG_DB = "ndx_dagster_test"


def small_run_config(storage: str, corpus: str) -> dict:
    return {"resources": {
        "storage": {"config": {"storage_dir": storage}},
        "corpus_source": {"config": {"path": corpus}},
        "subject_model": {"config": {"window_tokens": 16}},
        "selection": {"config": {"neurons": NEURONS, "score_top_excerpts": 2, "score_random_excerpts": 1}},
    }}


# ---------------------------------------------------------------------------------------------------------------
# The PostgreSQL server


def _pg_bindir() -> Path | None:
    """The folder of initdb/pg_ctl: on PATH, else the newest /usr/lib/postgresql/<version>/bin (Debian)."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                      key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


def _install_postgres() -> str | None:
    """apt-get install postgresql when we are root; returns why not otherwise (None on success)."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "PostgreSQL server programs (initdb, pg_ctl) are not installed; install Debian's `postgresql` package"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-qq", "postgresql"],
                ["sh", "-c", "apt-get update -qq && apt-get install -y -qq postgresql"]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"installing PostgreSQL with apt-get failed ({exc})"
        if done.returncode == 0 and _pg_bindir():
            return None
    return f"installing PostgreSQL with apt-get failed: {done.stderr.strip()[-300:]}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb + pg_ctl into a private folder; as the `postgres` user when we are root (postgres refuses root)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="ndx-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.password = os.urandom(12).hex()
        self.port = 0
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root but there is no `postgres` user to run the server as") from None
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else \
                ["su", "postgres", "-s", "/bin/sh", "-c"]

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_user[:1] == ["su"]:
            import shlex

            cmd = [*self.as_user, shlex.join(cmd)]
        else:
            cmd = [*self.as_user, *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr.strip()}\n{log}")
        return done

    def start(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.as_user:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        os.chmod(pwfile, 0o600)
        # Password (scram) over TCP, so the DAGSTER_PG_PASSWORD the instance reads is really checked.
        self._run("initdb", "-D", str(self.data), "-U", PG_USER, f"--pwfile={pwfile}", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        for attempt in range(3):
            self.port = _free_port()
            opts = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c max_connections=200 -c fsync=off"
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def create_database(self, name: str) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER, password=self.password,
                                dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def env(self, db: str) -> dict[str, str]:
        return {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": PG_USER,
                "DAGSTER_PG_PASSWORD": self.password, "DAGSTER_PG_DB": db}


@pytest.fixture(scope="module")
def postgres():
    bindir = _pg_bindir()
    if bindir is None:
        why = _install_postgres()
        bindir = _pg_bindir()
        if bindir is None:
            pytest.skip(why or "PostgreSQL server programs not found after installing")
    server = PostgresServer(bindir)
    try:
        server.start()
        server.create_database(PG_DB)
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_home(postgres, tmp_path, monkeypatch):
    """A DAGSTER_HOME holding deploy/postgres/dagster.yaml, with the connection in the environment."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PG_YAML, home / "dagster.yaml")
    for key, value in postgres.env(PG_DB).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.fixture
def small_corpus(tmp_path):
    """Six real documents (CPython's reference text): a few hundred 16-token windows."""
    from pydoc_data.topics import topics

    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ["assert", "break", "continue", "del", "pass", "global"]:
        (folder / f"{name}.txt").write_text(topics[name])
    return folder


# ---------------------------------------------------------------------------------------------------------------
# The worker (one layer run in its own process)


def _partition(layer: str) -> str:
    """The layer's partition key of the variant: `<layer>|neurons`."""
    from ndx_pipeline.defs.partitions import partition_key

    return str(partition_key(int(layer), VARIANT))


def _worker(layer: str, storage: str, corpus: str, out: str) -> int:
    import dagster as dg

    from ndx_pipeline.definitions import build_definitions
    from ndx_pipeline.defs.automation import MAIN_JOB

    partition = _partition(layer)

    job = build_definitions().resolve_job_def(MAIN_JOB)
    instance = dg.DagsterInstance.get()  # $DAGSTER_HOME/dagster.yaml: the Postgres instance
    started = time.time()
    result = job.execute_in_process(
        run_config=small_run_config(storage, corpus), instance=instance, partition_key=partition,
        asset_selection=[dg.AssetKey(k) for k in LAYER_ASSETS], raise_on_error=False,
    )
    counts = collections.Counter(e.event_type_value for e in result.all_events)
    Path(out).write_text(json.dumps({
        "run_id": result.run_id, "success": result.success, "partition": partition, "event_counts": counts,
        "started": started, "finished": time.time(), "storage": type(instance.event_log_storage).__name__,
    }))
    return 0 if result.success else 1


# ---------------------------------------------------------------------------------------------------------------
# The test


@pytest.mark.postgres
def test_instance_yaml_reads_the_connection_from_the_environment(pg_home):
    import dagster as dg
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    text = PG_YAML.read_text()
    assert os.environ["DAGSTER_PG_PASSWORD"] not in text
    instance = dg.DagsterInstance.get()
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
    assert instance.get_runs_count() >= 0  # tables created, connection works with the password from the env


@pytest.mark.postgres
def test_concurrent_layer_runs_lose_no_events_and_keep_partitions_intact(pg_home, small_corpus, tmp_path):
    import dagster as dg
    import polars as pl
    from dagster._core.events import DagsterEventType as T

    from ndx_pipeline.core.storage import asset_path
    from ndx_pipeline.core.variants import DEFAULT_VARIANT
    from ndx_pipeline.definitions import build_definitions
    from ndx_pipeline.defs.automation import MAIN_JOB
    from ndx_pipeline.defs.partitions import add_variant

    storage = tmp_path / "storage"
    instance = dg.DagsterInstance.get()
    job = build_definitions().resolve_job_def(MAIN_JOB)
    first = job.execute_in_process(run_config=small_run_config(str(storage), str(small_corpus)), instance=instance,
                                   asset_selection=[dg.AssetKey("corpus")], raise_on_error=False)
    assert first.success
    assert VARIANT == DEFAULT_VARIANT
    # The variant is a key of the dynamic dimension once, before the workers start (as the CLI adds it).
    assert add_variant(instance, VARIANT)
    partitions = {layer: _partition(layer) for layer in LAYERS}
    assert partitions["1"] == "1|neurons"

    # Three layer runs at once, each in its own process, all writing to the same Postgres database.
    procs, outs = [], {}
    for layer in LAYERS:
        outs[layer] = tmp_path / f"worker-{layer}.json"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "ndx_pipeline_tests.test_postgres", layer, str(storage), str(small_corpus),
             str(outs[layer])],
            cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    logs = [p.communicate(timeout=540)[0] for p in procs]
    for layer, proc, log in zip(LAYERS, procs, logs):
        assert proc.returncode == 0, f"layer {layer} worker failed:\n{log[-4000:]}"
    reports = {layer: json.loads(outs[layer].read_text()) for layer in LAYERS}
    assert all(r["storage"] == "PostgresEventLogStorage" for r in reports.values())
    # They really overlapped: every run started before any of them finished.
    assert max(r["started"] for r in reports.values()) < min(r["finished"] for r in reports.values())

    graph = build_definitions().resolve_asset_graph()
    steps = len({id(graph.get(dg.AssetKey(a)).assets_def) for a in LAYER_ASSETS})  # multi-assets: one step each
    run_ids = {layer: r["run_id"] for layer, r in reports.items()}
    assert len(set(run_ids.values())) == len(LAYERS)
    for layer, run_id in run_ids.items():
        run = instance.get_run_by_id(run_id)
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags["dagster/partition"] == partitions[layer]
        assert run.tags["dagster/partition/layer"] == layer and run.tags["dagster/partition/variant"] == VARIANT

        # No lost events: every Dagster event the run emitted is stored, type by type, with no duplicates.
        # (The *_PLANNED events are written by the instance when the run is created, not by the run itself.)
        log = instance.get_records_for_run(run_id).records
        records = [r.event_log_entry for r in log]
        assert len(records) == len(instance.all_logs(run_id))
        stored = collections.Counter(r.dagster_event.event_type_value for r in records if r.is_dagster_event)
        emitted = collections.Counter(reports[layer]["event_counts"])

        def executed(counts):
            return {k: v for k, v in counts.items() if not k.endswith("_PLANNED")}

        assert executed(stored) == executed(emitted), layer
        assert stored[T.RUN_START.value] == 1 and stored[T.RUN_SUCCESS.value] == 1
        assert stored[T.STEP_START.value] == stored[T.STEP_SUCCESS.value] == steps
        assert not stored.get(T.STEP_FAILURE.value) and not stored.get(T.RUN_FAILURE.value)
        assert stored[T.ASSET_MATERIALIZATION.value] == stored[T.ASSET_MATERIALIZATION_PLANNED.value] \
            == len(LAYER_ASSETS)
        assert stored.get(T.ASSET_CHECK_EVALUATION.value, 0) == stored.get(T.ASSET_CHECK_EVALUATION_PLANNED.value, 0)
        materialized = sorted(
            (r.dagster_event.asset_key.to_user_string(), r.dagster_event.partition)
            for r in records if r.dagster_event_type == T.ASSET_MATERIALIZATION
        )
        assert materialized == [(asset, partitions[layer]) for asset in sorted(LAYER_ASSETS)]
        # The event log of one run is in order and its storage ids are unique.
        ids = [r.storage_id for r in log]
        assert len(set(ids)) == len(ids) and ids == sorted(ids)
        assert [r.dagster_event_type for r in records if r.is_dagster_event][-1] == T.RUN_SUCCESS

    # Intact partitions: across all runs, exactly one materialization per asset per layer, from that layer's run,
    # and its Parquet file (the variant's) holds that layer's rows only, with ids scoped to the variant.
    layer_of = {p: layer for layer, p in partitions.items()}
    for asset in LAYER_ASSETS:
        key = dg.AssetKey(asset)
        assert instance.get_materialized_partitions(key) == set(partitions.values())
        events = instance.fetch_materializations(key, limit=100).records
        assert sorted(e.partition_key for e in events) == sorted(partitions.values())
        for e in events:
            layer = layer_of[e.partition_key]
            assert e.run_id == run_ids[layer]
            path = asset_path(storage, asset, int(layer), VARIANT)
            assert path == storage / asset / VARIANT / f"{layer}.parquet"
            frame = pl.read_parquet(path)
            assert len(frame) > 0, asset
            assert frame["layer"].unique().to_list() == [int(layer)]
            assert sorted(frame["neuron"].unique().to_list()) == NEURONS
            if asset == "top_excerpts":  # its ids: `neurons/<layer>/<neuron>/<kind>/<rank>`
                assert frame["excerpt_id"].str.starts_with(f"{VARIANT}/{layer}/").all(), asset
            assert e.asset_materialization.metadata["rows"].value == len(frame)
    # Nothing outside the variant's folders: no layer file of the layout from before variants.
    assert not [p for a in LAYER_ASSETS for p in (storage / a).glob("*.parquet")]
    records = pl.read_parquet(asset_path(storage, "activation_records", 1, VARIANT))
    assert records.filter(pl.col("kind") == "top").group_by("neuron").len()["len"].to_list() == [20, 20]
    assert not [p for p in storage.rglob("*.tmp")]
    assert instance.get_runs_count() == 1 + len(LAYERS)


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:5]))
