"""The README's main command: the whole study on one machine, on embedded defaults, nothing downloaded.

synthetic shards (train + held-out) -> the vae-quick tokenizer (Ray Train, codebook kept in use) ->
token shards -> a classifier of the training split (the metrics' feature extractor) -> var,
scale_markov and mvar generators on the same tokens, --seeds training seeds each (a group run per
variant, a run per seed), at an equal budget of full pyramids (Ray Train, 2 CPU workers) ->
evaluation of each seed with the classifier beside two reference rows (real: the held-out split; untrained:
a generator at step 0) -> benchmark -> ablation report (mean and interval over the seeds, a verdict per
comparison with VAR) and picture; everything in the MLflow store
out/quickstart/mlflow.db. Every step reuses what an earlier run finished (a step's output counts only
when complete), so a rerun (or a run after an interruption) goes straight to what is left.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from mvar import cluster, tracking
from mvar.cli import main as mvar_main
from mvar.commands import run_cli, standalone
from mvar.errors import UserError
from mvar.report import BUDGET_TAG  # what the variants' runs held equal: pyramids | steps

EXPERIMENT = "quickstart"
STEPS = 11
VARIANTS = ("var", "scale_markov", "mvar")
TOKENIZER_CONFIG = "workflows/configs/tokenizer_quick_local.yaml"
GENERATOR_CONFIG = "workflows/configs/generator_quick_local.yaml"
REFERENCE_TAG = "mvar.reference_row"


class Quickstart:
    def __init__(self, out: Path, args):
        self.out, self.args = out, args
        self.uri = f"sqlite:///{out / 'mlflow.db'}"
        self.common = [f"scaling.num_workers={args.workers}", f"run.storage_path={out / 'runs'}",
                       f"tracking.uri={self.uri}", f"tracking.experiment={EXPERIMENT}"]
        self.train_split, self.held_out = out / "data" / "synth", out / "data" / "synth-eval"
        self.classifier_pt = out / "classifier" / "classifier.pt"
        self.t0 = time.monotonic()

    def step(self, n: int, title: str) -> None:
        print(f"\n== [{n}/{STEPS}] {title}   (elapsed {time.monotonic() - self.t0:.0f} s, "
              f"CPU {time.process_time() + children_cpu():.0f} s)", flush=True)

    @property
    def held_out_images(self) -> int:
        return self.args.num_held_out or max(10, self.args.num_images // 2)

    def reuse(self, path: Path) -> bool:
        if path.exists():
            print(f"reusing {path}")
            return True
        return False

    def data(self) -> None:
        self.step(1, f"synthetic image shards: {self.args.num_images} for training, {self.held_out_images} "
                     "held out (64 px, 10 classes)")
        for d, n, seed in ((self.train_split, self.args.num_images, 0), (self.held_out, self.held_out_images, 1)):
            if not self.reuse(d / "manifest.json"):  # the manifest is written last
                check(mvar_main(["data", "synth", "--out", str(d), "--num-images", str(n), "--image-size", "64",
                                 "--num-classes", "10", "--seed", str(seed)]))

    def tokenizer(self) -> None:
        self.step(2, f"vae-quick tokenizer (7 scales up to 8x8, 256 codes), {self.args.tokenizer_steps} steps "
                     f"on {self.args.workers} Ray Train CPU worker(s)")
        out = self.out / "tokenizer"
        if self.reuse(out / "tokenizer.yaml"):  # written by save_tokenizer's rename: complete when there
            return
        from workflows.train_tokenizer import main as train_tokenizer
        check(train_tokenizer(["--config", TOKENIZER_CONFIG, f"output={out}", f"data.shards={self.train_split}",
                               f"data.eval_shards={self.held_out}", "run.name=quickstart-tokenizer",
                               f"run.steps={self.args.tokenizer_steps}",
                               f"run.checkpoint_every={max(1, self.args.tokenizer_steps // 2)}", *self.common]))

    def tokens(self) -> None:
        self.step(3, "token shards (the latent cache the generators train on), codebook usage per scale")
        for src in (self.train_split, self.held_out):
            d = src.parent / f"{src.name}-tokens"
            if not self.reuse(d / "manifest.json"):
                check(mvar_main(["data", "tokenize", "--tokenizer", str(self.out / "tokenizer"),
                                 "--src", str(src), "--out", str(d)]))

    def classifier(self) -> None:
        self.step(4, "classifier of the training split: the feature extractor of FID/IS/precision/recall "
                     "and class accuracy")
        if self.reuse(self.classifier_pt.with_suffix(".yaml")):  # its .yaml is written after the .pt
            return
        check(mvar_main(["eval", "train-classifier", "--shards", str(self.train_split), "--eval-shards",
                         str(self.held_out), "--out", str(self.classifier_pt),
                         "--steps", str(self.args.classifier_steps), "--threads", "1"]))  # 2 spin on a shared machine

    def run_key(self, name: str) -> str:
        return f"{self.out / 'runs'}/{name}"

    def finished_run(self, tags: dict, metric: str):
        store = tracking.Store(self.uri)
        run_id = store.find_run(EXPERIMENT, tags)
        run = store.get(run_id) if run_id else None
        return run if run and metric in run.metrics and run.status == "FINISHED" else None

    def seed_names(self, variant: str) -> list[str]:
        """The training runs of ``variant``: `quickstart-<variant>-seed<k>` (one seed: `quickstart-<variant>`)."""
        name = f"quickstart-{variant}"
        return [f"{name}-seed{k}" for k in range(self.args.seeds)] if self.args.seeds > 1 else [name]

    def train(self, variant: str) -> None:
        name = f"quickstart-{variant}"
        runs = [self.finished_run({"mvar.run_key": self.run_key(n)}, "train/loss") for n in self.seed_names(variant)]
        if all(runs):
            print(f"reusing the finished run(s) of {name}: {', '.join(r.name for r in runs)}")
            return
        from mvar.training import load_train_config, train_repeats
        cfg = load_train_config(GENERATOR_CONFIG, self.generator_overrides(variant, name))
        store = tracking.Store(self.uri)
        for outcome in train_repeats(cfg):  # every seed, nested under the variant's group run
            print(f"{name} seed {outcome.seed}: {outcome.step} steps, checkpoint {outcome.checkpoint}")
            store.set_tags(outcome.run_id, {BUDGET_TAG: self.args.budget})
            if outcome.group_run_id:
                store.set_tags(outcome.group_run_id, {BUDGET_TAG: self.args.budget})

    def generator_overrides(self, variant: str, name: str) -> list[str]:
        """Equal full pyramids (--budget pyramids, the default): the Markov variants train every scale at once
        under their mask (train.scale_schedule=packed), so each step trains every scale once, as VAR's does,
        and equal steps are equal pyramids and equal tokens. --budget steps: the authors' 8:1:1 cycle at equal
        optimizer steps (most of MVAR's steps then train only the small scales: fewer tokens)."""
        steps = self.args.train_steps
        from mvar.models.patterns import pattern_info
        packs = "packed" in pattern_info(variant).schedules  # VAR's full step is a pyramid already
        schedule = "packed" if self.args.budget == "pyramids" and packs else "auto"
        return [f"model.attention={variant}", f"tokenizer={self.out / 'tokenizer'}",
                f"data.shards={self.train_split.parent / 'synth-tokens'}",
                f"data.eval_shards={self.held_out.parent / 'synth-eval-tokens'}", f"run.name={name}",
                f"run.steps={steps}", f"run.checkpoint_every={max(1, steps // 2)}", f"run.repeats={self.args.seeds}",
                f"train.scale_schedule={schedule}", *self.common]

    def eval_args(self, out: Path) -> list[str]:
        return ["--reference", str(self.train_split), "--num-per-class", str(self.args.num_per_class),
                "--batch-size", "10", "--feature-extractor", "classifier",
                "--feature-extractor-weights", str(self.classifier_pt), "--num-workers", str(self.args.workers),
                "--cpus-per-worker", "0.5", "--out", str(out)]

    def evaluate(self, variant: str) -> None:
        for name in self.seed_names(variant):
            run = self.finished_run({"mvar.run_key": self.run_key(name)}, "train/loss")
            if run is None:
                raise SystemExit(f"no finished training run {name}")
            if "eval/fid" in run.metrics:
                print(f"reusing the evaluation of {name}")
                continue
            check(mvar_main(["eval", "--run-id", run.run_id, "--tracking-uri", self.uri, "--summary",
                             *self.eval_args(self.out / "eval" / name.removeprefix("quickstart-"))]))

    def untrained(self) -> None:
        """The ceiling: VAR's generator at step 0 (its initial weights), evaluated like the trained ones."""
        ckpt = self.out / "untrained"
        if self.finished_run({REFERENCE_TAG: "untrained"}, "eval/fid"):
            print("reusing the evaluation of the untrained generator")
            return
        if not self.reuse(ckpt / "checkpoint.yaml"):
            save_untrained(ckpt, GENERATOR_CONFIG, self.generator_overrides("var", "quickstart-untrained") +
                           ["run.repeats=1"])
        check(mvar_main(["eval", "--checkpoint", str(ckpt), "--tracking-uri", self.uri, "--experiment", EXPERIMENT,
                         *self.eval_args(self.out / "eval" / "untrained"), "--summary",
                         "tracking.run_name=quickstart-untrained"]))
        from mvar.training import load_train_config
        from mvar.training.launch import model_tags
        size = model_tags(load_train_config(GENERATOR_CONFIG, self.generator_overrides("var", "untrained") +
                                            ["run.repeats=1"]))["mvar.size"]
        store = tracking.Store(self.uri)  # the size: the report's depth column and the baseline of its ratios
        store.set_tags(store.find_run(EXPERIMENT, {"mvar.checkpoint": str(ckpt)}),
                       {REFERENCE_TAG: "untrained", "mvar.size": size})

    def real(self) -> None:
        """The floor: the held-out images scored against the training split as the samples are."""
        if self.finished_run({REFERENCE_TAG: "real"}, "eval/fid"):
            print("reusing the real-images row")
            return
        from mvar.evaluation.config import EvalConfig
        from mvar.evaluation.run import quality_metrics
        ecfg = EvalConfig(reference=str(self.train_split), feature_extractor="classifier",
                          feature_extractor_weights=str(self.classifier_pt), device="cpu")
        metrics = quality_metrics(ecfg, 64, self.out / "eval", self.held_out)
        cfg = tracking.TrackingConfig(uri=self.uri, experiment=EXPERIMENT, run_name="quickstart-real",
                                      system_metrics=False)
        run_id = tracking.start_run(cfg, "quickstart-real", tags={REFERENCE_TAG: "real",
                                                                  "mvar.feature_extractor": "classifier",
                                                                  "mvar.metrics_comparable": "false"})
        t = tracking.MlflowTracker(run_id, cfg)
        t.log_params({"eval.reference": str(self.train_split), "eval.images": str(self.held_out)})
        t.log_metrics(metrics, 0)
        t.close(status="FINISHED")
        print("real (held-out vs training split): " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))

    def independent_check(self) -> None:
        """A second classifier of another design (grey levels only, so hue alone cannot pass it), trained on
        the same split, names the class of each seed's samples (workflows.independent_check)."""
        self.step(8, "independent check: a grey-level classifier of another design names each sample's class")
        out = self.out / "report" / "independent_check.json"
        if self.reuse(out):
            return
        from workflows.independent_check import check as grey_check
        from workflows.quickstart_picture import samples_of
        samples = {}
        for variant in self.args.variants:
            for name in self.seed_names(variant):
                found = samples_of(self.out / "eval" / name.removeprefix("quickstart-"))
                if found is not None:
                    samples[name.removeprefix("quickstart-")] = str(found)
        result = grey_check(str(self.train_split), str(self.held_out), samples, self.args.check_steps)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out)
        by_variant = {v: [a for n, a in result["samples"].items() if n.split("-seed")[0] == v] for v in self.args.variants}
        print(f"grey-level check ({result['seconds']} s to train): held-out images {result['heldout_acc']:.3f}; "
              "samples " + ", ".join(f"{v} {sum(a) / len(a):.3f}" for v, a in by_variant.items() if a) +
              " (mean over seeds)")

    def bench(self) -> None:
        self.step(9, "benchmark: memory and speed of var, scale_markov, mvar (tiny, CPU, one process each)")
        bench_json = self.out / "bench.json"
        if self.reuse(bench_json):
            return
        check(subprocess.call([sys.executable, "-m", "mvar.cli", "bench", "--size", "tiny", "--resolution", "64",
                               "--batch", "8", "--repeats", "2", "--json", str(bench_json)]))

    def picture(self) -> Path:
        self.step(10, "picture: real images, tokenizer reconstructions and each generator's samples, a row per class")
        from workflows.quickstart_picture import ablation_picture
        first = [self.seed_names(v)[0].removeprefix("quickstart-") for v in self.args.variants]  # the first seed of each
        return ablation_picture(self.out, self.held_out, ["untrained", *first], min(4, self.args.num_per_class))

    def report(self, picture: Path) -> None:
        self.step(11, "ablation report from the MLflow runs")
        from mvar.report import make_report
        report = make_report(EXPERIMENT, self.out / "report", self.uri, extra_files=[picture])
        print(report.markdown)
        print("files: " + ", ".join(str(f) for f in report.files))


