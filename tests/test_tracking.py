"""MLflow audit trail: every checklist item is in the store, models and folds are nested runs,
secrets never reach it, re-logging is idempotent, an unreachable server is not fatal, and the UI
shows the run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histoflow.checklist import TITLES
from histoflow.io import write_json
from histoflow.metrics import write_metrics
from histoflow.mlflow import init_store, log_workflow

SECRET = "gdc-secret-token-0123456789"


@pytest.fixture(scope="module")
def finished_outdir(tmp_path_factory) -> Path:
    """A results folder as a finished run leaves it (predictions, histories, splits, QC)."""
    out = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    rows = []
    for fold in range(3):
        for i in range(12):
            role = "test" if i % 3 == fold else ("val" if i % 3 == (fold + 1) % 3 else "train")
            rows.append({"slide_id": f"s{i}", "patient_id": f"p{i}", "label": "tumor" if i % 2 else "normal",
                         "y": i % 2, "fold": fold, "role": role, "prob": float(np.clip(0.2 + 0.6 * (i % 2) + rng.normal(0, 0.1), 0, 1))})
    preds = pd.DataFrame(rows)
    for fold in range(3):
        fold_dir = out / "mil" / "abmil" / f"fold{fold}"
        fold_dir.mkdir(parents=True)
        preds[preds["fold"] == fold].to_csv(fold_dir / "predictions.tsv", sep="\t", index=False)
        pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [0.7, 0.5, 0.4], "val_loss": [0.7, 0.6, 0.5],
                      "val_auc": [0.6, 0.8, 0.9]}).to_csv(fold_dir / "history.tsv", sep="\t", index=False)
    preds[preds["role"] == "test"].to_csv(out / "mil" / "abmil" / "predictions.tsv", sep="\t", index=False)
    _trained_models(out, n_slides=12, folds=3)
    paths = [str(out / "mil" / "abmil" / f"fold{f}" / "predictions.tsv") for f in range(3)]
    write_metrics({"abmil": paths}, str(out / "metrics" / "metrics.json"), str(out / "metrics" / "metrics.tsv"),
                  str(out / "metrics" / "roc.png"), str(out / "metrics" / "pr.png"), str(out / "metrics" / "calibration.png"),
                  {"n_bootstrap": 50}, seed=1)
    (out / "splits").mkdir()
    preds[["slide_id", "patient_id", "label", "y", "fold", "role"]].to_csv(out / "splits" / "splits.tsv", sep="\t", index=False)
    write_json(out / "splits" / "split.json", {"strategy": "kfold", "k": 3, "seed": 1})
    write_json(out / "downloads" / "s0.json", {"slide_id": "s0", "source_kind": "gdc", "source": "gdc:x",
                                               "md5": "0" * 32, "download_seconds": 1.5, "status": "ok"})
    (out / "qc").mkdir()
    pd.DataFrame({"slide_id": ["s0"], "status": ["ok"], "tissue_area_mm2": [12.0]}).to_csv(out / "qc" / "slides.tsv", sep="\t", index=False)
    return out


def _trained_models(out: Path, n_slides: int, folds: int, dim: int = 8) -> None:
    """Fold checkpoints of a small ABMIL and each slide's tile features, as training leaves them."""
    import torch

    from histoflow.features import feature_table
    from histoflow.io import write_parquet
    from histoflow.mil import build_model
    from histoflow.mil.train import FitResult, MILSettings, save_checkpoint

    rng = np.random.default_rng(1)
    for i in range(n_slides):
        feats = rng.normal(i % 2, 1, (5, dim)).astype(np.float32)
        coords = pd.DataFrame({"slide_id": f"s{i}", "x": np.arange(5) * 256, "y": 0, "target_mpp": 0.5, "tile_px": 256,
                               "size0": 256, "col": np.arange(5), "row": 0})
        write_parquet(out / "features" / "ssl-resnet-tiny" / f"s{i}.parquet", feature_table(coords, feats))
    for fold in range(folds):
        torch.manual_seed(fold)
        model = build_model("abmil", dim, hidden_dim=8)
        history = pd.read_csv(out / "mil" / "abmil" / f"fold{fold}" / "history.tsv", sep="\t")
        save_checkpoint(out / "mil" / "abmil" / f"fold{fold}" / "checkpoint.pt", FitResult(model, history, 1),
                        "abmil", MILSettings(hidden_dim=8), {"fold": fold, "seed": 1, "encoder": "ssl:resnet-tiny"})


