"""The metric-name registry is what the sweep's objectives and the report's columns are read from."""
import pytest

from mvar import report
from mvar.config import ConfigError
from mvar.metric_names import AGGREGATES, BY_KEY, METRICS, SOURCES, MetricName
from sweeps.study import DIRECTIONS, KNOWN_METRICS, load_study


def test_every_entry_is_well_formed_and_named_once():
    assert len(BY_KEY) == len(METRICS)
    columns = [m.column for m in METRICS if m.column]
    assert len(set(columns)) == len(columns)
    for m in METRICS:
        assert m.source in SOURCES + ("",) and m.aggregate in AGGREGATES and m.direction in DIRECTIONS, m
        assert m.source or m.column, f"{m.key} is neither an objective nor a column"


def test_the_study_and_the_report_read_the_registry():
    assert KNOWN_METRICS == {m.key: m for m in METRICS if m.source}
    assert report.COLUMNS + report.RAW_COLUMNS == [(m.column, m.key, m.lower_is_better) for m in METRICS
                                                   if m.column and m.ratio] + \
        [(m.column, m.key, m.lower_is_better) for m in METRICS if m.column and not m.ratio]
    assert [c for c, _, _ in report.RAW_COLUMNS] == ["train s/it (raw)"]
    assert "FID x VAR" in report.table_columns() and "train s/it (raw) x VAR" not in report.table_columns()


def test_a_metric_without_a_source_is_no_objective(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text("base_config: workflows/configs/mvar_tiny_local.yaml\nobjectives: {train/pyramid_s: minimize}\n"
                     "search_space: {model.window_size: [1, 3]}\n")
    with pytest.raises(ConfigError, match="objectives.train/pyramid_s.*no run logs this metric"):
        load_study(study)
    assert isinstance(BY_KEY["train/pyramid_s"], MetricName) and not BY_KEY["train/pyramid_s"].source