def save_untrained(out: Path, config: str, overrides: list[str]) -> Path:
    """A model checkpoint of the generator's initial weights (the seed every variant starts from)."""
    import torch

    from mvar.checkpoint import load_tokenizer, save_checkpoint
    from mvar.config import to_dict
    from mvar.training import load_train_config
    from mvar.training.loop import build_model
    cfg = load_train_config(config, overrides)
    tokenizer, tok_cfg = load_tokenizer(cfg.tokenizer)
    model = build_model(cfg, tok_cfg, torch.device("cpu"))
    return save_checkpoint(out, model, tokenizer, tok_cfg, extra={"train": {"step": 0, "run_name": "untrained"},
                                                                  "sampling": to_dict(cfg.sampling)})


def children_cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def check(rc: int) -> None:
    if rc:
        raise SystemExit(rc)


def configure(parser) -> None:
    parser.add_argument("--out", default="out/quickstart", help="where everything is written")
    parser.add_argument("--num-images", type=int, default=4000, help="training images")
    parser.add_argument("--num-held-out", type=int, default=400, help="held-out images (0: half of --num-images)")
    parser.add_argument("--tokenizer-steps", type=int, default=600, help="steps of the tokenizer run")
    parser.add_argument("--classifier-steps", type=int, default=400, help="steps of the classifier")
    parser.add_argument("--train-steps", type=int, default=1100, help="steps of each generator run")
    parser.add_argument("--seeds", type=int, default=2, help="training seeds of each variant (run.seed 0..N-1): "
                        "the report's intervals are over them")
    parser.add_argument("--variants", default="var,mvar", help="attention patterns to train and compare "
                        "(comma-separated, of " + ", ".join(VARIANTS) + "; default var,mvar: the 15-minute budget; all three: "
                        "about 19 minutes; var is the baseline of every ratio)")
    parser.add_argument("--budget", choices=("pyramids", "steps"), default="pyramids",
                        help="what the variants hold equal: full pyramids (every scale trained once a step; the "
                        "Markov variants train packed) or optimizer steps (the authors' 8:1:1 cycle for them)")
    parser.add_argument("--check-steps", type=int, default=300, help="steps of the independent check's classifier")
    parser.add_argument("--num-per-class", type=int, default=20, help="evaluation samples per class")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers of each training, and Ray workers "
                        "of each evaluation's sampling (0.5 CPU each)")
    parser.set_defaults(func=run)


