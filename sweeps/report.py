"""What the parent run holds at the end of a sweep (also written under <log_dir>/<study>/report/).

- `trials.csv`: `study.trials_dataframe()`: number, state, objective values (named), params
  (the config keys), user attrs (every metric the trial's runs logged, the MLflow run ids);
- `pareto_front.png`: eval/fid against infer/peak_mem_mb of every complete trial, the
  non-dominated ones joined (both lower is better), whatever the study's objectives;
- `importances.json` (+ `importances.png` for the first objective): Optuna's parameter
  importances per objective, or the reason there are none (fewer than 2 complete trials,
  a parameter that never varied ...).
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

log = logging.getLogger(__name__)

QUALITY, MEMORY = "eval/fid", "infer/peak_mem_mb"


def write_report(study: optuna.Study, objectives: dict[str, str], out: Path) -> list[Path]:
    """Every file that could be made; a part that cannot (no data yet) is skipped with a log line."""
    import matplotlib
    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    files = [write_trials(study, out / "trials.csv")]
    for make in (write_pareto, write_importances):
        try:
            files += make(study, objectives, out)
        except Exception as err:  # noqa: BLE001 - a missing plot must not hide the sweep's results
            log.warning("report: %s skipped: %s", make.__name__, err)
    return files


def write_trials(study: optuna.Study, path: Path) -> Path:
    study.trials_dataframe(attrs=("number", "state", "value", "datetime_start", "datetime_complete", "duration",
                                  "params", "user_attrs")).to_csv(path, index=False)
    return path


def pareto_points(study: optuna.Study) -> tuple[list[tuple[float, float, int]], list[tuple[float, float, int]]]:
    """(all, non-dominated) (peak memory, FID, trial number) of the complete trials that have both."""
    pts = [(t.user_attrs[MEMORY], t.user_attrs[QUALITY], t.number)
           for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
           if MEMORY in t.user_attrs and QUALITY in t.user_attrs]
    front = [p for p in pts if not any(q[0] <= p[0] and q[1] <= p[1] and q[:2] != p[:2] for q in pts)]
    return pts, sorted(front)


def write_pareto(study: optuna.Study, objectives: dict[str, str], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    pts, front = pareto_points(study)
    if not pts:
        raise ValueError(f"no complete trial with both {QUALITY} and {MEMORY} (yet)")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], c="0.6", label="trials")
    ax.plot([p[0] for p in front], [p[1] for p in front], "o-", c="tab:red", label="Pareto front")
    for mem, fid, number in pts:
        params = study.trials[number].params
        ax.annotate(f"{number}: " + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in params.items()),
                    (mem, fid), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{MEMORY} (sampling)")
    ax.set_ylabel(QUALITY)
    ax.set_title(f"{study.study_name}: quality vs memory")
    ax.legend()
    path = out / "pareto_front.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [path]


def importances(study: optuna.Study, objectives: dict[str, str]) -> dict[str, dict]:
    """Per objective: how much each parameter matters for reaching good values (a maximised one is negated:
    Optuna's default evaluator looks at low values), or why there is no answer."""
    out = {}
    for i, (name, direction) in enumerate(objectives.items()):
        sign = -1.0 if direction == "maximize" else 1.0
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                imp = optuna.importance.get_param_importances(study, target=lambda t, i=i, s=sign: s * t.values[i])
            too_few = [str(w.message) for w in caught if "too small" in str(w.message)]
            out[name] = {"error": too_few[0]} if too_few else {k: float(v) for k, v in imp.items()}
        except Exception as err:  # noqa: BLE001 - no complete trial, or no parameter varied
            out[name] = {"error": f"{type(err).__name__}: {err}"}
    return out


def write_importances(study: optuna.Study, objectives: dict[str, str], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    result = importances(study, objectives)
    path = out / "importances.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    name = next(iter(objectives))
    first = result[name]
    if "error" in first:
        log.info("report: no parameter importances for %s: %s", name, first["error"])
        return [path]
    fig, ax = plt.subplots(figsize=(6, 1.5 + 0.4 * len(first)))
    ax.barh(list(first), list(first.values()))
    ax.set_xlabel(f"importance for {name}")
    png = out / "importances.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [path, png]
