"""The quickstart end to end on a small budget: every stage runs (Ray Train, MLflow, the classifier,
torch-fidelity), the codebook is in use, and the report has every row and column plus its picture."""
from __future__ import annotations

import csv
import json

import pytest

from mvar.report import table_columns
from workflows import quickstart


@pytest.mark.slow
def test_quickstart_on_a_small_budget_reports_every_row_and_column(tmp_path, capsys):
    out = tmp_path / "qs"
    argv = ["--out", str(out), "--num-images", "40", "--num-held-out", "20", "--tokenizer-steps", "4",
            "--classifier-steps", "20", "--train-steps", "4", "--num-per-class", "2", "--workers", "1",
            "--check-steps", "5"]  # 2 workers: tests/training
    assert quickstart.main(argv) == 0
    printed = capsys.readouterr().out
    with open(out / "report" / "ablation.csv") as fh:
        rows = {r["variant"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"real", "untrained", "var", "mvar"}  # --variants var,mvar by default
    for variant in ("var", "mvar"):  # two training seeds each, the interval over them
        assert rows[variant]["seeds"] == "2" and rows[variant]["interval"] == "t", rows[variant]
        assert rows[variant]["run"] == f"quickstart-{variant}"  # the group run
        assert float(rows[variant]["FID low"]) <= float(rows[variant]["FID"]) <= float(rows[variant]["FID high"])
    assert rows["mvar"]["FID x VAR verdict"] in ("better", "worse", "inconclusive")  # var is the baseline
    for variant, row in rows.items():
        for col in ("FID", "IS", "precision", "recall", "class acc"):
            assert row[col], (variant, col)
    for variant in ("var", "mvar"):  # measured for generators only (the real row has none)
        for col in table_columns()[4::2]:
            assert rows[variant][col], (variant, col)
        assert float(rows[variant]["FID x VAR"]) > 0
    assert float(rows["var"]["FID x VAR"]) == 1.0
    assert "Budget held equal: equal full pyramids" in (out / "report" / "ablation.md").read_text()
    check = json.loads((out / "report" / "independent_check.json").read_text())
    assert set(check["samples"]) == {f"{v}-seed{k}" for v in ("var", "mvar") for k in (0, 1)}
    assert rows["untrained"]["depth"] == rows["var"]["depth"] == "4"  # the generator it is the step 0 of
    assert (out / "report" / "ablation.png").stat().st_size > 10_000
    # the codebook is in use: k-means++ init spreads it before the first step
    md = (out / "report" / "ablation.md").read_text()
    usage = [float(line.split("|")[2]) for line in md.splitlines() if line.startswith("| ") and
             line.split("|")[1].strip().isdigit()]
    assert len(usage) == 7 and usage[-1] >= 20, md
    assert all(u > 100 / 256 for u in usage), "a scale with a single code"
    # a rerun reuses every finished step
    assert quickstart.main(argv) == 0
    again = capsys.readouterr().out
    assert "reusing the finished run(s) of quickstart-mvar" in again and "reusing the real-images row" in again
    assert "reusing the evaluation of the untrained generator" in again and "(new) in sqlite" not in again
    assert "held-out accuracy" in printed  # the classifier's, printed by the first run