def check_args(args) -> None:
    if args.workers < 1:
        raise UserError(f"--workers: must be at least 1, got {args.workers}")
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    if "var" not in args.variants:
        raise UserError("--variants: must include var, the baseline of the report's ratios")
    if args.seeds < 1:
        raise UserError(f"--seeds: must be at least 1 (training seeds per variant), got {args.seeds}")


def run(args) -> int:
    check_args(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    q = Quickstart(out, args)
    try:
        q.data()
        q.tokenizer()
        q.tokens()
        q.classifier()
        q.step(5, f"train {', '.join(args.variants)}: {args.seeds} seed(s) each, {args.train_steps} steps (equal "
                  f"{args.budget}) on {args.workers} Ray Train CPU worker(s)")
        for variant in args.variants:
            q.train(variant)
        q.step(6, f"evaluate each: {args.num_per_class} samples per class with the classifier")
        for variant in args.variants:
            q.evaluate(variant)
        q.step(7, "reference rows: untrained generator (ceiling) and real held-out images (floor)")
        q.untrained()
        q.real()
    finally:
        cluster.shutdown()
    q.independent_check()
    q.bench()
    q.report(q.picture())
    print(f"\ndone in {time.monotonic() - q.t0:.0f} s (CPU {time.process_time() + children_cpu():.0f} s of this "
          f"process and its children; Ray workers not counted); everything is under {out}")
    print("open the MLflow UI:\n"
          f"  .venv/bin/mlflow ui --backend-store-uri {q.uri} --host 127.0.0.1 --port 5000\n"
          f"  then http://127.0.0.1:5000 -> experiment '{EXPERIMENT}' -> select the runs -> Compare")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(standalone("python -m workflows.quickstart", __doc__.splitlines()[0], configure), argv,
                   name="workflows.quickstart")


if __name__ == "__main__":
    sys.exit(main())
