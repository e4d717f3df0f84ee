"""Slide-level metrics: correct values, thresholds from validation only, patient-level CIs, DeLong."""

from __future__ import annotations

from pathlib import Path

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


# --- each slide once (holdout ensemble), thresholds from validation only, patient bootstrap ----

def _holdout_predictions(k: int = 3, seed: int = 0) -> pd.DataFrame:
    """Holdout: 12 test slides (6 patients x 2 slides) scored by each of k fold models; 24 other
    slides rotate through val (8 per fold) and train."""
    rng = np.random.default_rng(seed)
    rows = []
    for fold in range(k):
        for i in range(36):
            y = (i // 2) % 2
            role = "test" if i < 12 else ("val" if (i - 12) // 8 == fold else "train")
            rows.append({"slide_id": f"s{i}", "patient_id": f"p{i // 2}", "y": y, "fold": fold, "role": role,
                         "prob": float(np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.25), 0, 1))})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_holdout_counts_each_test_slide_once_as_the_mean_of_the_fold_models(k):
    preds = _holdout_predictions(k)
    res = evaluate_model(preds, MetricsSettings(n_bootstrap=200), strategy="holdout")
    assert res["n_slides"] == 12 and res["n_patients"] == 6          # not 12 * k
    oof = res["oof"]
    assert oof["slide_id"].is_unique and len(oof) == 12
    mean = preds[preds["role"] == "test"].groupby("slide_id")["prob"].mean()
    assert np.allclose(oof.set_index("slide_id")["prob"], mean.loc[oof["slide_id"]])
    assert (oof["n_models"] == k).all()
    # metrics, CIs and DeLong on the 12 unique slides: the same as computed by hand on them
    y, p = oof["y"].to_numpy(), oof["prob"].to_numpy()
    assert res["pooled"]["auc"] == pytest.approx(roc_auc(y, p))
    ci = bootstrap_ci(y, p, oof["patient_id"].to_numpy(), 0.5, n_bootstrap=200, seed=MetricsSettings().seed)
    assert res["ci"]["auc"] == ci["auc"]
    other = evaluate_model(_holdout_predictions(k, seed=1), MetricsSettings(n_bootstrap=200), strategy="holdout")
    table = compare_models({"a": res, "b": other})
    assert (table["n_slides"] == 12).all() and (table["delong_n_slides"] == 12).all()
    # inferred from the table when not given
    assert evaluate_model(preds, MetricsSettings(n_bootstrap=50))["n_slides"] == 12


def test_kfold_keeps_each_slide_once_and_refuses_a_slide_tested_twice():
    preds = _predictions(0, 0.1)
    res = evaluate_model(preds, MetricsSettings(n_bootstrap=50), strategy="kfold")
    assert res["n_slides"] == 30 and res["oof"]["slide_id"].is_unique
    twice = preds.copy()
    twice.loc[(twice["slide_id"] == "s0") & (twice["fold"] == 1), "role"] = "test"
    with pytest.raises(ValueError, match="s0"):
        evaluate_model(twice, MetricsSettings(n_bootstrap=50), strategy="kfold")


def _tiny_val_predictions() -> pd.DataFrame:
    """kfold, 3 folds; each fold's validation is 2 slides of one class (useless on its own), so
    the threshold must come from the validation predictions of all folds pooled."""
    rng = np.random.default_rng(4)
    rows = []
    for fold in range(3):
        for i in range(30):
            y = i % 2
            if i % 3 == fold:
                role = "test"
            elif i in ({0: (2, 4), 1: (3, 5), 2: (7, 9)}[fold]):
                role = "val"
            else:
                role = "train"
            rows.append({"slide_id": f"s{i}", "patient_id": f"p{i}", "y": y, "fold": fold, "role": role,
                         "prob": float(np.clip(0.3 + 0.3 * y + rng.normal(0, 0.1), 0, 1))})
    return pd.DataFrame(rows)


def test_threshold_from_pooled_validation_never_training_predictions():
    preds = _tiny_val_predictions()
    settings = MetricsSettings(n_bootstrap=50)
    res = evaluate_model(preds, settings)
    assert res["threshold_source"] == "pooled_validation"
    assert all(f["threshold_source"] == "pooled_validation" for f in res["folds"])
    val = preds[preds["role"] == "val"]
    assert res["threshold"] == pytest.approx(choose_threshold(val["y"], val["prob"]))
    # neither training nor test predictions move it
    for role in ("train", "test"):
        moved = preds.copy()
        moved.loc[moved["role"] == role, "prob"] = 1 - moved.loc[moved["role"] == role, "prob"]
        assert evaluate_model(moved, settings)["threshold"] == res["threshold"]


