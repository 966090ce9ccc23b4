"""The per-rank side of test_train_tokenizer's two-rank test (a module of its own: spawned processes
import it by name)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_main(rank: int, port: int, overrides: list[str], out: dict) -> None:
    from mvar.training.tokenizer_config import load_tokenizer_train_config
    from mvar.training.tokenizer_loop import build_task
    from mvar.training.trainer import Trainer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = load_tokenizer_train_config(None, overrides)
        cpu = torch.device("cpu")
        task = build_task(cfg, cpu, rank, 2)
        trainer = Trainer(task, cfg, cpu, rank, 2)
        task.distribute()
        gen = torch.Generator().manual_seed(rank)  # each rank its own images
        data = [(torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, torch.zeros(2, dtype=torch.long))
                for _ in range(cfg.run.steps)]
        trainer.run(iter(data), 0)
        out[rank] = {"vae": {k: v.clone() for k, v in task.vae.state_dict().items()},
                     "disc": {k: v.clone() for k, v in task.disc.state_dict().items()}, "restarts": task.restarts}
    finally:
        dist.destroy_process_group()
