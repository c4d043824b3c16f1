"""The multi-machine deployment files load and validate with Dagster's own code (deploy/README.md).

- Every instance yaml (deploy/postgres, deploy/k8s, deploy/celery) passes Dagster's instance schema, and each
  configurable part (Postgres storage, K8sRunLauncher, run coordinator) passes its own class's schema with the
  environment variables resolved; the K8sRunLauncher is constructed for real (kubeconfig instead of in-cluster).
- The k8s run config validates against the job on `k8s_job_executor`; for every step of a layer run the pod that
  dagster-k8s would create is rendered with dagster-k8s's own merge and Job builder: `activation_records` asks for
  an nvidia.com/gpu on a GPU node with the GPU toleration, the LLM steps and the rest stay on CPU nodes, and every
  pod mounts the shared data volume and gets the Postgres password from its Secret.
- The celery file validates as the workers read it (dagster-celery's CLI) and as run config for the job on
  `celery_executor`; each step's queue is the one its tags name.
- The Helm values agree with deploy/k8s/dagster.yaml, and their run launcher part passes dagster-k8s's schema.
- The code-location targets named in the deployment load through Dagster's loader.
No cluster, broker or Helm is needed: nothing here connects anywhere.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PG_ENV = {"DAGSTER_PG_HOST": "db.internal", "DAGSTER_PG_PORT": "6543", "DAGSTER_PG_USER": "dagster",
          "DAGSTER_PG_PASSWORD": "not-in-any-file", "DAGSTER_PG_DB": "dagster"}
IMAGE = "registry.example.com/ndx-pipeline:0.1.0"
LAYER_STEPS = ["activation_records", "explanations", "simulations", "scores", "neuron_viewer"]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture
def pg_env(monkeypatch):
    for key, value in PG_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def kubeconfig(tmp_path):
    """A kubeconfig naming a cluster on 127.0.0.1 (never contacted: building clients does not connect)."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "test", "user": {"token": "test"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": "ndx"}}],
    }))
    return path


def instance_parts(yaml_path: Path, tmp_path: Path):
    """Validate an instance yaml as Dagster does when it loads $DAGSTER_HOME/dagster.yaml, and return its
    configurable parts {name: (class, config processed with the environment)}."""
    from dagster._config import process_config, resolve_to_config_type
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.instance.ref import InstanceRef
    from dagster._serdes.config_class import ConfigurableClassData

    home = tmp_path / yaml_path.parent.name
    home.mkdir()
    shutil.copy(yaml_path, home / "dagster.yaml")
    dagster_instance_config(str(home))  # raises DagsterInvalidConfigError on any schema error
    ref = InstanceRef.from_dir(str(home))
    parts = {}
    for name in ("storage_data", "run_coordinator_data", "run_launcher_data", "compute_logs_data",
                 "local_artifact_storage_data", "scheduler_data"):
        data = getattr(ref, name)
        if not isinstance(data, ConfigurableClassData):
            continue
        import importlib

        klass = getattr(importlib.import_module(data.module_name), data.class_name)
        result = process_config(resolve_to_config_type(klass.config_type()), data.config_dict)
        assert result.success, (yaml_path, name, [e.message for e in result.errors])
        parts[name] = (klass, result.value)
    return parts


@pytest.mark.parametrize("which", ["postgres", "k8s", "celery"])
def test_instance_yaml_validates_with_postgres_from_the_environment(which, tmp_path, pg_env):
    from dagster_postgres import DagsterPostgresStorage
    from dagster_postgres.utils import pg_url_from_config

    path = DEPLOY / which / "dagster.yaml"
    parts = instance_parts(path, tmp_path)
    klass, storage = parts["storage_data"]
    assert klass is DagsterPostgresStorage
    db = storage["postgres_db"]
    assert (db["hostname"], db["port"], db["username"], db["password"], db["db_name"]) == \
        ("db.internal", 6543, "dagster", "not-in-any-file", "dagster")
    assert pg_url_from_config(storage).startswith("postgresql+psycopg2://dagster:not-in-any-file@db.internal:6543/")
    raw = _load(path)["storage"]["postgres"]["postgres_db"]
    assert raw["password"] == {"env": "DAGSTER_PG_PASSWORD"}  # the password is only ever read from the env
    assert "password:" not in re.sub(r"password:\s*\n\s*env: DAGSTER_PG_PASSWORD", "", path.read_text())
    _, coordinator = parts["run_coordinator_data"]
    assert coordinator["max_concurrent_runs"] >= 1


