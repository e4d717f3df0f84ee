"""MLflow audit trail: one parent run per workflow result, nested runs per model and fold, and
every checklist item as params, metrics, tags and artifacts.

Why one writer: Snakemake runs per-slide and per-fold jobs in parallel (and on SLURM, on other
machines). Those jobs write files only; a single `mlflow_log` job at the end reads them back and
logs. Nothing can be lost or corrupted by concurrent writers, a fresh SQLite store is never raced,
and when a remote tracking server is unreachable the results on disk stay complete and
`snakemake mlflow_sync` logs them later (idempotently: a result already logged is not logged twice;
one whose logging was cut off part-way, which lacks the `histoflow.complete` tag, is deleted and
logged again).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import pandas as pd

from .checklist import ChecklistItem, collect_checklist, redact, redact_url
from .io import read_json, write_json
from .privacy import Exporter, exported_config, exported_model_spec
from .logs import get_logger

log = get_logger(__name__)
MAX_PARAM_CHARS = 500
# set on the parent run after its last nested run: a parent without it is incomplete (redo)
COMPLETE_TAG = "histoflow.complete"


def store_settings(outdir: str, config: dict) -> dict[str, str]:
    """Tracking URI and artifact location: config `mlflow.tracking_uri`, else an embedded SQLite
    store `{outdir}/mlflow.db` with artifacts in `{outdir}/mlruns`."""
    section = config.get("mlflow") or {}
    out = Path(outdir).resolve()
    if section.get("tracking_uri"):
        # a server decides where artifacts go (--artifacts-destination) unless the config says
        uri, artifacts = section["tracking_uri"], section.get("artifact_location") or ""
    else:
        uri, artifacts = f"sqlite:///{out / 'mlflow.db'}", (out / "mlruns").as_uri()
    return {"tracking_uri": uri, "artifact_location": artifacts, "experiment": section.get("experiment", "histoflow")}


def _client(uri: str):
    """A client; for a server, check it answers first (MLflow's own retries take minutes)."""
    import os

    from mlflow.tracking import MlflowClient

    if uri.startswith(("http://", "https://")):
        import requests

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location or None)
    except Exception:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def init_store(outdir: str, config: dict, out_json: str) -> None:
    """Rule `mlflow_init`: create the store's schema and the experiment once, before any parallel
    work, and record where it is. An unreachable remote server is recorded, not fatal."""
    settings = store_settings(outdir, config)
    record = {"tracking_uri": redact_url(settings["tracking_uri"]), "experiment": settings["experiment"]}
    try:
        if settings["tracking_uri"].startswith("sqlite:///"):
            Path(settings["tracking_uri"][len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        client = _client(settings["tracking_uri"])
        record["experiment_id"] = ensure_experiment(client, settings["experiment"], settings["artifact_location"])
        record["status"] = "ready"
    except Exception as err:
        log.warning("MLflow store %s not reachable (%s); results stay on disk, run `snakemake mlflow_sync` later",
                    record["tracking_uri"], type(err).__name__)
        record["status"] = "unreachable"
        record["reason"] = redact_url(str(err).splitlines()[0][:300]) if str(err) else type(err).__name__
    write_json(out_json, record)


def _key(text: str) -> str:
    """MLflow keys allow letters, digits, _ - . / and space."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)[:250]


def _value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def _log_batches(client, run_id: str, params: dict | None = None, metrics: dict | None = None,
                 tags: dict | None = None, step_metrics: list[tuple[str, float, int]] | None = None) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    plist = [Param(_key(k), _value(v)) for k, v in (params or {}).items()]
    mlist = [Metric(_key(k), float(v), now, 0) for k, v in (metrics or {}).items() if v is not None and v == v]
    mlist += [Metric(_key(k), float(v), now, int(s)) for k, v, s in (step_metrics or []) if v is not None and v == v]
    tlist = [RunTag(_key(k), _value(v)) for k, v in (tags or {}).items()]
    for i in range(0, max(len(plist), 1), 100):
        client.log_batch(run_id, params=plist[i:i + 100])
    for i in range(0, len(mlist), 1000):
        client.log_batch(run_id, metrics=mlist[i:i + 1000])
    if tlist:
        client.log_batch(run_id, tags=tlist)


def result_key(outdir: str) -> str:
    """Identity of a workflow result: the metrics, splits and config it came from. Re-logging the
    same result (mlflow_sync after a logged run) is a no-op."""
    h = hashlib.sha256(str(Path(outdir).resolve()).encode())
    for name in ("metrics/metrics.json", "splits/splits.tsv", "qc/slides.tsv"):
        p = Path(outdir) / name
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:24]


def _model_runs(outdir: str) -> list[dict]:
    """Models to log as nested runs: MIL models (per-fold history) and classic slide classifiers."""
    out = Path(outdir)
    metrics = read_json(out / "metrics" / "metrics.json") if (out / "metrics" / "metrics.json").exists() else {}
    runs = []
    target = metrics.get("target")
    for model_dir in sorted((out / "mil").glob("*")) if (out / "mil").is_dir() else []:
        if not model_dir.is_dir():
            continue
        folds = []
        for fold_dir in sorted(model_dir.glob("fold*")):
            hist = fold_dir / "history.tsv"
            folds.append({"fold": fold_dir.name, "history": pd.read_csv(hist, sep="\t") if hist.exists() else None,
                          "artifacts": [str(p) for p in (fold_dir / "history.tsv", fold_dir / "predictions.tsv") if p.exists()]})
        runs.append({"name": f"mil/{model_dir.name}", "model": model_dir.name, "kind": "mil", "folds": folds,
                     "result": metrics.get("models", {}).get(model_dir.name) or metrics.get("models", {}).get(f"mil-{model_dir.name}"),
                     "artifacts": [str(p) for p in (model_dir / "curves.png", model_dir / "predictions.tsv") if p.exists()]})
    for pred in sorted((out / "slide_classifier").glob("*/*/predictions.tsv")) if (out / "slide_classifier").is_dir() else []:
        name = f"{pred.parent.name}@{pred.parent.parent.name}"
        runs.append({"name": f"slide_classifier/{name}", "model": name, "kind": "slide_classifier", "folds": [],
                     "result": metrics.get("models", {}).get(name),
                     "artifacts": [str(p) for p in pred.parent.glob("*.tsv")]})
    for run in runs:
        run["target"] = target
    return runs


def log_workflow(outdir: str, config: dict, samples_path: str, status_json: str, force: bool = False) -> dict:
    """Rule `mlflow_log` (and `mlflow_sync`): log the finished result. Never raises on an
    unreachable server: the status file says `pending` and why."""
    settings = store_settings(outdir, config)
    status: dict[str, Any] = {"tracking_uri": redact_url(settings["tracking_uri"]), "experiment": settings["experiment"]}
    key = result_key(outdir)
    try:
        client = _client(settings["tracking_uri"])
        exp_id = ensure_experiment(client, settings["experiment"], settings["artifact_location"])
        existing = client.search_runs([exp_id], filter_string=f"tags.`histoflow.result_key` = '{key}'", max_results=100)
        complete = [r for r in existing if r.data.tags.get(COMPLETE_TAG) == "true"]
        if complete and not force:
            status.update(status="logged", run_id=complete[0].info.run_id, experiment_id=exp_id, note="already logged")
            write_json(status_json, status)
            return status
        # complete-or-redo: a parent without the complete tag was cut off part-way (job killed,
        # server gone); it is discarded with its nested runs and the result logged again
        for run in existing:
            if run.data.tags.get(COMPLETE_TAG) != "true":
                _discard_run(client, exp_id, run.info.run_id)
        items = collect_checklist(outdir, config, samples_path)
        parent = _log_parent(client, exp_id, items, config, key)
        exporter = Exporter(outdir, config, samples_path)   # privacy.export: what leaves the site
        for spec in _model_runs(outdir):
            _log_model(client, exp_id, parent, exported_model_spec(spec, exporter))
        client.set_terminated(parent, "FINISHED")
        # last of all: only now does the result count as logged
        client.set_tag(parent, COMPLETE_TAG, "true")
        status.update(status="logged", run_id=parent, experiment_id=exp_id, result_key=key,
                      items_logged=[it.key for it in items])
        log.info("logged run %s in experiment %s at %s", parent, settings["experiment"], status["tracking_uri"])
    except Exception as err:
        if settings["tracking_uri"].startswith("sqlite:"):
            raise  # a local store that fails is a real error, not a network hiccup
        log.warning("MLflow server unreachable (%s): results are complete on disk; run `snakemake mlflow_sync` later",
                    type(err).__name__)
        status.update(status="pending", reason=redact_url(str(err).splitlines()[0][:300]) if str(err) else type(err).__name__,
                      result_key=key)
    write_json(status_json, status)
    return status


def _discard_run(client, exp_id: str, run_id: str) -> None:
    """Mark an incomplete run FAILED and delete it with every run nested under it (children
    first), so nothing half-logged is left that could look like the result."""
    children = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=1000)
    for child in children:
        _discard_run(client, exp_id, child.info.run_id)
    log.warning("MLflow run %s was logged only in part (no %s tag); deleting it and logging again", run_id, COMPLETE_TAG)
    client.set_terminated(run_id, "FAILED")
    client.delete_run(run_id)


def _log_parent(client, exp_id: str, items: list[ChecklistItem], config: dict, key: str) -> str:
    from .checklist import flatten

    run = client.create_run(exp_id, run_name=f"histoflow {time.strftime('%Y-%m-%d %H:%M')}",
                            tags={"histoflow.result_key": key, "histoflow.kind": "workflow"})
    run_id = run.info.run_id
    params, metrics, tags = {}, {}, {}
    for it in items:
        prefix = f"c{it.number:02d}"
        params.update({f"{prefix}.{k}": v for k, v in it.params.items()})
        metrics.update({f"{prefix}.{k}": v for k, v in it.metrics.items()})
        tags[f"checklist.{it.key}"] = " ".join(it.summary)[:MAX_PARAM_CHARS] or "logged"
    params.update({f"config.{k}": v for k, v in flatten("", exported_config(config)).items()})
    _log_batches(client, run_id, params=params, metrics=metrics, tags=tags)
    for it in items:
        for path in dict.fromkeys(it.artifacts):
            if Path(path).is_file():
                client.log_artifact(run_id, path, artifact_path=f"checklist/{it.key}")
    return run_id


def _log_model(client, exp_id: str, parent: str, spec: dict) -> None:
    run = client.create_run(exp_id, run_name=spec["name"],
                            tags={"mlflow.parentRunId": parent, "histoflow.kind": spec["kind"], "histoflow.model": spec["model"]})
    run_id = run.info.run_id
    metrics = {}
    result = spec.get("result") or {}
    metrics.update({f"test.{k}": v for k, v in (result.get("pooled") or {}).items()})
    for k, (lo, hi) in (result.get("ci") or {}).items():
        metrics[f"test.{k}_ci_low"], metrics[f"test.{k}_ci_high"] = lo, hi
    params = {"model": spec["model"], "kind": spec["kind"]}
    if spec.get("target"):  # multi-class, survival, regression: the task, its loss and headline metric
        params.update({f"target.{k}": (json.dumps(v) if isinstance(v, list) else v) for k, v in spec["target"].items()})
    # where the operating point came from, as metrics.json says (pooled_validation, fold_validation, fixed)
    params.update({k: result[k] for k in ("threshold", "threshold_source", "n_slides", "n_patients", "ci_method") if k in result})
    _log_batches(client, run_id, params=params, metrics=metrics)
    for path in spec["artifacts"]:
        client.log_artifact(run_id, path)
    fold_results = {f"fold{f['fold']}": f for f in (result.get("folds") or [])}
    for fold in spec["folds"]:
        child = client.create_run(exp_id, run_name=f"{spec['name']}/{fold['fold']}",
                                  tags={"mlflow.parentRunId": run_id, "histoflow.fold": fold["fold"]})
        steps = []
        hist = fold["history"]
        if hist is not None and "epoch" in hist:
            for col in hist.columns:
                if col != "epoch" and pd.api.types.is_numeric_dtype(hist[col]):
                    steps += [(col, float(v), int(e)) for e, v in zip(hist["epoch"], hist[col])]
        fm = {f"test.{k}": v for k, v in fold_results.get(fold["fold"], {}).items() if isinstance(v, (int, float))}
        _log_batches(client, child.info.run_id, metrics=fm, step_metrics=steps)
        for path in fold["artifacts"]:
            client.log_artifact(child.info.run_id, path)
        client.set_terminated(child.info.run_id, "FINISHED")
    client.set_terminated(run_id, "FINISHED")
