"""Running the pipeline on more than one machine with Dagster's own engines (see deploy/README.md).

Where each step runs:
- `activation_records` runs the subject model: a GPU machine (celery queue `gpu`; on Kubernetes a pod asking for
  one `nvidia.com/gpu` and tolerating the usual GPU-node taint).
- `explanations` and `simulations` call the explainer/simulator LLM (an OpenAI-compatible server, or the local
  backend): celery queue `llm`; on Kubernetes CPU pods.
- `corpus`, `top_excerpts`, `scores`, `neuron_viewer` are light: celery's default queue `dagster`; CPU pods.

`op_tags(asset)` gives the step tags that say so; the assets carry them (harmless on one machine: only the celery
and k8s executors read them). Which *nodes* are GPU nodes is a property of the cluster, so node selectors live in
the deployment's run config (deploy/k8s/run_config.yaml), not here.

`k8s_definitions` / `celery_definitions` are the same Definitions with the distributed executor, for the code
location of a multi-machine deployment (`dagster api grpc -m ndx_pipeline.scale_out -a k8s_definitions`).
"""

from __future__ import annotations

import dagster as dg

CELERY_QUEUE_TAG = "dagster-celery/queue"  # dagster_celery.tags.DAGSTER_CELERY_QUEUE_TAG
K8S_CONFIG_TAG = "dagster-k8s/config"  # dagster_k8s.job.USER_DEFINED_K8S_CONFIG_KEY

GPU_QUEUE = "gpu"
LLM_QUEUE = "llm"
DEFAULT_QUEUE = "dagster"  # dagster-celery's default queue

STEP_QUEUES = {
    "corpus": DEFAULT_QUEUE,
    "activation_records": GPU_QUEUE,
    "top_excerpts": DEFAULT_QUEUE,
    "explanations": LLM_QUEUE,
    "simulations": LLM_QUEUE,
    "scores": DEFAULT_QUEUE,
    "neuron_viewer": DEFAULT_QUEUE,
}

# Cluster-independent part of the GPU pod: one GPU, and the taint GPU node pools usually carry (GKE, AKS and the
# NVIDIA device plugin's docs use `nvidia.com/gpu`). Node selectors are cluster-specific: run config.
GPU_K8S_CONFIG = {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
    "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}


def op_tags(asset: str) -> dict:
    """The step tags of one asset: its celery queue and, for the subject-model step, its GPU request."""
    queue = STEP_QUEUES[asset]
    tags: dict = {CELERY_QUEUE_TAG: queue}
    if queue == GPU_QUEUE:
        tags[K8S_CONFIG_TAG] = GPU_K8S_CONFIG
    return tags


def with_executor(executor: dg.ExecutorDefinition) -> dg.Definitions:
    """The project's Definitions (from the environment, as `defs`) with every job on `executor`."""
    from ndx_pipeline.definitions import build_definitions

    return dg.Definitions.merge(build_definitions(), dg.Definitions(executor=executor))


def k8s_definitions() -> dg.Definitions:
    """Each step a Kubernetes Job (dagster-k8s `k8s_job_executor`); configure it with deploy/k8s/run_config.yaml."""
    from dagster_k8s import k8s_job_executor

    return with_executor(k8s_job_executor)


def celery_definitions() -> dg.Definitions:
    """Each step a Celery task on the queue of `STEP_QUEUES` (dagster-celery); deploy/celery/celery.yaml."""
    from dagster_celery import celery_executor

    return with_executor(celery_executor)
