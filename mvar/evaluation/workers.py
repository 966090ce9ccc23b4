"""Where sampling runs: plain Ray tasks (one GPU or a few CPUs each), or this process.

`mvar.cluster.connect()` joins the cluster a job was submitted to, or starts a local Ray on
127.0.0.1 (shut down again at the end if this evaluation started it). A task that fails with
bad input re-raises that error in the driver; a worker that dies is retried by Ray, and
whatever shards it finished are kept for the retry or the next run.
"""
from __future__ import annotations

import logging
from dataclasses import asdict

from mvar.errors import UserError
from mvar.evaluation.config import EvalConfig
from mvar.evaluation.sampler import SampleJob, sample_shards

log = logging.getLogger(__name__)


class Workers:
    """Context manager: ``with Workers(cfg) as w: w.run(jobs)``."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.started_ray = False

    def __enter__(self):
        if self.cfg.num_workers > 0:
            import ray

            from mvar import cluster
            running = ray.is_initialized()  # e.g. a test's Ray, or a workflow's own: leave it running
            where = cluster.connect(env_vars={"RAY_USAGE_STATS_ENABLED": "0"})
            self.started_ray = not running
            try:
                self._check_resources(where)
            except BaseException:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc) -> None:
        if self.started_ray:
            from mvar import cluster
            cluster.shutdown()
            self.started_ray = False

    def _check_resources(self, where: str) -> None:
        from mvar import cluster
        have = cluster.cluster_resources()
        wants = {"CPU": self.cfg.cpus_per_worker, **({"GPU": 1.0} if self.cfg.use_gpu else {})}
        for res, n in wants.items():
            if have.get(res, 0) + 1e-9 < n:
                msg = (f"eval: a worker needs {n:g} {res} but the {where} Ray cluster has {have.get(res, 0):g}; "
                       f"lower eval.cpus_per_worker" + (" or set eval.use_gpu=false" if res == "GPU" else ""))
                if where == "local" or self.started_ray:
                    raise UserError(msg)
                log.warning("%s (waiting for the cluster to grow)", msg)

    def run(self, jobs: list[SampleJob]) -> list[dict]:
        if not jobs:
            return []
        if self.cfg.num_workers == 0:
            if not self.cfg.use_gpu:
                log.warning("eval.num_workers=0: sampling in this process, without mvar.measure's malloc settings, so "
                            "infer/peak_mem_mb on CPU can read low (even 0); use eval.num_workers>=1 for memory figures")
            return [sample_shards(asdict(job)) for job in jobs]
        import ray

        from mvar.measure import MALLOC_ENV  # freed tensors leave the resident set: honest peak memory
        task = ray.remote(sample_shards).options(
            num_cpus=self.cfg.cpus_per_worker, num_gpus=1 if self.cfg.use_gpu else 0, max_retries=2,
            name="mvar-eval-sample", runtime_env={"env_vars": dict(MALLOC_ENV)})
        return _get([task.remote(asdict(job)) for job in jobs])

    def call(self, fn, *args):
        """``fn(*args)`` as one Ray task on a worker's resources (one GPU with eval.use_gpu); its result."""
        import ray
        task = ray.remote(fn).options(num_cpus=self.cfg.cpus_per_worker, num_gpus=1 if self.cfg.use_gpu else 0,
                                      max_retries=1, name=f"mvar-eval-{fn.__name__}")
        return _get([task.remote(*args)])[0]


def _get(refs: list) -> list:
    """Results of Ray tasks; bad input found on a worker comes back as the one-line UserError it is."""
    import ray
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        for ref in refs:
            ray.cancel(ref)
        cause = getattr(err, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from err
        raise
