"""The Snakemake report under `privacy.export: deidentified` (the default) carries no path or URL of
the site: not the output folder, not the samples sheet, not a slide's source, and no patient id,
neither in the page nor in the files it embeds. `snakemake --report` itself puts the output
folder in every result's key, the reported jobs' params and every rule's input/output, and the
sheet's path in make_splits' input: `histoflow report` (Snakemake's html reporter through
histoflow's report plugin) is what users run."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from histoflow.report_plugin import redact_report, redact_text, redactions

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)?(;[\w=.-]+)*;base64,([A-Za-z0-9+/=]+)")


def _env() -> dict:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONHASHSEED="0")


def page_texts(page: str) -> dict[str, str]:
    """The page without its embedded files, and each embedded text file decoded (images are
    pixels: skipped)."""
    texts = {"page": DATA_URI.sub("<data>", page)}
    for i, match in enumerate(DATA_URI.finditer(page)):
        mime = match.group(1) or ""
        if mime.startswith(("image/", "font/")):
            continue
        texts[f"embedded {i} ({mime})"] = base64.b64decode(match.group(3)).decode("utf-8", "replace")
    return texts


def leaks(texts: dict[str, str], needles: set[str], pids: set[str]) -> list[str]:
    found = [f"{n!r} in {where}" for where, text in texts.items() for n in needles if n in text]
    found += [f"patient {p!r} in {where}" for where, text in texts.items() for p in pids
              if re.search(rf"(?<![A-Za-z0-9_]){re.escape(p)}(?![A-Za-z0-9_])", text)]
    return found


def test_a_relative_outdir_is_redacted_as_a_path_not_as_a_word(tmp_path, monkeypatch):
    """outdir "results": "results/qc/slides.tsv" is a path, `var results = {` is the page's code."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples.tsv").write_text("slide_id\tpatient_id\tlabel\tsource\nS1\tP1\ta\ts1.svs\n")
    config = {"outdir": "results", "samples": "samples.tsv",
              "features": {"encoders": [f"local:{tmp_path}/enc/model.pt"]}}
    page = (f'var results = {{"results/qc/slides.tsv": 1, "{tmp_path}/results/x.png": 2}}; '
            f'sheet {tmp_path}/samples.tsv enc {tmp_path}/enc/model.pt slide {tmp_path}/s1.svs s1.svs')
    text = redact_text(page, redactions(config))
    assert text.startswith('var results = {"{outdir}/qc/slides.tsv": 1, "{outdir}/x.png": 2}'), text
    assert str(tmp_path) not in text and text.endswith("slide {source} {source}"), text


@pytest.mark.parametrize("source", ["slides/TCGA-AB-1234-01Z.tiff", "TCGA-AB-1234-01Z.svs",
                                    "https://files.example/TCGA-AB-1234-01Z.svs?sig=1"])
def test_a_sources_file_name_alone_is_redacted_as_a_whole_token(tmp_path, monkeypatch, source):
    """A relative or bare file name in the sheet's source column (slide file names carry case
    ids): redacted wherever the page shows the name alone, never inside another word."""
    from histoflow.privacy import Exporter

    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples.tsv").write_text(f"slide_id\tpatient_id\tlabel\tsource\nS1\tP1\ta\t{source}\n")
    name = source.split("/")[-1].split("?")[0]
    page = f'read {source} as {name}; "{name}.json" other_{name} {name}x'
    text = redact_text(page, redactions({"outdir": "results", "samples": "samples.tsv"}))
    assert text.startswith("read {source} as {source}; \"{source}.json\""), text
    assert text.endswith(f"other_{name} {name}x"), text
    exporter = Exporter(tmp_path / "results", {"privacy": {"export": "deidentified"}}, tmp_path / "samples.tsv")
    assert "TCGA-AB-1234" not in exporter.value(f"slide {name} read"), exporter.value(f"slide {name} read")


def test_a_file_named_after_its_slide_id_leaves_the_outputs_alone(tmp_path, monkeypatch):
    """annotations/demo_001.geojson names nothing beyond the slide id (exported anyway): the
    workflow's own tissue/demo_001.geojson must not turn into {outdir}/tissue/{annotations}."""
    from histoflow.privacy import Exporter

    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples.tsv").write_text("slide_id\tpatient_id\tlabel\tsource\tannotations\n"
                                          "demo_001\tP1\ta\tslides/demo_001.tiff\tannotations/demo_001.geojson\n")
    page = "results/tissue/demo_001.geojson results/lesions/mil-abmil/demo_001.geojson read slides/demo_001.tiff"
    text = redact_text(page, redactions({"outdir": "results", "samples": "samples.tsv"}))
    assert text == ("{outdir}/tissue/demo_001.geojson {outdir}/lesions/mil-abmil/demo_001.geojson "
                    "read {source}"), text
    exporter = Exporter(tmp_path / "results", {"privacy": {"export": "deidentified"}}, tmp_path / "samples.tsv")
    assert "tissue/demo_001.geojson" in exporter.value("tissue/demo_001.geojson")


