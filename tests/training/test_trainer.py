"""The trainer core without Ray or MLflow: schedule, parameter groups, resume, NaN stop, metric intervals."""
from __future__ import annotations

import math
import time

import pytest
import torch

from mvar.config import ConfigError, from_dict
from mvar.models import NextScaleTransformer
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig
from mvar.training.config import AUTHORS_NO_DECAY_KEYS, OptimConfig, TrainConfig, load_train_config
from mvar.training.loop import GeneratorTask
from mvar.training.memory import peak_metric
from mvar.training.optim import lr_factor, no_decay_names, weight_decay_at
from mvar.training.trainer import Hooks, LocalCheckpoints, Trainer

TOK = TokenizerConfig.tiny()
CPU = torch.device("cpu")


def tiny_config(variant: str = "mvar", **keys) -> TrainConfig:
    overrides = [f"model_name={variant}-tiny", "tokenizer=t", "data.shards=s", "data.batch_size=4",
                 "optim.lr=0.003", "optim.warmup_steps=2", "model.attention_backend=reference"]
    return load_train_config(None, overrides + [f"{k}={v}" for k, v in keys.items()])


def tiny_task(cfg: TrainConfig) -> GeneratorTask:
    torch.manual_seed(0)
    model = NextScaleTransformer(cfg.model, TOK.vocab_size, TOK.z_channels, TOK.patch_nums)
    return GeneratorTask(cfg, model.train(), MultiScaleVQVAE(TOK).eval(), CPU)


def token_batches(n: int, batch: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    L = sum(p * p for p in TOK.patch_nums)
    return [(torch.randint(TOK.vocab_size, (batch, L), generator=gen), torch.randint(10, (batch,), generator=gen))
            for _ in range(n)]


class Record(Hooks):
    def __init__(self):
        self.steps, self.logged = [], []

    def on_step(self, step, outcome, metrics):
        self.steps.append((step, outcome.lr, float(metrics["train/loss"])))

    def log(self, metrics, step):
        self.logged.append((step, metrics))


# -- schedule and groups -------------------------------------------------------------------

def test_lin0_warms_up_holds_the_peak_then_decays_linearly_to_end_ratio():
    cfg = from_dict(OptimConfig, {"warmup_steps": 10, "warmup_start_ratio": 0.01, "hold_ratio": 0.2,
                                  "end_ratio": 0.1})
    total = 111  # 100 steps after warm-up: p = (step - 10) / 100
    f = [lr_factor(s, total, cfg) for s in range(total)]
    assert f[0] == pytest.approx(0.01) and f[5] == pytest.approx(0.01 + 0.99 * 0.5)
    assert all(v == 1.0 for v in f[10:30])  # p < 0.2: the peak
    assert f[-1] == pytest.approx(0.1) and f[30] == pytest.approx(1.0)
    decay = [b - a for a, b in zip(f[30:], f[31:])]
    assert all(d == pytest.approx(decay[0]) and d < 0 for d in decay)  # one straight line down
    ratio = from_dict(OptimConfig, {"warmup_ratio": 0.02})
    assert lr_factor(9, 500, ratio) < 1.0 == lr_factor(10, 500, ratio)  # warm-up = round(0.02 x 500) steps


def test_weight_decay_is_constant_unless_an_end_value_is_given():
    const = from_dict(OptimConfig, {"weight_decay": 0.05})
    assert {weight_decay_at(s, 100, const) for s in range(100)} == {0.05}
    cos = from_dict(OptimConfig, {"weight_decay": 0.05, "weight_decay_end": 0.08})
    assert weight_decay_at(0, 101, cos) == pytest.approx(0.05) and weight_decay_at(100, 101, cos) == pytest.approx(0.08)
    assert weight_decay_at(50, 101, cos) == pytest.approx(0.065)


def test_no_decay_groups_match_names_containing_the_authors_keys():
    cfg = tiny_config()
    model = tiny_task(cfg).model
    skip = set(no_decay_names(model, AUTHORS_NO_DECAY_KEYS))
    assert {"blocks.0.attn.scale_mul_1H11", "pos_start", "pos_1LC", "lvl_embed.weight", "head.bias"} <= skip
    assert not skip & {"class_emb.weight", "word_embed.weight", "blocks.0.attn.mat_qkv.weight", "head.weight"}
    trainer = Trainer(GeneratorTask(cfg, model, MultiScaleVQVAE(TOK), CPU), cfg, CPU)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["wd_scale"]: sorted(names[id(p)] for p in g["params"]) for g in trainer.optimizer.param_groups}
    assert groups[0.0] == sorted(skip) and trainer.optimizer.param_groups[0]["weight_decay"] == cfg.optim.weight_decay
    custom = set(no_decay_names(model, ["class_emb"]))
    assert "class_emb.weight" in custom and "pos_start" not in custom  # the list is a config key