def config_for(out: Path, **mlflow) -> dict:
    return {"samples": "samples.tsv", "seed": 1, "mlflow": {"experiment": "histoflow-test", **mlflow},
            "download": {"gdc_token_env": "GDC_TOKEN", "token": SECRET},
            "tiling": {"mpp": [0.5], "tile_px": 256}, "split": {"k": 3}}


@pytest.fixture(scope="module")
def logged(finished_outdir):
    config = config_for(finished_outdir)
    init_store(str(finished_outdir), config, str(finished_outdir / "mlflow" / "store.json"))
    status = log_workflow(str(finished_outdir), config, "samples.tsv", str(finished_outdir / "mlflow" / "logged.json"))
    return finished_outdir, config, status


def client_for(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")


def test_every_checklist_item_is_in_the_parent_run(logged):
    out, _config, status = logged
    assert status["status"] == "logged"
    run = client_for(out).get_run(status["run_id"])
    tags, params = run.data.tags, run.data.params
    for number, title in TITLES.items():
        assert any(k.startswith(f"checklist.{number:02d}_") for k in tags), f"item {number} ({title}) missing"
        assert f"c{number:02d}.status" in params
    assert "c01.cpu_model" in params and "c01.version.snakemake" in params
    assert params["c03.seed"] == "1"
    assert run.data.metrics["c09.abmil.fold0.best_val_auc"] == pytest.approx(0.9)
    assert "c11.abmil.auc" in run.data.metrics and "c11.abmil.auc_ci_low" in run.data.metrics
    artifacts = [a.path for a in client_for(out).list_artifacts(status["run_id"], "checklist/11_performance_metrics")]
    assert any(p.endswith("roc.png") for p in artifacts)


def test_models_and_folds_are_nested_runs_with_training_curves(logged):
    out, _config, status = logged
    client = client_for(out)
    exp = client.get_experiment_by_name("histoflow-test")
    runs = client.search_runs([exp.experiment_id])
    model_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == status["run_id"]]
    assert [r.data.tags["histoflow.model"] for r in model_runs] == ["abmil"]
    folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == model_runs[0].info.run_id]
    assert len(folds) == 3
    history = client.get_metric_history(folds[0].info.run_id, "val_auc")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2]


def test_secrets_never_reach_the_store(logged):
    out, _config, _status = logged
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"secret leaked into {path}"


def test_logging_the_same_result_twice_makes_no_second_run(logged):
    out, config, status = logged
    again = log_workflow(str(out), config, "samples.tsv", str(out / "mlflow" / "again.json"))
    assert again["run_id"] == status["run_id"]


def test_unreachable_server_leaves_results_pending_not_failed(finished_outdir, tmp_path):
    config = config_for(finished_outdir, tracking_uri="http://127.0.0.1:9")
    status = log_workflow(str(finished_outdir), config, "samples.tsv", str(tmp_path / "status.json"))
    assert status["status"] == "pending"
    assert (tmp_path / "status.json").exists()


