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
# MLflow 3's experiment kind (the UI reads this tag): a training experiment opens on its runs,
# not on the GenAI traces overview
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# where the cohort dataset comes from, relative to {outdir} (never an absolute path)
COHORT_SOURCE = "mlflow/export/cohort.tsv"


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
    """The experiment's id, created as a model-training experiment; one made before (or by hand)
    without a kind gets it now. A kind someone chose in the UI is kept."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location or None,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def ui_path(experiment_id: str) -> str:
    """The experiment's page in the MLflow UI (after the server's address). MLflow 3's UI keeps a
    GenAI / Model training switch in the browser (GenAI unless changed) and opens an experiment
    on the GenAI overview under GenAI whatever its kind; asking for the Model training view lets
    the experiment's kind choose the tab: Training runs."""
    return f"#/experiments/{experiment_id}?workflowType=machine_learning"


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
    # every run says its task, loss and metrics (metrics.json has a target record for the
    # non-binary tasks; the binary default is described here)
    target = metrics.get("target") or {"type": "classification", "kind": "binary", "loss": "binary cross-entropy",
                                       "primary_metric": "auc"}
    for model_dir in sorted((out / "mil").glob("*")) if (out / "mil").is_dir() else []:
        if not model_dir.is_dir():
            continue
        folds = []
        for fold_dir in sorted(model_dir.glob("fold*"), key=lambda p: (len(p.name), p.name)):
            hist = fold_dir / "history.tsv"
            sysm = fold_dir / SYSTEM_METRICS_FILE
            folds.append({"fold": fold_dir.name, "history": pd.read_csv(hist, sep="\t") if hist.exists() else None,
                          "checkpoint": str(fold_dir / "checkpoint.pt") if (fold_dir / "checkpoint.pt").is_file() else None,
                          "system_metrics": pd.read_csv(sysm, sep="\t") if sysm.is_file() else None,
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
        # external cohorts (metrics.json external.<cohort>.<model>): this model's records
        run["external"] = {c: per_model[run["model"] if run["kind"] == "slide_classifier" else f"mil-{run['model']}"]
                           for c, per_model in (metrics.get("external") or {}).items()
                           if (run["model"] if run["kind"] == "slide_classifier" else f"mil-{run['model']}") in per_model}
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
            status.update(status="logged", run_id=complete[0].info.run_id, experiment_id=exp_id, note="already logged",
                          ui_path=ui_path(exp_id))
            write_json(status_json, status)
            return status
        # complete-or-redo: a parent without the complete tag was cut off part-way (job killed,
        # server gone); it is discarded with its nested runs and the result logged again
        for run in existing:
            if run.data.tags.get(COMPLETE_TAG) != "true":
                _discard_run(client, exp_id, run.info.run_id)
        items = collect_checklist(outdir, config, samples_path)
        parent = _log_parent(client, exp_id, items, config, key, outdir)
        exporter = Exporter(outdir, config, samples_path)   # privacy.export: what leaves the site
        cohort = cohort_table(outdir, exporter)
        options = {"tracking_uri": settings["tracking_uri"], "outdir": outdir, "cohort": cohort,
                   "splits": _splits(outdir), "register": bool((config.get("mlflow") or {}).get("register_models")),
                   "system_metrics": bool((config.get("mlflow") or {}).get("system_metrics"))}
        for spec in _model_runs(outdir):
            _log_model(client, exp_id, parent, exported_model_spec(spec, exporter), options)
        client.set_terminated(parent, "FINISHED")
        # last of all: only now does the result count as logged
        client.set_tag(parent, COMPLETE_TAG, "true")
        status.update(status="logged", run_id=parent, experiment_id=exp_id, result_key=key, ui_path=ui_path(exp_id),
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


def _log_parent(client, exp_id: str, items: list[ChecklistItem], config: dict, key: str, outdir: str) -> str:
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
    metrics.update(comparison_metrics(read_json(Path(outdir) / "metrics" / "metrics.json")
                                      if (Path(outdir) / "metrics" / "metrics.json").is_file() else {}))
    _log_batches(client, run_id, params=params, metrics=metrics, tags=tags)
    for it in items:
        for path in dict.fromkeys(it.artifacts):
            if Path(path).is_file():
                client.log_artifact(run_id, path, artifact_path=f"checklist/{it.key}")
    return run_id


def comparison_metrics(metrics: dict) -> dict[str, float]:
    """The model comparison as parent-run metrics ``<model>.<metric>`` (pooled test metrics and
    their CI bounds), so the runs table sorts models by any of them. MLflow keys allow no ``@``:
    ``rf@patch_classifier`` becomes ``rf_patch_classifier`` (as in the c11.* metrics)."""
    out: dict[str, float] = {}
    for model, res in (metrics.get("models") or {}).items():
        out.update(_pooled_and_ci(res, f"{_key(model)}."))
    # external cohorts: external.<cohort>.<model>.<metric> (and CI bounds)
    for cohort, per_model in (metrics.get("external") or {}).items():
        for model, res in per_model.items():
            out.update(_pooled_and_ci(res, f"external.{_key(cohort)}.{_key(model)}."))
    return out


def _pooled_and_ci(res: dict, prefix: str) -> dict[str, float]:
    out = {f"{prefix}{k}": v for k, v in (res.get("pooled") or {}).items()}
    for k, (lo, hi) in (res.get("ci") or {}).items():
        out[f"{prefix}{k}_ci_low"], out[f"{prefix}{k}_ci_high"] = lo, hi
    return out


# ------------------------------------------------------------------------------ datasets

def _splits(outdir: str) -> pd.DataFrame | None:
    path = Path(outdir) / "splits" / "splits.tsv"
    return pd.read_csv(path, sep="\t", dtype={"slide_id": str, "patient_id": str}) if path.is_file() else None


def cohort_table(outdir: str, exporter: Exporter) -> pd.DataFrame:
    """The cohort as MLflow datasets carry it, whatever ``privacy.export`` says: slide id, salted
    patient hash, label and md5 (of the downloaded file, else the sheet's), sorted by slide, never
    a path, URL or patient id. Written to ``{outdir}/mlflow/export/cohort.tsv``, the dataset's
    (relative) source. The same cohort in the same output folder gives the same digest."""
    from .io import write_tsv

    sheet = exporter.sheet()
    base = sheet if len(sheet) else _splits(outdir)
    if base is None or not len(base):
        base = pd.DataFrame(columns=["slide_id", "patient_id", "label"])
    base = base.drop_duplicates("slide_id")
    md5 = {}
    for manifest in sorted((Path(outdir) / "downloads").glob("*.json")):
        try:
            m = read_json(manifest)
        except ValueError:
            continue
        if isinstance(m, dict) and m.get("md5") and m.get("slide_id"):
            md5[str(m["slide_id"])] = str(m["md5"])
    sheet_md5 = base["md5"] if "md5" in base else pd.Series([""] * len(base), index=base.index)
    table = pd.DataFrame({
        "slide_id": base["slide_id"].astype(str),
        "patient_hash": [exporter.patient(p) for p in base["patient_id"]],
        "label": base["label"].astype(str),
        "md5": [md5.get(str(s)) or (str(v) if isinstance(v, str) else "") for s, v in zip(base["slide_id"], sheet_md5)],
    }).sort_values("slide_id", kind="stable").reset_index(drop=True)
    write_tsv(Path(outdir) / COHORT_SOURCE, table)
    return table


def _dataset_input(table: pd.DataFrame, name: str, context: str):
    """An ``mlflow.data`` pandas dataset (schema, profile, digest of its rows) as a run input
    with its context (train / val / test / cohort), what ``mlflow.log_input`` logs."""
    import warnings

    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "source resolved to a local file": relative on purpose
        dataset = mlflow.data.from_pandas(table.reset_index(drop=True), source=COHORT_SOURCE, name=name, targets="label")
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def _fold_inputs(options: dict, fold: str) -> list:
    cohort, splits = options["cohort"], options["splits"]
    if splits is None or "fold" not in splits or not fold.startswith("fold"):
        return []
    part = splits[splits["fold"].astype(str) == fold[4:]]
    inputs = []
    for role in ("train", "val", "test"):
        slides = set(part.loc[part["role"] == role, "slide_id"].astype(str))
        if slides:
            rows = cohort[cohort["slide_id"].isin(slides)]
            inputs.append(_dataset_input(rows, f"cohort-{fold}-{role}", role))
    return inputs


# ------------------------------------------------------------------------------ models

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


def _input_example(outdir: str, checkpoint: str, n_tiles: int = 4) -> pd.DataFrame | None:
    """A few tiles of one slide of the run (the first with features), as the model's input."""
    import torch

    from .mil.data import feature_slug, read_bag
    from .mlflow_model import feature_frame

    meta = torch.load(checkpoint, map_location="cpu", weights_only=True)
    folder = Path(outdir) / "features" / feature_slug(str(meta.get("encoder", "")))
    for path in sorted(folder.glob("*.parquet")):
        bag = read_bag(path, dtype="float32")
        if len(bag):
            return feature_frame(bag.features[:n_tiles], bag.slide_id)
    return None


def log_slide_model(tracking_uri: str, run_id: str, model: str, checkpoints: list[str], result: dict,
                    classes: list[str], input_example: pd.DataFrame | None, register: bool = False) -> str:
    """Log a trained MIL model (its fold checkpoints, or a model bundle's) as an MLflow pyfunc of
    run ``run_id``: models-from-code (``histoflow/mlflow_model.py``), the weights as artifacts,
    a signature and input example; ``register`` registers it as ``histoflow-<model>``. Returns
    the model URI."""
    import json
    import os
    import shutil
    import tempfile
    import warnings

    import mlflow
    import numpy
    import torch

    from . import __file__ as package_init

    previous = mlflow.get_tracking_uri()
    with tempfile.TemporaryDirectory(prefix="histoflow-model-") as tmp:
        # MLflow records each file's local path in MLmodel: staged copies under neutral names
        # keep the output folder's path (and anything in it) out of the export
        stage = Path(tmp)
        meta = {"model": model, "threshold": result.get("threshold", 0.5),
                "threshold_source": result.get("threshold_source", "fixed"), "classes": classes,
                "n_models": len(checkpoints), "output": "mean probability of the fold models"}
        (stage / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        artifacts = {"meta": str(stage / "meta.json")}
        for i, path in enumerate(checkpoints):
            shutil.copyfile(path, stage / f"fold{i}.pt")
            artifacts[f"fold{i}"] = str(stage / f"fold{i}.pt")
        shutil.copyfile(MODEL_CODE, stage / "python_model.py")
        shutil.copytree(Path(package_init).parent, stage / "histoflow", ignore=shutil.ignore_patterns("__pycache__"))
        requirements = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                        f"numpy=={numpy.__version__}", f"pandas=={pd.__version__}"]
        mlflow.set_tracking_uri(tracking_uri)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        try:
            with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
                warnings.simplefilter("ignore")   # integer output column, non-writable example array
                info = mlflow.pyfunc.log_model(
                    name=f"histoflow-{model}", python_model=str(stage / "python_model.py"), artifacts=artifacts,
                    code_paths=[str(stage / "histoflow")],   # the package, so loading needs no install
                    input_example=input_example, pip_requirements=requirements,
                    registered_model_name=f"histoflow-{model}" if register else None,
                    tags={"histoflow.model": model, "histoflow.threshold_source": str(meta["threshold_source"])})
        finally:
            mlflow.set_tracking_uri(previous)
        # the fluent API tags the model with the logging script's path and the OS user
        client = mlflow.MlflowClient(tracking_uri)
        for tag in ("mlflow.source.name", "mlflow.user", "mlflow.source.git.commit", "mlflow.source.git.repoURL"):
            if tag in (client.get_logged_model(info.model_id).tags or {}):
                client.delete_logged_model_tag(info.model_id, tag)
    return info.model_uri


# ------------------------------------------------------------------------------ system metrics

SYSTEM_METRICS_FILE = "system_metrics.tsv"


class SystemMetrics:
    """``with SystemMetrics(path, enabled):`` samples CPU, memory, disk (and GPU where MLflow's
    monitor finds one) every ``interval_s`` into a TSV while a long job runs; `mlflow_log` logs
    it as ``system/*`` metrics of the job's run (the UI's System metrics tab). Jobs never write
    to MLflow themselves (one writer, see above). Uses MLflow's own monitors, which need psutil;
    where either is missing it logs one line and samples nothing."""

    def __init__(self, path: str | Path, enabled: bool = False, interval_s: float = 10.0):
        self.path, self.enabled, self.interval_s = Path(path), bool(enabled), float(interval_s)
        self.rows: list[dict] = []
        self._thread = None

    @classmethod
    def beside(cls, output: str | Path, enabled: bool = False) -> "SystemMetrics":
        """Sampling into :data:`SYSTEM_METRICS_FILE` in the folder of a job's ``output``."""
        return cls(Path(output).parent / SYSTEM_METRICS_FILE, enabled)

    def _monitors(self) -> list:
        try:
            from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
            from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        except ImportError as err:   # mlflow or psutil not in this job's environment
            try:
                return [_PsutilMonitor()]
            except ImportError:
                log.warning("mlflow.system_metrics is on but not sampled here: %s", err)
                return []
        monitors = [CPUMonitor(), DiskMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            monitors.append(GPUMonitor())
        except Exception:   # no pynvml or no GPU
            pass
        return monitors

    def _sample(self, monitors: list, step: int) -> None:
        row: dict = {"step": step, "timestamp_ms": int(time.time() * 1000)}
        for monitor in monitors:
            monitor.clear_metrics()
            monitor.collect_metrics()
            row.update(monitor.aggregate_metrics())
        self.rows.append(row)

    def __enter__(self):
        if not self.enabled:
            return self
        import threading

        monitors = self._monitors()
        if not monitors:
            return self
        self._stop = threading.Event()

        def loop():
            step = 0
            while True:
                self._sample(monitors, step)
                step += 1
                if self._stop.wait(self.interval_s):
                    break

        self._thread = threading.Thread(target=loop, name="system-metrics", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=30)
        from .io import write_tsv

        write_tsv(self.path, pd.DataFrame(self.rows))


class _PsutilMonitor:
    """CPU and memory under MLflow's metric names, where psutil is installed but MLflow is not
    (the training jobs' conda environment)."""

    def __init__(self):
        import psutil

        self.psutil, self.row = psutil, {}

    def clear_metrics(self) -> None:
        self.row = {}

    def collect_metrics(self) -> None:
        mem = self.psutil.virtual_memory()
        self.row = {"cpu_utilization_percentage": self.psutil.cpu_percent(),
                    "system_memory_usage_megabytes": mem.used / 1e6,
                    "system_memory_usage_percentage": mem.used / mem.total * 100}

    def aggregate_metrics(self) -> dict:
        return {k: round(v, 1) for k, v in self.row.items()}


def _system_metric_list(frame: pd.DataFrame | None) -> list:
    from mlflow.entities import Metric

    if frame is None or "step" not in frame:
        return []
    out = []
    for col in frame.columns:
        if col in ("step", "timestamp_ms") or not pd.api.types.is_numeric_dtype(frame[col]):
            continue
        out += [Metric(f"system/{_key(col)}", float(v), int(t), int(s))
                for v, t, s in zip(frame[col], frame["timestamp_ms"], frame["step"]) if v == v]
    return out


# ------------------------------------------------------------------------------ nested runs

def _log_model(client, exp_id: str, parent: str, spec: dict, options: dict | None = None) -> None:
    options = options or {}
    run = client.create_run(exp_id, run_name=spec["name"],
                            tags={"mlflow.parentRunId": parent, "histoflow.kind": spec["kind"], "histoflow.model": spec["model"]})
    run_id = run.info.run_id
    metrics = {}
    result = spec.get("result") or {}
    metrics.update(_pooled_and_ci(result, "test."))
    params = {"model": spec["model"], "kind": spec["kind"]}
    if spec.get("target"):  # the task, its loss and headline metric
        params.update({f"target.{k}": (json.dumps(v) if isinstance(v, list) else v) for k, v in spec["target"].items()})
    if result.get("pooled"):   # which metrics the test.* (and external.*) values are
        params["metrics"] = ", ".join(result["pooled"])
    for cohort, res in (spec.get("external") or {}).items():   # the same model on each external cohort
        metrics.update(_pooled_and_ci(res, f"external.{_key(cohort)}."))
        params.update({f"external.{_key(cohort)}.{k}": res[k] for k in ("n_slides", "n_patients", "threshold_source")
                       if k in res})
    # where the operating point came from, as metrics.json says (pooled_validation, fold_validation, fixed)
    params.update({k: result[k] for k in ("threshold", "threshold_source", "n_slides", "n_patients", "ci_method") if k in result})
    _log_batches(client, run_id, params=params, metrics=metrics)
    if options.get("cohort") is not None:
        client.log_inputs(run_id, [_dataset_input(options["cohort"], "cohort", "cohort")])
    for path in spec["artifacts"]:
        client.log_artifact(run_id, path)
    fold_results = {f"fold{f['fold']}": f for f in (result.get("folds") or [])}
    for fold in spec["folds"]:
        child = client.create_run(exp_id, run_name=f"{spec['name']}/{fold['fold']}",
                                  tags={"mlflow.parentRunId": run_id, "histoflow.fold": fold["fold"]})
        steps = []
        hist = fold["history"]
        fm, fp = {}, {}
        if hist is not None and "epoch" in hist:
            for col in hist.columns:
                if col != "epoch" and pd.api.types.is_numeric_dtype(hist[col]):
                    steps += [(col, float(v), int(e)) for e, v in zip(hist["epoch"], hist[col])]
            best = _best_epoch(fold.get("checkpoint"), hist)
            if best is not None:   # validation metrics of the epoch whose weights were kept
                row = hist.loc[hist["epoch"] == best].iloc[0]
                fm.update({f"val.{c[4:]}": row[c] for c in hist.columns if c.startswith("val_")})
                fp["best_epoch"] = best
        fold_result = fold_results.get(fold["fold"], {})
        fm.update({f"test.{k}": v for k, v in fold_result.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("fold", "threshold")})
        fp.update({k: fold_result[k] for k in ("threshold", "threshold_source", "n_test", "n_val_pos", "n_val_neg")
                   if k in fold_result})
        _log_batches(client, child.info.run_id, params=fp, metrics=fm, step_metrics=steps)
        if options.get("system_metrics"):
            sysm = _system_metric_list(fold.get("system_metrics"))
            for i in range(0, len(sysm), 1000):
                client.log_batch(child.info.run_id, metrics=sysm[i:i + 1000])
        if options.get("cohort") is not None:
            client.log_inputs(child.info.run_id, _fold_inputs(options, fold["fold"]))
        for path in fold["artifacts"]:
            client.log_artifact(child.info.run_id, path)
        client.set_terminated(child.info.run_id, "FINISHED")
    checkpoints = [f["checkpoint"] for f in spec["folds"] if f.get("checkpoint")]
    if spec["kind"] == "mil" and checkpoints and options.get("tracking_uri"):
        example = _input_example(options["outdir"], checkpoints[0])
        uri = log_slide_model(options["tracking_uri"], run_id, spec["model"], checkpoints, result,
                              _classes(options.get("splits")), example, register=options.get("register", False))
        client.set_tag(run_id, "histoflow.model_uri", uri)
    client.set_terminated(run_id, "FINISHED")


def _best_epoch(checkpoint: str | None, hist: pd.DataFrame) -> int | None:
    """The epoch early stopping kept: the checkpoint says; without one, the lowest val_loss."""
    if checkpoint:
        import torch

        best = torch.load(checkpoint, map_location="cpu", weights_only=True).get("best_epoch")
        if best is not None and (hist["epoch"] == int(best)).any():
            return int(best)
    if "val_loss" in hist and hist["val_loss"].notna().any():
        return int(hist.loc[hist["val_loss"].idxmin(), "epoch"])
    return None


def _classes(splits: pd.DataFrame | None) -> list[str]:
    """Class names by label index (y = 0, 1), from the splits table."""
    if splits is None or "y" not in splits or "label" not in splits:
        return ["0", "1"]
    names = splits.drop_duplicates("y").set_index("y")["label"].astype(str)
    return [names.get(0, "0"), names.get(1, "1")]