def test_threshold_per_fold_only_with_enough_validation_slides_of_each_class():
    preds = _predictions(0, 0.2)          # 10 val slides per fold, 5 of each class
    per_fold = evaluate_model(preds, MetricsSettings(n_bootstrap=50, min_val_per_class=5))
    assert per_fold["threshold_source"] == "fold_validation"
    for f in per_fold["folds"]:
        val = preds[(preds["fold"] == f["fold"]) & (preds["role"] == "val")]
        assert f["threshold_source"] == "fold_validation"
        assert f["threshold"] == pytest.approx(choose_threshold(val["y"], val["prob"]))
    pooled = evaluate_model(preds, MetricsSettings(n_bootstrap=50, min_val_per_class=6))
    assert pooled["threshold_source"] == "pooled_validation" and isinstance(pooled["threshold"], float)
    # no validation predictions at all: the fixed threshold, and it says so
    no_val = preds.assign(role=preds["role"].replace({"val": "train"}))
    fixed = evaluate_model(no_val, MetricsSettings(n_bootstrap=50, fixed_threshold=0.4))
    assert (fixed["threshold"], fixed["threshold_source"]) == (0.4, "fixed")


def test_metrics_json_says_how_every_number_was_obtained(tmp_path):
    import json

    from histoflow.metrics import write_metrics

    paths = []
    for name, frame in (("hold", _holdout_predictions(3)),):
        for fold, part in frame.groupby("fold"):
            paths.append(str(tmp_path / f"{name}{fold}.tsv"))
            part.to_csv(paths[-1], sep="\t", index=False)
    out = {n: str(tmp_path / n) for n in ("m.json", "m.tsv", "roc.png", "pr.png", "cal.png")}
    write_metrics({"abmil": paths}, out["m.json"], out["m.tsv"], out["roc.png"], out["pr.png"], out["cal.png"],
                  {"n_bootstrap": 100}, seed=1, strategy="holdout")
    m = json.loads(Path(out["m.json"]).read_text())
    model = m["models"]["abmil"]
    assert model["threshold_source"] == "pooled_validation" and isinstance(model["threshold"], float)
    assert model["n_slides"] == 12 and model["n_patients"] == 6 and model["strategy"] == "holdout"
    assert "patient bootstrap" in model["ci_method"] and "n_bootstrap=100" in model["ci_method"]
    assert "mean of the 3 fold models" in model["method"]["test_prediction"]
    assert m["settings"]["min_val_per_class"] == 5
    table = pd.read_csv(out["m.tsv"], sep="\t")
    assert table.loc[0, "threshold_source"] == "pooled_validation" and table.loc[0, "n_slides"] == 12


def test_mlflow_model_run_logs_threshold_and_its_source():
    from histoflow.mlflow import _log_model

    class Client:
        def __init__(self):
            self.params = {}

        def create_run(self, *a, **k):
            return type("R", (), {"info": type("I", (), {"run_id": "r"})})()

        def log_batch(self, run_id, params=(), metrics=(), tags=()):
            self.params.update({p.key: p.value for p in params})

        def log_artifact(self, *a, **k):
            pass

        def set_terminated(self, *a, **k):
            pass

    res = evaluate_model(_tiny_val_predictions(), MetricsSettings(n_bootstrap=50))
    client = Client()
    _log_model(client, "0", "parent", {"name": "mil/abmil", "model": "abmil", "kind": "mil", "folds": [], "artifacts": [],
                                       "result": {**res, "ci": {}, "pooled": {}, "ci_method": "patient bootstrap"}})
    assert client.params["threshold_source"] == "pooled_validation"
    assert float(client.params["threshold"]) == pytest.approx(res["threshold"])