def test_k8s_run_launcher_validates_and_constructs(tmp_path, pg_env, kubeconfig):
    from dagster_k8s import K8sRunLauncher

    klass, config = instance_parts(DEPLOY / "k8s" / "dagster.yaml", tmp_path)["run_launcher_data"]
    assert klass is K8sRunLauncher
    assert config["load_incluster_config"] is True
    launcher = K8sRunLauncher(**{**config, "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)})
    assert launcher.postgres_password_secret == "dagster-postgresql-secret"
    assert launcher.instance_config_map == "dagster-instance"
    assert [v["name"] for v in launcher.volumes] == ["ndx-data"]


def _k8s_job():
    from ndx_pipeline.defs.automation import MAIN_JOB
    from ndx_pipeline.scale_out import k8s_definitions

    return k8s_definitions().resolve_job_def(MAIN_JOB)


def _step_pods(tmp_path, kubeconfig, run_config: dict) -> dict[str, dict]:
    """The Kubernetes Job that k8s_job_executor would create for each step of a layer run, built the way its
    K8sStepHandler does (run launcher context ⊕ executor config ⊕ step tag ⊕ per-step config)."""
    import kubernetes
    from dagster._core.execution.api import create_execution_plan
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster_k8s import K8sRunLauncher
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import UserDefinedDagsterK8sConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    _, launcher_config = instance_parts(DEPLOY / "k8s" / "dagster.yaml", tmp_path)["run_launcher_data"]
    launcher = K8sRunLauncher(**{**launcher_config, "load_incluster_config": False,
                                 "kubeconfig_file": str(kubeconfig)})
    job = _k8s_job()
    tags = {"dagster/partition": "3"}
    plan = create_execution_plan(job, run_config=run_config, tags=tags)
    (resolved,) = dg.validate_run_config(job, run_config)["execution"].values()  # {"k8s": executor config}
    resolved = resolved.get("config", resolved)
    executor_context = K8sContainerContext(
        namespace=resolved.get("job_namespace"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(resolved.get("step_k8s_config", {})),
    )
    run = DagsterRun(job_name=job.name, run_id="0123456789abcdef", tags=tags)
    pods = {}
    api = kubernetes.client.ApiClient()
    for step in plan.get_all_steps_in_topo_order():
        context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=False).merge(executor_context)
        context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step.tags)))
        per_step = resolved.get("per_step_k8s_config", {}).get(step.node_handle.name, {})
        context = context.merge(K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(per_step)))
        job_config = context.get_k8s_job_config(IMAGE, launcher)
        k8s_job = construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step"], f"dagster-step-{step.key}",
                                            user_defined_k8s_config=context.run_k8s_config,
                                            pod_name=f"dagster-step-{step.key}", component="step_worker")
        pods[step.key] = {"namespace": context.namespace, "job": api.sanitize_for_serialization(k8s_job)}
    return pods


