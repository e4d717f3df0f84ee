"""Nothing that identifies a patient leaves the site by default (config privacy.export).

The real logging path (histoflow.mlflow.log_workflow into a local MLflow store, and the
checklist) runs on a finished results folder whose sheet holds distinctive patient ids, local
paths and signed URLs; every MLflow param, tag and text artifact and checklist.md is scanned.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histoflow.checklist import write_checklist
from histoflow.io import write_json
from histoflow.metrics import write_metrics
from histoflow.privacy import (SALT_NAME, Exporter, patient_hash, privacy_salt, resolve_sheet_value,
                               scrub_text, sheet_reference)
from histoflow.mlflow import init_store, log_workflow

HOST = "pacs.stmary-hospital.example"
SIGNATURE = "Sig0nature0Secret0Value"
TEXT_SUFFIXES = {".tsv", ".json", ".md", ".txt", ".csv", ".yaml", ".html", ".xml", ".geojson"}


def _cohort(root: Path) -> tuple[Path, dict]:
    """A sheet of 12 slides: local files in a ward folder, signed URLs, GDC ids."""
    ward = root / "ward7_private"
    ward.mkdir(parents=True)
    rows = []
    for i in range(12):
        pid = f"MRN-{48150 + i}-DOE"
        if i % 3 == 0:
            path = ward / f"Doe_John_{i}_biopsy.svs"
            path.write_bytes(b"x")
            source = str(path)
        elif i % 3 == 1:
            source = f"https://user:pw@{HOST}/wsi/Doe_John_{i}.svs?X-Amz-Signature={SIGNATURE}&X-Amz-Expires=3600"
        else:
            source = f"gdc:0000000{i:01d}-aaaa-bbbb-cccc-{i:012d}"
        rows.append({"slide_id": f"s{i}", "patient_id": pid, "label": "tumor" if i % 2 else "normal", "source": source})
    sheet = root / "samples.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    return sheet, {r["slide_id"]: r for r in rows}


def _finished(out: Path, rows: dict, sheet: Path) -> None:
    """A results folder as a finished run leaves it (as in test_tracking, with this cohort)."""
    rng = np.random.default_rng(0)
    preds = []
    for fold in range(3):
        for i in range(12):
            r = rows[f"s{i}"]
            role = "test" if i % 3 == fold else ("val" if i % 3 == (fold + 1) % 3 else "train")
            preds.append({"slide_id": r["slide_id"], "patient_id": r["patient_id"], "label": r["label"],
                          "y": i % 2, "fold": fold, "role": role,
                          "prob": float(np.clip(0.2 + 0.6 * (i % 2) + rng.normal(0, 0.1), 0, 1))})
    preds = pd.DataFrame(preds)
    for fold in range(3):
        fold_dir = out / "mil" / "abmil" / f"fold{fold}"
        fold_dir.mkdir(parents=True)
        preds[preds["fold"] == fold].to_csv(fold_dir / "predictions.tsv", sep="\t", index=False)
        pd.DataFrame({"epoch": [0, 1], "train_loss": [0.7, 0.5], "val_loss": [0.7, 0.6],
                      "val_auc": [0.6, 0.8]}).to_csv(fold_dir / "history.tsv", sep="\t", index=False)
    preds[preds["role"] == "test"].to_csv(out / "mil" / "abmil" / "predictions.tsv", sep="\t", index=False)
    paths = [str(out / "mil" / "abmil" / f"fold{f}" / "predictions.tsv") for f in range(3)]
    write_metrics({"abmil": paths}, str(out / "metrics" / "metrics.json"), str(out / "metrics" / "metrics.tsv"),
                  str(out / "metrics" / "roc.png"), str(out / "metrics" / "pr.png"),
                  str(out / "metrics" / "calibration.png"), {"n_bootstrap": 20}, seed=1)
    (out / "splits").mkdir()
    preds[["slide_id", "patient_id", "label", "y", "fold", "role"]].to_csv(out / "splits" / "splits.tsv",
                                                                          sep="\t", index=False)
    write_json(out / "splits" / "split.json", {"strategy": "kfold", "k": 3, "seed": 1})
    from histoflow.download import redact_url

    qc = []
    for sid, r in rows.items():
        kind = "local" if r["source"].startswith("/") else ("gdc" if r["source"].startswith("gdc:") else "url")
        write_json(out / "downloads" / f"{sid}.json",
                   {"slide_id": sid, "source_kind": kind, "source": redact_url(r["source"]) if kind == "url" else r["source"],
                    "path": str(out / "downloads" / sid / f"Doe_John_{sid}.svs"), "md5": "0" * 32,
                    "download_seconds": 1.0, "status": "ok"})
        reason = f"cannot open {r['source']}: not a slide (Doe_John_{sid}.svs)" if sid == "s0" else ""
        qc.append({"slide_id": sid, "status": "skipped" if reason else "ok", "reason": reason, "tissue_area_mm2": 1.0})
    (out / "qc").mkdir()
    pd.DataFrame(qc).to_csv(out / "qc" / "slides.tsv", sep="\t", index=False)


def forbidden(rows: dict) -> list[str]:
    """What must never be exported: patient ids, local paths and their folders and file names,
    URL hosts, query strings and credentials."""
    out = {HOST, SIGNATURE, "X-Amz-Signature", "ward7_private", "Doe_John", "user:pw"}
    for r in rows.values():
        out.add(r["patient_id"])
        if r["source"].startswith("/"):
            out |= {r["source"], os.path.dirname(r["source"]), os.path.basename(r["source"])}
    return sorted(out)


def scan(texts: dict[str, str], needles: list[str]) -> list[str]:
    return [f"{needle!r} in {where}" for where, text in texts.items() for needle in needles if needle in text]


def exported_texts(out: Path, status: dict) -> dict[str, str]:
    """Every param, tag and text artifact of every run of the experiment, and checklist.md."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    texts: dict[str, str] = {}
    runs = client.search_runs([status["experiment_id"]])
    assert runs
    for run in runs:
        rid = run.info.run_id
        texts[f"run {run.info.run_name} params"] = json.dumps(run.data.params)
        texts[f"run {run.info.run_name} tags"] = json.dumps(run.data.tags)
        texts[f"run {run.info.run_name} name"] = run.info.run_name or ""
        local = Path(client.download_artifacts(rid, "", str(out.parent / f"dl-{rid}")))
        for path in local.rglob("*"):
            if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
                texts[f"artifact {path.relative_to(local)} of {run.info.run_name}"] = path.read_text(errors="replace")
    texts["checklist.md"] = (out / "checklist.md").read_text()
    return texts