def test_redactions_cover_outdir_sheet_sources_and_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "slides").mkdir()
    sheet = tmp_path / "cohort" / "samples.tsv"
    sheet.parent.mkdir()
    pd.DataFrame({"slide_id": ["S1", "S2"], "patient_id": ["P1", "P2"], "label": ["a", "b"],
                  "source": ["../slides/s1.svs", "https://files.hospital.example/s2.svs?sig=abc"]}
                 ).to_csv(sheet, sep="\t", index=False)
    config = {"outdir": "runs/out", "samples": str(sheet),
              "mlflow": {"tracking_uri": "http://mlflow.hospital.example:5000"}, "tiling": {"mpp": [0.5]}}
    page = json.dumps({str(tmp_path / "runs/out/qc/slides.tsv"): {"params": f"sheet={sheet}"},
                       "x": "../slides/s1.svs " + str(tmp_path / "slides/s1.svs"),
                       "u": "https://files.hospital.example/s2.svs?sig=abc http://mlflow.hospital.example:5000",
                       "unit": "µm/px"}, ensure_ascii=False)
    path = tmp_path / "report.html"
    path.write_text(page)
    redact_report(path, redactions(config))
    text = path.read_text()
    assert str(tmp_path) not in text and "hospital.example" not in text and "sig=abc" not in text, text
    assert "{outdir}/qc/slides.tsv" in text and "{samples}" in text and "µm/px" in text
    # a zipped report: the page inside is redacted, the archive otherwise unchanged
    archive = tmp_path / "report.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("report/report.html", page)
        zf.writestr("report/data/raw/x/slides.tsv", "slide_id\nS1\n")
    redact_report(archive, redactions(config))
    with zipfile.ZipFile(archive) as zf:
        assert str(tmp_path) not in zf.read("report/report.html").decode()
        assert zf.read("report/data/raw/x/slides.tsv") == b"slide_id\nS1\n"


@pytest.mark.e2e
def test_the_report_of_a_run_carries_no_site_path_url_or_patient_id(tmp_path):
    """A real run (2 small slides to the QC table) and its report: the plain Snakemake report
    carries the output folder (so the scan can see it), histoflow's carries none of it."""
    from histoflow.demo import make_demo_cohort

    sheet = Path(make_demo_cohort(tmp_path / "demo", 2, 11, small=True, progress=False))
    outdir = tmp_path / "results"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"samples": str(sheet), "outdir": str(outdir),
                                   "tiling": {"mpp": [2.0], "tile_px": 128, "min_tissue_fraction": 0.5},
                                   "features": {"mpp": 2.0}}))
    args = ["qc", "--configfile", "config.yaml", str(cfg)]
    run = lambda cmd: subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    for proc in (run([str(BIN / "snakemake"), "--cores", "2", *args]),
                 run([str(BIN / "snakemake"), "--report", str(tmp_path / "plain.html"), *args]),
                 run([sys.executable, "-m", "histoflow.cli", "report", str(tmp_path / "report.html"), *args])):
        assert proc.returncode == 0, proc.stderr[-4000:]

    table = pd.read_csv(sheet, sep="\t", dtype=str, keep_default_na=False)
    needles = {str(tmp_path), str(tmp_path.resolve()), str(outdir), str(sheet)}
    needles |= {str((sheet.parent / s).resolve()) for s in table["source"]}
    pids = set(table["patient_id"])

    plain = page_texts((tmp_path / "plain.html").read_text())
    assert leaks(plain, {str(outdir)}, set()), "the plain report no longer shows the outdir: is the scan blind?"
    texts = page_texts((tmp_path / "report.html").read_text())
    assert any(k.startswith("embedded") for k in texts)          # the QC table, decoded
    assert not leaks(texts, needles, pids), leaks(texts, needles, pids)[:10]
    assert "{outdir}/qc/slides.tsv" in texts["page"]             # still says which file is which