@pytest.mark.e2e
def test_mlflow_ui_shows_training_runs_datasets_and_models(logged):
    """What a person sees in headless Chromium: the experiment (opened by the link histoflow
    prints) lands on its training runs, the parent run expands to the model runs, the Dataset
    column names the cohort and the Models column lists the logged MIL model."""
    from mlflow_ui import Browser, chromium_binary, mlflow_server

    if not chromium_binary():
        pytest.skip("Debian package chromium not installed (CI installs it)")
    pytest.importorskip("aiohttp", reason="drives Chromium over the DevTools protocol")
    out, _config, status = logged
    with mlflow_server(out / "mlflow.db") as base:
        browser = Browser()
        try:
            browser.open(f"{base}/{status['ui_path']}")
            text = browser.wait_for(r"histoflow \d{4}-\d{2}-\d{2}")
            assert "/runs" in browser.js("location.href")
            assert "Training runs" in text or "Runs" in text.split("Experiments")[-1]
            assert "Traces\n0" not in text and "No data available" not in text   # not the GenAI overview
            assert "Dataset" in text and "Models" in text   # the runs table's columns
            browser.close_assistant()
            assert browser.expand_rows()
            text = browser.wait_for(r"mil/abmil")
            assert "cohort" in text   # the Dataset column of the model run
            assert "histoflow-abmil" in text   # the Models column: the logged pyfunc
        finally:
            browser.close()


# ---------------------------------------------------------------- a real secret on the real path

URL_SECRET = "Zx9SIGNATUREq7Kp2Lw4Vb8Nm3Tr6Yh1"   # the signature of a pre-signed URL
GDC_SECRET = "eyJhbGciOiJIUzI1NiJ9.gdctoken.Qw8Er7Ty6"   # a GDC token, in a file and the environment


@pytest.fixture
def slide_server():
    """Serves the same bytes for any path (the query string, with its signature, is ignored)."""
    import http.server
    import threading

    body = os.urandom(20_000)
    seen_tokens = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            seen_tokens.append(self.headers.get("X-Auth-Token"))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Disposition", 'attachment; filename="slide.svs"')
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", seen_tokens
    srv.shutdown()
    srv.server_close()


def test_a_signed_url_and_a_gdc_token_reach_nothing_in_the_mlflow_store(finished_outdir, tmp_path, slide_server,
                                                                        monkeypatch):
    """The real path: a samples sheet whose source is a pre-signed URL and a GDC file fetched with
    a token (file + environment) are downloaded, and the run is logged to MLflow with that sheet.
    Every byte of the store (database, artifacts) and of the results folder is searched."""
    from histoflow.download import download_slide

    base, seen_tokens = slide_server
    out = tmp_path / "results"
    shutil.copytree(finished_outdir, out, ignore=shutil.ignore_patterns("mlflow*", "mlruns", "downloads"))
    token_file = tmp_path / "gdc-token.txt"
    token_file.write_text(GDC_SECRET + "\n")
    monkeypatch.setenv("GDC_TOKEN", GDC_SECRET)
    signed = f"{base}/bucket/s0.svs?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature={URL_SECRET}"
    uuid = "2f6b6a8e-1111-2222-3333-444455556666"
    sheet = tmp_path / "samples.tsv"
    uuid2 = "2f6b6a8e-1111-2222-3333-777788889999"
    pd.DataFrame({"slide_id": ["s0", "s1", "s2"], "patient_id": ["p0", "p1", "p2"], "label": ["normal", "tumor", "tumor"],
                  "source": [signed, f"gdc:{uuid}", f"gdc:{uuid2}"]}).to_csv(sheet, sep="\t", index=False)
    download = {"gdc_endpoint": f"{base}/data", "gdc_token_file": str(token_file), "gdc_md5": False,
                "retries": 0, "backoff_s": 0.01}
    from_env = {k: v for k, v in download.items() if k != "gdc_token_file"}   # the token from $GDC_TOKEN
    for sid, source, settings in (("s0", signed, download), ("s1", f"gdc:{uuid}", download),
                                  ("s2", f"gdc:{uuid2}", from_env)):
        manifest = download_slide(sid, source, out / "downloads" / sid, out / "downloads" / f"{sid}.json", None,
                                  settings, "fail")
        assert manifest["status"] == "ok"
    assert seen_tokens.count(GDC_SECRET) == 2   # the token really was used, from the file and from the environment

    config = {**config_for(out), "download": download, "samples": str(sheet)}
    init_store(str(out), config, str(out / "mlflow" / "store.json"))
    status = log_workflow(str(out), config, str(sheet), str(out / "mlflow" / "logged.json"))
    assert status["status"] == "logged"
    client = client_for(out)
    run = client.get_run(status["run_id"])
    assert run.data.params and run.data.tags   # the store really holds the run
    store = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name.startswith("mlflow.db") for p in store) and any("mlruns" in p.parts for p in store)
    for secret in (URL_SECRET, GDC_SECRET, "AKIAEXAMPLE"):
        leaked = [str(p.relative_to(out)) for p in store if secret.encode() in p.read_bytes()]
        assert not leaked, f"secret {secret[:6]}... found in {leaked}"


