"""Slide-level metrics: correct values, thresholds from validation only, patient-level CIs, DeLong."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import brier_score_loss, f1_score, roc_auc_score

from histoflow.metrics import (MetricsSettings, binary_metrics, bootstrap_ci, choose_threshold,
                               compare_models, delong_test, evaluate_model, expected_calibration_error,
                               roc_auc)


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, 200), 0, 1)
    return y, p


def test_metrics_agree_with_scikit_learn(scores):
    y, p = scores
    m = binary_metrics(y, p, 0.5)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["f1"] == pytest.approx(f1_score(y, p >= 0.5))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    tp = ((p >= 0.5) & (y == 1)).sum()
    assert m["sensitivity"] == pytest.approx(tp / y.sum())
    assert m["balanced_accuracy"] == pytest.approx((m["sensitivity"] + m["specificity"]) / 2)


def test_auc_is_nan_with_one_class():
    assert np.isnan(roc_auc(np.ones(5), np.linspace(0, 1, 5)))


def test_calibrated_predictions_have_small_ece():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, 20000)
    y = rng.uniform(0, 1, 20000) < p
    assert expected_calibration_error(y, p) < 0.02
    assert expected_calibration_error(y, np.clip(p + 0.3, 0, 1)) > 0.15


def test_youden_threshold_separates_separable_validation_data():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    t = choose_threshold(y, p)
    assert 0.3 < t <= 0.6
    assert binary_metrics(y, p, t)["accuracy"] == 1.0


def test_bootstrap_ci_brackets_the_estimate_and_resamples_patients(scores):
    y, p = scores
    patients = np.repeat(np.arange(100), 2)
    ci = bootstrap_ci(y, p, patients, 0.5, n_bootstrap=300, seed=3)
    auc = roc_auc(y, p)
    assert ci["auc"][0] < auc < ci["auc"][1]
    assert ci == bootstrap_ci(y, p, patients, 0.5, n_bootstrap=300, seed=3)  # seeded


def test_delong_identical_models_not_different_and_better_model_detected():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    good = y + rng.normal(0, 0.5, 300)
    bad = y + rng.normal(0, 3.0, 300)
    diff, z, pval = delong_test(y, good, good)
    assert diff == 0 and pval == pytest.approx(1.0)
    diff, z, pval = delong_test(y, good, bad)
    assert diff > 0 and pval < 0.001
    assert diff == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, bad))


def _predictions(seed: int, noise: float) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for fold in range(3):
        for i in range(30):
            y = i % 2
            role = "test" if i % 3 == fold else ("val" if i % 3 == (fold + 1) % 3 else "train")
            rows.append({"slide_id": f"s{i}", "patient_id": f"p{i // 2}", "y": y, "fold": fold, "role": role,
                         "prob": float(np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, noise), 0, 1))})
    return pd.DataFrame(rows)


def test_threshold_comes_from_validation_never_test():
    preds = _predictions(0, 0.1)
    settings = MetricsSettings(n_bootstrap=50)
    before = evaluate_model(preds, settings)
    moved = preds.copy()
    moved.loc[moved["role"] == "test", "prob"] = 1 - moved.loc[moved["role"] == "test", "prob"]
    after = evaluate_model(moved, settings)
    assert [f["threshold"] for f in before["folds"]] == [f["threshold"] for f in after["folds"]]


def test_comparison_table_ranks_models_and_reports_cis_and_fold_spread():
    settings = MetricsSettings(n_bootstrap=100)
    results = {"good": evaluate_model(_predictions(0, 0.1), settings),
               "noisy": evaluate_model(_predictions(1, 0.6), settings)}
    table = compare_models(results)
    assert list(table["model"]) == ["good", "noisy"]
    assert table.loc[0, "delong_vs_best"] == "(best)"
    assert table.loc[1, "delong_vs_best"] == "good"
    for col in ("auc_ci_low", "auc_ci_high", "auc_fold_mean", "auc_fold_sd", "ece", "brier", "npv"):
        assert col in table.columns
    assert results["good"]["n_slides"] == 30
