"""Cohort builders: ``histoflow gdc-cohort`` against a local server that answers in the GDC shape
(and sends fewer hits per page than asked), ``histoflow camelyon16-cohort`` on a fake layout."""

from __future__ import annotations

import http.server
import json
import logging
import threading
from pathlib import Path

import pandas as pd
import pytest

from histoflow.cli import main
from histoflow.cohorts import (camelyon16_rows, gdc_files_url, gdc_filters, read_label_map, rows_from_hits,
                               values_at)
from histoflow.config import read_samples_sheet, validate_samples
from histoflow.errors import HistoflowError, InputError

TOKEN = "gdc-T0KEN-9f8e7d6c5b4a39281706"


def uuid(i: int) -> str:
    return f"{i:08x}-aaaa-4bbb-8ccc-{i:012x}"


def hit(i: int, project: str, patient: str, diagnoses: list | None = None, strategy: str = "Diagnostic Slide") -> dict:
    case = {"submitter_id": patient, "project": {"project_id": project}}
    if diagnoses is not None:
        case["diagnoses"] = [{"primary_diagnosis": d} for d in diagnoses]
    return {"file_id": uuid(i), "file_name": f"{patient}-01Z-00-DX{i % 3 + 1}.{uuid(i)}.svs",
            "md5sum": f"{i:032x}", "data_format": "SVS", "experimental_strategy": strategy, "cases": [case]}