# ---------------------------------------------------------------- what the MLflow UI shows


def _runs(out: Path, status: dict):
    client = client_for(out)
    return client, client.search_runs([status["experiment_id"]], max_results=1000)


def test_the_experiment_is_a_model_training_experiment(logged, tmp_path):
    out, _config, status = logged
    client = client_for(out)
    assert client.get_experiment(status["experiment_id"]).tags.get("mlflow.experimentKind") == "custom_model_development"
    # an experiment made before (no kind) gets it on the next log; a kind chosen in the UI is kept
    from mlflow.tracking import MlflowClient

    from histoflow.mlflow import ensure_experiment

    other = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'old.db'}")
    old = other.create_experiment("old", artifact_location=(tmp_path / "art").as_uri())
    assert "mlflow.experimentKind" not in other.get_experiment(old).tags
    assert ensure_experiment(other, "old", None) == old
    assert other.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    other.set_experiment_tag(old, "mlflow.experimentKind", "genai_development")
    ensure_experiment(other, "old", None)
    assert other.get_experiment(old).tags["mlflow.experimentKind"] == "genai_development"
    assert status["ui_path"] == f"#/experiments/{status['experiment_id']}?workflowType=machine_learning"


def test_the_parent_run_sorts_models_by_any_metric(logged):
    from histoflow.io import read_json

    out, _config, status = logged
    client, runs = _runs(out, status)
    metrics = client.get_run(status["run_id"]).data.metrics
    result = read_json(out / "metrics" / "metrics.json")["models"]["abmil"]
    assert metrics["abmil.auc"] == pytest.approx(result["pooled"]["auc"])
    assert metrics["abmil.auc_ci_low"] == pytest.approx(result["ci"]["auc"][0])
    assert metrics["abmil.balanced_accuracy_ci_high"] == pytest.approx(result["ci"]["balanced_accuracy"][1])
    # sortable in the runs table: MLflow orders parents by the metric
    ordered = client.search_runs([status["experiment_id"]], filter_string="metrics.`abmil.auc` > -1",
                                 order_by=["metrics.`abmil.auc` DESC"])
    assert [r.info.run_id for r in ordered] == [status["run_id"]]
    # nested runs keep their names, test.*/val.* metrics, and the threshold with its source
    by_name = {r.info.run_name: r for r in runs}
    assert {"mil/abmil", "mil/abmil/fold0", "mil/abmil/fold2"} <= set(by_name)
    model = by_name["mil/abmil"].data
    assert model.params["threshold_source"] == result["threshold_source"] and "threshold" in model.params
    fold = by_name["mil/abmil/fold0"].data
    assert fold.params["threshold_source"] == result["folds"][0]["threshold_source"]
    assert float(fold.params["threshold"]) == pytest.approx(result["folds"][0]["threshold"])
    assert fold.params["best_epoch"] == "1"   # from the checkpoint
    assert fold.metrics["val.auc"] == pytest.approx(0.8) and fold.metrics["val.loss"] == pytest.approx(0.6)
    assert "test.auc" in fold.metrics


