"""Which tracker each rank of a run gets (mvar.training.worker.make_tracker), against a real MLflow store."""
from __future__ import annotations

from types import SimpleNamespace

from mvar import tracking
from mvar.training.worker import make_tracker


def test_rank_0_logs_the_run_and_the_first_rank_of_each_other_node_its_system_metrics(tmp_path):
    """Ranks of one node share its machine: one sampler a node (rank 0's on node 0), the other ranks none."""
    cfg = SimpleNamespace(tracking=tracking.TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t",
                                                           system_metrics=False))
    run_id = tracking.start_run(cfg.tracking, "ranks")
    kinds = {}
    for rank, node_rank, local_rank in ((0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)):
        tracker = make_tracker(cfg, rank, run_id, None, 1, node_rank, local_rank)  # start 1: a resumed run
        kinds[rank] = type(tracker).__name__
        tracker.close(status="")
    assert kinds == {0: "MlflowTracker", 1: "NullTracker", 2: "NodeTracker", 3: "NullTracker"}
    assert type(make_tracker(cfg, 0, "", None, 1)).__name__ == "NullTracker"  # a dry run: no MLflow run
    assert tracking.Store(cfg.tracking.uri).get(run_id).status == "RUNNING"
