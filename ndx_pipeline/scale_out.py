"""Running the pipeline on more than one machine with Dagster's own engines (see deploy/README.md).

Which step runs where is said once, in `ndx_pipeline.defs.queues` (the assets carry those step tags).
`k8s_definitions` / `celery_definitions` are the same definitions with the distributed executor, for the code
location of a multi-machine deployment (`dagster api grpc -m ndx_pipeline.scale_out -a k8s_definitions`).
"""

from __future__ import annotations

import dagster as dg

from ndx_pipeline.definitions import build_definitions
from ndx_pipeline.defs.queues import CELERY_QUEUE_TAG, K8S_CONFIG_TAG, STEP_QUEUES

__all__ = ["CELERY_QUEUE_TAG", "K8S_CONFIG_TAG", "STEP_QUEUES", "celery_definitions", "k8s_definitions",
           "with_executor"]


def with_executor(executor: dg.ExecutorDefinition) -> dg.Definitions:
    """The project's definitions (from the environment, as `defs`) with every job on `executor`."""
    return dg.Definitions.merge(build_definitions(), dg.Definitions(executor=executor))


def k8s_definitions() -> dg.Definitions:
    """Each step a Kubernetes Job (dagster-k8s `k8s_job_executor`); configure it with deploy/k8s/run_config.yaml."""
    from dagster_k8s import k8s_job_executor

    return with_executor(k8s_job_executor)


def celery_definitions() -> dg.Definitions:
    """Each step a Celery task on the queue of `STEP_QUEUES` (dagster-celery); deploy/celery/celery.yaml."""
    from dagster_celery import celery_executor

    return with_executor(celery_executor)