# -- the loop --------------------------------------------------------------------------------

def test_a_run_resumed_from_a_local_checkpoint_equals_a_straight_run(tmp_path):
    cfg = tiny_config(**{"run.steps": 6, "run.checkpoint_every": 3, "model.cond_drop_rate": 0.5})
    data = token_batches(6)
    straight = tiny_task(cfg)
    assert Trainer(straight, cfg, CPU).run(iter(data), 0, LocalCheckpoints(tmp_path / "a"))["status"] == "completed"
    resumed = tiny_task(cfg)
    trainer = Trainer(resumed, cfg, CPU)
    assert trainer.restore(tmp_path / "a" / "step_00000003") == 3
    trainer.run(iter(data[3:]), 3, Hooks())  # per-step seeds: the same class dropout as the straight run
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=k)
    meta = (tmp_path / "a" / "step_00000006" / "checkpoint.yaml").read_text()
    assert "sampling:" in meta and "step: 6" in meta


def test_nonfinite_loss_stops_before_the_optimizer_step():
    cfg = tiny_config(**{"run.steps": 5, "run.fault_nan_at_step": 3})
    task = tiny_task(cfg)
    record = Record()
    result = Trainer(task, cfg, CPU).run(iter(token_batches(5)), 0, record)
    assert result["status"] == "nonfinite" and result["step"] == 3
    assert [s for s, _, _ in record.steps] == [0, 1]
    assert all(torch.isfinite(p).all() for p in task.model.parameters())


def test_logged_metrics_are_interval_means_and_cycle_steps_log_their_scales():
    cfg = tiny_config(**{"run.steps": 10, "run.log_every": 5, "train.cycle_ratio": 3})
    record = Record()
    Trainer(tiny_task(cfg), cfg, CPU).run(iter(token_batches(10)), 0, record)
    assert [s for s, _ in record.logged] == [5, 10]
    step5 = record.logged[0][1]
    assert step5["train/loss"] == pytest.approx(sum(loss for _, _, loss in record.steps[:5]) / 5, rel=1e-6)
    assert step5["train/lr"] == record.steps[4][1]
    # cycle_ratio 3 with markov_from_scale 2 of 4 scales: steps 0-2 on scales 0-1, 3 on scale 2, 4 on scale 3
    assert {"train/acc_s0", "train/acc_s1", "train/loss_s2", "train/loss_s3", "perf/step_s"} <= set(step5)


def test_cost_is_kept_per_step_kind_and_a_pyramid_is_every_scale_once():
    # the cycle of 4 scales, markov_from_scale 2, cycle_ratio 3: dense, dense, dense, s2, s3 (5 steps a period)
    cfg = tiny_config(**{"run.steps": 10, "run.log_every": 10, "train.cycle_ratio": 3})
    task, record = tiny_task(cfg), Record()
    assert [task.step_type(s) for s in range(5)] == ["dense"] * 3 + ["s2", "s3"]
    Trainer(task, cfg, CPU).run(iter(token_batches(10)), 0, record)
    m = record.logged[-1][1]
    kinds = ("dense", "s2", "s3")
    assert all(m[f"train/step_s_{k}"] > 0 and m[f"train/peak_mem_mb_{k}"] > 0 for k in kinds)
    assert m["train/pyramid_s"] == pytest.approx(sum(m[f"train/step_s_{k}"] for k in kinds))
    assert m["train/images_per_s"] == pytest.approx(4 / m["train/pyramid_s"])
    # tokens of the 9 timed steps (the first is left out) over their seconds
    n = [p * p for p in TOK.patch_nums]
    tokens = 4 * (5 * (n[0] + n[1]) + 2 * n[2] + 2 * n[3])  # steps 1-9: dense x5, s2 x2, s3 x2
    seconds = sum(m[f"train/step_s_{k}"] * c for k, c in zip(kinds, (5, 2, 2)))
    assert m["train/tokens_per_s"] == pytest.approx(tokens / seconds)
    assert m["perf/peak_mem_mb"] >= max(m[f"train/peak_mem_mb_{k}"] for k in kinds) * 0.999


def test_peak_memory_is_named_by_what_it_measures():
    cfg = tiny_config(**{"run.steps": 2, "run.log_every": 2})
    record = Record()
    Trainer(tiny_task(cfg), cfg, CPU).run(iter(token_batches(2)), 0, record)
    m = record.logged[-1][1]
    assert m["perf/peak_rss_mb"] > 0 and "perf/peak_cuda_mb" not in m  # a CPU process: its resident set
    assert m["perf/peak_mem_mb"] == m["perf/peak_rss_mb"]               # the deprecated alias, for one release
    assert peak_metric(torch.device("cuda", 0)) == "perf/peak_cuda_mb" and peak_metric(CPU) == "perf/peak_rss_mb"


