"""What the parent run holds at the end of a sweep (also written under <log_dir>/<study>/report/).

- `trials.csv`: `study.trials_dataframe()`: number, state, objective values (named), params
  (the config keys), user attrs (every metric the trial's runs logged, the MLflow run ids), and
  `device_hours`: the trial's training cost, the sum of its seeds' `cost/device_hours`;
- `cost.json`: `device_hours` per trial and the study's `total` (also the parent run's `cost/device_hours`);
- `pareto_front.png`: eval/fid against infer/peak_mem_mb of every complete trial, the
  non-dominated ones joined (both lower is better), whatever the study's objectives;
- `history_<objective>.png` (`/` as `_`: `history_eval_fid.png`): Optuna's optimisation history
  of each objective (every complete trial's value and the best so far);
- `importances.json` (+ `importances.png` for the first objective): Optuna's parameter
  importances per objective, or the reason there are none (fewer than 2 complete trials,
  a parameter that never varied ...).

The plots are Optuna's own (`optuna.visualization.matplotlib`), with the trials' numbers and
settings written next to the Pareto front's points.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sweeps.storage import quiet_experimental

log = logging.getLogger(__name__)

QUALITY, MEMORY = "eval/fid", "infer/peak_mem_mb"
COST = "cost/device_hours"


def write_report(study: optuna.Study, objectives: dict[str, str], out: Path) -> list[Path]:
    """Every file that could be made; a part that cannot (no data yet) is skipped with a log line."""
    import matplotlib
    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    files = [write_trials(study, out / "trials.csv"), write_cost(study, out / "cost.json")]
    for make in (write_pareto, write_history, write_importances):
        try:
            files += make(study, objectives, out)
        except Exception as err:  # noqa: BLE001 - a missing plot must not hide the sweep's results
            log.warning("report: %s skipped: %s", make.__name__, err)
    return files


def write_trials(study: optuna.Study, path: Path) -> Path:
    frame = study.trials_dataframe(attrs=("number", "state", "value", "datetime_start", "datetime_complete",
                                          "duration", "params", "user_attrs"))
    if len(frame):
        hours = trial_device_hours(study)
        frame["device_hours"] = [hours.get(n) for n in frame["number"]]
    frame.to_csv(path, index=False)
    return path


def device_hours(attrs: dict) -> float | None:
    """A trial's training cost from its user attrs: the sum of its seeds' `cost/device_hours` (a trial of
    several seeds holds their mean under the metric's name, each seed's under `seed<seed>/`), else its one run's."""
    seeds = [v for k, v in attrs.items() if k.startswith("seed") and k.endswith("/" + COST)]
    if seeds:
        return float(sum(seeds))
    return float(attrs[COST]) if COST in attrs else None


def trial_device_hours(study: optuna.Study) -> dict[int, float]:
    """{trial number: device-hours} of the trials whose runs were measured (complete trials)."""
    out = {}
    for t in study.get_trials(deepcopy=False):
        hours = device_hours(t.user_attrs)
        if hours is not None:
            out[t.number] = hours
    return out


def study_device_hours(study: optuna.Study) -> float:
    """The study's training cost: the sum over its trials' device-hours."""
    return float(sum(trial_device_hours(study).values()))


def write_cost(study: optuna.Study, path: Path) -> Path:
    per_trial = trial_device_hours(study)
    path.write_text(json.dumps({"device_hours": {str(n): h for n, h in sorted(per_trial.items())},
                                "total": float(sum(per_trial.values()))}, indent=1) + "\n")
    return path


def pareto_points(study: optuna.Study) -> tuple[list[tuple[float, float, int]], list[tuple[float, float, int]]]:
    """(all, non-dominated) (peak memory, FID, trial number) of the complete trials that have both."""
    pts = [(t.user_attrs[MEMORY], t.user_attrs[QUALITY], t.number)
           for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
           if MEMORY in t.user_attrs and QUALITY in t.user_attrs]
    front = [p for p in pts if not any(q[0] <= p[0] and q[1] <= p[1] and q[:2] != p[:2] for q in pts)]
    return pts, sorted(front)


def points_study(study: optuna.Study) -> optuna.Study:
    """An in-memory study of the complete trials' (peak memory, FID), both minimised, whatever the sweep's
    objectives: Optuna's Pareto-front plot draws a study's own values, and the front asked for is this one."""
    points = optuna.create_study(directions=["minimize", "minimize"], study_name=study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if MEMORY in t.user_attrs and QUALITY in t.user_attrs:
            points.add_trial(optuna.create_trial(params=t.params, distributions=t.distributions,
                                                 values=[t.user_attrs[MEMORY], t.user_attrs[QUALITY]],
                                                 user_attrs={"number": t.number}))
    return points


def _save(ax, path: Path) -> Path:
    import matplotlib.pyplot as plt
    ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    return path


def write_pareto(study: optuna.Study, objectives: dict[str, str], out: Path) -> list[Path]:
    from optuna.visualization.matplotlib import plot_pareto_front
    points = points_study(study)
    if not points.trials:
        raise ValueError(f"no complete trial with both {QUALITY} and {MEMORY} (yet)")
    with quiet_experimental():
        ax = plot_pareto_front(points, target_names=[f"{MEMORY} (sampling)", QUALITY])
    for t in points.trials:  # which trial and which settings each point is
        label = f"{t.user_attrs['number']}: " + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in t.params.items())
        ax.annotate(label, tuple(t.values), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_title(f"{study.study_name}: quality vs memory (Pareto front)")
    return [_save(ax, out / "pareto_front.png")]


def write_history(study: optuna.Study, objectives: dict[str, str], out: Path) -> list[Path]:
    """Optuna's optimisation history (each complete trial's value and the best so far), per objective."""
    from optuna.visualization.matplotlib import plot_optimization_history
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ValueError("no complete trial (yet)")
    files = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for i, (name, direction) in enumerate(objectives.items()):
        with quiet_experimental():
            ax = plot_optimization_history(study, target=lambda t, i=i: t.values[i], target_name=name)
        # with a target Optuna draws no best-so-far line (it cannot know the direction): the objective's own
        pick = min if direction == "minimize" else max
        best = [pick(t.values[i] for t in complete[:k + 1]) for k in range(len(complete))]
        ax.plot([t.number for t in complete], best, c="tab:red", label=f"best {name} so far")
        ax.legend()
        ax.set_title(f"{study.study_name}: optimisation history of {name} ({direction})")
        files.append(_save(ax, out / f"history_{slug(name)}.png"))
    return files


def slug(metric: str) -> str:
    return metric.replace("/", "_")


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
    from optuna.visualization.matplotlib import plot_param_importances
    result = importances(study, objectives)
    path = out / "importances.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    name = next(iter(objectives))
    if "error" in result[name]:
        log.info("report: no parameter importances for %s: %s", name, result[name]["error"])
        return [path]
    sign = -1.0 if objectives[name] == "maximize" else 1.0
    with quiet_experimental(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "PedAnovaImportanceEvaluator computes", UserWarning)  # the sign is set
        ax = plot_param_importances(study, target=lambda t: sign * t.values[0], target_name=name)
    ax.set_title(f"{study.study_name}: parameter importances for {name}", loc="left")  # in place of Optuna's
    return [path, _save(ax, out / "importances.png")]
