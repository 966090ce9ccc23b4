"""tools/compare_authors.py: the authors' code beside ours, one process per measured thing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VAR_DIR = Path(os.environ.get("MVAR_AUTHORS_VAR_DIR", "/work/ext/FoundationVision+VAR"))
MVAR_DIR = Path(os.environ.get("MVAR_AUTHORS_MVAR_DIR", "/work/ext/CVL-UESTC+MVAR"))


def run_tool(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tools.compare_authors", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)


def test_a_directory_without_the_authors_models_is_refused_before_measuring(tmp_path):
    proc = run_tool("--var-dir", str(tmp_path), "--size", "tiny", "--resolution", "64")
    assert proc.returncode != 0 and f"--var-dir {tmp_path}: no models/ package there" in proc.stderr
    assert "measuring" not in proc.stderr


def test_ours_alone_in_turn_generate_and_training_per_full_pyramid(tmp_path):
    """Without the authors' checkouts the in-turn runs take our three variants: each round trains every
    kind of step of a variant's pyramid once (VAR: its full step; the cycle: the small scales, then each
    windowed scale), and the pyramid's time is the sum of its steps'."""
    out = tmp_path / "cmp.json"
    proc = run_tool("--size", "tiny", "--resolution", "64", "--batch", "2", "--top-k", "20", "--in-turn-only",
                    "--ab-rounds", "1", "--train-rounds", "2", "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(out.read_text())["tables"]["64"]
    trained = table["train_in_turn"]
    names = {"ours var", "ours scale_markov", "ours mvar"}
    assert set(trained["pyramid_s"]) == set(trained["kind_s"]) == set(trained["tokens_per_s"]) == names
    assert list(trained["kind_s"]["ours var"]) == ["full"]
    for name in ("ours scale_markov", "ours mvar"):
        kinds = list(trained["kind_s"][name])
        assert kinds[0] == "cycle_small" and len(kinds) >= 2 and all(k.startswith("cycle_s") for k in kinds[1:])
    for name in names:
        rounds = trained["pyramid_s"][name]
        assert len(rounds) == 2 and all(t > 0 for t in rounds), name
        for r, t in enumerate(rounds):
            assert t == pytest.approx(sum(steps[r] for steps in trained["kind_s"][name].values())), name
        assert len(trained["pyramid_cpu_s"][name]) == 2 and trained["tokens_per_s"][name] > 0
    assert "| training, s per full pyramid (in turn, one process: median) |" in table["markdown"]
    assert any("ours mvar / ours var training s per full pyramid (in turn) = " in line for line in table["ratios"])
    assert set(table["in_turn_s"]) == names and not any(table["results"].values())
    # --no-train: the generate times alone
    proc = run_tool("--size", "tiny", "--resolution", "64", "--batch", "2", "--top-k", "20", "--in-turn-only",
                    "--ab-rounds", "1", "--no-train", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(out.read_text())["tables"]["64"]
    assert table["train_in_turn"] == {} and "in turn, one process" in table["markdown"]
    assert "training all in turn" not in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (VAR_DIR / "models").is_dir() or not (MVAR_DIR / "models").is_dir(),
                    reason="checkouts of FoundationVision/VAR and CVL-UESTC/MVAR not found")
def test_tiny_comparison_fills_every_column(tmp_path):
    out = tmp_path / "cmp.json"
    proc = run_tool("--var-dir", str(VAR_DIR), "--mvar-dir", str(MVAR_DIR), "--size", "tiny", "--resolution", "64",
                    "--batch", "2", "--repeats", "1", "--top-k", "20", "--ab-rounds", "1",
                    "--train-rounds", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(out.read_text())["tables"]["64"]
    results = table["results"]
    assert set(results) == {"authors var", "ours var", "ours scale_markov", "authors mvar", "ours mvar"}
    for name, runs in results.items():
        assert runs[0]["infer_latency_s"] > 0, name
    assert "| 64 px, batch 2 | authors VAR | ours VAR | ours scale_markov | authors MVAR | ours MVAR |" in proc.stdout
    assert any("mvar: ours / authors generate time" in line for line in table["ratios"])
    assert set(table["in_turn_s"]) == set(results) and "(in turn, one process: median)" in table["markdown"]
    assert set(table["in_turn_cpu_s"]) == set(results) and "CPU s (in turn: median)" in table["markdown"]
    assert all(s > 0 for runs in table["in_turn_cpu_s"].values() for s in runs)
    assert any("mvar: ours / authors generate CPU s" in line for line in table["ratios"])
    # training like-for-like: a full pyramid is every kind of step once, so the cycle's exceeds its mean step
    for name in ("authors mvar", "ours mvar"):
        run = results[name][0]
        assert run["train_pyramid_s"] > run["train_step_s"] > 0 and run["train_tokens_per_s"] > 0, name
    assert results["authors var"][0]["train_pyramid_s"] == results["authors var"][0]["train_step_s"]
    assert "training, s per full pyramid" in table["markdown"]
    assert set(table["train_in_turn"]["pyramid_s"]) == set(results)
    assert any("mvar: ours / authors training s per full pyramid (in turn)" in line for line in table["ratios"])