class GDCHandler(http.server.BaseHTTPRequestHandler):
    """POST /files: filters by project/format/strategy, sorts by file_id, pages with from/size but
    never sends more than ``server.max_page`` hits (a server may send fewer than asked)."""

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body, dict(self.headers)))
        if self.server.fail_first and len(self.server.requests) == 1:
            return self._send(503, {"message": "busy"})
        if self.server.token and self.headers.get("X-Auth-Token") != self.server.token:
            return self._send(403, {"message": "forbidden"})
        if self.path != "/files":
            return self._send(404, {"message": "no such endpoint"})
        conds = {c["content"]["field"]: c["content"]["value"] for c in body["filters"]["content"]}
        hits = [h for h in self.server.catalogue
                if h["cases"][0]["project"]["project_id"] in conds["cases.project.project_id"]
                and h["data_format"] == conds["data_format"]
                and h["experimental_strategy"] == conds.get("experimental_strategy", h["experimental_strategy"])]
        hits.sort(key=lambda h: h["file_id"])
        start, size = (0 if self.server.ignore_from else int(body["from"])), int(body["size"])
        page = hits[start: start + min(size, self.server.max_page)]
        self._send(200, {"data": {"hits": page, "pagination": {
            "count": len(page), "total": len(hits), "size": size, "from": start,
            "page": start // max(size, 1) + 1, "pages": -(-len(hits) // max(size, 1)), "sort": ""}}, "warnings": {}})

    def _send(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def gdc():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), GDCHandler)
    server.requests, server.catalogue, server.token, server.max_page, server.fail_first = [], [], None, 3, False
    server.ignore_from = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


def nsclc_catalogue() -> list[dict]:
    cat = []
    for i in range(8):   # LUAD: 8 slides of 6 patients (two patients with two slides)
        cat.append(hit(i, "TCGA-LUAD", f"TCGA-05-{4200 + i % 6}"))
    for i in range(8, 16):
        cat.append(hit(i, "TCGA-LUSC", f"TCGA-18-{3400 + i}"))
    cat.append(hit(16, "TCGA-BRCA", "TCGA-A1-0001"))                      # project not asked
    cat.append(hit(17, "TCGA-LUAD", "TCGA-05-9999", strategy="Tissue Slide"))  # frozen section
    return cat


def test_gdc_cohort_reads_every_page_sends_filters_and_token_and_never_shows_it(gdc, tmp_path, monkeypatch, capsys, caplog):
    gdc.catalogue, gdc.token = nsclc_catalogue(), TOKEN
    monkeypatch.setenv("GDC_TOKEN", TOKEN)
    out = tmp_path / "sheet.tsv"
    caplog.set_level(logging.DEBUG)
    rc = main(["gdc-cohort", "--project", "TCGA-LUSC", "--project", "TCGA-LUAD", "--label-from", "project",
               "--out", str(out), "--endpoint", gdc.url, "--page-size", "5", "--retries", "0"])
    assert rc == 0
    sheet = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False)
    assert list(sheet.columns) == ["slide_id", "patient_id", "label", "source", "md5", "site"]
    expected = sorted((h for h in gdc.catalogue[:16]), key=lambda h: h["file_name"])
    assert len(sheet) == 16                                   # 16 hits over 6 pages of at most 3
    assert list(sheet["slide_id"]) == sorted(sheet["slide_id"])
    assert list(sheet["slide_id"]) == [h["file_name"][: -len(".svs")] for h in expected]
    assert list(sheet["source"]) == [f"gdc:{h['file_id']}" for h in expected]
    assert list(sheet["md5"]) == [h["md5sum"] for h in expected]
    assert list(sheet["patient_id"]) == [h["cases"][0]["submitter_id"] for h in expected]
    assert set(sheet["site"]) == {"05", "18"}                 # tissue source site of the barcode
    assert set(sheet["label"]) == {"TCGA-LUAD", "TCGA-LUSC"}
    assert (sheet["label"] == "TCGA-LUAD").sum() == 8
    # what the server received: the filters, only the fields needed, offsets by hits received
    assert len(gdc.requests) == 6
    body = gdc.requests[0][1]
    assert body["filters"] == {"op": "and", "content": [
        {"op": "in", "content": {"field": "cases.project.project_id", "value": ["TCGA-LUAD", "TCGA-LUSC"]}},
        {"op": "=", "content": {"field": "data_format", "value": "SVS"}},
        {"op": "=", "content": {"field": "experimental_strategy", "value": "Diagnostic Slide"}}]}
    assert set(body["fields"].split(",")) == {"file_id", "file_name", "md5sum", "cases.submitter_id",
                                              "cases.project.project_id"}
    assert [r[1]["from"] for r in gdc.requests] == [0, 3, 6, 9, 12, 15]
    assert all(r[1]["size"] == 5 for r in gdc.requests)
    assert all(r[2].get("X-Auth-Token") == TOKEN for r in gdc.requests)
    # the token is in no output
    printed = capsys.readouterr()
    assert "16 slides" in printed.out
    for text in (printed.out, printed.err, caplog.text, out.read_text()):
        assert TOKEN not in text
    validate_samples(read_samples_sheet(out), out, check_local_files=False)


def test_gdc_label_map_maps_diagnoses_and_counts_what_it_drops(gdc, tmp_path, capsys):
    gdc.catalogue = [
        hit(1, "TCGA-BRCA", "TCGA-A1-0001", ["Infiltrating duct carcinoma, NOS"]),
        hit(2, "TCGA-BRCA", "TCGA-A1-0001", ["Infiltrating duct carcinoma, NOS"]),   # second slide, same patient
        hit(3, "TCGA-BRCA", "TCGA-A1-0002", ["Lobular carcinoma, NOS"]),
        hit(4, "TCGA-BRCA", "TCGA-A1-0003", ["Infiltrating duct and lobular carcinoma"]),   # not in the map
        hit(5, "TCGA-BRCA", "TCGA-A1-0004", ["Lobular carcinoma, NOS", "Infiltrating duct carcinoma, NOS"]),
        hit(6, "TCGA-BRCA", "TCGA-A1-0005", ["Not Reported"]),
        hit(7, "TCGA-BRCA", "TCGA-A1-0006", ["lobular carcinoma, nos", "Not Reported"]),
    ]
    label_map = tmp_path / "brca.tsv"
    label_map.write_text("value\tlabel\n# TCGA-BRCA histological subtypes\n"
                         "Infiltrating duct carcinoma, NOS\tIDC\nLobular carcinoma, NOS\tILC\n")
    out = tmp_path / "brca.tsv.out"
    rc = main(["gdc-cohort", "--project", "TCGA-BRCA", "--label-from", "cases.diagnoses.primary_diagnosis",
               "--label-map", str(label_map), "--out", str(out), "--endpoint", gdc.url, "--retries", "0"])
    assert rc == 0
    sheet = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False)
    assert dict(zip(sheet["source"], sheet["label"])) == {f"gdc:{uuid(1)}": "IDC", f"gdc:{uuid(2)}": "IDC",
                                                           f"gdc:{uuid(3)}": "ILC", f"gdc:{uuid(7)}": "ILC"}
    assert gdc.requests[0][1]["fields"].split(",") == ["file_id", "file_name", "md5sum", "cases.submitter_id",
                                                        "cases.diagnoses.primary_diagnosis"]
    line = capsys.readouterr().out.splitlines()[0]
    assert "4 slides (IDC 2, ILC 2)" in line
    assert "1 slides whose value is not in the label map" in line
    assert "1 slides with conflicting values" in line
    assert "1 slides without a value" in line


def test_gdc_retries_a_busy_server_and_reports_a_refused_token_in_one_line(gdc, tmp_path, monkeypatch, capsys):
    from histoflow.cohorts import gdc_cohort
    from histoflow.download import DownloadSettings

    gdc.catalogue, gdc.fail_first = nsclc_catalogue(), True
    fast = DownloadSettings(retries=2, backoff_s=0.001, timeout_s=5)
    result = gdc_cohort(["TCGA-LUAD"], endpoint=gdc.url, settings=fast)
    assert len(result.rows) == 8 and len(gdc.requests) == 1 + 3     # one 503, then 3 pages
    gdc.token = "another-token"
    token_file = tmp_path / "token.txt"
    token_file.write_text(TOKEN + "\n")
    rc = main(["gdc-cohort", "--project", "TCGA-LUAD", "--out", str(tmp_path / "s.tsv"), "--endpoint", gdc.url,
               "--token-file", str(token_file), "--retries", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and "HTTP 403" in err and "token" in err and TOKEN not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.tsv").exists()
    gdc.token, gdc.ignore_from = None, True      # a server that does not page: an error, not 3 rows repeated
    with pytest.raises(HistoflowError, match="does not page"):
        gdc_cohort(["TCGA-LUAD"], endpoint=gdc.url, settings=fast)


def test_gdc_rows_dedupe_repeated_files_and_refuse_two_files_with_one_name():
    a, b = hit(1, "TCGA-LUAD", "TCGA-05-0001"), hit(2, "TCGA-LUAD", "TCGA-05-0002")
    same_name = dict(b, file_id=uuid(9))                       # same name and md5: the same image twice
    result = rows_from_hits([b, a, a, same_name])
    assert [r["source"] for r in result.rows] == [f"gdc:{uuid(1)}", f"gdc:{uuid(2)}"]
    assert dict(result.dropped) == {"repeated file_id (same file listed twice)": 1,
                                    "duplicate file names with the same md5 (one kept)": 1}
    with pytest.raises(InputError, match="two different files named"):
        rows_from_hits([b, dict(b, file_id=uuid(9), md5sum="f" * 32)])


def test_gdc_query_parts():
    assert gdc_files_url(None) == "https://api.gdc.cancer.gov/files"
    assert gdc_files_url("https://api.gdc.cancer.gov/data/") == "https://api.gdc.cancer.gov/files"
    assert gdc_files_url("http://mirror:8080/v0") == "http://mirror:8080/v0/files"
    assert len(gdc_filters(["TCGA-KIRC"], None)["content"]) == 2
    assert values_at([{"diagnoses": [{"x": 1}, {"x": 2}]}, {"diagnoses": []}], "diagnoses.x") == [1, 2]
    with pytest.raises(InputError):
        gdc_filters([])


def test_label_map_yaml_and_bad_tsv(tmp_path):
    y = tmp_path / "m.yaml"
    y.write_text("TCGA-KIRC: KIRC\nTCGA-KIRP: KIRP\n")
    assert read_label_map(y) == {"tcga-kirc": "KIRC", "tcga-kirp": "KIRP"}
    bad = tmp_path / "m.tsv"
    bad.write_text("only one column\n")
    with pytest.raises(InputError, match="line 1"):
        read_label_map(bad)


# --------------------------------------------------------------------------- CAMELYON16

def c16_layout(root: Path, *, nested: bool = False, zipped_only: bool = False, capital: bool = False) -> Path:
    """A small CAMELYON16 tree: empty slide files (the builder never opens a slide)."""
    def name(s: str) -> str:
        return s.capitalize() if capital else s

    for stem in ("normal_001", "normal_002", "normal_086"):
        (root / "training" / "normal").mkdir(parents=True, exist_ok=True)
        (root / "training" / "normal" / f"{name(stem)}.tif").touch()
    for stem in ("tumor_001", "tumor_002", "tumor_111"):
        (root / "training" / "tumor").mkdir(parents=True, exist_ok=True)
        (root / "training" / "tumor" / f"{name(stem)}.tif").touch()
    (root / "testing" / "images").mkdir(parents=True)
    for stem in ("test_001", "test_002", "test_049", "test_114"):
        (root / "testing" / "images" / f"{name(stem)}.tif").touch()
    (root / "testing" / "reference.csv").write_text(
        "Test_001,Tumor,Macro,Primary\nTest_002,Normal\nTest_049,Tumor,Micro,Primary\nTest_114,Tumor,Macro,Primary\n"
        "Test_130,Normal\n")
    for part, stems in (("training", ("tumor_001", "tumor_002", "tumor_111")), ("testing", ("test_001", "test_114"))):
        (root / part / "lesion_annotations.zip").touch()
        if zipped_only:
            continue
        folder = root / part / "lesion_annotations"
        if nested:
            folder = folder / "lesion_annotations"
        folder.mkdir(parents=True)
        for stem in stems:
            (folder / f"{name(stem)}.xml").write_text("<ASAP_Annotations/>")
    return root


def test_camelyon16_sheet_has_official_split_labels_annotations_and_exclusions(tmp_path, capsys):
    root = c16_layout(tmp_path / "data" / "CAMELYON16")
    out = tmp_path / "sheets" / "c16.tsv"
    assert main(["camelyon16-cohort", "--root", str(root), "--out", str(out)]) == 0
    sheet = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False).set_index("slide_id")
    assert list(sheet.index) == ["normal_001", "normal_002", "test_001", "test_002", "test_114",
                                 "tumor_001", "tumor_002", "tumor_111"]            # normal_086, test_049 out
    assert list(sheet.columns) == ["patient_id", "label", "source", "split", "annotations"]
    assert (sheet["patient_id"] == sheet.index).all()                              # one patient per slide
    assert dict(sheet["label"]) == {"normal_001": "normal", "normal_002": "normal", "test_001": "tumor",
                                    "test_002": "normal", "test_114": "tumor", "tumor_001": "tumor",
                                    "tumor_002": "tumor", "tumor_111": "tumor"}
    assert dict(sheet["split"]) == {s: ("test" if s.startswith("test") else "train") for s in sheet.index}
    assert sheet.loc["test_114", "annotations"] == ""                              # not exhaustive: no FROC
    assert sheet.loc["test_001", "annotations"] == "../data/CAMELYON16/testing/lesion_annotations/test_001.xml"
    assert sheet.loc["tumor_002", "source"] == "../data/CAMELYON16/training/tumor/tumor_002.tif"
    assert sheet.loc["normal_001", "annotations"] == ""
    printed = capsys.readouterr().out
    assert "8 slides (normal 3, tumor 5)" in printed
    assert "1 normal_086" in printed and "1 test_049" in printed and "test_114" in printed
    assert "1 slide(s) listed in reference.csv have no image" in printed            # test_130
    # the sheet validates as histoflow reads it: relative paths from the sheet's folder exist
    table = validate_samples(read_samples_sheet(out), out, check_local_files=True)
    assert Path(table.loc["tumor_002", "source"]) == (root / "training" / "tumor" / "tumor_002.tif").resolve()
    assert Path(table.loc["tumor_111", "annotations"]).is_file()
    assert table.loc["test_002", "split"] == "test"


def test_camelyon16_accepts_common_variants(tmp_path):
    root = c16_layout(tmp_path / "c16", nested=True, capital=True)
    result = camelyon16_rows(root, tmp_path, absolute=True)
    rows = {r["slide_id"]: r for r in result.rows}
    assert "tumor_001" in rows and rows["tumor_001"]["annotations"].endswith("lesion_annotations/Tumor_001.xml")
    assert Path(rows["test_001"]["source"]).is_absolute()
    assert rows["test_001"]["label"] == "tumor" and "normal_086" not in rows


def test_camelyon16_refuses_what_it_cannot_read(tmp_path):
    root = c16_layout(tmp_path / "zipped", zipped_only=True)
    with pytest.raises(InputError, match="is not unpacked: run `unzip"):
        camelyon16_rows(root, tmp_path)
    assert all(r["annotations"] is None for r in camelyon16_rows(root, tmp_path, annotations=False).rows)
    root = c16_layout(tmp_path / "noref")
    (root / "testing" / "reference.csv").unlink()
    with pytest.raises(InputError, match="no reference.csv"):
        camelyon16_rows(root, tmp_path)
    root = c16_layout(tmp_path / "extra")
    (root / "testing" / "images" / "test_099.tif").touch()
    with pytest.raises(InputError, match="test_099.tif' is not in"):
        camelyon16_rows(root, tmp_path)
    (root / "testing" / "images" / "test_099.tif").unlink()
    (root / "training" / "tumor" / "normal_003.tif").touch()          # a normal slide in the tumour folder
    with pytest.raises(InputError, match="not a CAMELYON16 tumor slide"):
        camelyon16_rows(root, tmp_path)
    with pytest.raises(InputError, match="neither training/ nor testing/"):
        camelyon16_rows(tmp_path / "extra" / "testing" / "images", tmp_path)


def test_samples_schema_accepts_split_train_val_test_only(tmp_path):
    frame = pd.DataFrame({"slide_id": ["a", "b", "c"], "patient_id": ["p", "q", "r"], "label": ["x", "y", "x"],
                          "source": ["gdc:" + uuid(1), "gdc:" + uuid(2), "gdc:" + uuid(3)],
                          "split": ["train", "val", "test"]})
    assert list(validate_samples(frame, "s.tsv")["split"]) == ["train", "val", "test"]
    frame.loc[1, "split"] = "holdout"
    with pytest.raises(InputError, match="split"):
        validate_samples(frame, "s.tsv")


def test_camelyon16_full_release_gives_270_train_and_129_test_slides(tmp_path):
    """The old release's file list (normal_001-160 with normal_086, tumor_001-111, test_001-130 with
    test_049): the official 270 training and 129 test slides remain."""
    root = tmp_path / "CAMELYON16"
    for folder, prefix, n in (("training/normal", "normal", 160), ("training/tumor", "tumor", 111),
                              ("testing/images", "test", 130)):
        (root / folder).mkdir(parents=True)
        for i in range(1, n + 1):
            (root / folder / f"{prefix}_{i:03d}.tif").touch()
    (root / "testing" / "reference.csv").write_text(
        "".join(f"test_{i:03d},{'Tumor,Macro,Primary' if i % 3 == 0 else 'Normal'}\n" for i in range(1, 131)))
    result = camelyon16_rows(root, tmp_path, annotations=False)
    splits = pd.Series([r["split"] for r in result.rows]).value_counts().to_dict()
    assert splits == {"train": 270, "test": 129}
    assert sum(r["label"] == "normal" and r["split"] == "train" for r in result.rows) == 159