def test_every_model_run_has_the_cohort_as_a_dataset(logged):
    out, _config, status = logged
    _client, runs = _runs(out, status)
    model_runs = [r for r in runs if r.data.tags.get("histoflow.kind") in ("mil", "slide_classifier")]
    fold_runs = [r for r in runs if "histoflow.fold" in r.data.tags]
    assert model_runs and len(fold_runs) == 3
    for run in model_runs:
        (inp,) = run.inputs.dataset_inputs
        assert inp.dataset.name == "cohort" and [t.value for t in inp.tags] == ["cohort"]
    for run in fold_runs:
        contexts = {t.value: i.dataset for i in run.inputs.dataset_inputs for t in i.tags}
        assert set(contexts) == {"train", "val", "test"}
        test = json.loads(contexts["test"].profile)["num_rows"]
        assert test == 4   # the fold's test slides
    # what the dataset says about itself: columns, source; never a patient id or an absolute path
    ds = model_runs[0].inputs.dataset_inputs[0].dataset
    assert [c["name"] for c in json.loads(ds.schema)["mlflow_colspec"]] == ["slide_id", "patient_hash", "label", "md5"]
    assert json.loads(ds.source) == {"uri": "mlflow/export/cohort.tsv"}
    table = pd.read_csv(out / "mlflow" / "export" / "cohort.tsv", sep="\t", dtype=str)
    assert table["patient_hash"].str.startswith("pt_").all() and not set(table["patient_hash"]) & {f"p{i}" for i in range(12)}
    assert table.loc[table["slide_id"] == "s0", "md5"].item() == "0" * 32   # the downloaded file's md5


