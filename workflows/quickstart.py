"""The README's main command: the whole study on one machine, on embedded defaults, nothing downloaded.

synthetic shards -> tiny tokenizer (Ray Train) -> token shards -> tiny VAR and MVAR (Ray Train,
2 CPU workers) -> evaluation (FID / IS / precision / recall with stand-in Inception weights) ->
benchmark -> ablation report; everything in the MLflow store out/quickstart/mlflow.db. Every
step reuses what an earlier run finished, so a rerun (or a run after an interruption) goes
straight to what is left.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from mvar import cluster, tracking
from mvar.cli import main as mvar_main
from mvar.commands import Parser

EXPERIMENT = "quickstart"
STEPS = 8


class Quickstart:
    def __init__(self, out: Path, train_steps: int, tokenizer_steps: int, num_per_class: int):
        self.out, self.train_steps, self.tokenizer_steps = out, train_steps, tokenizer_steps
        self.num_per_class = num_per_class
        self.uri = f"sqlite:///{out / 'mlflow.db'}"
        self.common = [f"run.storage_path={out / 'runs'}", f"tracking.uri={self.uri}",
                       f"tracking.experiment={EXPERIMENT}"]
        self.t0 = time.monotonic()

    def step(self, n: int, title: str) -> None:
        print(f"\n== [{n}/{STEPS}] {title}   (elapsed {time.monotonic() - self.t0:.0f} s)", flush=True)

    def reuse(self, path: Path) -> bool:
        if path.exists():
            print(f"reusing {path}")
            return True
        return False

    def data(self) -> None:
        self.step(1, "synthetic image shards: 400 for training, 200 held out (64 px, 10 classes)")
        for name, n, seed in (("synth", 400, 0), ("synth-eval", 200, 1)):
            d = self.out / "data" / name
            if not self.reuse(d / "manifest.json"):
                check(mvar_main(["data", "synth", "--out", str(d), "--num-images", str(n), "--image-size", "64",
                                 "--num-classes", "10", "--seed", str(seed)]))

    def tokenizer(self) -> None:
        self.step(2, f"tiny tokenizer, {self.tokenizer_steps} steps on 2 Ray Train CPU workers")
        out = self.out / "tokenizer"
        if self.reuse(out / "tokenizer.yaml"):
            return
        from workflows.train_tokenizer import main as train_tokenizer
        check(train_tokenizer(["--config", "workflows/configs/tokenizer_tiny_local.yaml", f"output={out}",
                               f"data.shards={self.out / 'data' / 'synth'}", "run.name=quickstart-tokenizer",
                               f"run.steps={self.tokenizer_steps}", *self.common]))

    def tokens(self) -> None:
        self.step(3, "token shards (the latent cache the generators train on)")
        for name in ("synth", "synth-eval"):
            d = self.out / "data" / f"{name}-tokens"
            if not self.reuse(d / "manifest.json"):
                check(mvar_main(["data", "tokenize", "--tokenizer", str(self.out / "tokenizer"),
                                 "--src", str(self.out / "data" / name), "--out", str(d)]))

    def run_key(self, name: str) -> str:
        return f"{self.out / 'runs'}/{name}"

    def finished_run(self, name: str, metric: str):
        store = tracking.Store(self.uri)
        run_id = store.find_run(EXPERIMENT, {"mvar.run_key": self.run_key(name)})
        run = store.get(run_id) if run_id else None
        return run if run and metric in run.metrics and run.status == "FINISHED" else None

    def train(self, variant: str) -> None:
        name = f"quickstart-{variant}-tiny"
        if self.finished_run(name, "train/loss"):
            print(f"reusing the finished run {name}")
            return
        from mvar.training import load_train_config, train
        cfg = load_train_config(f"workflows/configs/{variant}_tiny_local.yaml", [
            f"tokenizer={self.out / 'tokenizer'}", f"data.shards={self.out / 'data' / 'synth-tokens'}",
            f"data.eval_shards={self.out / 'data' / 'synth-eval-tokens'}", f"run.name={name}",
            f"run.steps={self.train_steps}", f"run.checkpoint_every={self.train_steps // 2}", *self.common])
        outcome = train(cfg)
        print(f"{name}: {outcome.step} steps, checkpoint {outcome.checkpoint}")

    def evaluate(self, variant: str) -> None:
        name = f"quickstart-{variant}-tiny"
        run = self.finished_run(name, "train/loss")
        if run is None:
            raise SystemExit(f"no finished training run {name}")
        if "eval/fid" in run.metrics:
            print(f"reusing the evaluation of {name}")
            return
        weights, ref = self.reference()
        check(mvar_main(["eval", "--run-id", run.run_id, "--tracking-uri", self.uri,
                         "--reference", str(ref), "--num-per-class",
                         str(self.num_per_class), "--batch-size", "10", "--feature-extractor-weights", str(weights),
                         "--num-workers", "2", "--cpus-per-worker", "0.5",
                         "--out", str(self.out / "eval" / variant)]))

    def reference(self) -> tuple[Path, Path]:
        """Stand-in Inception weights and the held-out set's statistics, made once (Inception is slow on CPU)."""
        weights, ref = self.out / "standin_inception.pt", self.out / "reference_synth_eval.npz"
        if not weights.is_file():
            check(mvar_main(["eval", "standin-weights", "--out", str(weights)]))
        if not ref.is_file():
            check(mvar_main(["eval", "make-ref", "--shards", str(self.out / "data" / "synth-eval"), "--out", str(ref),
                             "--feature-extractor-weights", str(weights), "--device", "cpu"]))
        return weights, ref

    def bench(self) -> None:
        self.step(7, "benchmark: memory and speed of var, scale_markov, mvar (tiny, CPU, one process each)")
        bench_json = self.out / "bench.json"
        if self.reuse(bench_json):
            return
        check(subprocess.call([sys.executable, "-m", "mvar.cli", "bench", "--size", "tiny", "--resolution", "64",
                               "--batch", "8", "--repeats", "2", "--json", str(bench_json)]))

    def report(self) -> None:
        self.step(8, "ablation report from the MLflow runs")
        from mvar.report import make_report
        report = make_report(EXPERIMENT, self.out / "report", self.uri)
        print(report.markdown)
        print("files: " + ", ".join(str(f) for f in report.files))


