"""The 11-item WSI analysis checklist: what was done, with which parameters, read back from the
files the workflow wrote. One collector feeds both `checklist.md` and MLflow, so the report and
the audit trail can never disagree."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from glob import glob
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from .config import REPO_ROOT

TITLES = {
    1: "Hardware and software", 2: "Data source", 3: "Data splitting", 4: "Stain normalisation",
    5: "Background removal (tissue detection)", 6: "Patch extraction and augmentation",
    7: "Patch labelling", 8: "Patch classifier", 9: "Slide classifier (aggregation)",
    10: "Lesion detection", 11: "Performance metrics",
}
PACKAGES = ("snakemake", "torch", "torchvision", "timm", "openslide-python", "openslide-bin", "pyvips",
            "scikit-learn", "scikit-image", "shapely", "numpy", "pandas", "pyarrow", "mlflow")
SECRET_KEY = re.compile(r"(token|secret|password|passwd|credential|api[_-]?key)", re.I)


@dataclass
class ChecklistItem:
    number: int
    title: str
    summary: list[str] = field(default_factory=list)      # sentences for checklist.md
    params: dict[str, Any] = field(default_factory=dict)   # flat, logged as MLflow params
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)     # files to attach

    @property
    def key(self) -> str:
        return f"{self.number:02d}_" + re.sub(r"[^a-z0-9]+", "_", self.title.lower()).strip("_")


def redact(value: Any, key: str = "") -> Any:
    """Secrets never reach params, tags or artifacts: values under secret-looking keys are
    replaced (names of variables/files that *hold* a secret are kept) and URLs lose credentials."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if key and SECRET_KEY.search(key) and not key.endswith(("_env", "_file")) and value not in (None, ""):
        return "***"
    if isinstance(value, str):
        return redact_url(value)
    return value


def redact_url(text: str) -> str:
    text = re.sub(r"(https?://)[^/@\s]+@", r"\1***@", text)
    return re.sub(r"([?&](?:token|sig|signature|key|X-Amz-Signature|X-Amz-Credential)=)[^&\s]+", r"\1***", text, flags=re.I)


