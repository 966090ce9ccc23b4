"""Bad input, one row each: the command (through `mvar`'s own ``main``), its exit code, the words its one error
line must hold, and the files that must not appear. docs/reliability.md ("Bad input") lists the same rows.

Data checks (issue 22, part 1): what `mvar train --check` / `mvar train-tokenizer --check` and `mvar data
verify` refuse; the flags of `mvar sample` and the bench commands (part 2); and cases that passed before, so
that none regresses. Each row damages a private copy of small valid inputs made once per module; the clean
inputs pass the same commands (the first rows), so a row fails when its check is missing.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml

from mvar.checkpoint import save_checkpoint
from mvar.cli import main as mvar_main
from mvar.data.synth import write_synth
from mvar.data.tario import ShardWriter, iter_tar_samples
from mvar.data.tokens import tokenize
from mvar.metrics.fidelity import Reference, save_reference
from mvar.models import NextScaleTransformer, named_model
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig

TRAIN_CONFIG = "workflows/configs/mvar_tiny_local.yaml"
TOKENIZER_CONFIG = "workflows/configs/tokenizer_tiny_local.yaml"
SHARD = "shard-000000.tar"


@dataclass
class Inputs:
    root: Path
    checkpoint: Path   # a tiny MVAR checkpoint (random weights); its tokenizer/ is the runs' tokenizer
    images: Path       # 16 synthetic 64 px images of 10 classes, 2 shards
    tokens: Path       # their token shards
    weights: Path      # a torch file that passes the Inception weights check (never loaded by --check)
    reference: Path    # a valid `mvar eval make-ref` file for those weights (2048-dimensional, random)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("bad-input")
    torch.manual_seed(0)
    tok_cfg = TokenizerConfig.tiny()
    model = NextScaleTransformer(named_model("mvar-tiny"), tok_cfg.vocab_size, tok_cfg.z_channels, tok_cfg.patch_nums)
    save_checkpoint(root / "ckpt", model, MultiScaleVQVAE(tok_cfg), tok_cfg)
    write_synth(str(root / "images"), num_images=16, image_size=64, num_classes=10, seed=0, shard_size=8)
    tokenize(str(root / "ckpt"), str(root / "images"), str(root / "tokens"), progress=False)
    torch.save({"w": torch.zeros(1)}, root / "weights.pt")
    write_reference(root / "ref.npz", _sha256(root / "weights.pt"), dim=2048)
    return Inputs(root, root / "ckpt", root / "images", root / "tokens", root / "weights.pt", root / "ref.npz")


def write_reference(path: Path, weights_sha256: str, dim: int, sigma_dim: int | None = None,
                    nan: bool = False) -> Path:
    rng = np.random.default_rng(0)
    mu = rng.normal(size=dim).astype(np.float32)
    if nan:
        mu[3] = np.nan
    sigma = np.eye(sigma_dim or dim, dtype=np.float32)
    features = torch.from_numpy(rng.normal(size=(20, dim)).astype(np.float32))
    return save_reference(path, Reference(mu, sigma, features, 64, weights_sha256, "test"))


# -- damaging a copy ------------------------------------------------------------------------

def fresh(inputs: Inputs, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(getattr(inputs, name), tmp_path / name, ignore=shutil.ignore_patterns(".mvar-data")))


def edit_manifest(shards: Path, edit: Callable[[dict], None]) -> None:
    path = shards / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path, at: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF  # the padding after the first payload: the same tar and samples, another sha256
    path.write_bytes(bytes(data))


def rewrite_without_labels(shards: Path, name: str = SHARD) -> None:
    """The shard rewritten with no .cls members, its new sha256 and size in the manifest: only the labels lack."""
    with open(shards / name, "rb") as fh:
        samples = list(iter_tar_samples(fh))
    writer = ShardWriter(str(shards), name)
    for key, sample in samples:
        writer.add(key, {ext: payload for ext, payload in sample.items() if ext != "cls"})
    info = writer.commit()

    def edit(data: dict) -> None:
        entry = next(s for s in data["shards"] if s["name"] == name)
        entry.update(sha256=info.sha256, num_bytes=info.num_bytes)
    edit_manifest(shards, edit)


def claim_samples(shards: Path, count: int) -> None:
    """The first shard (and so the total) claims ``count`` samples: the total agrees with the shards."""
    def edit(data: dict) -> None:
        data["shards"][0]["num_samples"] = count
        data["num_samples"] = sum(s["num_samples"] for s in data["shards"])
    edit_manifest(shards, edit)


def edit_checkpoint_model(ckpt: Path, key: str, value) -> None:
    path = ckpt / "checkpoint.yaml"
    meta = yaml.safe_load(path.read_text())
    meta["model"][key] = value
    path.write_text(yaml.safe_dump(meta, sort_keys=False))


# -- the rows -------------------------------------------------------------------------------

@dataclass
class Row:
    argv: list[str]
    words: tuple[str, ...] = ()      # in the one `PROG: error:` line (exit 2), else in stdout + stderr
    outputs: tuple[Path, ...] = ()   # must not exist afterwards
    code: int = 2

    @property
    def prog(self) -> str:
        return "mvar " + self.argv[0]


def store(tmp_path: Path) -> str:
    return f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"


def train_check(inputs: Inputs, tmp_path: Path, shards: Path, *overrides: str) -> list[str]:
    return ["train", "--config", TRAIN_CONFIG, f"tokenizer={inputs.checkpoint}", f"data.shards={shards}",
            f"run.storage_path={tmp_path / 'runs'}", store(tmp_path), *overrides, "--check"]


def tokenizer_check(tmp_path: Path, shards: Path, *overrides: str) -> list[str]:
    return ["train-tokenizer", "--config", TOKENIZER_CONFIG, f"data.shards={shards}", f"output={tmp_path / 'tok'}",
            f"run.storage_path={tmp_path / 'runs'}", store(tmp_path), *overrides, "--check"]


def eval_check(inputs: Inputs, tmp_path: Path, reference: Path) -> list[str]:
    return ["eval", "--checkpoint", str(inputs.checkpoint), "--reference", str(reference),
            "--feature-extractor-weights", str(inputs.weights), "--no-tracking", "--num-workers", "0",
            "--out", str(tmp_path / "eval"), "--check"]


def sample(ckpt: Path, tmp_path: Path, *flags: str, out: str = "grid.png") -> Row:
    path = tmp_path / out
    return Row(["sample", "--checkpoint", str(ckpt), "--classes", "1", "--out", str(path), *flags], outputs=(path,))


def with_words(row: Row, *words: str, code: int = 2) -> Row:
    row.words, row.code = words, code
    return row


def rows_clean(i: Inputs, t: Path) -> dict[str, Row]:
    """The clean inputs pass every command the rows below damage them for."""
    return {
        "clean tokens: train --check": Row(train_check(i, t, i.tokens), ("OK",), (t / "runs",), code=0),
        "clean images: train-tokenizer --check": Row(tokenizer_check(t, i.images), ("OK",), (t / "tok",), code=0),
        "clean tokens: data verify": Row(["data", "verify", str(i.tokens)], ("ok: 2 shards, 16 samples",), code=0),
        "clean reference: eval --check": Row(eval_check(i, t, i.reference), ("OK",), (t / "eval",), code=0),
    }


def data_rows(i: Inputs, t: Path) -> dict[str, Callable[[], Row]]:
    """Part 1: damaged data, refused by --check and by `mvar data verify` (exit 1, naming the shard)."""
    def tokens(damage) -> Path:
        shards = fresh(i, t, "tokens")
        damage(shards)
        return shards

    def images(damage) -> Path:
        shards = fresh(i, t, "images")
        damage(shards)
        return shards

    cut = lambda s: cut_in_half(s / SHARD)  # noqa: E731
    return {
        "token tar cut in half: train --check": lambda: Row(
            train_check(i, t, tokens(cut)), ("data.shards", SHARD, "bytes", "mvar data verify")),
        "token tar cut in half: data verify": lambda: Row(
            ["data", "verify", str(tokens(cut))], (f"BAD {SHARD}", "bytes, manifest says"), code=1),
        "image tar cut in half: train-tokenizer --check": lambda: Row(
            tokenizer_check(t, images(cut)), ("data.shards", SHARD, "bytes")),
        "token samples without .cls: train --check": lambda: Row(
            train_check(i, t, tokens(rewrite_without_labels)), ("data.shards", SHARD, ".cls")),
        "token samples without .cls: data verify": lambda: Row(
            ["data", "verify", str(tokens(rewrite_without_labels))], (f"BAD {SHARD}", "8 of 8 samples lack a .cls"),
            code=1),
        "a shard claims 4000 samples: train --check": lambda: Row(
            train_check(i, t, tokens(lambda s: claim_samples(s, 4000))), (SHARD, "room for at most", "4000")),
        "a shard claims 4000 samples: data verify": lambda: Row(
            ["data", "verify", str(tokens(lambda s: claim_samples(s, 4000)))], ("8 samples, manifest says 4000",),
            code=1),
        "manifest total 300 for 16: data verify": lambda: Row(
            ["data", "verify", str(tokens(lambda s: edit_manifest(s, lambda d: d.update(num_samples=300))))],
            ("num_samples 300", "16 samples")),
        "manifest total 4000 for 16: train --check": lambda: Row(
            train_check(i, t, tokens(lambda s: edit_manifest(s, lambda d: d.update(num_samples=4000)))),
            ("data.shards", "num_samples 4000", "16 samples")),
        "a flipped byte, data.verify_checksums=true: train --check": lambda: Row(
            train_check(i, t, tokens(lambda s: flip_a_byte(s / SHARD)), "data.verify_checksums=true"),
            ("data.shards", SHARD, "sha256", "data.verify_checksums")),
        "a shard file missing: train --check": lambda: Row(
            train_check(i, t, tokens(lambda s: (s / SHARD).unlink())), ("data.shards", SHARD, "missing")),
        "eval shards without .cls: train --check": lambda: Row(
            train_check(i, t, i.tokens, f"data.eval_shards={tokens(rewrite_without_labels)}"),
            ("data.eval_shards", ".cls")),
    }


def reference_rows(i: Inputs, t: Path) -> dict[str, Callable[[], Row]]:
    """Part 1: reference statistics that the evaluation could only fail on (or give NaN) after all the sampling."""
    def ref(**kw) -> Path:
        return write_reference(t / "r.npz", _sha256(i.weights), **kw)

    def without_sigma() -> Path:
        with np.load(i.reference) as data:
            kept = {k: data[k] for k in data.files if k != "sigma"}
        np.savez(t / "nosigma.npz", **kept)
        return t / "nosigma.npz"

    return {
        "reference mu 32, sigma 64x64: eval --check": lambda: Row(
            eval_check(i, t, ref(dim=32, sigma_dim=64)),
            ("mu (32,)", "sigma (64, 64)", "do not agree"), (t / "eval",)),
        "reference mu holds NaN: eval --check": lambda: Row(
            eval_check(i, t, ref(dim=2048, nan=True)), ("mu", "NaN"), (t / "eval",)),
        "reference of 32-dim features for Inception: eval --check": lambda: Row(
            eval_check(i, t, ref(dim=32)), ("32-dimensional", "2048"), (t / "eval",)),
        "reference without sigma: eval --check": lambda: Row(
            eval_check(i, t, without_sigma()), ("nosigma.npz", "lacks sigma"), (t / "eval",)),
    }


def flag_rows(i: Inputs, t: Path) -> dict[str, Callable[[], Row]]:
    """Part 2: the flags of `mvar sample` and the bench commands, refused before any work."""
    ck = i.checkpoint

    def typo() -> Path:
        ckpt = Path(shutil.copytree(ck, t / "ckpt"))
        edit_checkpoint_model(ckpt, "dpeth", 2)
        return ckpt

    return {
        "sample --top-p 1.5": lambda: with_words(sample(ck, t, "--top-p", "1.5"), "--top-p 1.5", "sampling.top_p",
                                                 "[0, 1]"),
        "sample --cfg -3": lambda: with_words(sample(ck, t, "--cfg", "-3"), "--cfg -3", "sampling.cfg", ">= 0"),
        "sample --top-k -1": lambda: with_words(sample(ck, t, "--top-k", "-1"), "--top-k -1", "sampling.top_k"),
        "sample --classes ''": lambda: with_words(sample(ck, t, "--classes", ""), "--classes", "no class id"),
        "sample --out x.txt": lambda: with_words(sample(ck, t, out="x.txt"), "--out", "x.txt", ".png"),
        "sample --device cuda:99": lambda: with_words(sample(ck, t, "--device", "cuda:99"), "--device cuda:99"),
        "sample --device nonsense": lambda: with_words(sample(ck, t, "--device", "gpu0"), "--device", "gpu0"),
        "sample --window-size 50 (even)": lambda: with_words(sample(ck, t, "--window-size", "50"),
                                                            "--window-size 50", "odd"),
        "sample --window-size 5 (> the 3x3 scale)": lambda: with_words(
            sample(ck, t, "--window-size", "5"), "--window-size 5", "3x3", "odd window <= 3"),
        "checkpoint.yaml model: dpeth": lambda: with_words(sample(typo(), t), "checkpoint.yaml", "'model.dpeth'",
                                                          "under 'model'"),
        "bench --variants ''": lambda: Row(["bench", "--variants", "", "--size", "tiny", "--json", str(t / "b.json")],
                                           ("--variants", "none given"), (t / "b.json",)),
        "bench --resolution 63": lambda: Row(["bench", "--size", "tiny", "--resolution", "63", "--json",
                                              str(t / "b.json")], ("--resolution 63", "64 px"), (t / "b.json",)),
        "bench --window-size 4": lambda: Row(["bench", "--size", "tiny", "--resolution", "64", "--window-size", "4",
                                              "--json", str(t / "b.json")], ("--window-size 4", "odd"), (t / "b.json",)),
        "eval bench --variants var,mvarr": lambda: Row(["eval", "bench", "--variants", "var,mvarr", "--json",
                                                        str(t / "e.json")], ("--variants", "mvarr", "known"),
                                                       (t / "e.json",)),
        "eval bench --variants ''": lambda: Row(["eval", "bench", "--variants", "", "--json", str(t / "e.json")],
                                                ("--variants", "none given"), (t / "e.json",)),
    }


def passing_rows(i: Inputs, t: Path) -> dict[str, Callable[[], Row]]:
    """Cases refused cleanly before issue 22: kept so that none regresses."""
    ck = i.checkpoint
    return {
        "train: config key typo": lambda: Row(train_check(i, t, i.tokens, "model.dpeth=2"), ("model.dpeth",)),
        "train: sampling.top_p=1.5": lambda: Row(train_check(i, t, i.tokens, "sampling.top_p=1.5"),
                                                 ("sampling.top_p", "[0, 1]")),
        "train: an override without =": lambda: Row(train_check(i, t, i.tokens, "model.depth"),
                                                    ("override 'model.depth'",)),
        "train: missing shard directory": lambda: Row(train_check(i, t, t / "nowhere"),
                                                      ("data.shards", "does not exist")),
        "sample: not a checkpoint": lambda: with_words(sample(t / "nockpt", t), "not a model checkpoint"),
        "sample: class id out of range": lambda: with_words(sample(ck, t, "--classes", "12"), "--classes", "[12]"),
        "bench --variants mvarr": lambda: Row(["bench", "--variants", "mvarr", "--size", "tiny"],
                                              ("--variants: unknown ['mvarr']",)),
        "data verify: missing directory": lambda: Row(["data", "verify", str(t / "nowhere")], ("does not exist",)),
        "data tokenize: unknown registered model": lambda: Row(
            ["data", "tokenize", "--tokenizer", "models:/nope@final", "--tracking-uri", f"sqlite:///{t}/mlflow.db",
             "--src", str(i.images), "--out", str(t / "tok-out")], ("models:/nope@final", "not a registered"),
            (t / "tok-out",)),
    }


ROW_SETS = (data_rows, reference_rows, flag_rows, passing_rows)
_NOWHERE = Inputs(*[Path("/nonexistent")] * 6)  # the rows' names, before any input exists
ROW_IDS = sorted(name for rows in ROW_SETS for name in rows(_NOWHERE, Path("/nonexistent")))


def call(argv: list[str]) -> int:
    try:
        return mvar_main(argv)
    except SystemExit as err:  # argparse's own errors (a flag's type)
        return int(err.code)


def assert_row(row: Row, capsys) -> None:
    capsys.readouterr()
    code = call(row.argv)
    out, err = capsys.readouterr()
    assert code == row.code, (code, out[-2000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    if row.code == 2:
        errors = [line for line in err.splitlines() if line.startswith(f"{row.prog}: error:")]
        assert len(errors) == 1, err[-3000:]
        text = errors[0]
    else:
        text = out + err
    for word in row.words:
        assert word in text, text
    for path in row.outputs:
        assert not path.exists(), f"{path} was written"


@pytest.mark.parametrize("name", sorted(rows_clean(_NOWHERE, Path("/nonexistent"))))
def test_the_clean_inputs_pass(inputs, tmp_path, capsys, name):
    assert_row(rows_clean(inputs, tmp_path)[name], capsys)


@pytest.mark.parametrize("name", ROW_IDS)
def test_bad_input_is_one_line_exit_2_before_any_work(inputs, tmp_path, capsys, name):
    builders = {k: v for rows in ROW_SETS for k, v in rows(inputs, tmp_path).items()}
    assert_row(builders[name](), capsys)