class RecordAndSave(Record):
    def __init__(self, root):
        super().__init__()
        self.saver = LocalCheckpoints(root)

    def checkpoint(self, trainer, step, report):
        self.saver.checkpoint(trainer, step, report)


def test_device_hours_are_wall_time_times_ranks_and_add_up_over_a_resume(tmp_path):
    cfg = tiny_config(**{"run.steps": 6, "run.log_every": 3, "run.checkpoint_every": 3})
    data, world = token_batches(6), 2  # two ranks' worth of devices (the loop runs one, undistributed)
    first, record = Trainer(tiny_task(cfg), cfg, CPU, world=world), RecordAndSave(tmp_path)
    t0 = time.perf_counter()
    first.run(iter(data), 0, record)
    wall1 = time.perf_counter() - t0
    hours = [m["cost/device_hours"] for _, m in record.logged]
    assert [s for s, _ in record.logged] == [3, 6] and 0 < hours[0] < hours[1] <= wall1 * world / 3600
    resumed, again = Trainer(tiny_task(cfg), cfg, CPU, world=world), Record()
    assert resumed.restore(tmp_path / "step_00000003") == 3
    saved = resumed.device_s / 3600  # the cost up to the checkpoint, kept in its train state
    assert hours[0] <= saved <= hours[1]
    t0 = time.perf_counter()
    resumed.run(iter(data[3:]), 3, again)
    wall2 = time.perf_counter() - t0
    [(step, m)] = again.logged
    assert step == 6 and saved < m["cost/device_hours"] <= saved + wall2 * world / 3600


def test_a_full_step_is_a_pyramid():
    cfg = tiny_config("var", **{"run.steps": 4, "run.log_every": 4})
    record = Record()
    Trainer(tiny_task(cfg), cfg, CPU).run(iter(token_batches(4)), 0, record)
    m = record.logged[-1][1]
    assert m["train/pyramid_s"] == m["train/step_s_full"] and "train/step_s_dense" not in m
    assert m["train/tokens_per_s"] == pytest.approx(4 * sum(p * p for p in TOK.patch_nums) / m["train/step_s_full"])


@pytest.mark.parametrize("overrides, key", [
    (["train.cycle_ratio=0"], "train.cycle_ratio"),
    (["optim.hold_ratio=1"], "optim.hold_ratio"),
    (["optim.hold_ratio=-0.1"], "optim.hold_ratio"),
    (["model.markov_from_scale=0"], "model.markov_from_scale"),
    (["train.precision=fp16"], "train.precision"),
    (["optim.warmup_steps=5", "optim.warmup_ratio=0.1"], "optim.warmup_ratio"),
    (["run.steps=10", "run.epochs=2"], "run.epochs"),
])
def test_bad_training_keys_are_named(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_train_config(None, ["model_name=mvar-tiny", "tokenizer=t", "data.shards=s", *overrides])


def test_cycle_needs_a_scale_after_markov_from_scale():
    cfg = tiny_config("scale_markov", **{"model.markov_from_scale": 4})  # scale_markov: fine until the scales are known
    with pytest.raises(ConfigError, match="model.markov_from_scale.*tokenizer has 4 scales"):
        cfg.check_scales(TOK.patch_nums)
    tiny_config("scale_markov", **{"model.markov_from_scale": 4, "train.scale_schedule": "packed"}).check_scales(
        TOK.patch_nums)  # packed needs no split


def test_run_steps_on_the_command_line_replace_epochs_of_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model_name: mvar-tiny\ntokenizer: t\ndata: {shards: s}\nrun: {epochs: 3}\n")
    assert load_train_config(path).run.steps == 0 and load_train_config(path).run.epochs == 3
    cfg = load_train_config(path, ["run.steps=7"])
    assert cfg.run.steps == 7 and cfg.run.epochs == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_steps_with_a_grad_scaler_on_cuda():
    cfg = tiny_config(**{"run.steps": 4, "run.log_every": 4, "train.precision": "fp16", "scaling.use_gpu": "true"})
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = NextScaleTransformer(cfg.model, TOK.vocab_size, TOK.z_channels, TOK.patch_nums).to(dev).train()
    task = GeneratorTask(cfg, model, MultiScaleVQVAE(TOK).to(dev).eval(), dev)
    record = Record()
    data = [(x.to(dev), y.to(dev)) for x, y in token_batches(4)]
    trainer = Trainer(task, cfg, dev)
    assert trainer.run(iter(data), 0, record)["status"] == "completed"
    assert record.logged[-1][1]["train/loss_scale"] == 2.0 ** 11  # the authors' initial scale
    assert math.isfinite(record.logged[-1][1]["train/loss"]) and trainer.stepper.scaler is not None