def test_bootstrap_resamples_whole_patients_not_slides():
    # 10 patients x 20 slides; a patient's slides are all right or all wrong (5 each): accuracy 0.5.
    # Drawing patients, a replicate's accuracy is (right patients drawn) / 10, a multiple of 0.1,
    # with SD ~0.16; drawing slides it is a multiple of 1/200 with SD ~0.035.
    patients = np.repeat(np.arange(10), 20)
    y = np.tile([0, 1], 100)
    right = patients < 5
    p = np.where(right, y * 0.8 + 0.1, 0.9 - y * 0.8)
    ci = bootstrap_ci(y, p, patients, 0.5, n_bootstrap=400, seed=0)
    lo, hi = ci["accuracy"]
    assert hi - lo > 0.4                                   # slide resampling: ~0.14
    assert np.allclose(np.array([lo, hi]) * 10, np.round(np.array([lo, hi]) * 10))
    # and it differs from an independent slide bootstrap of the same data
    rng = np.random.default_rng(0)
    slide_acc = [((p[i] >= 0.5) == y[i]).mean() for i in (rng.integers(0, 200, 200) for _ in range(400))]
    assert hi - lo > 2.5 * (np.quantile(slide_acc, 0.975) - np.quantile(slide_acc, 0.025))


def test_checklist_states_each_models_threshold_source_and_the_holdout_ensemble(tmp_path):
    from histoflow.checklist import collect_checklist
    from histoflow.metrics import write_metrics

    paths = []
    for fold, part in _holdout_predictions(3).groupby("fold"):
        paths.append(str(tmp_path / f"f{fold}.tsv"))
        part.to_csv(paths[-1], sep="\t", index=False)
    out = tmp_path / "results" / "metrics"
    out.mkdir(parents=True)
    write_metrics({"mil-abmil": paths}, str(out / "metrics.json"), str(out / "metrics.tsv"), str(out / "roc.png"),
                  str(out / "pr.png"), str(out / "calibration.png"), {"n_bootstrap": 100}, seed=1, strategy="holdout")
    item = collect_checklist(str(tmp_path / "results"), {"metrics": {"n_bootstrap": 100}}, "samples.tsv")[10]
    text = " ".join(item.summary)
    assert "mean of the k fold models" in text and "on 12 slides of 6 patients" in text
    assert "pooled validation predictions of all folds: mil-abmil" in text
    assert item.params["mil-abmil.threshold_source"] == "pooled_validation"


@pytest.mark.parametrize("kind", ["binary", "multiclass", "survival", "regression"])
def test_checklist_items_9_and_11_name_the_task_its_loss_and_metrics(tmp_path, kind):
    """Every target type: item 9 says the task and the loss, item 11 the loss and the metrics
    (and for an external cohort, its primary metric with the CI)."""
    from histoflow.checklist import collect_checklist
    from histoflow.io import write_json
    from histoflow.targets import Target

    config = {"binary": {}, "multiclass": {"target": {"type": "classification", "classes": "sheet"}},
              "survival": {"target": {"type": "survival"}}, "regression": {"target": {"type": "regression"}}}[kind]
    config = {**config, "positive_label": "tumor", "metrics": {"n_bootstrap": 100}}
    task = Target.from_config(config, labels=["a", "b", "c"] if kind == "multiclass" else ["tumor", "normal"])
    primary = task.primary_metric
    rec = {"pooled": {primary: 0.7}, "ci": {primary: [0.6, 0.8]}, "n_slides": 10, "n_patients": 8,
           "threshold_source": "x"}
    payload = {"best_model": "mil-abmil", "models": {"mil-abmil": rec}, "external": {"site_b": {"mil-abmil": rec}},
               "settings": {"n_bootstrap": 100}}
    if kind != "binary":
        payload.update(target=task.describe(), primary_metric=primary)
    write_json(tmp_path / "metrics" / "metrics.json", payload)
    items = {it.number: it for it in collect_checklist(str(tmp_path), config, "samples.tsv")}
    loss = {"binary": "binary cross-entropy", "multiclass": "cross-entropy", "survival": "Cox partial log-likelihood",
            "regression": "mean squared error"}[kind]
    assert loss in " ".join(items[9].summary)
    assert items[11].params["target.loss"] and items[11].params["target.metrics"]
    assert loss.split()[0].lower() in items[11].params["target.loss"].lower()
    assert f"External cohort site_b" in " ".join(items[11].summary)
    assert items[11].metrics[f"external.site_b.mil-abmil.{primary}"] == 0.7
