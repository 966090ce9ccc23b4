"""Training throughput of the tiny models with 1 and 2 Ray Train CPU workers (docs/benchmarks.md).

    python -m workflows.bench_train [--out out/bench-train] [--steps 200] [--batch 16]   # = mvar bench train

Makes its own inputs (synthetic 64 px shards, a stand-in tiny tokenizer with
random weights, token shards), trains var-tiny and mvar-tiny for `--steps`
steps with each worker count through the real workflow (local Ray, MLflow
store under --out), and reports the median `perf/images_per_s` and
`perf/step_s` over the logged steps after the first quarter (start-up and
warm-up excluded). Global batch = per-worker batch x workers.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from mvar import cluster, tracking
from mvar.checkpoint import save_tokenizer
from mvar.commands import benchmarks, run_cli, standalone
from mvar.data.synth import write_synth
from mvar.data.tokens import tokenize
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig
from mvar.training import load_train_config, train


def make_inputs(out: Path) -> tuple[str, str]:
    tok, images, tokens = out / "tokenizer", out / "images", out / "tokens"
    if not (tok / "tokenizer.yaml").is_file():
        torch.manual_seed(0)
        cfg = TokenizerConfig.tiny()
        save_tokenizer(tok, MultiScaleVQVAE(cfg), cfg)
    if not (images / "manifest.json").is_file():
        write_synth(str(images), num_images=400, image_size=64, num_classes=10, seed=0, shard_size=50)
    if not (tokens / "manifest.json").is_file():
        tokenize(str(tok), str(images), str(tokens), progress=False)
    return str(tok), str(tokens)


def measure(out: Path, variant: str, workers: int, steps: int, batch: int, tok: str, tokens: str) -> dict:
    name = f"{variant}-w{workers}-b{batch}-s{steps}"
    cfg = load_train_config(f"workflows/configs/{variant}_tiny_local.yaml", [
        f"tokenizer={tok}", f"data.shards={tokens}", f"data.batch_size={batch}", "data.num_workers=1",
        f"scaling.num_workers={workers}", "scaling.cpus_per_worker=0.5", f"run.name={name}",
        f"run.steps={steps}", f"run.checkpoint_every={steps}", "run.log_every=5",
        f"run.storage_path={out / 'runs'}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
        "tracking.experiment=bench-train", "tracking.system_metrics=false"])
    outcome = train(cfg)
    store = tracking.Store(cfg.tracking.uri)

    def median(key: str) -> float:
        return statistics.median(v for s, v in store.history(outcome.run_id, key) if s > steps // 4)
    return {"variant": variant, "workers": workers, "batch_per_worker": batch, "steps": steps,
            "images_per_s": median("perf/images_per_s"), "step_s": median("perf/step_s"),
            "peak_mem_mb": median("perf/peak_mem_mb"), "run_id": outcome.run_id}


def configure(parser) -> None:
    benchmarks.train(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tok, tokens = make_inputs(out)
    rows = [measure(out, v, w, args.steps, args.batch, tok, tokens) for v in ("var", "mvar") for w in (1, 2)]
    cluster.shutdown()
    (out / "bench_train.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| variant | workers | global batch | step s | images/s | peak RSS MB (rank 0) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']}-tiny | {r['workers']} | {r['batch_per_worker'] * r['workers']} | "
              f"{r['step_s']:.3f} | {r['images_per_s']:.0f} | {r['peak_mem_mb']:.0f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(standalone("python -m workflows.bench_train", benchmarks.TRAIN, configure), argv,
                   name="workflows.bench_train")


if __name__ == "__main__":
    raise SystemExit(main())