def flatten(prefix: str, value: Any, out: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {} if out is None else out
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return out


def _read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _ci_label(mj: dict) -> str:
    """The CI level of metrics.json (config metrics.ci), e.g. ``95%``."""
    return f"{100 * float((mj.get('settings') or {}).get('ci', 0.95)):g}%"


def _target_words(cfg: dict) -> str | None:
    """Checklist item 9's line on the task, loss and outputs (every target type)."""
    target = cfg.get("target") or {}
    kind = target.get("type", "classification")
    if kind == "classification" and (target.get("classes") is None or len(target.get("classes") or ()) == 2):
        return (f"Task: binary classification ({cfg.get('positive_label', 'tumor')} vs every other label); MIL heads give "
                "one logit, binary cross-entropy loss; slide classifiers binary; predictions prob, thresholded at each "
                "model's threshold_source in metrics.json (validation predictions, or the fixed threshold; never "
                "training or test predictions).")
    if kind == "classification":
        return ("Task: multi-class classification (classes in metrics.json target.classes); MIL heads give one logit "
                "per class, softmax cross-entropy loss; slide classifiers multi-class; predictions prob_<class>, argmax pred.")
    if kind == "survival":
        return (f"Task: survival (time {target.get('time_column', 'time')}, event {target.get('event_column', 'event')}); "
                f"MIL heads give one risk, negative Cox partial log-likelihood over batches of {target.get('survival_batch', 32)} "
                "bags (risk sets within a batch); slide models on slide features from scikit-survival (rf: random "
                "survival forest, gb: boosted Cox, logreg: ridge-penalised Cox); predictions risk.")
    loss = "Huber" if target.get("loss") == "huber" else "mean squared error"
    return (f"Task: regression of the numeric label; MIL heads give one value, {loss} "
            "loss on the value standardised with the training slides' mean/SD; slide regressors rf/gb/ridge.")


def _files(pattern: str) -> list[str]:
    return sorted(glob(pattern, recursive=True))


def hardware_software() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        ram_gb = float("nan")
    gpus = []
    try:
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:   # per-rule conda envs: the checklist's own (envs/report.yaml) has no torch
        gpus = ["not detected (no torch in the checklist job's environment)"]
    except Exception:  # a broken CUDA install must not stop the audit
        pass
    versions = {}
    pins = _env_pins()
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            # per-rule conda envs: the version the rules that use it were given
            versions[name] = pins.get(name, "absent")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", False
    return {"cpu_model": cpu, "cpu_cores": os.cpu_count(), "ram_gb": round(ram_gb, 1),
            "gpus": gpus or ["none"], "python": sys.version.split()[0], "platform": platform.platform(),
            "workflow_commit": commit, "workflow_dirty": dirty, "versions": versions}


def _encoder_resolution(it: "ChecklistItem", cfg: dict) -> None:
    """A named foundation encoder tiles at the µm/px it was trained at unless the config says
    otherwise (histoflow.config._encoder_mpp): the record says which it was."""
    from .encoders import trained_mpp

    features = cfg.get("features", {})
    named = {e: m for e in features.get("encoders") or () if (m := trained_mpp(str(e))) is not None}
    if not named:
        return
    mpp = float(features.get("mpp"))
    for name, trained in named.items():
        it.params[f"features.trained_mpp.{name}"] = trained
    same = [n for n, m in named.items() if abs(mpp - m) <= 0.1 * m]
    other = [f"{n} (trained at {m} µm/px)" for n, m in named.items() if n not in same]
    it.summary.append(f"Features at {mpp} µm/px: " + "; ".join(
        ([f"the resolution {', '.join(same)} was trained at (histoflow encoders), used unless the config sets another"]
         if same else [])
        + ([f"set by the config, not the resolution of {', '.join(other)}"] if other else [])) + ".")


def _published_vs_run(it: "ChecklistItem", cfg: dict, mj: dict, out: Path) -> None:
    """Item 11: each published figure of the config (a preset's `published`) beside this run's
    value and 95 % CI (histoflow.presets.compare_published)."""
    from .presets import compare_published, format_row

    if cfg.get("preset"):
        it.params["preset"] = cfg["preset"]
    if not cfg.get("published"):
        return
    lesions = {Path(p).parent.name: _read_json(p) for p in _files(str(out / "lesions" / "*" / "metrics.json"))}
    rows = compare_published(cfg["published"], mj, lesions)
    for i, row in enumerate(rows):
        key = f"published.{i}.{row['model']}.{row['metric']}"
        it.metrics[key] = float(row["published"])
        if row["value"] is not None:
            it.metrics[f"{key}.this_run"] = float(row["value"])
        if row["inside"] is not None:
            it.metrics[f"{key}.inside_ci"] = float(row["inside"])
    it.summary.append(f"Published vs this run{' (preset ' + cfg['preset'] + ')' if cfg.get('preset') else ''}: "
                      + "; ".join(format_row(r, _ci_label(mj)) for r in rows) + ".")
def _env_pins() -> dict[str, str]:
    """Package -> ``<version> (envs/<file>)`` for the pip pins of the per-rule conda envs."""
    import yaml

    pins: dict[str, str] = {}
    for env_file in sorted((REPO_ROOT / "envs").glob("*.yaml")):
        try:
            deps = yaml.safe_load(env_file.read_text()).get("dependencies", [])
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        for dep in deps:
            for spec in dep.get("pip", []) if isinstance(dep, dict) else []:
                name, _, version = str(spec).partition("==")
                if version:
                    pins.setdefault(name.strip().lower(), f"{version} (envs/{env_file.name})")
    return pins


def collect_checklist(outdir: str, config: dict, samples_path: str) -> list[ChecklistItem]:
    """Read every stage's outputs under ``outdir`` and describe the 11 checklist items."""
    from .privacy import Exporter, deidentify_config

    out = Path(outdir)
    # privacy.export: what the checklist and MLflow carry (histoflow/privacy.py)
    exporter = Exporter(outdir, config, samples_path)
    cfg = redact(config) if exporter.full else deidentify_config(config)
    items = {n: ChecklistItem(n, t) for n, t in TITLES.items()}

    # 1 hardware / software
    hw = hardware_software()
    it = items[1]
    it.params = flatten("", {k: v for k, v in hw.items() if k != "versions"})
    it.params.update({f"version.{k}": v for k, v in hw["versions"].items()})
    it.summary.append(f"CPU {hw['cpu_model']} ({hw['cpu_cores']} cores), {hw['ram_gb']} GB RAM, GPU: {', '.join(hw['gpus'])}.")
    it.summary.append(f"Python {hw['python']}, Snakemake {hw['versions']['snakemake']}, torch {hw['versions']['torch']}, "
                      f"OpenSlide bin {hw['versions']['openslide-bin']}; workflow commit {hw['workflow_commit'][:12]}"
                      + (" (with uncommitted changes)" if hw["workflow_dirty"] else "") + ".")

    # 2 data source
    it = items[2]
    manifests = [_read_json(p) for p in _files(str(out / "downloads" / "*.json"))]
    kinds = pd.Series([m.get("source_kind", "?") for m in manifests]).value_counts().to_dict() if manifests else {}
    it.params = {"samples_sheet": samples_path if exporter.full else "<samples sheet>", "n_slides": len(manifests),
                 **{f"n_source_{k}": v for k, v in kinds.items()}, "privacy.export": exporter.mode}
    secs = [m.get("download_seconds") or 0 for m in manifests]
    it.metrics = {"download_seconds_total": float(sum(secs)), "n_slides": float(len(manifests))}
    if manifests:
        table = pd.DataFrame([{k: redact_url(str(m.get(k))) for k in ("slide_id", "source_kind", "source", "md5", "size_bytes", "download_seconds", "status")} for m in manifests])
        sources_tsv = out / "mlflow" / "sources.tsv"
        sources_tsv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(sources_tsv, sep="\t", index=False)
        it.artifacts.append(str(sources_tsv))
    if Path(samples_path).exists():
        it.artifacts.append(samples_path)
    qc = out / "qc" / "slides.tsv"
    n_skipped = 0
    if qc.exists():
        qct = pd.read_csv(qc, sep="\t")
        n_skipped = int((qct.get("status", pd.Series(dtype=str)) == "skipped").sum())
        it.artifacts.append(str(qc))
    it.params["n_skipped"] = n_skipped
    it.summary.append(f"{len(manifests)} slides from {', '.join(f'{v} {k}' for k, v in kinds.items()) or 'no source'}; "
                      f"md5 recorded per slide; {n_skipped} skipped by QC (reasons in qc/slides.tsv).")
    it.summary.append("Exported de-identified (privacy.export: deidentified): slide ids, salted patient hashes, "
                      "source kind and md5, counts; no patient ids, paths, hosts or file names." if not exporter.full else
                      "Exported in full (privacy.export: full): patient ids, paths and sources as in the sheet; "
                      "for a tracking store that stays on site only.")

    # 3 splitting
    it = items[3]
    split_cfg = cfg.get("split", {})
    split_json = _read_json(out / "splits" / "split.json")
    it.params = flatten("split", split_cfg)
    it.params["seed"] = cfg.get("seed")
    it.params.update(flatten("split_result", {k: v for k, v in split_json.items() if not isinstance(v, (list, dict))}))
    if (out / "splits" / "splits.tsv").exists():
        it.artifacts.append(str(out / "splits" / "splits.tsv"))
    it.artifacts += [p for p in [str(out / "splits" / "split.json")] if Path(p).exists()]
    strategy = split_json.get('strategy', split_cfg.get('strategy', 'kfold'))
    it.summary.append(("The samples sheet's own split (`split` column, used as given; split.strategy sheet"
                       if strategy == "sheet" else f"Patient-level, label-stratified splits ({strategy}")
                      + f", k={split_json.get('k', split_cfg.get('k', '?'))}, seed {cfg.get('seed')}); no patient in two roles of one fold.")
    # what was fitted before/outside the split: say in words whether it saw the test slides
    ssl_archs = sorted({e[4:] for e in cfg.get("features", {}).get("encoders", []) if str(e).startswith("ssl:")})
    ssl_runs = {a: pd.read_csv(out / "ssl" / a / "training.tsv", sep="\t").iloc[-1].to_dict()
                for a in ssl_archs if (out / "ssl" / a / "training.tsv").exists()}
    ssl_fit = {a: (ssl_runs.get(a, {}).get("fit_on", cfg.get("ssl", {}).get("fit_on", "all")),
                   ssl_runs.get(a, {}).get("n_fit_slides", "?")) for a in ssl_archs}
    stain_json = _read_json(out / "stain" / "stain.json")
    stain_fit = stain_json.get("fit_on", cfg.get("stain", {}).get("fit_on", "all"))
    def saw(fit_on: str, n: Any) -> str:
        return ("every slide, test slides included (unlabelled, transductive: no label is read)" if fit_on == "all"
                else f"only the {n} slides train-role in every fold")

    fitted = [f"SSL encoder ssl:{a} on {saw(f, n)}" for a, (f, n) in ssl_fit.items()]
    if stain_json.get("reference_source") == "auto":
        fitted.append(f"stain reference drawn from {saw(stain_fit, stain_json.get('n_fit_slides', '?'))}")
    it.params.update({f"ssl_fit_on.{a}": f for a, (f, _) in ssl_fit.items()})
    it.params["stain_fit_on"] = stain_fit if stain_json else "not fitted"
    it.summary.append(("Fitted outside the split: " + "; ".join(fitted) + "." if fitted else
                       "Nothing was fitted outside the split (no SSL encoder, no stain reference drawn from the cohort).")
                      + " Labels are per slide; splits are by patient, stratified by positive-if-any.")

    # 4 normalisation
    it = items[4]
    stain = _read_json(out / "stain" / "stain.json")
    it.params = flatten("stain", cfg.get("stain", {}))
    it.params.update(flatten("stain_fit", {k: v for k, v in stain.items() if not isinstance(v, (list, dict))}))
    it.artifacts += [p for p in (str(out / "stain" / "stain.json"), str(out / "stain" / "reference.png")) if Path(p).exists()]
    it.summary.append(f"Stain normalisation: {cfg.get('stain', {}).get('method', 'none')}"
                      + (f", reference {stain.get('reference', stain.get('reference_source', '?'))}, fitted matrix in stain/stain.json." if stain else "."))
    if stain and stain.get("reference_source") == "auto":
        it.summary.append(f"The reference tile was chosen from the tiles of {stain.get('n_fit_slides', '?')} slides: "
                          + ("every slide, test slides included (unlabelled, transductive; stain.fit_on: all)."
                             if stain.get("fit_on", "all") == "all" else
                             "only slides that are train-role in every fold (stain.fit_on: train_only)."))
    elif stain:
        it.summary.append("The reference is a tile given in the config, not chosen from the cohort's slides.")

    # 5 background removal
    it = items[5]
    tissue = [_read_json(p) for p in _files(str(out / "tissue" / "*.json"))]
    areas = [t.get("tissue_area_mm2") or 0.0 for t in tissue]
    methods = pd.Series([t.get("method", "?") for t in tissue]).value_counts().to_dict() if tissue else {}
    it.params = flatten("tissue", cfg.get("tissue", {}))
    it.metrics = {"tissue_area_mm2_mean": float(sum(areas) / len(areas)) if areas else 0.0,
                  "tissue_area_mm2_total": float(sum(areas))}
    it.metrics.update({f"tissue_area_mm2.{t.get('slide_id')}": float(t.get("tissue_area_mm2") or 0.0) for t in tissue})
    it.artifacts += _files(str(out / "tissue" / "*.overlay.jpg"))[:50]
    it.summary.append(f"Tissue masks on a ~{cfg.get('tissue', {}).get('mask_mpp')} µm/px level ({', '.join(f'{v} {k}' for k, v in methods.items())}); "
                      f"mean tissue area {it.metrics['tissue_area_mm2_mean']:.2f} mm² per slide.")

    # 6 patch extraction
    it = items[6]
    counts = {}
    for p in _files(str(out / "tiles" / "*.parquet")):
        try:
            import pyarrow.parquet as pq

            counts[Path(p).stem] = pq.ParquetFile(p).metadata.num_rows
        except Exception:
            counts[Path(p).stem] = 0
    it.params = flatten("tiling", cfg.get("tiling", {}))
    it.params.update(flatten("features", {k: v for k, v in cfg.get("features", {}).items()
                                          if k in ("encoders", "mpp", "tta", "dtype", "max_failed_tile_fraction")}))
    it.params.update(flatten("augmentation", {"ssl": cfg.get("ssl", {}), "stain_augment": cfg.get("stain", {}).get("augment")}))
    it.metrics = {"n_tiles_total": float(sum(counts.values()))}
    it.metrics.update({f"n_tiles.{k}": float(v) for k, v in counts.items()})
    # tiles that failed to read (or gave non-finite features), per slide, from the features files
    from .features import features_qc_rows

    fqc = features_qc_rows(_files(str(out / "features" / "*" / "*.parquet")))
    failed = fqc.groupby("slide_id")["failed_tiles"].max() if len(fqc) else pd.Series(dtype=float)
    it.metrics["n_failed_tiles_total"] = float(failed.sum())
    it.metrics.update({f"n_failed_tiles.{k}": float(v) for k, v in failed.items()})
    n_failed_skipped = int(fqc.loc[fqc["status"] != "ok", "slide_id"].nunique()) if len(fqc) else 0
    if (out / "qc" / "features.tsv").exists():
        it.artifacts.append(str(out / "qc" / "features.tsv"))
    tcfg = cfg.get("tiling", {})
    it.summary.append(f"Tiles of {tcfg.get('tile_px')} px at {tcfg.get('mpp')} µm/px, overlap {tcfg.get('overlap_px')} px, "
                      f"min tissue fraction {tcfg.get('min_tissue_fraction')}: {sum(counts.values())} tiles in {len(counts)} slides; "
                      f"features {cfg.get('features', {}).get('encoders')} (TTA {cfg.get('features', {}).get('tta')}); "
                      f"{int(failed.sum())} tiles failed to read (qc/features.tsv), {n_failed_skipped} slide(s) over "
                      f"features.max_failed_tile_fraction {cfg.get('features', {}).get('max_failed_tile_fraction', 0.01)}.")
    _encoder_resolution(it, cfg)
    for arch, (fit_on, n_fit) in ssl_fit.items():
        sigma = ssl_runs.get(arch, {}).get("hed_sigma", cfg.get("ssl", {}).get("hed_sigma"))
        it.summary.append(f"SSL encoder ssl:{arch} trained (SimCLR) on tiles of {n_fit} slides: "
                          + ("every slide, test slides included (unlabelled, transductive; ssl.fit_on: all)"
                             if fit_on == "all" else "only slides train-role in every fold (ssl.fit_on: train_only)")
                          + f"; augmentation, of its training views only: random resized crop, flips/90° rotations, "
                            f"HED stain jitter sigma {sigma} (ssl.hed_sigma, else stain.augment.hed_jitter), "
                            "brightness/contrast/saturation, greyscale, blur.")
    it.summary.append("MIL and the patch classifier train on frozen features of unaugmented tiles"
                      + (" (no SSL encoder in this run, so no augmentation is applied)." if not ssl_fit else "."))

    # 7 patch labelling
    it = items[7]
    it.params = flatten("patch_labels", cfg.get("patch_labels", {}))
    label_counts = out / "patch_labels" / "counts.tsv"
    sources = _read_json(out / "tile_probs" / "sources.json")
    if label_counts.exists():
        lc = pd.read_csv(label_counts, sep="\t")
        for col in lc.columns:
            if col.startswith("n_") and pd.api.types.is_numeric_dtype(lc[col]):
                it.metrics[f"labels.{col}"] = float(lc[col].sum())
        it.artifacts.append(str(label_counts))
        it.summary.append("Tile labels from annotation polygons by overlap fraction: "
                          + ", ".join(f"{k.split('.', 1)[1]} {int(v)}" for k, v in it.metrics.items()) + ".")
    else:
        it.summary.append("No annotations: no tile labels; tumour probabilities come from MIL instance scores.")
    if sources:
        it.params.update(flatten("tile_prob_sources", sources))

    # 8 patch classifier
    it = items[8]
    it.params = flatten("patch_classifier", cfg.get("patch_classifier", {}))
    pc = [(_read_json(p), p) for p in _files(str(out / "patch_classifier" / "fold*" / "metrics.json"))]
    for m, p in pc:
        fold = Path(p).parent.name
        for k, v in flatten("", m).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                it.metrics[f"{fold}.{k}"] = float(v)
        it.artifacts.append(p)
    it.summary.append(f"Patch classifier {cfg.get('patch_classifier', {}).get('model', 'n/a')} on frozen features, trained per fold on "
                      f"train-role slides only ({len(pc)} folds)." if pc else "No patch classifier (no annotations).")

    # 9 slide classifier: MIL + classic
    it = items[9]
    it.params = flatten("mil", cfg.get("mil", {}))
    it.params.update(flatten("slide_features", cfg.get("slide_features", {})))
    it.params.update(flatten("slide_classifier", cfg.get("slide_classifier", {})))
    it.artifacts += _files(str(out / "mil" / "*" / "curves.png"))
    models = sorted({Path(p).parent.name for p in _files(str(out / "mil" / "*" / "predictions.tsv"))})
    classic = sorted({f"{Path(p).parent.name}@{Path(p).parent.parent.name}" for p in _files(str(out / "slide_classifier" / "*" / "*" / "predictions.tsv"))})
    it.params["mil_models_run"] = json.dumps(models)
    it.params["slide_classifiers_run"] = json.dumps(classic)
    for hist in _files(str(out / "mil" / "*" / "fold*" / "history.tsv")):
        h = pd.read_csv(hist, sep="\t")
        model, fold = Path(hist).parent.parent.name, Path(hist).parent.name
        it.metrics[f"{model}.{fold}.epochs"] = float(len(h))
        # val_auc (binary); val_auc_macro / val_c_index / val_r2 for the other targets
        val = next((c for c in h.columns if c.startswith("val_") and c != "val_loss"), None)
        if val and h[val].notna().any():
            it.metrics[f"{model}.{fold}.best_{val}"] = float(h[val].max())
    it.summary.append(f"MIL models: {', '.join(models) or 'none'}; feature-based slide classifiers: {', '.join(classic) or 'none'}; "
                      "training curves per fold in nested MLflow runs.")
    task = _target_words(cfg)
    it.params.update(flatten("target", cfg.get("target", {})))
    it.summary.append(task)
    crossfit = _files(str(out / "tile_probs" / "*" / "fold*.crossfit.parquet"))
    if classic:
        inner = cfg.get("slide_classifier", {}).get("inner_folds", 3)
        it.params["slide_classifier_train_features"] = "crossfit" if crossfit else "missing"
        it.summary.append(f"Feature-based slide classifiers train on cross-fitted features: each fold's train patients are "
                          f"dealt into {inner} inner folds and every train slide's tile probabilities come from a tile model "
                          "(patch classifier or MIL, trained as the fold's own) that did not see it, as the test slides' "
                          "come from the fold's model; training on in-sample features is refused.")

    # 10 lesion detection
    it = items[10]
    it.params = flatten("lesions", cfg.get("lesions", {}))
    for p in _files(str(out / "lesions" / "*" / "metrics.json")):
        src = Path(p).parent.name
        for k, v in flatten("", _read_json(p)).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                it.metrics[f"{src}.{k}"] = float(v)
        it.artifacts.append(p)
        it.artifacts += [q for q in _files(str(Path(p).parent / "*.png"))][:5]
    summary = ", ".join(f"{k} {v:.3f}" for k, v in it.metrics.items()
                        if k.split(".")[-1] in ("froc_score", "pooled", "mean_tumour_slides", "n_lesions", "n_lesions_detected"))
    it.summary.append(f"Lesion polygons and Dice: threshold {cfg.get('lesions', {}).get('threshold')} + connected components on "
                      "tile probabilities; FROC: local maxima of the map, each scored by its probability, swept over the whole "
                      f"probability range; test-role slides only; {summary or 'no lesion metrics'}.")

    # 11 metrics
    it = items[11]
    mj = _read_json(out / "metrics" / "metrics.json")
    it.params = flatten("metrics", {**cfg.get("metrics", {}), **mj.get("settings", {})})
    for model, res in mj.get("models", {}).items():
        for k, v in res.get("pooled", {}).items():
            if v is not None:
                it.metrics[f"{model}.{k}"] = float(v)
        for k, (lo, hi) in res.get("ci", {}).items():
            if lo is not None:
                it.metrics[f"{model}.{k}_ci_low"] = float(lo)
                it.metrics[f"{model}.{k}_ci_high"] = float(hi)
        it.params[f"{model}.threshold"] = json.dumps(res.get("threshold"))
        it.params[f"{model}.threshold_source"] = res.get("threshold_source", "?")
        it.metrics[f"{model}.n_slides"] = float(res.get("n_slides", 0))
        it.metrics[f"{model}.n_patients"] = float(res.get("n_patients", 0))
    it.artifacts += [p for p in (str(out / "metrics" / n) for n in ("metrics.json", "metrics.tsv", "roc.png", "pr.png", "calibration.png")) if Path(p).exists()]
    _published_vs_run(it, cfg, mj, out)
    if mj and "target" in mj:  # multi-class, survival, regression
        best, primary = mj.get("best_model"), mj.get("primary_metric")
        b = mj["models"].get(best, {})
        lo, hi = b.get("ci", {}).get(primary, [None, None])
        value = b.get("pooled", {}).get(primary)
        it.params["target.kind"] = mj["target"].get("kind")
        it.params["target.loss"] = mj["target"].get("loss")
        words = {"multiclass": "metrics auc_macro (mean one-vs-rest AUC), per-class AUC, balanced accuracy, macro F1 and a "
                               "confusion matrix at the argmax (no threshold)",
                 "survival": "metrics Harrell's c-index, Uno's c at the stated horizons, Kaplan-Meier by risk group (median "
                             "risk of each fold's training slides) with the log-rank p",
                 "regression": "metrics Pearson r, Spearman rho, MAE, RMSE and R²"}.get(mj["target"].get("kind"), "")
        it.summary.append(f"Target {mj['target'].get('kind')} ({words}); {len(mj.get('models', {}))} models compared on "
                          f"test slides, each slide once; best {best}: {primary} "
                          f"{value if value is None else f'{value:.3f}'} ({_ci_label(mj)} patient-bootstrap CI "
                          f"{'n/a' if lo is None else f'{lo:.3f}-{hi:.3f}'}) on {b.get('n_slides')} slides of "
                          f"{b.get('n_patients')} patients; {mj.get('settings', {}).get('n_bootstrap')} patient resamples; "
                          "paired patient-bootstrap test vs best in metrics.tsv.")
        it.artifacts += [p for p in (str(out / "metrics" / n) for n in ("confusion.tsv", "confusion.png", "km.png", "scatter.png"))
                         if Path(p).exists()]
        it.params["target.metrics"] = words
        for cohort, per_model in (mj.get("external") or {}).items():   # config `external`, every target type
            parts = []
            for model, res in per_model.items():
                v, ci = res.get("pooled", {}).get(primary), res.get("ci", {}).get(primary, [None, None])
                parts.append(f"{model} {primary} {v:.3f} ({_ci_label(mj)} CI {ci[0]:.3f}-{ci[1]:.3f})"
                             if v is not None and ci[0] is not None else f"{model} {primary} n/a")
                it.metrics[f"external.{cohort}.{model}.{primary}"] = float(v) if v is not None else float("nan")
            n = next(iter(per_model.values()), {})
            it.summary.append(f"External cohort {cohort} ({n.get('n_slides')} slides of {n.get('n_patients')} patients, never "
                              "in training, cut-offs, stain reference or SSL; each slide the mean of the development fold "
                              "models' outputs): " + "; ".join(parts) + ".")
    elif mj:
        it.params["target.kind"] = "binary"
        it.params["target.loss"] = "binary cross-entropy"
        it.params["target.metrics"] = ("AUC, balanced accuracy, accuracy, F1, sensitivity, specificity, PPV, NPV, "
                                       "Brier, ECE at each model's threshold_source (validation predictions or fixed)")
        best = mj.get("best_model")
        b = mj["models"].get(best, {})
        ci = b.get("ci", {}).get("auc", [None, None])
        auc = b.get("pooled", {}).get("auc")
        auc_txt = f"{auc:.3f}" if auc is not None else "n/a"
        ci_txt = f"{ci[0]:.3f}-{ci[1]:.3f}" if ci[0] is not None else "n/a"
        holdout = mj.get("settings", {}).get("strategy") in ("holdout", "sheet")
        it.summary.append(f"{len(mj.get('models', {}))} models compared on "
                          + ("the held-out test slides, each slide's prediction the mean of the k fold models"
                             if holdout else "out-of-fold test slides, each slide once") + f"; best {best}: AUC {auc_txt} "
                          f"({_ci_label(mj)} patient-bootstrap CI {ci_txt}) on {b.get('n_slides')} slides of {b.get('n_patients')} patients; "
                          f"{mj.get('settings', {}).get('n_bootstrap')} patient resamples; DeLong vs best in metrics.tsv.")
        from .metrics import THRESHOLD_WORDS

        sources = {}
        for model, res in mj.get("models", {}).items():
            sources.setdefault(res.get("threshold_source", "?"), []).append(model)
        it.summary.append("Decision thresholds from validation predictions only (never training or test): "
                          + "; ".join(f"{THRESHOLD_WORDS.get(src, src)}: {', '.join(models)}" for src, models in sorted(sources.items()))
                          + f" (a fold's own threshold needs >= {mj.get('settings', {}).get('min_val_per_class')} validation "
                            "slides of each class).")
        for cohort, per_model in (mj.get("external") or {}).items():   # config `external`
            parts = []
            for model, res in per_model.items():
                auc, ci = res.get("pooled", {}).get("auc"), res.get("ci", {}).get("auc", [None, None])
                parts.append(f"{model} AUC {auc:.3f} ({_ci_label(mj)} CI {ci[0]:.3f}-{ci[1]:.3f})" if auc is not None and ci[0] is not None
                             else f"{model} AUC n/a")
                it.metrics[f"external.{cohort}.{model}.auc"] = float(auc) if auc is not None else float("nan")
            n = next(iter(per_model.values()), {})
            it.summary.append(f"External cohort {cohort} ({n.get('n_slides')} slides of {n.get('n_patients')} patients, never "
                              "in training, thresholds, stain reference or SSL; the mean of the fold models at the development "
                              "threshold): " + "; ".join(parts) + ".")
    else:
        it.summary.append("Metrics not computed yet.")
    # hardware/software is recorded by the audit itself; stain method none is a choice, not a gap
    items[1].params.setdefault("status", "recorded")
    if str(items[4].params.get("stain.method", "")).lower() == "none":
        items[4].params.setdefault("status", "off (stain.method: none)")
    for it in items.values():
        it.params.setdefault("status", "done" if (it.metrics or it.artifacts) else "not run in this workflow")
        if not exporter.full:   # the safety net: nothing from the sheet in any exported text
            it.params = {k: exporter.value(v) for k, v in it.params.items()}
            it.summary = [exporter.text(s, file_names=False) for s in it.summary]
            it.artifacts = [exporter.artifact(p) for p in dict.fromkeys(it.artifacts) if Path(p).is_file()]
    return [items[n] for n in sorted(items)]


def render_checklist(items: list[ChecklistItem]) -> str:
    lines = ["# WSI analysis checklist", "",
             "What this run did for each item of the checklist, read back from its outputs.", ""]
    for it in items:
        lines.append(f"## {it.number}. {it.title}")
        lines += [f"- {s}" for s in it.summary]
        if it.params:
            shown = list(it.params.items())[:25]
            lines.append("")
            lines.append("| parameter | value |")
            lines.append("|---|---|")
            lines += [f"| `{k}` | {v} |" for k, v in shown]
            if len(it.params) > len(shown):
                lines.append(f"| ... | {len(it.params) - len(shown)} more in MLflow |")
        lines.append("")
    return "\n".join(lines)


def write_checklist(outdir: str | None, config: dict, samples_path: str, out_path: str) -> None:
    """Rule `checklist`: {outdir}/checklist.md (``outdir`` None: the folder of ``out_path``)."""
    from .io import write_text

    outdir = outdir if outdir is not None else str(Path(out_path).parent)
    write_text(out_path, render_checklist(collect_checklist(outdir, config, samples_path)))
