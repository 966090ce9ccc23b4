"""Connecting workflows to Ray: the cluster they were submitted to, or a local one on 127.0.0.1.

``connect()`` is called once by a workflow's driver. Under ``ray job submit``
(or with RAY_ADDRESS set) it joins that cluster; otherwise it starts a local
Ray bound to loopback, sized by ``num_cpus`` (default: every core), with a
capped object store and no dashboard.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 500 * 1024 * 1024  # shards stream from disk; Ray objects stay small
_started_here = False  # True when connect() started the local Ray this process uses


# what the job supervisor of `ray job submit` sets for the entrypoint: the job config, whose
# metadata holds the submission id
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def in_ray_job() -> bool:
    """True inside the entrypoint of `ray job submit`."""
    return bool(os.environ.get(JOB_CONFIG_ENV))


def connect(num_cpus: int | None = None, num_gpus: int | None = None, env_vars: dict | None = None) -> str:
    """Join the given cluster or start a local one; returns 'cluster' or 'local'."""
    import ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": env_vars} if env_vars else None
    global _started_here
    if ray.is_initialized():
        return "local" if _started_here else "cluster"
    address = os.environ.get("RAY_ADDRESS", "")
    if address or in_ray_job():
        # a dashboard URL (http://...:8265) is what `ray job submit` wants; the driver joins via GCS
        if address.startswith(("127.0.0.1", "localhost", "http://127.0.0.1", "http://localhost")):
            _advertise_loopback()  # else Ray rewrites loopback to the machine's address and the join hangs
        ray.init(address="auto" if address.startswith("http") or not address else address,
                 runtime_env=runtime_env, log_to_driver=True)
        return "cluster"
    _advertise_loopback()
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             object_store_memory=LOCAL_OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1",
             runtime_env=runtime_env, logging_level=logging.WARNING)
    _started_here = True
    return "local"


def _advertise_loopback() -> None:
    """Make an in-process local Ray use 127.0.0.1 as its node address.

    `ray.init` turns a loopback `_node_ip_address` into the machine's routable
    address unless Ray's single-machine mode (the one it uses on macOS and
    Windows) is on; that switch is read at call time, so flipping it here keeps
    every connection of the local cluster on loopback, as `ray start
    --node-ip-address=127.0.0.1` does for a head started by hand.
    """
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False


def is_local() -> bool:
    """True when this process started the Ray it uses (so this machine is the whole cluster)."""
    return _started_here


def job_id() -> str:
    """The Ray job submission id (for the run's tags), '' outside a submitted job."""
    import json
    try:
        meta = json.loads(os.environ.get(JOB_CONFIG_ENV, "") or "{}").get("metadata") or {}
    except ValueError:
        return ""
    return str(meta.get("job_submission_id", ""))


def cluster_resources() -> dict[str, float]:
    import ray
    return dict(ray.cluster_resources())


def shutdown() -> None:
    global _started_here
    import ray
    if ray.is_initialized():
        ray.shutdown()
    _started_here = False
