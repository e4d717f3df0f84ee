"""Targets beyond binary (histoflow.targets): the task definition, its metrics against hand-
computed examples, the Cox loss, every MIL model on every target type, and the metrics stage."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from histoflow import targets as T
from histoflow.errors import InputError
from histoflow.targets import Target


def _cfg(**target):
    return {"target": target, "positive_label": "tumor"}


# --- task definition -------------------------------------------------------------------------

def test_default_target_is_the_binary_task():
    t = Target.from_config(_cfg(), labels=["tumor", "normal", "other"])
    assert t.binary and t.positive_label == "tumor" and t.n_out == 1 and t.score_columns == ["prob"]
    y = t.encode(pd.DataFrame({"slide_id": ["a", "b", "c"], "label": ["tumor", "normal", "other"]}))["y"]
    assert y.tolist() == [1, 0, 0]


def test_multiclass_classes_from_the_sheet_in_sorted_order():
    t = Target.from_config(_cfg(classes="sheet"), labels=["kirc", "kich", "kirp", "kirc"])
    assert t.multiclass and t.classes == ("kich", "kirc", "kirp") and t.n_out == 3
    assert t.score_columns == ["prob_kich", "prob_kirc", "prob_kirp"]
    frame = pd.DataFrame({"slide_id": ["a", "b"], "label": ["kirp", "kich"]})
    assert t.encode(frame)["y"].tolist() == [2, 0]
    with pytest.raises(InputError, match="slide 'b'.*'x' is not one of"):
        t.encode(pd.DataFrame({"slide_id": ["a", "b"], "label": ["kirp", "x"]}))


def test_survival_and_regression_encoding_name_the_slide():
    t = Target.from_config(_cfg(type="survival", time_column="os", event_column="dead"))
    frame = pd.DataFrame({"slide_id": ["a", "b"], "label": ["x", "x"], "os": [3.0, 5.0], "dead": [1, 0]})
    enc = t.encode(frame)
    assert enc["time"].tolist() == [3.0, 5.0] and enc["event"].tolist() == [1, 0]
    with pytest.raises(InputError, match="slide 'b': dead '2' is not 1"):
        t.encode(frame.assign(dead=["1", "2"]))
    with pytest.raises(InputError, match="no column 'os'"):
        t.encode(frame.drop(columns="os"))
    r = Target.from_config(_cfg(type="regression"))
    assert r.encode(pd.DataFrame({"slide_id": ["a"], "label": ["0.25"]}))["y"].tolist() == [0.25]
    with pytest.raises(InputError, match="slide 'a'.*not a number"):
        r.encode(pd.DataFrame({"slide_id": ["a"], "label": ["high"]}))


def test_config_validation_refuses_clam_for_survival_but_not_survival_slide_classifiers():
    base = {"positive_label": "tumor", "mil": {"models": ["abmil", "clam_sb"]}, "slide_classifier": {"models": []}}
    with pytest.raises(InputError, match="clam_sb does not support target.type survival"):
        T.check_target_config({**base, "target": {"type": "survival"}})
    T.check_target_config({**base, "target": {"type": "classification", "classes": "sheet"}},
                          pd.DataFrame({"slide_id": ["a", "b", "c"], "label": ["x", "y", "z"]}))
    # survival slide models come from scikit-survival (Cox, random survival forest)
    T.check_target_config({**base, "mil": {"models": ["abmil"]}, "slide_classifier": {"models": ["rf", "gb", "logreg"]},
                           "target": {"type": "survival"}})


# --- metrics against hand-computed values ------------------------------------------------

def test_harrell_c_hand_example():
    t, e = [1, 2, 3, 4], [1, 1, 0, 1]
    # comparable pairs: (0,1) (0,2) (0,3) (1,2) (1,3): 5
    assert T.harrell_c(t, e, [4, 3, 2, 1]) == 1.0
    assert T.harrell_c(t, e, [1, 2, 3, 4]) == 0.0
    assert T.harrell_c(t, e, [4, 1, 2, 3]) == pytest.approx(3 / 5)
    assert T.harrell_c(t, e, [1, 1, 1, 1]) == 0.5


def test_uno_c_hand_example():
    # censored at t=2: censoring KM G drops to 2/3 after 2; events before tau=4 at t=1 (G=1) and
    # t=3 (G(3-)=2/3, weight 9/4). Pairs: 0 vs 1,2,3 (weight 1, all concordant), 2 vs 3 (9/4, discordant)
    t, e, r = [1, 2, 3, 4], [1, 0, 1, 1], [3, 0, 1, 2]
    assert T.uno_c(t, e, r) == pytest.approx(3 / (3 + 2.25))
    assert T.harrell_c(t, e, r) == pytest.approx(3 / 4)
    # without censoring Uno's weights are all 1: Harrell's (with the same truncation)
    assert T.uno_c([1, 2, 3, 4], [1, 1, 1, 1], [4, 2, 3, 1], tau=5) == pytest.approx(T.harrell_c([1, 2, 3, 4], [1] * 4, [4, 2, 3, 1]))


def test_logrank_and_kaplan_meier_hand_example():
    chi2, p = T.logrank([1, 3, 2, 4], [1, 1, 1, 1], [True, True, False, False])
    # O-E = 1/2 - 1/3 + 1/2; V = 1/4 + 2/9 + 1/4
    assert chi2 == pytest.approx((2 / 3) ** 2 / (0.25 + 2 / 9 + 0.25))
    assert p == pytest.approx(0.4328, abs=1e-3)
    times, surv = T.kaplan_meier([1, 2, 2, 3], [1, 0, 1, 1])
    assert times.tolist() == [1, 2, 3] and surv == pytest.approx([3 / 4, 3 / 4 * 2 / 3, 0.0])


def test_cox_loss_hand_example_and_ties():
    loss = T.cox_loss(torch.zeros(2), torch.tensor([1.0, 2.0]), torch.tensor([1, 1]))
    assert float(loss) == pytest.approx(math.log(2) / 2)
    tied = T.cox_loss(torch.zeros(2), torch.tensor([1.0, 1.0]), torch.tensor([1, 1]))
    assert float(tied) == pytest.approx(math.log(2))  # Breslow: both at risk for both events
    # the gradient pushes the earlier event's risk up
    risk = torch.zeros(3, requires_grad=True)
    T.cox_loss(risk, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 0, 0])).backward()
    assert risk.grad[0] < 0 < risk.grad[1]


def test_multiclass_and_regression_metrics():
    y = np.array([0, 1, 2, 2])
    p = np.eye(3)[y] * 0.8 + 0.2 / 3
    m = T.multiclass_metrics(y, p, ("a", "b", "c"))
    assert m["auc_macro"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["f1_macro"] == 1.0 and m["auc_b"] == 1.0
    wrong = T.multiclass_metrics(y, p[[1, 2, 0, 0]], ("a", "b", "c"))
    assert wrong["accuracy"] == 0.0
    r = T.regression_metrics([1, 2, 3, 4], [1, 2, 3, 5])
    assert r["mae"] == 0.25 and r["spearman_rho"] == 1.0 and r["r2"] == pytest.approx(1 - 1 / 5)


# --- MIL on every target ---------------------------------------------------------------------

def _bags(kind: str, n: int = 24, seed: int = 0):
    """Bags whose tiles carry the target: class k shifts feature k; risk/value = shift size."""
    rng = np.random.default_rng(seed)
    bags, y = [], []
    for i in range(n):
        x = rng.normal(size=(int(rng.integers(8, 20)), 6)).astype(np.float32)
        if kind == "multiclass":
            k = i % 3
            x[:, k] += 2.0
            y.append(k)
        else:
            burden = (i % 6) / 5
            x[:, 0] += 3 * burden
            if kind == "survival":
                y.append([float(np.exp(-2.5 * burden) * rng.uniform(0.8, 1.2)), float(i % 5 != 0)])
            else:
                y.append(burden)
        bags.append(x)
    return bags, np.asarray(y)


@pytest.mark.parametrize("kind", ["multiclass", "survival", "regression"])
@pytest.mark.parametrize("model", ["mean", "max", "abmil", "clam_sb", "transmil", "dsmil"])
def test_every_mil_model_trains_on_every_target(kind, model):
    from histoflow.mil.train import MILSettings, fit, predict_logits, tile_scores

    target = {"multiclass": Target(classes=("a", "b", "c")), "survival": Target(type="survival", survival_batch=8),
              "regression": Target(type="regression")}[kind]
    bags, y = _bags(kind)
    settings = MILSettings(models=(model,), epochs=2, hidden_dim=16, min_epochs=1, patience=5)
    if (kind, model) in T.UNSUPPORTED_MIL:
        with pytest.raises(InputError, match=f"{model} does not support"):
            fit(model, bags, y, bags[:6], y[:6], settings, 0, progress=False, target=target)
        return
    result = fit(model, bags, y, bags[:6], y[:6], settings, 0, progress=False, target=target)
    out = predict_logits(result.model, bags)
    assert out.shape == ((len(bags), 3) if kind == "multiclass" else (len(bags),)) and np.isfinite(out).all()
    assert np.isfinite(result.history["train_loss"]).all()
    att, inst = tile_scores(result.model, bags[0])
    assert att.sum() == pytest.approx(1.0) and inst.shape[0] == len(bags[0])
    if kind == "multiclass":
        assert inst.shape == (len(bags[0]), 3)


@pytest.mark.parametrize("kind", ["multiclass", "survival", "regression"])
def test_mil_learns_each_target(kind):
    """Above chance on held-out bags: the loss actually carries the target (a no-op loss fails)."""
    from histoflow.mil.train import MILSettings, fit, predict_logits, softmax

    target = {"multiclass": Target(classes=("a", "b", "c")), "survival": Target(type="survival", survival_batch=12),
              "regression": Target(type="regression")}[kind]
    bags, y = _bags(kind, n=36)
    test_bags, test_y = _bags(kind, n=18, seed=1)
    settings = MILSettings(models=("mean",), epochs=25, hidden_dim=16, lr=5e-3, min_epochs=25)
    result = fit("mean", bags, y, [], [], settings, 0, progress=False, target=target)
    out = predict_logits(result.model, test_bags)
    if kind == "multiclass":
        assert T.multiclass_metrics(test_y, softmax(out), target.classes)["auc_macro"] > 0.9
    elif kind == "survival":
        assert T.harrell_c(test_y[:, 0], test_y[:, 1], out) > 0.75
    else:
        assert T.regression_metrics(test_y, out)["spearman_rho"] > 0.8


# --- splits and the metrics stage ------------------------------------------------------------

def _sheet(kind: str, n: int = 24) -> pd.DataFrame:
    rows = []
    for i in range(n):
        row = {"slide_id": f"s{i:02d}", "patient_id": f"p{i // 2:02d}", "site": ""}
        g = i // 2
        if kind == "multiclass":
            row["label"] = ["a", "b", "c"][g % 3]
        elif kind == "survival":
            row.update(label="x", time=float(1 + g), event=int(g % 4 != 0))
        else:
            row["label"] = str(0.5 * g)
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("kind", ["multiclass", "survival", "regression"])
def test_splits_encode_the_target_and_keep_patients_together(kind):
    from histoflow.split import SplitSettings, make_splits

    target = {"multiclass": Target(classes=("a", "b", "c")), "survival": Target(type="survival"),
              "regression": Target(type="regression")}[kind]
    table = make_splits(_sheet(kind), SplitSettings(k=3, val_fraction=0.25), "tumor", 1, target=target)
    assert table.groupby(["fold", "patient_id"])["role"].nunique().max() == 1
    for _, part in table.groupby("fold"):
        test = part[part["role"] == "test"]
        if kind == "multiclass":   # stratified: every class in every test fold
            assert set(test["y"]) == {0, 1, 2}
        if kind == "survival":
            assert {"time", "event"} <= set(table.columns) and test["event"].sum() >= 1
    if kind == "regression":
        assert table["y"].dtype == float and table["y"].max() == pytest.approx(5.5)


def _predictions(kind: str, informative: bool = True) -> pd.DataFrame:
    """kfold predictions of 3 folds (train/val/test rows), informative or shuffled."""
    rng = np.random.default_rng(0)
    sheet = _sheet(kind, 30)
    rows = []
    for fold in range(3):
        for i, rec in sheet.iterrows():
            role = "test" if (i // 2) % 3 == fold else ("val" if (i // 2) % 3 == (fold + 1) % 3 else "train")
            row = {"slide_id": rec["slide_id"], "patient_id": rec["patient_id"], "label": rec["label"], "fold": fold,
                   "role": role, "n_tiles": 10}
            signal = 1.0 if informative else 0.0
            if kind == "multiclass":
                k = ["a", "b", "c"].index(rec["label"])
                logits = rng.normal(size=3) + 3 * signal * np.eye(3)[k]
                p = np.exp(logits) / np.exp(logits).sum()
                row.update(y=k, pred=int(p.argmax()), prob_a=p[0], prob_b=p[1], prob_c=p[2])
            elif kind == "survival":
                row.update(y=rec["event"], time=rec["time"], event=rec["event"], risk=-signal * rec["time"] + rng.normal())
            else:
                row.update(y=float(rec["label"]), value=signal * float(rec["label"]) + rng.normal(scale=0.5))
            rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("kind", ["multiclass", "survival", "regression"])
def test_metrics_stage_counts_each_slide_once_with_cis_and_plots(kind, tmp_path):
    from histoflow.metrics import write_target_metrics

    target = {"multiclass": Target(classes=("a", "b", "c")), "survival": Target(type="survival", horizons=(10.0,)),
              "regression": Target(type="regression")}[kind]
    paths = {}
    for name, informative in (("good", True), ("noise", False)):
        p = tmp_path / f"{name}.tsv"
        _predictions(kind, informative).to_csv(p, sep="\t", index=False)
        paths[name] = [str(p)]
    plots = {"multiclass": {"roc": "roc.png", "pr": "pr.png", "calibration": "cal.png", "confusion_tsv": "c.tsv",
                            "confusion_png": "c.png"}, "survival": {"km": "km.png"}, "regression": {"scatter": "sc.png"}}[kind]
    plots = {k: str(tmp_path / v) for k, v in plots.items()}
    payload = write_target_metrics(paths, target, str(tmp_path / "m.json"), str(tmp_path / "m.tsv"), plots,
                                   {"n_bootstrap": 100}, 0)
    primary = target.primary_metric
    good = payload["models"]["good"]
    # inferred from the rows: one test row per slide is kfold (val/train rows are never read)
    assert good["strategy"] == "kfold" and len(good["folds"]) == 3 and sum(f["n_test"] for f in good["folds"]) == 30
    assert payload["best_model"] == "good" and good["n_slides"] == 30 and good["n_patients"] == 15
    lo, hi = good["ci"][primary]
    assert lo <= good["pooled"][primary] <= hi
    assert good["pooled"][primary] > payload["models"]["noise"]["pooled"][primary]
    row = [r for r in payload["comparison"] if r["model"] == "noise"][0]
    assert row["paired_vs_best"] == "good" and 0 <= row["paired_p"] < 0.05
    for path in plots.values():
        assert Path(path).exists()
    if kind == "survival":
        assert "uno_c_at_10" in good["pooled"] and good["risk_groups"]["n_high"] + good["risk_groups"]["n_low"] == 30
        assert good["threshold_source"] == "train_median_risk"
    if kind == "multiclass":
        assert good["threshold_source"] == "argmax" and np.asarray(good["confusion"]["matrix"]).sum() == 30


def test_harrell_c_agrees_with_scikit_survival():
    """On distinct times (with tied risks): scikit-survival also counts an event and a censoring
    at the same time as comparable, which harrell_c leaves out (its docstring)."""
    from sksurv.metrics import concordance_index_censored

    rng = np.random.default_rng(3)
    t = rng.exponential(5, 60)
    e = rng.random(60) < 0.7
    r = np.round(rng.normal(size=60) - 0.1 * t, 1)   # tied risks included
    ref = concordance_index_censored(e, t, r)[0]
    assert T.harrell_c(t, e.astype(int), r) == pytest.approx(ref, abs=1e-12)


def test_an_external_survival_sheet_without_the_event_column_is_refused_at_planning(tmp_path, repo_root, snakemake_exe):
    """`snakemake -n`: one line naming the cohort, its sheet and the missing column."""
    import subprocess

    import yaml

    (tmp_path / "a.svs").write_bytes(b"x")
    rows = [{"slide_id": f"s{i}", "patient_id": f"p{i}", "label": "x", "source": "a.svs", "time": 1.0 + i,
             "event": i % 2} for i in range(6)]
    pd.DataFrame(rows).to_csv(tmp_path / "dev.tsv", sep="\t", index=False)
    pd.DataFrame(rows).assign(slide_id=lambda f: "e" + f["slide_id"], patient_id=lambda f: "e" + f["patient_id"]) \
        .drop(columns=["event"]) \
        .to_csv(tmp_path / "ext.tsv", sep="\t", index=False)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "samples": str(tmp_path / "dev.tsv"), "outdir": str(tmp_path / "out"), "target": {"type": "survival"},
        "split": {"k": 2}, "external": [{"name": "site_b", "samples": str(tmp_path / "ext.tsv")}]}))
    result = subprocess.run([snakemake_exe, "-n", "--cores", "1", "metrics", "--configfile", "config.yaml",
                             str(tmp_path / "c.yaml")], cwd=repo_root, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    lines = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.startswith("histoflow:")]
    assert len(lines) == 1 and "site_b" in lines[0] and "'event'" in lines[0], result.stderr[-2000:]


def test_survival_validation_without_a_comparable_event_does_not_freeze_the_first_epoch():
    """A validation set whose Cox loss cannot change (no event with a bag still at risk, e.g. all
    censored) would make early stopping keep epoch 1's weights; the last epoch is kept instead."""
    from histoflow.mil.train import MILSettings, _cox_informative, fit

    bags, y = _bags("survival", n=24)
    censored = y[:4].copy()
    censored[:, 1] = 0
    settings = MILSettings(models=("mean",), epochs=8, hidden_dim=16, lr=5e-3, min_epochs=1, patience=2)
    result = fit("mean", bags, y, bags[:4], censored, settings, 0, progress=False,
                 target=Target(type="survival", survival_batch=12))
    assert result.best_epoch == len(result.history) == 8
    assert not _cox_informative(censored) and _cox_informative(y)
    last = y[:2].copy()
    last[:, 0], last[:, 1] = [1.0, 5.0], [0, 1]   # the only event is the longest time: nobody else at risk
    assert not _cox_informative(last)


def test_the_default_survival_horizon_comes_from_training_slides_only():
    """target.horizons empty: Uno's c horizon from each fold's training slides, never the test ones."""
    from histoflow.metrics import _train_horizons

    rows = []
    for fold in (0, 1):
        rows += [{"slide_id": f"t{fold}{i}", "fold": fold, "role": "train", "time": t, "event": 1}
                 for i, t in enumerate((2.0, 4.0, 6.0))]
        rows += [{"slide_id": f"x{fold}", "fold": fold, "role": "test", "time": 1000.0, "event": 1}]
    horizons, source = _train_horizons(pd.DataFrame(rows))
    assert horizons == [4.0] and "training slides" in source
    none, why = _train_horizons(pd.DataFrame(rows).assign(event=0))
    assert none == [] and "no training slide" in why