def test_the_same_cohort_has_the_same_digest_and_a_changed_one_does_not(logged, tmp_path):
    from histoflow.privacy import Exporter
    from histoflow.mlflow import _dataset_input, cohort_table

    out, config, status = logged
    again = log_workflow(str(out), config, "samples.tsv", str(tmp_path / "again.json"), force=True)
    assert again["run_id"] != status["run_id"]
    client = client_for(out)

    def digests(parent):
        runs = client.search_runs([status["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
        return sorted(i.dataset.digest for r in runs for i in r.inputs.dataset_inputs)

    first, second = digests(status["run_id"]), digests(again["run_id"])
    assert first and first == second
    exporter = Exporter(str(out), config, None)
    cohort = cohort_table(str(out), exporter)
    changed = cohort.copy()
    changed.loc[0, "label"] = "tumor" if changed.loc[0, "label"] == "normal" else "normal"
    assert _dataset_input(cohort, "cohort", "cohort").dataset.digest in first
    assert _dataset_input(changed, "cohort", "cohort").dataset.digest not in first


def test_each_mil_model_is_a_logged_pyfunc_that_predicts_a_slide(logged):
    import mlflow

    from histoflow.mil.data import read_bag
    from histoflow.mil.train import load_checkpoint, predict_proba
    from histoflow.mlflow_model import feature_frame

    out, _config, status = logged
    client, runs = _runs(out, status)
    model_run = next(r for r in runs if r.info.run_name == "mil/abmil" and r.data.tags["mlflow.parentRunId"] == status["run_id"])
    logged_models = [m for m in client.search_logged_models([status["experiment_id"]])
                     if m.source_run_id in {r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == status["run_id"]}]
    assert [m.name for m in logged_models] == ["histoflow-abmil"]   # one per MIL model
    (info,) = logged_models
    assert info.source_run_id == model_run.info.run_id
    assert [o.model_id for o in model_run.outputs.model_outputs] == [info.model_id]   # the Models column
    assert not {"mlflow.source.name", "mlflow.user"} & set(info.tags)   # no script path, no OS user
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{info.model_id}")
    assert model.metadata.signature is not None and model.metadata.saved_input_example_info
    bag = read_bag(out / "features" / "ssl-resnet-tiny" / "s3.parquet", dtype="float32")
    pred = model.predict(feature_frame(bag.features, "s3"))
    expected = np.mean([predict_proba(load_checkpoint(out / "mil" / "abmil" / f"fold{k}" / "checkpoint.pt")[0],
                                      [bag.features])[0] for k in range(3)])
    assert pred["slide_id"].tolist() == ["s3"] and pred["prob"].item() == pytest.approx(expected, abs=1e-6)
    assert pred["label"].item() in ("normal", "tumor")
    # the model's files name no local path (staged copies), and the registry is off by default
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{info.model_id}"))
    for path in local.rglob("*"):
        if path.is_file() and path.suffix in ("", ".json", ".yaml", ".txt", ".py"):
            text = path.read_text(errors="replace")
            if path.name == "MLmodel":   # MLflow writes the store's own artifact location there
                text = "\n".join(line for line in text.splitlines() if not line.startswith("artifact_path: "))
            assert str(out) not in text, path
    assert client.search_registered_models() == []


def test_register_models_and_system_metrics_when_asked(finished_outdir, tmp_path):
    from histoflow.mlflow import SYSTEM_METRICS_FILE, SystemMetrics

    out = tmp_path / "results"
    shutil.copytree(finished_outdir, out, ignore=shutil.ignore_patterns("mlflow*", "mlruns"))
    with SystemMetrics(out / "mil" / "abmil" / "fold0" / SYSTEM_METRICS_FILE, enabled=True, interval_s=0.05):
        time.sleep(0.3)
    with SystemMetrics(out / "mil" / "abmil" / "fold1" / SYSTEM_METRICS_FILE, enabled=False):
        pass
    assert not (out / "mil" / "abmil" / "fold1" / SYSTEM_METRICS_FILE).exists()   # off: nothing sampled
    config = config_for(out, register_models=True, system_metrics=True)
    status = log_workflow(str(out), config, "samples.tsv", str(out / "mlflow" / "logged.json"))
    client = client_for(out)
    (version,) = client.search_model_versions("name = 'histoflow-abmil'")
    assert str(version.version) == "1"
    fold0 = client.search_runs([status["experiment_id"]], filter_string="attributes.run_name = 'mil/abmil/fold0'")[0]
    history = client.get_metric_history(fold0.info.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and sorted(m.step for m in history)[:2] == [0, 1]


def test_external_cohort_metrics_and_the_task_reach_mlflow(tmp_path):
    """metrics.json external.<cohort>.<model> becomes parent metrics external.<cohort>.<model>.*
    and the model run's external.<cohort>.*; every model run names its task, loss and metrics
    (the binary default too)."""
    from histoflow.io import write_json
    from histoflow.mlflow import _model_runs, comparison_metrics

    rec = {"pooled": {"auc": 0.8}, "ci": {"auc": [0.6, 0.9]}, "n_slides": 4, "threshold_source": "pooled_validation"}
    ext = {"pooled": {"auc": 0.7}, "ci": {"auc": [0.5, 0.95]}, "n_slides": 3, "threshold_source": "pooled_validation"}
    metrics = {"models": {"mil-abmil": rec}, "external": {"site_b": {"mil-abmil": ext}}}
    flat = comparison_metrics(metrics)
    assert flat["external.site_b.mil-abmil.auc"] == 0.7 and flat["external.site_b.mil-abmil.auc_ci_high"] == 0.95
    assert flat["mil-abmil.auc"] == 0.8
    (tmp_path / "mil" / "abmil" / "fold0").mkdir(parents=True)
    write_json(tmp_path / "metrics" / "metrics.json", metrics)
    runs = _model_runs(str(tmp_path))
    assert runs[0]["external"] == {"site_b": ext}
    assert runs[0]["target"]["kind"] == "binary" and runs[0]["target"]["loss"] == "binary cross-entropy"
