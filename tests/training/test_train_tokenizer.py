"""workflows.train_tokenizer: config, loss terms, the perceptual net, bad input before Ray, and a real Ray Train run."""
from __future__ import annotations

import dataclasses
import socket

import pytest
import torch

from mvar import tracking
from mvar.checkpoint import load_tokenizer, load_train_state, save_tokenizer, tokenizer_fingerprint
from mvar.config import ConfigError
from mvar.errors import UserError
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig
from mvar.tokenizer.perceptual import (
    VGGPerceptual,
    load_perceptual,
    save_standin_weights,
    vgg16_features,
)
from mvar.training.tokenizer_config import load_tokenizer_train_config
from mvar.training.tasks import prepare_tokenizer as prepare
from mvar.training.tokenizer_loop import TokenizerObjective
from workflows.train_tokenizer import main

LOCAL = "workflows/configs/tokenizer_tiny_local.yaml"
SMALL = ["tokenizer_name=vae-tiny32", "data.shards=s"]  # unit tests: the 32 px tokenizer, 4x fewer pixels


def overrides(inputs, name: str, **extra) -> list[str]:
    """Point the tiny local config at the test's image shards and a store under the test root."""
    base = {"data.shards": inputs.images, "run.name": name, "run.storage_path": str(inputs.root / "tok-runs"),
            "output": str(inputs.root / "tok-out" / name), "tracking.uri": inputs.tracking_uri,
            "tracking.experiment": "tests", "tracking.system_metrics": "false", "data.num_workers": 0}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Two OpenMP threads on a 2-core machine that other jobs share spin at every barrier (seen: 20x slower
    convolutions); one thread keeps these small CPU tests' time proportional to the load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
    """Stand-in VGG16 features (seeded random), two taps: small and fast."""
    return save_standin_weights(tmp_path_factory.mktemp("vgg") / "vgg16-features.pth", num_layers=2, seed=0)


@pytest.fixture
def no_ray_started(monkeypatch):
    """A bad-input run must fail before it starts or joins a Ray. Refusing the connection (rather than
    asking whether a Ray is up) holds whatever another test of the session left running."""
    import ray
    from mvar import cluster

    def refuse(*args, **kwargs):
        raise AssertionError("a bad-input run must fail before Ray starts")
    monkeypatch.setattr(cluster, "connect", refuse)
    monkeypatch.setattr(ray, "init", refuse)
    yield


# -- config ------------------------------------------------------------------------

def test_registry_and_trainer_defaults_fill_the_sections_and_yaml_wins():
    cfg = load_tokenizer_train_config(LOCAL, ["data.shards=s", "tokenizer.vocab_size=64"])
    assert cfg.tokenizer.image_size == 64 and cfg.tokenizer.ch == 32 and cfg.tokenizer.vocab_size == 64
    assert cfg.optim.lr == 0.001 and cfg.optim.weight_decay == 0.0 and cfg.optim.grad_clip == 1.0
    assert cfg.run.name == "tokenizer_tiny_local"
    assert cfg.output_dir("/runs") == "out/quickstart/tokenizer"
    cfg = load_tokenizer_train_config(None, ["tokenizer_name=vae-tiny32", "data.shards=s"])
    assert cfg.data.image_size == 32  # taken from the tokenizer
    assert cfg.output_dir("/runs/") == "/runs/train_tokenizer/tokenizer"