@pytest.fixture(scope="module", params=["deidentified", "full"])
def logged(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"privacy-{request.param}")
    sheet, rows = _cohort(root)
    out = root / "results"
    _finished(out, rows, sheet)
    config = {"samples": str(sheet), "outdir": str(out), "seed": 1, "mlflow": {"experiment": "privacy"},
              "tiling": {"mpp": [0.5], "tile_px": 256}, "split": {"k": 3},
              "features": {"encoders": [f"local:{root / 'ward7_private' / 'enc.pt'}"]}}
    if request.param == "full":
        config["privacy"] = {"export": "full"}
    init_store(str(out), config, str(out / "mlflow" / "store.json"))
    write_checklist(str(out), config, str(sheet), str(out / "checklist.md"))
    status = log_workflow(str(out), config, str(sheet), str(out / "mlflow" / "logged.json"))
    assert status["status"] == "logged"
    return request.param, out, rows, status


def test_nothing_identifying_is_exported_by_default(logged):
    mode, out, rows, status = logged
    texts = exported_texts(out, status)
    leaks = scan(texts, forbidden(rows))
    if mode == "full":   # the opt-in exports the files as they are: the scan sees the sheet
        assert leaks and "privacy.export: full" in texts["checklist.md"]
        return
    assert leaks == [], leaks[:10]
    assert "privacy.export: deidentified" in texts["checklist.md"]
    # what is exported instead: slide ids, salted patient hashes, source kinds, md5
    salt = privacy_salt(out)
    splits = next(t for k, t in texts.items() if k.startswith("artifact") and "splits.tsv" in k)
    assert patient_hash(rows["s3"]["patient_id"], salt) in splits and "s3" in splits
    sources = next(t for k, t in texts.items() if "sources.tsv" in k)
    assert "source_kind" in sources and "0" * 32 in sources and "\turl\t" in sources
    qc = next(t for k, t in texts.items() if k.startswith("artifact") and "slides.tsv" in k)
    assert "cannot open <" in qc    # the reason is kept, without its path and file name
    preds = [t for k, t in texts.items() if "predictions.tsv" in k]
    assert len(preds) == 4 and all("patient_hash" in t and "patient_id" not in t for t in preds)


def test_the_salt_is_kept_in_the_outdir_and_never_exported(logged):
    mode, out, _rows, status = logged
    if mode == "full":
        pytest.skip("full export hashes nothing: no salt is made")
    salt_file = out / SALT_NAME
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    salt = salt_file.read_text().strip()
    assert len(salt) == 64
    texts = exported_texts(out, status)
    assert scan(texts, [salt, salt[:16]]) == []


def test_a_hash_is_stable_for_one_outdir_and_differs_across_outdirs(tmp_path):
    a, b = privacy_salt(tmp_path / "a"), privacy_salt(tmp_path / "b")
    assert privacy_salt(tmp_path / "a") == a != b
    assert patient_hash("P1", a) == patient_hash("P1", a) != patient_hash("P1", b)
    assert patient_hash("P1", a) != patient_hash("P2", a)


