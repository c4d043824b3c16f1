"""Where each step runs when the pipeline is spread over machines by Dagster's own executors (see
deploy/README.md and `ndx_pipeline.scale_out`):

- the subject-model step (`activation_records`, with the token table and top_excerpts split from the records it
  writes) runs the subject model: a GPU machine (celery queue `gpu`; on Kubernetes a pod asking for one
  `nvidia.com/gpu` and tolerating the usual GPU-node taint). top_excerpts materialized alone (a changed split count)
  is the same step and goes there too, though it reads files and runs no model;
- the LLM steps (explanations, simulations and their baseline/calibration outputs; the detection and fuzzing
  scorers): celery queue `llm`, CPU pods;
- the light steps (corpus, scores, scorer_excerpts, the embedding scorer, neuron_viewer): celery's
  default queue `dagster`, CPU pods.

`STEP_QUEUES` says it per step (a step is an asset, or a multi-asset with the files written beside it) and
`step_tags(step)` gives the step tags that say so (harmless on one machine: only the celery and k8s executors read
them). Which nodes are GPU nodes is a property of the cluster, so node selectors live in the deployment's run
config (deploy/k8s/run_config.yaml), not here.
"""

from __future__ import annotations

CELERY_QUEUE_TAG = "dagster-celery/queue"  # dagster_celery.tags.DAGSTER_CELERY_QUEUE_TAG
K8S_CONFIG_TAG = "dagster-k8s/config"  # dagster_k8s.job.USER_DEFINED_K8S_CONFIG_KEY

GPU_QUEUE = "gpu"
LLM_QUEUE = "llm"
DEFAULT_QUEUE = "dagster"  # dagster-celery's default queue

# Cluster-independent part of the GPU pod: one GPU, and the taint GPU node pools usually carry (GKE, AKS and the
# NVIDIA device plugin's docs use `nvidia.com/gpu`). Node selectors are cluster-specific: run config.
GPU_K8S_CONFIG = {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
    "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}


STEP_QUEUES = {
    "corpus": DEFAULT_QUEUE,
    "activation_records": GPU_QUEUE,
    "output_tokens": DEFAULT_QUEUE,  # one matrix product per layer from the weights: no GPU needed
    "explanations": LLM_QUEUE,
    "simulations": LLM_QUEUE,
    "scores": DEFAULT_QUEUE,
    "scorer_excerpts": DEFAULT_QUEUE,
    "detection": LLM_QUEUE,  # the scorer LLM
    "fuzzing": LLM_QUEUE,
    "embedding": DEFAULT_QUEUE,  # a 22M-parameter sentence model on the CPU
    "neuron_viewer": DEFAULT_QUEUE,
}


def step_tags(step: str) -> dict:
    """The tags of one step: its celery queue and, for the subject-model step, its GPU request."""
    queue = STEP_QUEUES[step]
    tags: dict = {CELERY_QUEUE_TAG: queue}
    if queue == GPU_QUEUE:
        tags[K8S_CONFIG_TAG] = GPU_K8S_CONFIG
    return tags
