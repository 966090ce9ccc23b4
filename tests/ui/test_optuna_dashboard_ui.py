"""optuna-dashboard, in a real browser, shows a study of the sweeps' storage: its trials and best value.

A tiny study (8 trials of a two-parameter function, a seeded sampler) in a fresh SQLite file is
served by optuna-dashboard on a free loopback port (the same command `mvar stack up` runs);
headless Chromium opens the study's page and reads the rendered text. The screenshot and text are
kept in `out/test-artifacts/optuna-dashboard/` (or `$MVAR_TEST_ARTIFACTS/optuna-dashboard/`).
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_study_page_shows_the_study_its_trials_and_its_best_value(browser, optuna_dashboard, artifact_dirs):
    d = optuna_dashboard
    # the study's name, its parameters, the best trial with its value (JavaScript prints a float as Python's
    # repr does), the study's user attribute
    needles = [f"{d.study_name} (id={d.study_id})", "model.lr", "model.depth", f"Best Trial (number={d.best_number})",
               repr(d.best_value), "mvar.test"]
    browser.set_window(1600, 1400)
    browser.open(f"{d.url}/dashboard/studies/{d.study_id}", needles)
    text = browser.keep(artifact_dirs("optuna-dashboard"), "study")
    missing = [n for n in needles if n not in text]
    assert not missing, f"not on the study page: {missing}; page text:\n{text[:3000]}"
    # the history plot has a point per trial: its x axis counts them 0..n-1
    assert f"\n{d.n_trials - 1}\n" in text.split("History", 2)[-1], f"no trial {d.n_trials - 1} in the history:\n{text[:2000]}"