def test_reasons_lose_paths_urls_and_file_names():
    text = scrub_text("cannot open '/data/ward/Doe_J.svs' from https://h.example/x.svs?sig=1 (Doe_J.ndpi); gdc:"
                      "2f6b6a8e-1111-2222-3333-444455556666 too small: 3 µm/px, n/a")
    assert "Doe_J" not in text and "h.example" not in text and "/data" not in text and "2f6b6a8e" not in text
    assert "µm/px" in text and "n/a" in text and "cannot open" in text


def test_signed_url_reaches_params_only_as_a_reference(tmp_path, monkeypatch):
    url = f"https://{HOST}/wsi/a.svs?X-Amz-Signature={SIGNATURE}"
    sheet = tmp_path / "samples.tsv"
    pd.DataFrame([{"slide_id": "s1", "patient_id": "p", "label": "t", "source": url}]).to_csv(sheet, sep="\t", index=False)
    ref = sheet_reference("source", url)
    assert SIGNATURE not in ref and HOST not in ref and ref.startswith("sheet:source:url:")
    monkeypatch.setenv("HISTOFLOW_SAMPLES", str(sheet))
    assert resolve_sheet_value(ref, "s1") == url
    assert resolve_sheet_value("plain", "s1") == "plain"
    pd.DataFrame([{"slide_id": "s1", "patient_id": "p", "label": "t", "source": url + "x"}]).to_csv(sheet, sep="\t", index=False)
    from histoflow.errors import InputError

    with pytest.raises(InputError, match="changed"):
        resolve_sheet_value(ref, "s1")


def test_download_rule_params_hold_no_query_string(repo_root):
    rules = (repo_root / "workflow" / "rules" / "download.smk").read_text()
    assert 'source=sheet_ref("source")' in rules
    tiles = (repo_root / "workflow" / "rules" / "tiling.smk").read_text()
    # tiling takes no annotations at all (bag tiles never depend on them), so no path in its params
    assert "annotations=" not in tiles.split("rule tile_slide:", 1)[1].split("\nrule ", 1)[0]
    report = (repo_root / "workflow" / "rules" / "checklist.smk").read_text()
    assert "config=config" not in report


def test_exporter_drops_path_columns_and_hashes_patients(tmp_path):
    sheet = tmp_path / "samples.tsv"
    pd.DataFrame([{"slide_id": "s1", "patient_id": "Jane", "label": "t", "source": "/w/Jane.svs"}]).to_csv(sheet, sep="\t", index=False)
    ex = Exporter(tmp_path / "out", {}, sheet)
    frame = ex.frame(pd.DataFrame({"slide_id": ["s1"], "patient_id": ["Jane"], "path": ["/w/Jane.svs"],
                                   "note": ["from /w/Jane.svs"]}))
    assert list(frame.columns) == ["slide_id", "patient_hash", "note"] and "Jane" not in frame.to_csv()


@pytest.mark.shared
def test_label_and_macro_images_are_never_read(tmp_path, shared_data, monkeypatch):
    """CMU-1-Small-Region.svs has a label (which can carry a patient's name) and a macro photo:
    slide QC, tissue detection, tiling and tile images run with both made unreadable, and only
    their names reach the slide record."""
    import openslide

    from histoflow.tiling import export_tile_images, tile_slide_with_preview
    from histoflow.wsi.tiff_jpeg import TiffJpegReader
    from test_tissue import run_rule, slide_json

    path = shared_data / "slides" / "CMU-1-Small-Region.svs"
    with openslide.OpenSlide(str(path)) as slide:
        assert {"label", "macro"} <= set(slide.associated_images.keys())

    def refuse(*args, **kwargs):
        raise AssertionError("an associated image (label/macro/thumbnail) was read")

    real_decode = TiffJpegReader._decode
    pages_read = []

    def decode(self, page, index):         # the tiles' backend may decode pyramid levels only
        pages_read.append((page.width, page.height))
        assert (page.width, page.height) in self.level_dimensions, "a page that is not a pyramid level was read"
        return real_decode(self, page, index)

    monkeypatch.setattr(openslide.lowlevel, "read_associated_image", refuse)
    monkeypatch.setattr(TiffJpegReader, "_decode", decode)
    sj = slide_json(tmp_path, "cmu", path)
    record = json.loads(sj.read_text())
    assert record["status"] == "ok" and {"label", "macro"} <= set(record["associated_images"])
    stats, paths = run_rule(tmp_path, sj)
    assert stats["status"] == "ok"
    tiles, preview = tmp_path / "cmu.parquet", tmp_path / "cmu.preview.jpg"
    tile_slide_with_preview(sj, paths["png"], paths["json"], paths["overlay.jpg"], tiles, preview,
                            {"mpp": [1.0], "tile_px": 224, "max_tiles_per_slide": 4}, seed=0)
    assert export_tile_images(sj, tiles, tmp_path / "tile_images" / "cmu", "png") > 0