def test_k8s_run_config_puts_the_subject_model_on_gpu_nodes_and_the_rest_on_cpu(tmp_path, pg_env, kubeconfig):
    run_config = _load(DEPLOY / "k8s" / "run_config.yaml")
    pods = _step_pods(tmp_path, kubeconfig, run_config)
    assert set(LAYER_STEPS) <= set(pods)
    for step, pod in pods.items():
        spec = pod["job"]["spec"]["template"]["spec"]
        container = spec["containers"][0]
        limits = container.get("resources", {}).get("limits", {})
        tolerations = spec.get("tolerations") or []
        assert pod["namespace"] == "ndx"
        assert container["image"] == IMAGE
        # Shared storage and secrets reach every step pod from the run launcher's settings.
        assert {"name": "ndx-data", "mountPath": "/data"} in container["volumeMounts"]
        assert any(v["name"] == "ndx-data" and v["persistentVolumeClaim"]["claimName"] == "ndx-data"
                   for v in spec["volumes"])
        env_from = container.get("envFrom", [])
        assert {"configMapRef": {"name": "ndx-settings"}} in env_from
        assert {"secretRef": {"name": "ndx-llm-keys"}} in env_from
        password = next(e for e in container["env"] if e["name"] == "DAGSTER_PG_PASSWORD")
        assert password["valueFrom"]["secretKeyRef"] == {"name": "dagster-postgresql-secret",
                                                         "key": "postgresql-password"}
        if step == "activation_records":
            assert limits.get("nvidia.com/gpu") == "1", container
            assert spec["nodeSelector"] == {"ndx.dev/pool": "gpu"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
        else:
            assert "nvidia.com/gpu" not in limits, step
            assert spec["nodeSelector"] == {"ndx.dev/pool": "cpu"}, step
            assert not any(t.get("key") == "nvidia.com/gpu" for t in tolerations), step
        if step in ("explanations", "simulations"):
            assert container["resources"]["requests"]["cpu"] == "2"


def test_k8s_run_config_rejects_a_misspelled_field():
    run_config = _load(DEPLOY / "k8s" / "run_config.yaml")
    run_config["execution"]["config"]["per_step_k8s_config"]["activation_records"]["pod_spec"] = {}
    with pytest.raises(dg.DagsterInvalidConfigError):
        dg.validate_run_config(_k8s_job(), run_config)


def test_celery_config_as_workers_and_runs_read_it(monkeypatch, tmp_path):
    import sys

    from dagster._core.execution.api import create_execution_plan
    from dagster._core.execution.retries import RetryMode
    from dagster_celery.cli import get_config_dir
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app

    from ndx_pipeline.defs.automation import MAIN_JOB
    from ndx_pipeline.scale_out import celery_definitions

    monkeypatch.setenv("NDX_CELERY_BROKER", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("NDX_CELERY_BACKEND", "redis://127.0.0.1:6379/1")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    path = DEPLOY / "celery" / "celery.yaml"

    # A worker: `dagster-celery worker start -y` validates the file, resolves the env vars into a settings module
    # on the worker's PYTHONPATH, and `celery -A dagster_celery.app worker` builds its app from it.
    config_dir = get_config_dir(str(path))
    monkeypatch.syspath_prepend(config_dir)
    monkeypatch.delitem(sys.modules, "dagster_celery_config", raising=False)
    worker_app = make_app()
    assert worker_app.conf.broker_url == "redis://127.0.0.1:6379/0"
    assert worker_app.conf.result_backend == "redis://127.0.0.1:6379/1"
    assert worker_app.conf.worker_prefetch_multiplier == 1 and worker_app.conf.task_acks_late is True

    # A run: the same file as run config of the job on celery_executor; the run's app gets the same broker.
    job = celery_definitions().resolve_job_def(MAIN_JOB)
    assert job.executor_def.name == "celery"
    run_config = _load(path)
    (resolved,) = dg.validate_run_config(job, run_config)["execution"].values()
    resolved = resolved.get("config", resolved)
    executor = CeleryExecutor(retries=RetryMode.from_config(resolved["retries"]), broker=resolved["broker"],
                              backend=resolved["backend"], include=resolved.get("include"),
                              config_source=resolved.get("config_source"))
    run_app = make_app(executor.app_args())
    assert run_app.conf.broker_url == worker_app.conf.broker_url
    assert run_app.conf.result_backend == worker_app.conf.result_backend
    plan = create_execution_plan(job, run_config=run_config, tags={"dagster/partition": "3"})
    assert {s.key for s in plan.get_all_steps_in_topo_order()} >= set(LAYER_STEPS)


def test_assets_carry_the_routing_tags():
    """The step tags the celery and k8s executors read: queue per step, GPU request on the subject-model step."""
    from dagster._core.execution.api import create_execution_plan
    from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG
    from dagster_k8s.job import USER_DEFINED_K8S_CONFIG_KEY, get_user_defined_k8s_config

    from ndx_pipeline.definitions import build_definitions
    from ndx_pipeline.defs.automation import MAIN_JOB
    from ndx_pipeline.scale_out import CELERY_QUEUE_TAG, K8S_CONFIG_TAG, STEP_QUEUES

    assert (CELERY_QUEUE_TAG, K8S_CONFIG_TAG) == (DAGSTER_CELERY_QUEUE_TAG, USER_DEFINED_K8S_CONFIG_KEY)
    job = build_definitions().resolve_job_def(MAIN_JOB)
    plan = create_execution_plan(job, tags={"dagster/partition": "3"})
    steps = {s.node_handle.name: s for s in plan.get_all_steps_in_topo_order()}
    queues = {name: steps[name].tags.get(DAGSTER_CELERY_QUEUE_TAG, "dagster") for name in STEP_QUEUES}
    assert queues == STEP_QUEUES
    assert queues["activation_records"] == "gpu"
    assert queues["explanations"] == queues["simulations"] == "llm"
    gpu = get_user_defined_k8s_config(steps["activation_records"].tags)
    assert gpu.container_config["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for name in STEP_QUEUES:
        if name != "activation_records":
            assert "nvidia.com/gpu" not in json.dumps(steps[name].tags), name


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def test_helm_values_agree_with_the_instance_yaml(tmp_path, pg_env):
    from dagster._config import process_config, resolve_to_config_type
    from dagster_k8s import K8sRunLauncher

    values = _load(DEPLOY / "k8s" / "values.yaml")
    instance = _load(DEPLOY / "k8s" / "dagster.yaml")
    launcher = instance["run_launcher"]["config"]

    pg = values["postgresql"]
    assert pg["enabled"] is False and values["generatePostgresqlPasswordSecret"] is False
    assert "postgresqlPassword" not in pg  # the password lives in the dagster-postgresql-secret Secret
    assert pg["postgresqlScheme"] == instance["storage"]["postgres"]["postgres_db"]["scheme"]

    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == instance["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert coordinator["config"]["queuedRunCoordinator"]["maxConcurrentRuns"] == \
        instance["run_coordinator"]["config"]["max_concurrent_runs"]
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    assert monitoring["startTimeoutSeconds"] == instance["run_monitoring"]["start_timeout_seconds"]

    # The chart's k8sRunLauncher block is the K8sRunLauncher config in camelCase (k8s objects stay as they are).
    assert values["runLauncher"]["type"] == instance["run_launcher"]["class"] == "K8sRunLauncher"
    helm = values["runLauncher"]["config"]["k8sRunLauncher"]
    converted = {
        "job_namespace": helm["jobNamespace"],
        "load_incluster_config": helm["loadInclusterConfig"],
        "env_config_maps": [c["name"] for c in helm["envConfigMaps"]],
        "env_secrets": [s["name"] for s in helm["envSecrets"]],
        "volume_mounts": helm["volumeMounts"],
        "volumes": helm["volumes"],
        "run_k8s_config": {_snake(k): v for k, v in helm["runK8sConfig"].items()},
        "instance_config_map": launcher["instance_config_map"],
    }
    converted["run_k8s_config"]["pod_spec_config"] = {
        _snake(k): v for k, v in converted["run_k8s_config"]["pod_spec_config"].items()}
    result = process_config(resolve_to_config_type(K8sRunLauncher.config_type()), converted)
    assert result.success, [e.message for e in result.errors]
    for key, value in converted.items():
        assert launcher[key] == value, key

    # The code location the chart serves is the one the instance's jobs expect: the k8s executor.
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    args = deployment["dagsterApiGrpcArgs"]
    assert args[args.index("-m") + 1] == "ndx_pipeline.scale_out" and args[args.index("-a") + 1] == "k8s_definitions"
    assert deployment["volumeMounts"] == helm["volumeMounts"] and deployment["volumes"] == helm["volumes"]


@pytest.mark.parametrize(("attribute", "executor"), [("k8s_definitions", "k8s"), ("celery_definitions", "celery")])
def test_code_locations_load_through_dagsters_loader(attribute, executor):
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    from ndx_pipeline.defs.automation import MAIN_JOB

    repo = ReconstructableRepository.for_module("ndx_pipeline.scale_out", attribute, str(REPO)).get_definition()
    jobs = {job.name: job.executor_def.name for job in repo.get_all_jobs()}
    assert jobs[MAIN_JOB] == executor
    assert set(jobs.values()) == {executor}
