"""The UI path, headless: `dagster dev` on a free port on 127.0.0.1, driven through GraphQL as the UI drives it.

1. `dagster dev -w workspace.yaml` (the venv's, the repository's workspace) starts in a temporary folder with its
   own DAGSTER_HOME (the instance template the CLI writes: sqlite, run queue).
2. The variant `neurons` is made a key of the `variant` partition dimension through GraphQL
   (`addDynamicPartition`, as the UI's "add partition" does). Through `dagster_graphql.DagsterGraphQLClient` ONE run
   of job `explain_neurons` is launched for layers 0 and 1 of that variant (the partition-range tags `0|neurons` …
   `1|neurons`, small run config), queued, dequeued by the daemon, executed by the run launcher; we wait for
   SUCCESS. That one run materialized every asset for both partitions (a multi-partition single-run backfill, which
   has had upstream bugs: dagster-io/dagster #18852, #23996, #28861, #17404): it is the instance's only run, and
   each asset's materializations of `0|neurons` and `1|neurons` carry its run id.
3. Lineage of `scores` for partition `1|neurons`, read with raw GraphQL (the client has no call for it): the
   upstream asset keys down to `corpus`, each one's materialization for the partition made by our run, and the input
   event pointers each materialization records, checked against the instance's event log (they name the parents'
   materializations from the same run), with the input data versions (of both partitions the step read).
4. Staleness: everything FRESH for `0|neurons` and `1|neurons` (MISSING for `2|neurons`). Then a configuration
   change: dagster dev is restarted with NDX_SIMULATOR_MODEL set to the bundled GGUF's path (the same weights, a
   different simulator setting), which changes the code version of `simulations` only. `simulations` turns STALE
   with a CODE cause, nothing upstream changes, and `scores` is still FRESH (Dagster's staleness is not transitive).
   After `simulations` alone is rematerialized through GraphQL for the single partition `1|neurons` (with the tags
   the launchpad takes from the job's partition set), its output (the simulator's name is in the data) has a new
   data version, and `scores` turns STALE, its root cause being that new data version of `simulations`.

Marked `ui`; 1–2 minutes on two cores. Run with `pytest -m ui`.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ndx_pipeline.cli import instance_settings
from ndx_pipeline.core.contract import ASSETS, SCORER_ASSETS, SCORER_EXCERPTS
from ndx_pipeline.core.models import bundled_gguf
from ndx_pipeline.core.variants import DEFAULT_VARIANT
from ndx_pipeline.definitions import build_definitions
from ndx_pipeline.defs.automation import MAIN_JOB
from ndx_pipeline.defs.partitions import VARIANT, partition_key, range_tags

REPO = Path(__file__).resolve().parents[1]
LOCATION = "ndx_pipeline"
LAYERS = (0, 1)  # one run carries both
PARTITIONS = [str(partition_key(layer, DEFAULT_VARIANT)) for layer in LAYERS]  # "0|neurons", "1|neurons"
LAYER = PARTITIONS[-1]  # the partition whose lineage and staleness are followed
OTHER = str(partition_key(2, DEFAULT_VARIANT))  # never materialized
# everything the scores of a layer come from (the scorers beside simulation read the same explanations but feed only
# the viewer)
ORDER = [a for a in ASSETS if a not in ("neuron_viewer", SCORER_EXCERPTS, *(x for p in SCORER_ASSETS.values()
                                                                                for x in p))]
# the UI's groups: the paper's chain, the scorers beside simulation, the reports, the variants' settings folded apart
GROUPS = {"extraction": ["activation_records", "corpus", "output_tokens", "token_table", "top_excerpts"],
          "explanation": ["baseline_explanations", "calibration_simulations", "explanations"],
          "simulation_and_scoring": ["baseline_simulations", "scores", "simulations"],
          "scorers": sorted([SCORER_EXCERPTS, *(x for p in SCORER_ASSETS.values() for x in p)]),
          "reports": ["neuron_viewer", "release"]}
SIMULATION_STEP = ["simulations", "baseline_simulations"]  # one step writes both

NODES_QUERY = """
query Nodes($keys: [AssetKeyInput!], $partition: String) {
  assetNodes(assetKeys: $keys) {
    assetKey { path }
    isPartitioned
    dependencyKeys { path }
    opVersion
    staleStatus(partition: $partition)
    staleCauses(partition: $partition) {
      key { path } partitionKey category reason dependency { path } dependencyPartitionKey
    }
  }
}
"""

GROUPS_QUERY = """
query { assetNodes { assetKey { path } groupName } }
"""

MATERIALIZATIONS_QUERY = """
query Materializations($keys: [AssetKeyInput!], $partitions: [String!]) {
  assetNodes(assetKeys: $keys) {
    assetKey { path }
    assetMaterializations(partitions: $partitions, limit: 10) {
      runId partition timestamp stepKey tags { key value }
    }
  }
}
"""

UNPARTITIONED_QUERY = """
query Unpartitioned($keys: [AssetKeyInput!]) {
  assetNodes(assetKeys: $keys) {
    assetKey { path }
    isPartitioned
    dependencyKeys { path }
    opVersion
    staleStatus
    staleCauses { key { path } category reason dependency { path } }
    assetMaterializations(limit: 10) { runId partition timestamp tags { key value } }
  }
}
"""

RUNS_QUERY = """
query { runsOrError { __typename ... on Runs { results { runId status tags { key value } } } } }
"""

REPOSITORIES_QUERY = """
query { repositoriesOrError { __typename ... on RepositoryConnection { nodes { name location { name } } } } }
"""

ADD_PARTITION_MUTATION = """
mutation Add($repo: RepositorySelector!, $name: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $repo, partitionsDefName: $name, partitionKey: $key) {
    __typename ... on AddDynamicPartitionSuccess { partitionsDefName partitionKey }
    ... on PythonError { message } ... on UnauthorizedError { message }
  }
}
"""

PARTITION_TAGS_QUERY = """
query Tags($repo: RepositorySelector!, $set: String!, $partition: String!) {
  partitionSetOrError(repositorySelector: $repo, partitionSetName: $set) {
    __typename ... on PartitionSet { partition(partitionName: $partition) { name tagsOrError {
      __typename ... on PartitionTags { results { key value } } ... on PythonError { message } } } }
    ... on PythonError { message }
  }
}
"""

WORKSPACE_QUERY = """
query { workspaceOrError { __typename ... on Workspace { locationEntries {
  name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DagsterDev:
    """`dagster dev` in its own process group; stop() ends the group (webserver, daemon, code server)."""

    def __init__(self, workdir: Path, home: Path, env: dict[str, str], command: str = "dagster"):
        self.workdir, self.home, self.extra_env, self.command = workdir, home, env, command
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = workdir / "dagster-dev.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/graphql"

    def start(self, timeout: float = 150) -> None:
        binary = Path(sys.executable).parent / self.command
        self.port = _free_port()
        env = {**os.environ, "DAGSTER_HOME": str(self.home), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
               **self.extra_env}
        log = open(self.log_path, "a")
        if self.command == "dagster":  # the workspace file, as `dagster dev` is run in this folder
            args, cwd = ["dev", "-w", str(REPO / "workspace.yaml")], self.workdir
        else:  # `dg dev` in the project folder: the project's [tool.dg] settings, this virtualenv
            args, cwd = ["dev", "--use-active-venv", "--no-check-yaml"], REPO
        self.proc = subprocess.Popen(
            [str(binary), *args, "-h", "127.0.0.1", "-p", str(self.port)],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # A shell that started us in the background leaves SIGINT ignored, and dagster dev maps SIGTERM to
            # its SIGINT handler: restore the default so stop() can shut it down cleanly.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dagster dev exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                data = self.query(WORKSPACE_QUERY)
                entries = data["workspaceOrError"]["locationEntries"]
                entry = next((e for e in entries if e["name"] == LOCATION), None)
                if entry and entry["loadStatus"] == "LOADED":
                    kind = entry["locationOrLoadError"]["__typename"]
                    if kind != "RepositoryLocation":
                        raise RuntimeError(f"code location failed to load: {entry['locationOrLoadError']}")
                    return
            except (OSError, ValueError, KeyError, TypeError):
                pass
            time.sleep(1)
        raise RuntimeError(f"dagster dev did not load {LOCATION} within {timeout}s:\n{self.log_tail()}")

    def query(self, query: str, variables: dict | None = None) -> dict:
        import requests

        resp = requests.post(self.url, json={"query": query, "variables": variables or {}}, timeout=120)
        resp.raise_for_status()
        body = resp.json()
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def client(self):
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient("127.0.0.1", port_number=self.port, timeout=120)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # the leader is gone; make sure no child of the group outlives it
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(1)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""


def _keys(*names: str) -> list[dict]:
    return [{"path": [n]} for n in names]


def _by_key(nodes: list[dict]) -> dict[str, dict]:
    return {"/".join(n["assetKey"]["path"]): n for n in nodes}


def _tags(event: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in event["tags"]}


def _wait_for_run(dev: DagsterDev, run_id: str, timeout: float = 420):
    from dagster import DagsterRunStatus

    client = dev.client()
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = client.get_run_status(run_id)
        if status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
            break
        time.sleep(2)
    assert status == DagsterRunStatus.SUCCESS, f"run {run_id} ended {status}:\n{_run_errors(dev, run_id)}"


def _run_errors(dev: DagsterDev, run_id: str) -> str:
    data = dev.query("""query($id: ID!) { logsForRun(runId: $id) { __typename ... on EventConnection { events {
        __typename ... on MessageEvent { message } ... on ExecutionStepFailureEvent { error { message } } } } } }""",
                     {"id": run_id})
    events = data["logsForRun"].get("events", [])
    return "\n".join(str(e) for e in events[-30:]) + "\n" + dev.log_tail(2000)


def _repository(dev: DagsterDev) -> dict:
    """The selector of our code location's repository."""
    nodes = dev.query(REPOSITORIES_QUERY)["repositoriesOrError"]["nodes"]
    (name,) = [n["name"] for n in nodes if n["location"]["name"] == LOCATION]
    return {"repositoryLocationName": LOCATION, "repositoryName": name}


def _add_variant(dev: DagsterDev, variant: str) -> None:
    """Make `variant` a key of the dynamic `variant` dimension, as the UI's "add partition" dialog does."""
    out = dev.query(ADD_PARTITION_MUTATION, {"repo": _repository(dev), "name": VARIANT, "key": variant})
    assert out["addDynamicPartition"] == {"__typename": "AddDynamicPartitionSuccess", "partitionsDefName": VARIANT,
                                          "partitionKey": variant}, out


def _partition_tags(dev: DagsterDev, partition: str) -> dict[str, str]:
    """The run tags the launchpad gives a run of one partition of the job (from the job's partition set)."""
    out = dev.query(PARTITION_TAGS_QUERY, {"repo": _repository(dev), "set": f"{MAIN_JOB}_partition_set",
                                           "partition": partition})["partitionSetOrError"]
    assert out["__typename"] == "PartitionSet", out
    tags = out["partition"]["tagsOrError"]
    assert tags["__typename"] == "PartitionTags", tags
    return {t["key"]: t["value"] for t in tags["results"]}


def _staleness(dev: DagsterDev, partition: str) -> dict[str, dict]:
    nodes = _by_key(dev.query(NODES_QUERY, {"keys": _keys(*ORDER[1:]), "partition": partition})["assetNodes"])
    corpus = _by_key(dev.query(UNPARTITIONED_QUERY, {"keys": _keys("corpus")})["assetNodes"])
    return {**corpus, **nodes}


def _small_run_config(storage: Path, corpus: Path) -> dict:
    """Two neurons a layer, few excerpts, short explanations; of the baselines the lookup and the random one (the
    random one is simulated, so `baseline_simulations` holds rows the simulator wrote); no calibration excerpts."""
    return {
        "execution": {"config": {"in_process": {}}},
        "resources": {
            "storage": {"config": {"storage_dir": str(storage)}},
            "corpus_source": {"config": {"path": str(corpus)}},
            "subject_model": {"config": {"window_tokens": 16}},
            "selection": {"config": {"neurons": [5, 9], "explain_excerpts": 2, "score_top_excerpts": 1,
                                     "score_random_excerpts": 1}},
            "quality": {"config": {"baselines": ["lookup", "random"], "calibration_top_excerpts": 0,
                                   "calibration_random_excerpts": 0}},
            "explainer_llm": {"config": {"max_tokens": 16}},
        },
    }


@pytest.fixture
def workdir(tmp_path):
    from pydoc_data.topics import topics

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(instance_settings(home))  # what the CLI writes into a new home
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ["assert", "break", "continue", "del", "pass", "global"]:
        (corpus / f"{name}.txt").write_text(topics[name])
    return tmp_path


@pytest.mark.ui
def test_graphql_launch_lineage_and_staleness(workdir, monkeypatch):
    from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

    home, corpus, storage = workdir / "dagster_home", workdir / "corpus", workdir / "storage"
    config = _small_run_config(storage, corpus)
    # The test's own environment must not leak settings that change code versions.
    clean = {k: "" for k in os.environ if k.startswith("NDX_")}
    dev = DagsterDev(workdir, home, clean)
    try:
        dev.start()
        # --- 1. the variant, then ONE run of two layers of it through the client (the range tags), and wait for it
        _add_variant(dev, DEFAULT_VARIANT)
        tags = range_tags(DEFAULT_VARIANT, LAYERS[0], LAYERS[-1])
        assert list(tags.values()) == PARTITIONS == ["0|neurons", "1|neurons"]
        run_id = dev.client().submit_job_execution(
            MAIN_JOB, repository_location_name=LOCATION, run_config=config, tags=tags,
        )
        _wait_for_run(dev, run_id)
        runs = dev.query(RUNS_QUERY)["runsOrError"]["results"]
        assert [r["runId"] for r in runs] == [run_id], runs  # one run, no backfill split into a run per partition
        # Every asset's step saw both partitions: each one's materializations of both layers come from that run.
        both = _by_key(dev.query(MATERIALIZATIONS_QUERY,
                                 {"keys": _keys(*ORDER[1:]), "partitions": PARTITIONS})["assetNodes"])
        for key in ORDER[1:]:
            events = both[key]["assetMaterializations"]
            assert sorted((e["partition"], e["runId"]) for e in events) == [(p, run_id) for p in PARTITIONS], \
                (key, events)
            for event in events:  # multi-partition events carry their dimensions
                layer, variant = event["partition"].split("|")
                assert (_tags(event)["dagster/partition/layer"], _tags(event)["dagster/partition/variant"]) == \
                    (layer, variant), (key, event)
        assert {e["runId"] for e in both["scores"]["assetMaterializations"]} == {run_id}

        # --- 2. lineage of `scores` for the layer: walk dependencyKeys down to the corpus
        nodes = _staleness(dev, LAYER)
        groups: dict[str, list] = {}
        for node in dev.query(GROUPS_QUERY)["assetNodes"]:
            groups.setdefault(node["groupName"], []).append("/".join(node["assetKey"]["path"]))
        settings_group = groups.pop("variant_settings")
        assert {g: sorted(keys) for g, keys in groups.items()} == GROUPS
        assert all(key.startswith("variant_settings/") for key in settings_group)
        lineage, todo, settings = [], ["scores"], set()
        while todo:
            key = todo.pop(0)
            if key in lineage:
                continue
            lineage.append(key)
            for dep in ("/".join(d["path"]) for d in nodes[key].get("dependencyKeys", [])):
                # the variant's observed settings of each stage group: no file, no upstream of their own
                (settings.add if dep.startswith("variant_settings/") else todo.append)(dep)
        # best-of-k's calibration_simulations feed the explanations step, not the scores
        assert sorted(lineage) == sorted(a for a in ORDER if a != "calibration_simulations")
        assert settings == {f"variant_settings/{g}" for g in ("extraction", "output", "excerpts", "explainer",
                                                              "simulator", "scoring")}
        assert sorted("/".join(d["path"]) for d in nodes["scores"]["dependencyKeys"]) == [
            "baseline_explanations", "baseline_simulations", "explanations", "simulations", "token_table",
            "top_excerpts", "variant_settings/scoring"]
        assert sorted(d["path"] for d in nodes["activation_records"]["dependencyKeys"]) == [
            ["corpus"], ["variant_settings", "extraction"]]

        mats = _by_key(dev.query(MATERIALIZATIONS_QUERY,
                                 {"keys": _keys(*ORDER[1:]), "partitions": [LAYER]})["assetNodes"])
        mats.update(_by_key(dev.query(UNPARTITIONED_QUERY, {"keys": _keys("corpus")})["assetNodes"]))
        latest = {}
        for key in ORDER:
            events = mats[key]["assetMaterializations"]
            assert len(events) == 1, (key, events)
            event = events[0]
            assert event["runId"] == run_id
            assert event["partition"] == (None if key == "corpus" else LAYER)
            latest[key] = _tags(event)
        # Each materialization names the parent materializations it read (event pointers = storage ids of the
        # parents' events) and their data versions; check the pointers against the instance's event log. Dagster
        # points at the parent asset's latest materialization whatever its partition: in a run of two partitions,
        # one of the run's two (which one depends on the order the step reported them). The data version it records
        # for a partitioned parent is that of the partitions the step read: a hash of the parent's data versions of
        # both partitions, in key order (`_get_partitions_data_version_from_keys`); for the corpus (unpartitioned),
        # the pointed-to materialization's.
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        instance = DagsterInstance.from_config(str(home))
        for key in ORDER[1:]:
            for dep in nodes[key]["dependencyKeys"]:
                parent = "/".join(dep["path"])
                if parent.startswith("variant_settings/"):  # observations, not files (test_variants covers them)
                    continue
                pointer = int(latest[key][f"dagster/input_event_pointer/{parent}"])
                record = instance.fetch_materializations(
                    AssetRecordsFilter(asset_key=AssetKey(parent), storage_ids=[pointer]), limit=1).records
                assert len(record) == 1 and record[0].run_id == run_id, (key, parent, pointer)
                if parent == "corpus":
                    assert record[0].partition_key is None
                else:
                    assert record[0].partition_key in PARTITIONS, (key, parent, record[0].partition_key)
                read = latest[key][f"dagster/input_data_version/{parent}"]
                if parent == "corpus":
                    assert read == record[0].asset_materialization.tags["dagster/data_version"], (key, parent)
                else:
                    versions = sorted((e["partition"], _tags(e)["dagster/data_version"])
                                      for e in both[parent]["assetMaterializations"])
                    assert [p for p, _ in versions] == PARTITIONS
                    assert read == hashlib.sha256("".join(v for _, v in versions).encode()).hexdigest(), \
                        (key, parent)
            assert latest[key]["dagster/code_version"] == nodes[key]["opVersion"]
        assert latest["activation_records"]["dagster/input_data_version/corpus"] == \
            latest["corpus"]["dagster/data_version"]

        # --- 3. staleness before any change: FRESH for both layers of the run, MISSING for another
        assert {k: n["staleStatus"] for k, n in nodes.items()} == {k: "FRESH" for k in ORDER}
        assert all(n["staleCauses"] == [] for n in nodes.values())
        first = _staleness(dev, PARTITIONS[0])
        assert {k: n["staleStatus"] for k, n in first.items()} == {k: "FRESH" for k in ORDER}
        other = _staleness(dev, OTHER)
        assert {k: other[k]["staleStatus"] for k in ORDER[1:]} == {k: "MISSING" for k in ORDER[1:]}
        versions_before = {k: nodes[k]["opVersion"] for k in ORDER}

        # --- 4. a configuration change: the simulator model setting (same weights, named by path)
        dev.stop()
        dev = DagsterDev(workdir, home, {**clean, "NDX_SIMULATOR_MODEL": str(bundled_gguf())})
        dev.start()
        nodes = _staleness(dev, LAYER)
        changed = sorted(k for k in ORDER if nodes[k]["opVersion"] != versions_before[k])
        assert changed == sorted(SIMULATION_STEP)
        status = {k: n["staleStatus"] for k, n in nodes.items()}
        assert status == {**{k: "FRESH" for k in ORDER}, **{k: "STALE" for k in SIMULATION_STEP}}, status
        for key in SIMULATION_STEP:
            causes = nodes[key]["staleCauses"]
            assert [(c["category"], c["key"]["path"], c["partitionKey"]) for c in causes] == \
                [("CODE", [key], LAYER)], causes
            assert "code version" in causes[0]["reason"]

        # --- 5. rematerialize `simulations` alone for one partition, with the tags the launchpad gives it: `scores`
        # becomes stale by data, upstream untouched
        single = _partition_tags(dev, LAYER)
        assert single == {"dagster/partition": LAYER, "dagster/partition/layer": LAYER.split("|")[0],
                          "dagster/partition/variant": DEFAULT_VARIANT,
                          "dagster/partition_set": f"{MAIN_JOB}_partition_set"}, single
        rerun = dev.client().submit_job_execution(
            MAIN_JOB, repository_location_name=LOCATION, run_config=config,
            tags=single, asset_selection=[AssetKey(k) for k in SIMULATION_STEP],
        )
        _wait_for_run(dev, rerun)
        nodes = _staleness(dev, LAYER)
        status = {k: n["staleStatus"] for k, n in nodes.items()}
        assert status == {**{k: "FRESH" for k in ORDER}, "scores": "STALE"}, status
        # GraphQL reports root causes: the dependency's new data version, not the edge scores → simulations.
        causes = nodes["scores"]["staleCauses"]
        assert sorted((c["category"], c["key"]["path"], c["partitionKey"], c["reason"]) for c in causes) == \
            [("DATA", [k], LAYER, "has a new data version") for k in sorted(SIMULATION_STEP)], causes
        mats = _by_key(dev.query(MATERIALIZATIONS_QUERY,
                                 {"keys": _keys(*ORDER[1:]), "partitions": [LAYER]})["assetNodes"])
        sims = sorted(mats["simulations"]["assetMaterializations"], key=lambda e: float(e["timestamp"]))
        assert [e["runId"] for e in sims] == [run_id, rerun]
        assert _tags(sims[1])["dagster/code_version"] != _tags(sims[0])["dagster/code_version"]
        assert _tags(sims[1])["dagster/data_version"] != _tags(sims[0])["dagster/data_version"]
        assert all(e["runId"] == run_id for k in ORDER[1:] if k not in SIMULATION_STEP
                   for e in mats[k]["assetMaterializations"])
        assert (_tags(sims[1])["dagster/partition/layer"], _tags(sims[1])["dagster/partition/variant"]) == \
            (LAYER.split("|")[0], DEFAULT_VARIANT)
        # the other layer of the first run is untouched by the single-partition rerun
        first = _by_key(dev.query(MATERIALIZATIONS_QUERY, {"keys": _keys(*SIMULATION_STEP),
                                                           "partitions": PARTITIONS[:1]})["assetNodes"])
        assert all([e["runId"] for e in first[k]["assetMaterializations"]] == [run_id] for k in SIMULATION_STEP)
    finally:
        dev.stop()


@pytest.mark.ui
def test_dg_dev_serves_the_same_definitions(workdir):
    """`dg dev` in the project folder loads the defs folder through [tool.dg] and serves exactly the assets, code
    versions and jobs that `build_definitions()` (what `dagster dev` and the CLI load) has."""
    clean = {k: "" for k in os.environ if k.startswith("NDX_")}
    expected = build_definitions().resolve_asset_graph()
    versions = {k.to_user_string(): expected.get(k).code_version for k in expected.get_all_asset_keys()}
    dev = DagsterDev(workdir, workdir / "dagster_home", clean, command="dg")
    try:
        dev.start()
        nodes = _by_key(dev.query("query { assetNodes { assetKey { path } opVersion } }")["assetNodes"])
        assert {k: n["opVersion"] for k, n in nodes.items()} == versions
        jobs = dev.query("query { repositoriesOrError { ... on RepositoryConnection { nodes { jobs { name } } } } }")
        names = {j["name"] for r in jobs["repositoriesOrError"]["nodes"] for j in r["jobs"]}
        assert {"explain_neurons", "extract_activations", "explain_and_score"} <= names
    finally:
        dev.stop()