def check(rc: int) -> None:
    if rc:
        raise SystemExit(rc)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/quickstart", help="where everything is written")
    parser.add_argument("--train-steps", type=int, default=300, help="steps of each generator run")
    parser.add_argument("--tokenizer-steps", type=int, default=60, help="steps of the tokenizer run")
    parser.add_argument("--num-per-class", type=int, default=10, help="evaluation samples per class")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    q = Quickstart(out, args.train_steps, args.tokenizer_steps, args.num_per_class)
    try:
        q.data()
        q.tokenizer()
        q.tokens()
        for n, variant in ((4, "var"), (5, "mvar")):
            q.step(n, f"train {variant}-tiny, {args.train_steps} steps on 2 Ray Train CPU workers")
            q.train(variant)
        q.step(6, f"evaluate both: {args.num_per_class} samples per class, FID/IS/precision/recall "
                  "(stand-in Inception weights: not comparable with published numbers)")
        for variant in ("var", "mvar"):
            q.evaluate(variant)
    finally:
        cluster.shutdown()
    q.bench()
    q.report()
    print(f"\ndone in {time.monotonic() - q.t0:.0f} s; everything is under {out}")
    print("open the MLflow UI:\n"
          f"  .venv/bin/mlflow ui --backend-store-uri {q.uri} --host 127.0.0.1 --port 5000\n"
          f"  then http://127.0.0.1:5000 -> experiment '{EXPERIMENT}' -> select the runs -> Compare")
    return 0


if __name__ == "__main__":
    sys.exit(main())