@pytest.mark.parametrize("override, message", [
    ("tokenizer_name=vae-huge", "config key 'tokenizer_name': unknown tokenizer size 'vae-huge'"),
    ("data.image_size=32", "config key 'data.image_size': is 32 but the tokenizer takes 64 px"),
    ("losses.perceptual_weight=0.5", "config key 'losses.perceptual_weights'"),
    ("losses.perceptual_layers=6", "config key 'losses.perceptual_layers'"),
    ("data.kind=tokens", "config key 'data.kind'"),
    ("losses.l3_weight=1", "unknown config key 'losses.l3_weight'"),
    ("codebook.restart_below=0", "config key 'codebook.restart_below'"),
    ("codebook.init=lloyd", "config key 'codebook.init'"),
    ("gan.num_layers=9", "config key 'gan.num_layers'"),
    ("gan.wieght=1", "unknown config key 'gan.wieght'"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_tokenizer_train_config(LOCAL, ["data.shards=s", override])


# -- loss terms ----------------------------------------------------------------------

def test_objective_equals_the_tokenizers_own_losses_in_fp32():
    torch.manual_seed(0)
    cfg = load_tokenizer_train_config(None, [*SMALL, "losses.l2_weight=0.5", "losses.vq_weight=2"])
    vae = MultiScaleVQVAE(cfg.tokenizer)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ref = vae.losses(x, l1_weight=1.0, l2_weight=0.5, vq_weight=2.0)
    out = TokenizerObjective(vae, cfg.losses, None)(x)
    torch.testing.assert_close(out["loss"], ref.total)
    torch.testing.assert_close(out["recon_l1"], ref.recon_l1)
    assert [i.shape for i in out["indices"]] == [(2, 1), (2, 4), (2, 9), (2, 16)]
    assert out["perceptual"].item() == 0.0


def test_perceptual_term_is_added_finite_and_trains_only_the_tokenizer(vgg_weights):
    torch.manual_seed(0)
    cfg = load_tokenizer_train_config(None, [*SMALL, "losses.perceptual_weight=0.5",
                                              f"losses.perceptual_weights={vgg_weights}", "losses.perceptual_layers=2"])
    perceptual = load_perceptual(vgg_weights, 2)
    objective = TokenizerObjective(MultiScaleVQVAE(cfg.tokenizer), cfg.losses, perceptual)
    objective.train()
    assert not perceptual.training  # frozen net stays in eval mode
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = objective(x)
    p = out["perceptual"]
    assert torch.isfinite(p) and p.item() > 0
    torch.testing.assert_close(out["loss"], out["recon_l1"] + out["recon_l2"] + out["vq_loss"] + 0.5 * p)
    out["loss"].backward()
    assert objective.vae.decoder.conv_out.weight.grad is not None
    assert all(q.grad is None for q in perceptual.parameters())
    assert perceptual(x, x).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.filterwarnings("ignore:Grad strides do not match")  # 1x1 convs' grads on CPU: a copy, not an error
def test_perceptual_under_ddp_with_a_frozen_submodule(vgg_weights):
    """The objective as Ray Train wraps it: DDP (gloo, world size 1) over tokenizer + frozen VGG."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        cfg = load_tokenizer_train_config(None, [*SMALL, "losses.perceptual_weight=1",
                                                  f"losses.perceptual_weights={vgg_weights}",
                                                  "losses.perceptual_layers=2"])
        ddp = DistributedDataParallel(TokenizerObjective(MultiScaleVQVAE(cfg.tokenizer), cfg.losses,
                                                         load_perceptual(vgg_weights, 2)))
        out = ddp(torch.rand(2, 3, 32, 32) * 2 - 1)
        out["loss"].backward()
        assert torch.isfinite(out["perceptual"]) and out["perceptual"].item() > 0
    finally:
        dist.destroy_process_group()


def test_perceptual_weights_formats_and_mismatches(tmp_path):
    full = save_standin_weights(tmp_path / "features.pth", num_layers=5, seed=1)  # ~59 MB, every tap
    net = load_perceptual(full, 5)
    assert torch.equal(net.features[28].weight, torch.load(full, weights_only=True)["features.28.weight"])
    bare = tmp_path / "bare.pth"  # a state dict of vgg16().features itself: keys without the prefix
    torch.save({k: v for k, v in vgg16_features(1).state_dict().items()}, bare)
    VGGPerceptual(1).load_weights(bare)
    with pytest.raises(UserError, match=r"losses.perceptual_weights: .* has no key 'features.5.weight'"):
        load_perceptual(bare, 2)
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3), "features.0.bias": torch.zeros(8)}, wrong)
    with pytest.raises(UserError, match=r"'features.0.weight' has shape \(8, 3, 3, 3\), VGG16 needs \(64, 3, 3, 3\)"):
        load_perceptual(wrong, 1)
    with pytest.raises(UserError, match="losses.perceptual_weights: file .* does not exist"):
        load_perceptual(tmp_path / "none.pth", 1)


def test_checkpoint_restores_weights_optimizer_scheduler_and_step(tmp_path):
    """Through the trainer core, without Ray: a checkpoint is a tokenizer directory plus the train state."""
    from mvar.training.tokenizer_loop import build_task
    from mvar.training.trainer import LocalCheckpoints, Trainer
    cfg = load_tokenizer_train_config(None, [*SMALL, "run.steps=4", "run.checkpoint_every=2", "data.batch_size=1",
                                             "codebook.init_batches=1"])
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    data = [(torch.rand(1, 3, 32, 32) * 2 - 1, torch.zeros(1, dtype=torch.long)) for _ in range(4)]
    task = build_task(cfg, cpu, 0, 1)
    trainer = Trainer(task, cfg, cpu)
    hooks = LocalCheckpoints(tmp_path)
    assert trainer.run(iter(data), 0, hooks)["status"] == "completed"
    ckpt = tmp_path / "step_00000002"
    assert load_tokenizer(ckpt)[1] == cfg.tokenizer  # a checkpoint is a tokenizer directory as it is
    resumed = Trainer(build_task(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=1)), cpu, 0, 1),
                      cfg, cpu)
    assert resumed.restore(ckpt) == 2
    assert resumed.stepper.sched.last_epoch == 2
    resumed.run(iter(data[2:]), 2, LocalCheckpoints(tmp_path / "again"))
    done = tmp_path / "again" / "step_00000004"
    for a, b in zip(load_tokenizer(tmp_path / "step_00000004")[0].state_dict().values(),
                    load_tokenizer(done)[0].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # resuming at step 2 = running straight through
    names = {id(p): n for n, p in task.vae.named_parameters()}
    undecayed = {names[id(p)] for g in trainer.optimizer.param_groups if g["wd_scale"] == 0 for p in g["params"]}
    assert "quantize.embedding.weight" in undecayed and "decoder.conv_out.weight" not in undecayed


GAN_RUN = [*SMALL, "run.steps=4", "run.checkpoint_every=2", "data.batch_size=2", "codebook.init_batches=1",
           "codebook.restart_every=1", "gan.weight=0.5", "gan.start_step=2", "gan.channels=8", "gan.num_layers=2"]


class StepMetrics:
    """Hooks that keep each step's metrics."""

    def __init__(self, inner):
        self.inner, self.steps = inner, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def on_step(self, step, outcome, metrics):
        self.steps[step] = {k: float(v) for k, v in metrics.items()}


def test_gan_starts_at_its_step_codebook_is_set_once_and_a_resumed_run_continues_exactly(tmp_path):
    """Through the task and the trainer core: no adversarial term and a frozen discriminator before
    gan.start_step, both after; the codebook initialised at step 0 only (a resumed run takes the
    checkpoint's); codes restarted; discriminator and its optimizer resumed, so 2 + 2 steps = 4 straight."""
    from mvar.training.tokenizer_loop import build_task
    from mvar.training.trainer import LocalCheckpoints, Trainer
    cfg = load_tokenizer_train_config(None, GAN_RUN)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    data = [(torch.rand(2, 3, 32, 32) * 2 - 1, torch.zeros(2, dtype=torch.long)) for _ in range(4)]
    task = build_task(cfg, cpu, 0, 1)
    codebook0 = task.vae.quantize.embedding.weight.detach().clone()
    disc0 = [p.detach().clone() for p in task.disc.parameters()]
    hooks = StepMetrics(LocalCheckpoints(tmp_path))
    assert Trainer(task, cfg, cpu).run(iter(data), 0, hooks)["status"] == "completed"
    assert task.inits == 1 and not torch.equal(codebook0, task.vae.quantize.embedding.weight)
    assert [hooks.steps[s]["gan/weight"] for s in range(4)] == [0.0, 0.0, 0.5, 0.5]
    assert "gan/g_loss" not in hooks.steps[1] and "gan/g_loss" in hooks.steps[2]
    assert task.restarts > 0
    mid = load_train_state(tmp_path / "step_00000002" / "train_state.pt")["task"]
    assert all(torch.equal(a, b) for a, b in zip(disc0, mid["disc"].values()))  # not trained before step 2
    assert not all(torch.equal(a, b) for a, b in zip(disc0, task.disc.parameters()))

    resumed_task = build_task(cfg, cpu, 0, 1)
    resumed = Trainer(resumed_task, cfg, cpu)
    assert resumed.restore(tmp_path / "step_00000002") == 2
    resumed.run(iter(data[2:]), 2, LocalCheckpoints(tmp_path / "again"))
    assert resumed_task.inits == 0 and resumed_task.restarts == task.restarts
    straight, again = (load_train_state(d / "step_00000004" / "train_state.pt")
                       for d in (tmp_path, tmp_path / "again"))
    for a, b in zip(straight["task"]["disc"].values(), again["task"]["disc"].values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(load_tokenizer(tmp_path / "step_00000004")[0].state_dict().values(),
                    load_tokenizer(tmp_path / "again" / "step_00000004")[0].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_two_ranks_with_restarts_and_the_gan_stay_identical():
    """DDP over the tokenizer, DDP over the discriminator, restarts decided by rank 0 (gloo): after steps
    with the adversarial term on and codes re-seeded, both ranks hold the same weights."""
    import sys
    from pathlib import Path

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = str(Path(__file__).parent)
    sys.path.insert(0, here)  # spawned processes copy sys.path: they find the helper
    try:
        from tokenizer_ranks import rank_main
        with mp.Manager() as manager:
            out = manager.dict()
            args = [*GAN_RUN, "run.steps=3", "gan.start_step=1", "run.checkpoint_every=100"]
            mp.spawn(rank_main, args=(port, args, out), nprocs=2, join=True)
            r0, r1 = dict(out[0]), dict(out[1])
    finally:
        sys.path.remove(here)
    assert r0["restarts"] == r1["restarts"] > 0
    for part in ("vae", "disc"):
        for key in r0[part]:
            if key != "quantize.ema_vocab_hit_SV":  # each rank's own usage statistic (DDP re-broadcasts it)
                assert torch.equal(r0[part][key], r1[part][key]), (part, key)


def test_no_codebook_init_when_fine_tuning_a_tokenizer(tmp_path):
    """init_from: the codebook is the checkpoint's (the released tokenizer's must not be re-picked)."""
    from mvar.training.tokenizer_loop import build_task
    cfg32 = TokenizerConfig.named("vae-tiny32")
    save_tokenizer(tmp_path / "tok32", MultiScaleVQVAE(cfg32), cfg32)
    cfg = load_tokenizer_train_config(None, [*SMALL, "codebook.init_batches=1", f"init_from={tmp_path / 'tok32'}"])
    task = build_task(cfg, torch.device("cpu"), 0, 1)
    before = task.vae.quantize.embedding.weight.detach().clone()
    task.loss((torch.rand(2, 3, 32, 32) * 2 - 1, torch.zeros(2, dtype=torch.long)), 0)
    assert task.inits == 0 and torch.equal(before, task.vae.quantize.embedding.weight)


# -- bad input: refused before Ray starts ---------------------------------------------

@pytest.mark.usefixtures("no_ray_started")
def test_missing_perceptual_weights_fail_before_ray(tiny_inputs, tmp_path, capsys):
    missing = tmp_path / "vgg16.pth"
    rc = main(["--config", LOCAL, *overrides(tiny_inputs, "bad"), "losses.perceptual_weight=0.1",
               f"losses.perceptual_weights={missing}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "losses.perceptual_weights" in err and str(missing) in err


@pytest.mark.usefixtures("no_ray_started")
def test_image_shards_of_another_size_fail_before_ray(tiny_inputs, tmp_path, capsys):
    from mvar.data.synth import write_synth
    write_synth(str(tmp_path / "img32"), num_images=8, image_size=32, num_classes=2, seed=0, shard_size=8)
    rc = main(["--config", LOCAL, *overrides(tiny_inputs, "bad"), f"data.shards={tmp_path / 'img32'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "data.shards" in err and "32 px" in err and "tokenizer.image_size" in err
    rc = main(["--config", LOCAL, *overrides(tiny_inputs, "bad"), f"data.shards={tmp_path / 'nowhere'}"])
    assert rc == 2 and "data.shards" in capsys.readouterr().err


@pytest.mark.usefixtures("no_ray_started")
def test_init_from_and_output_are_checked_before_ray(tiny_inputs, tmp_path):
    cfg32 = TokenizerConfig.named("vae-tiny32")
    save_tokenizer(tmp_path / "tok32", MultiScaleVQVAE(cfg32), cfg32)
    cfg = load_tokenizer_train_config(LOCAL, overrides(tiny_inputs, "bad", init_from=tmp_path / "tok32"))
    with pytest.raises(UserError, match=r"init_from: .* has tokenizer.vocab_size 64, this run's tokenizer has 32"):
        prepare(cfg)
    cfg = load_tokenizer_train_config(LOCAL, overrides(tiny_inputs, "bad", init_from=tmp_path / "none"))
    with pytest.raises(UserError, match="init_from: .* is not a tokenizer checkpoint"):
        prepare(cfg)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    cfg = load_tokenizer_train_config(LOCAL, overrides(tiny_inputs, "bad", output=tmp_path / "busy"))
    with pytest.raises(UserError, match="output: .* exists and is not a tokenizer checkpoint"):
        prepare(cfg)
    prepare(load_tokenizer_train_config(LOCAL, overrides(tiny_inputs, "good", init_from=tiny_inputs.tokenizer)))


@pytest.mark.usefixtures("no_ray_started")
def test_relative_paths_are_refused_inside_a_ray_job(tiny_inputs, monkeypatch):
    """The generator's job-path check (mvar.cluster.check_job_paths) also guards the tokenizer's run."""
    monkeypatch.setattr("mvar.cluster.in_ray_job", lambda: True)
    cfg = load_tokenizer_train_config(LOCAL, overrides(tiny_inputs, "bad", output="out/tok"))
    with pytest.raises(UserError, match="'output': 'out/tok' is relative, but a Ray job"):
        prepare(cfg)


# -- a real run -------------------------------------------------------------------------

def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracking.client(uri).get_metric_history(run_id, key))


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_tiny_tokenizer_trains_and_its_output_tokenizes(tiny_inputs, tmp_path, capsys, progress_line_pattern):
    from mvar.data.manifest import read_manifest
    from mvar.data.tokens import tokenize
    out = tiny_inputs.root / "tok-out" / "fit"
    args = overrides(tiny_inputs, "fit", **{
        "run.steps": 30, "run.checkpoint_every": 15, "run.log_every": 2, "data.batch_size": 8,
        "optim.warmup_steps": 4, "data.eval_shards": tiny_inputs.root / "eval-images",
        "codebook.restart_every": 5, "codebook.warn_usage_below": 1.0})
    assert main(["--config", LOCAL, *args]) == 0
    printed = capsys.readouterr()
    assert f"tokenizer: {out}" in printed.out
    # rank 0's progress lines reach the driver (Ray's log monitor, which may still hold the last ones back
    # here: the complete set is checked through `ray job logs` in test_train_job.py)
    seen = [int(m.group(1)) for m in progress_line_pattern.finditer(printed.out + printed.err) if m.group(2) == "30"]
    assert seen and len(set(seen)) == len(seen) and set(seen) <= set(range(2, 31, 2)), seen
    uri = tiny_inputs.tracking_uri
    c = tracking.client(uri)
    run = c.search_runs([c.get_experiment_by_name("tests").experiment_id],
                        filter_string="tags.`mvar.run_key` LIKE '%/tok-runs/fit'")[0]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["tokenizer.vocab_size"] == "32" and run.data.params["run.steps"] == "30"
    assert run.data.tags["mvar.task"] == "tokenizer" and run.data.tags["mvar.checkpoint"].endswith("step_00000030")
    assert run.data.tags["mvar.tokenizer"] == str(out)
    l1 = history(uri, run_id, "train/recon_l1")
    assert [s for s, _ in l1] == list(range(2, 31, 2))
    first, last = sum(v for _, v in l1[:3]) / 3, sum(v for _, v in l1[-3:]) / 3
    assert last < 0.8 * first, f"reconstruction loss did not decrease: {first:.3f} -> {last:.3f}"
    for key in ("train/loss", "train/recon_l2", "train/vq_loss", "train/codebook_usage", "train/lr",
                "train/grad_norm", "perf/step_s", "perf/images_per_s", "perf/peak_mem_mb", "val/recon_l1"):
        assert key in run.data.metrics, key
    assert "train/perceptual" not in run.data.metrics  # off in this run
    assert 0 < run.data.metrics["train/codebook_usage"] <= 1
    for k in range(4):  # per scale, on training batches and on the held-out set
        for key in (f"tok/usage_s{k}", f"tok/perplexity_s{k}", f"tok/val_usage_s{k}", f"tok/val_perplexity_s{k}"):
            assert key in run.data.metrics, key
    assert [s for s, _ in history(uri, run_id, "tok/restarts")] == list(range(2, 31, 2))
    assert run.data.metrics["tok/restarts"] > 0  # restart_below is loose at 32 codes x 4 scales
    assert 5 < run.data.metrics["tok/val_psnr"] < 60
    # warn_usage_below 1.0: fewer codes than tokens at some scale is certain, so the warning and its tag
    assert run.data.metrics["tok/low_usage_scales"] > 0 and "mvar.codebook_warning" in run.data.tags
    assert [s for s, _ in history(uri, run_id, "val/recon_l1")] == [15, 30]
    # the output is a tokenizer checkpoint that `mvar data tokenize` and training use
    _, tok_cfg = load_tokenizer(out)
    assert tok_cfg == TokenizerConfig.tiny()
    fingerprint = tokenizer_fingerprint(out)
    assert run.data.tags["mvar.tokenizer_sha256"] == fingerprint
    tokenize(str(out), tiny_inputs.images, str(tmp_path / "tokens"), progress=False)
    manifest = read_manifest(str(tmp_path / "tokens"))
    assert manifest.tokens["tokenizer_sha256"] == fingerprint and manifest.num_samples == 160


@pytest.mark.usefixtures("no_ray_started")
def test_check_runs_every_check_prints_ok_and_writes_nothing(tiny_inputs, tmp_path, capsys):
    argv = ["--config", LOCAL, *overrides(tiny_inputs, "checked", output=tmp_path / "tok"), "--check"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("OK: run 'checked'")
    assert not (tmp_path / "tok").exists()
    assert main([*argv, "losses.perceptual_weight=1", f"losses.perceptual_weights={tmp_path / 'none.pth'}"]) == 2
    assert "none.pth" in capsys.readouterr().err
