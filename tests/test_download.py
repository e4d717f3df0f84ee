"""Stage `download`: what a user relies on when slides come from URLs, the GDC, or local disks.

Network behaviour is tested against a real HTTP server on 127.0.0.1 (random port) that can
truncate bodies, drop connections, ignore Range, fail, and demand a GDC token.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import runpy
import socket
import struct
import threading
import types
from pathlib import Path

import pytest

from histoflow.download import (DownloadSettings, backoff_seconds, choose_filename, download_slide,
                                filename_from_headers, redact_url, sanitize_filename)
from histoflow.errors import InputError, SlideError

TOKEN = "s3cr3t-GDC-token-0123456789abcdef"
UUID = "2f6b6a8e-1111-4222-8333-944455556666"
FAST = {"retries": 3, "backoff_s": 0.001, "timeout_s": 5}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def payload(n: int = 300_000, seed: int = 1) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32)


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.routes[path]``: a dict of behaviours (see the fixture)."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802 (http.server API)
        path = self.path.split("?", 1)[0]
        self.server.requests.append((path, dict(self.headers)))
        route = self.server.routes.get(path)
        if route is None:
            return self._empty(404)
        route["hits"] = route.get("hits", 0) + 1
        if "redirect" in route:
            self.send_response(302)
            self.send_header("Location", route["redirect"])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if "token" in route and self.headers.get("X-Auth-Token") != route["token"]:
            return self._empty(403)
        if route.get("fail", 0) >= route["hits"]:
            return self._empty(route.get("fail_status", 503), {"Retry-After": "0"})
        if "json" in route:
            body = json.dumps(route["json"]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        data, start = route["data"], 0
        etag = f'"{md5(data)}"'
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and route.get("range", True) and (if_range is None or if_range == etag):
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", etag)
        if "filename" in route:
            self.send_header("Content-Disposition", f"attachment; filename={route['filename']}")
        self.end_headers()
        body = data[start:]
        if route.get("truncate", 0) >= route["hits"]:  # announce everything, send half, close
            self.wfile.write(body[: len(body) // 2])
            return
        if route.get("drop", 0) >= route["hits"]:  # reset the connection mid-body
            self.wfile.write(body[: len(body) // 3])
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return
        self.wfile.write(body)

    def _empty(self, status, headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.routes, srv.requests = {}, []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def run(tmp_path, source, md5_=None, on_error="fail", settings=None, slide_id="S1"):
    dest = tmp_path / "downloads" / slide_id
    manifest_path = tmp_path / "downloads" / f"{slide_id}.json"
    manifest = download_slide(slide_id, source, dest, manifest_path, md5_, dict(FAST, **(settings or {})), on_error)
    assert json.loads(manifest_path.read_text()) == manifest
    return manifest, dest


def assert_clean(dest: Path, final_name: str | None = None):
    """No partial file is left, and only the final file (if any) carries the slide's name."""
    assert not list(dest.glob("*.part"))
    if final_name is None:
        assert not [p for p in dest.iterdir() if p.is_file() and not p.name.startswith(".")]


# --------------------------------------------------------------------------- settings and names

def test_settings_come_from_the_config_section_with_schema_defaults():
    s = DownloadSettings.from_config({"retries": 2, "gdc_token_file": None})
    assert (s.retries, s.backoff_s, s.timeout_s, s.gdc_endpoint, s.gdc_token_env) == \
        (2, 1.0, 60.0, "https://api.gdc.cancer.gov/data", "GDC_TOKEN")
    with pytest.raises(InputError, match="download.retires"):
        DownloadSettings.from_config({"retires": 2})


def test_file_names_are_safe_and_keep_the_extension():
    assert sanitize_filename("../../etc/x y.svs") == "x_y.svs"
    assert sanitize_filename(".hidden.ndpi") == "hidden.ndpi"
    assert sanitize_filename("", fallback="S1") == "S1"
    assert sanitize_filename("rejected", fallback="S1") == "S1"
    assert filename_from_headers("attachment; filename*=UTF-8''TCGA%20A1.svs") == "TCGA A1.svs"
    # Content-Disposition wins; otherwise the URL path that has an extension (pre-signed redirects)
    assert choose_filename("http://h/data/uuid", "http://h/data/uuid", 'attachment; filename="a.svs"', "S") == "a.svs"
    assert choose_filename("http://h/get/123", "http://s3/b/slide.ndpi?sig=x", None, "S") == "slide.ndpi"
    assert choose_filename("http://h/get/123", "http://h/get/123", None, "S") == "123"


def test_urls_in_manifests_carry_no_credentials():
    safe = redact_url("https://user:pw@host:8443/a.svs?X-Amz-Signature=abc&part=2&token=t")
    assert "pw" not in safe and "abc" not in safe and "=t" not in safe
    assert safe.startswith("https://host:8443/a.svs?") and "part=2" in safe


def test_backoff_is_exponential_and_honours_retry_after():
    assert [backoff_seconds(k, 0.5) for k in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert backoff_seconds(1, 0.5, retry_after=7) == 7
    assert backoff_seconds(1, 0.5, retry_after=1e9) == 300  # capped: a server asking for days is down


# --------------------------------------------------------------------------- HTTP

def test_plain_download_is_complete_verified_and_described(tmp_path, server):
    data = payload()
    server.routes["/slides/a%20b.svs"] = {"data": data}
    manifest, dest = run(tmp_path, server.url + "/slides/a%20b.svs", md5(data))
    path = Path(manifest["path"])
    assert path == dest.absolute() / "a_b.svs" and path.read_bytes() == data
    assert manifest["status"] == "ok" and manifest["reason"] is None
    assert (manifest["md5"], manifest["md5_checked"], manifest["size_bytes"]) == (md5(data), True, len(data))
    assert manifest["source_kind"] == "url" and manifest["attempts"] == 1 and not manifest["resumed"]
    assert_clean(dest, "a_b.svs")


def test_truncated_body_is_resumed_with_range_not_refetched(tmp_path, server):
    data = payload()
    server.routes["/t.svs"] = {"data": data, "truncate": 2}
    manifest, dest = run(tmp_path, server.url + "/t.svs", md5(data))
    assert Path(manifest["path"]).read_bytes() == data
    assert manifest["attempts"] == 3 and manifest["resumed"] and manifest["md5"] == md5(data)
    ranges = [h.get("Range") for p, h in server.requests]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[2].startswith("bytes=")
    assert int(ranges[2].split("=")[1].rstrip("-")) > int(ranges[1].split("=")[1].rstrip("-")) > 0
    assert_clean(dest, "t.svs")


def test_dropped_connection_mid_body_recovers(tmp_path, server):
    data = payload()
    server.routes["/d.svs"] = {"data": data, "drop": 1}
    manifest, dest = run(tmp_path, server.url + "/d.svs")
    assert Path(manifest["path"]).read_bytes() == data and manifest["attempts"] == 2
    # md5 recorded even without a sheet md5 (slide_qc and MLflow audit it), but not "checked"
    assert manifest["md5"] == md5(data) and manifest["md5_checked"] is False


def test_server_ignoring_range_makes_a_clean_restart(tmp_path, server):
    data = payload()
    server.routes["/n.svs"] = {"data": data, "truncate": 1, "range": False}
    manifest, dest = run(tmp_path, server.url + "/n.svs", md5(data))
    assert Path(manifest["path"]).read_bytes() == data  # no half file glued onto a full one
    assert manifest["attempts"] == 2 and not manifest["resumed"]


def test_file_changed_on_server_between_attempts_is_not_spliced(tmp_path, server):
    old, new = payload(seed=1), payload(seed=2)
    server.routes["/c.svs"] = {"data": old, "truncate": 1}
    with pytest.raises(SlideError):
        run(tmp_path, server.url + "/c.svs", settings={"retries": 0})
    assert list((tmp_path / "downloads/S1").glob("*.part"))  # the partial file waits for the next run
    server.routes["/c.svs"] = {"data": new}
    manifest, _ = run(tmp_path, server.url + "/c.svs")
    assert server.requests[-1][1].get("If-Range") == f'"{md5(old)}"'
    assert Path(manifest["path"]).read_bytes() == new and not manifest["resumed"]


def test_checksum_mismatch_rejects_the_file_and_never_uses_it(tmp_path, server):
    data = payload()
    server.routes["/m.svs"] = {"data": data}
    with pytest.raises(SlideError) as err:
        run(tmp_path, server.url + "/m.svs", "0" * 32)
    msg = str(err.value)
    assert "\n" not in msg and "'S1'" in msg and "md5 mismatch" in msg and md5(data) in msg and "0" * 32 in msg
    dest = tmp_path / "downloads/S1"
    assert not (dest / "m.svs").exists() and (dest / "rejected/m.svs").read_bytes() == data
    assert_clean(dest)
    assert not (tmp_path / "downloads/S1.json").exists()  # on_error: fail writes no manifest


def test_not_found_fails_at_once_with_a_clear_line(tmp_path, server):
    with pytest.raises(SlideError) as err:
        run(tmp_path, server.url + "/missing.svs")
    assert len(server.requests) == 1  # a 404 is not retried
    assert "HTTP 404" in str(err.value) and "source" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("status", [503, 429, 408])
def test_transient_statuses_are_retried(tmp_path, server, status):
    data = payload(1000)
    server.routes["/r.svs"] = {"data": data, "fail": 2, "fail_status": status}
    manifest, _ = run(tmp_path, server.url + "/r.svs")
    assert manifest["attempts"] == 3 and Path(manifest["path"]).read_bytes() == data


def test_retries_are_bounded_and_the_error_says_what_to_do(tmp_path, server):
    server.routes["/down.svs"] = {"data": b"x", "fail": 99}
    with pytest.raises(SlideError, match="after 3 attempt.*download.retries"):
        run(tmp_path, server.url + "/down.svs", settings={"retries": 2})
    assert server.routes["/down.svs"]["hits"] == 3


def test_skip_writes_a_failed_manifest_so_the_cohort_goes_on(tmp_path, server):
    manifest, _ = run(tmp_path, server.url + "/missing.svs", on_error="skip")
    assert manifest["status"] == "failed" and "HTTP 404" in manifest["reason"] and manifest["path"] is None
    assert manifest["slide_id"] == "S1" and manifest["source_kind"] == "url"


def test_a_complete_download_is_not_fetched_again(tmp_path, server):
    data = payload()
    server.routes["/i.svs"] = {"data": data}
    first, _ = run(tmp_path, server.url + "/i.svs", md5(data))
    n = len(server.requests)
    again, _ = run(tmp_path, server.url + "/i.svs", md5(data))
    (tmp_path / "downloads/S1.json").unlink()  # Snakemake deletes outputs before re-running a job
    third, _ = run(tmp_path, server.url + "/i.svs", md5(data))
    assert len(server.requests) == n
    assert again["reused"] and third["reused"] and third["path"] == first["path"] and third["md5"] == md5(data)
    # a different expected md5 is a different file: fetched again (and rejected here)
    with pytest.raises(SlideError, match="md5 mismatch"):
        run(tmp_path, server.url + "/i.svs", "f" * 32)
    assert len(server.requests) == n + 1


# --------------------------------------------------------------------------- GDC

@pytest.fixture
def gdc(server):
    data = payload(seed=3)
    server.routes[f"/data/{UUID}"] = {"data": data, "token": TOKEN, "filename": "TCGA-AA-0001.svs"}
    server.routes[f"/files/{UUID}"] = {"json": {"data": {"md5sum": md5(data), "file_name": "TCGA-AA-0001.svs"}},
                                       "token": TOKEN}
    server.gdc_data = data
    return server


def test_gdc_token_from_a_file_or_the_environment_never_leaks(tmp_path, gdc, caplog, capsys, monkeypatch):
    token_file = tmp_path / "gdc-token.txt"
    token_file.write_text(TOKEN + "\n")
    caplog.set_level(logging.DEBUG)  # urllib3 included
    settings = {"gdc_endpoint": gdc.url + "/data", "gdc_token_file": str(token_file)}
    manifest, dest = run(tmp_path, f"gdc:{UUID}", settings=settings)
    assert Path(manifest["path"]).name == "TCGA-AA-0001.svs"  # name from Content-Disposition
    assert Path(manifest["path"]).read_bytes() == gdc.gdc_data
    assert manifest["source"] == f"gdc:{UUID}" and manifest["source_kind"] == "gdc"
    assert manifest["md5_checked"]  # GDC's own md5 was checked though the sheet gave none
    assert gdc.requests[-1][1]["X-Auth-Token"] == TOKEN

    monkeypatch.setenv("MY_GDC", TOKEN)
    manifest2, _ = run(tmp_path, f"gdc:{UUID}", slide_id="S2",
                       settings={"gdc_endpoint": gdc.url + "/data", "gdc_token_env": "MY_GDC"})
    assert manifest2["status"] == "ok"

    out = capsys.readouterr()
    written = "".join(p.read_text() for p in tmp_path.rglob("*.json"))
    for text in (caplog.text, out.out, out.err, written):
        assert TOKEN not in text


def test_gdc_without_token_says_access_is_controlled_and_how_to_give_one(tmp_path, gdc, monkeypatch):
    monkeypatch.delenv("GDC_TOKEN", raising=False)
    with pytest.raises(SlideError) as err:
        run(tmp_path, f"gdc:{UUID}", settings={"gdc_endpoint": gdc.url + "/data"})
    msg = str(err.value)
    assert "controlled" in msg and "gdc_token_file" in msg and "GDC_TOKEN" in msg and "\n" not in msg
    assert gdc.routes[f"/data/{UUID}"]["hits"] == 1  # 403 is not retried


def test_gdc_rejected_token_error_and_skip_manifest_hide_the_token(tmp_path, gdc, monkeypatch, caplog):
    monkeypatch.setenv("GDC_TOKEN", TOKEN + "-expired")
    caplog.set_level(logging.DEBUG)
    manifest, _ = run(tmp_path, f"gdc:{UUID}", on_error="skip", settings={"gdc_endpoint": gdc.url + "/data"})
    assert manifest["status"] == "failed" and "refused the token" in manifest["reason"]
    assert TOKEN not in json.dumps(manifest) and TOKEN not in caplog.text


def test_missing_token_file_is_a_clear_error(tmp_path, gdc):
    with pytest.raises(SlideError, match="token file .* does not exist"):
        run(tmp_path, f"gdc:{UUID}", settings={"gdc_endpoint": gdc.url + "/data",
                                               "gdc_token_file": str(tmp_path / "nope.txt")})


def test_gdc_md5_mismatch_rejects_the_file(tmp_path, gdc, monkeypatch):
    monkeypatch.setenv("GDC_TOKEN", TOKEN)
    gdc.routes[f"/files/{UUID}"]["json"]["data"]["md5sum"] = "a" * 32
    with pytest.raises(SlideError, match="md5 mismatch"):
        run(tmp_path, f"gdc:{UUID}", settings={"gdc_endpoint": gdc.url + "/data"})
    assert (tmp_path / "downloads/S1/rejected/TCGA-AA-0001.svs").exists()


def test_token_is_not_forwarded_when_a_redirect_leaves_the_gdc_host(tmp_path, server, monkeypatch):
    data = payload(5000)
    port = server.server_address[1]
    server.routes[f"/data/{UUID}"] = {"redirect": f"http://localhost:{port}/bucket/obj.svs?X-Amz-Signature=zz"}
    server.routes["/bucket/obj.svs"] = {"data": data}
    monkeypatch.setenv("GDC_TOKEN", TOKEN)
    manifest, _ = run(tmp_path, f"gdc:{UUID}", settings={"gdc_endpoint": server.url + "/data", "gdc_md5": False})
    assert Path(manifest["path"]).name == "obj.svs" and Path(manifest["path"]).read_bytes() == data
    sent = {path: headers for path, headers in server.requests}
    assert sent[f"/data/{UUID}"]["X-Auth-Token"] == TOKEN
    assert "X-Auth-Token" not in sent["/bucket/obj.svs"]


# --------------------------------------------------------------------------- local sources

def test_local_file_is_linked_not_copied_and_md5_only_when_asked(tmp_path, monkeypatch):
    src = tmp_path / "store" / "slide.svs"
    src.parent.mkdir()
    src.write_bytes(b"fake slide bytes")
    import histoflow.download as dl

    def no_md5(*a, **k):
        raise AssertionError("md5 of a local file computed without a sheet md5")

    with monkeypatch.context() as m:
        m.setattr(dl, "file_md5", no_md5)
        manifest, dest = run(tmp_path, str(src))
    link = dest / "slide.svs"
    assert link.is_symlink() and os.readlink(link) == str(src) and manifest["path"] == str(link.absolute())
    assert manifest["md5"] is None and manifest["size_bytes"] == src.stat().st_size
    manifest, _ = run(tmp_path, str(src), md5(b"fake slide bytes"), slide_id="S2")
    assert manifest["md5"] == md5(b"fake slide bytes") and manifest["md5_checked"]


def test_local_md5_mismatch_fails_and_leaves_no_link(tmp_path):
    src = tmp_path / "slide.svs"
    src.write_bytes(b"abc")
    with pytest.raises(SlideError, match="md5 mismatch"):
        run(tmp_path, str(src), "0" * 32)
    assert not (tmp_path / "downloads/S1/slide.svs").exists()
    assert src.read_bytes() == b"abc"  # the user's file is never moved


def test_dicom_file_brings_its_folder_and_a_folder_source_is_linked(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    for name in ("level_1.dcm", "level_0.dcm", "label.dcm"):
        (series / name).write_bytes(b"D" * 10)
    manifest, dest = run(tmp_path, str(series / "level_0.dcm"))
    assert (dest / "series").is_symlink() and Path(manifest["path"]) == (dest / "series/level_0.dcm").absolute()
    assert sorted(p.name for p in Path(manifest["path"]).parent.iterdir()) == ["label.dcm", "level_0.dcm", "level_1.dcm"]
    assert manifest["size_bytes"] == 30
    manifest, _ = run(tmp_path, str(series), slide_id="S2")
    assert Path(manifest["path"]).name == "label.dcm" and Path(manifest["path"]).parent.is_symlink()


def test_mirax_brings_its_data_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m/case.mrxs").write_bytes(b"M")
    (tmp_path / "m/case").mkdir()
    (tmp_path / "m/case/Slidedat.ini").write_bytes(b"ini")
    manifest, dest = run(tmp_path, str(tmp_path / "m/case.mrxs"))
    assert (dest / "case.mrxs").is_symlink() and (dest / "case/Slidedat.ini").read_bytes() == b"ini"


def test_missing_local_source_skips_with_a_reason(tmp_path):
    manifest, _ = run(tmp_path, str(tmp_path / "nowhere.svs"), on_error="skip")
    assert manifest["status"] == "failed" and "does not exist" in manifest["reason"]
    with pytest.raises(SlideError, match="does not exist"):
        run(tmp_path, str(tmp_path / "nowhere.svs"))


def test_the_rule_script_only_wires_snakemake_to_download_slide(tmp_path, repo_root):
    src = tmp_path / "a.svs"
    src.write_bytes(b"x")
    snk = types.SimpleNamespace(
        wildcards=types.SimpleNamespace(slide_id="S9"),
        params=types.SimpleNamespace(source=str(src), md5=None, dest_dir=str(tmp_path / "d/S9"),
                                     settings=FAST, on_error="fail"),
        output=types.SimpleNamespace(manifest=str(tmp_path / "d/S9.json")),
        log=[str(tmp_path / "logs/S9.log")])
    runpy.run_path(str(repo_root / "workflow/scripts/download_slide.py"), init_globals={"snakemake": snk})
    assert json.loads((tmp_path / "d/S9.json").read_text())["status"] == "ok"
    assert "linked" in (tmp_path / "logs/S9.log").read_text()


# --------------------------------------------------------------------------- real slides

def test_real_slides_open_after_download_and_link(tmp_path, server, shared_data):
    openslide = pytest.importorskip("openslide")
    svs = shared_data / "slides/CMU-1-Small-Region.svs"
    data = svs.read_bytes()
    server.routes["/CMU-1-Small-Region.svs"] = {"data": data, "truncate": 1}
    manifest, _ = run(tmp_path, server.url + "/CMU-1-Small-Region.svs", "1ad6e35c9d17e4d85fb7e3143b328efe")
    with openslide.OpenSlide(manifest["path"]) as slide:
        assert slide.dimensions == (2220, 2967)
    dcm = sorted((shared_data / "slides/dicom-cmu-1-small-region").glob("*.dcm"))[0]
    manifest, _ = run(tmp_path, str(dcm), slide_id="S2")
    with openslide.OpenSlide(manifest["path"]) as slide:
        assert slide.dimensions == (2220, 2967) and slide.level_count > 1


def test_signed_url_secrets_stay_out_of_errors_and_manifests(tmp_path, caplog):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caplog.set_level(logging.DEBUG)
    url = f"http://user:pa55word@127.0.0.1:{port}/x.svs?X-Amz-Signature=SIGSECRET123&part=1"
    manifest, _ = run(tmp_path, url, on_error="skip", settings={"retries": 1})
    assert manifest["status"] == "failed" and "after 2 attempt" in manifest["reason"]
    text = json.dumps(manifest) + caplog.text
    assert "SIGSECRET123" not in text and "pa55word" not in text
    assert manifest["source"] == f"http://127.0.0.1:{port}/x.svs?X-Amz-Signature=***&part=1"


def test_not_enough_disk_space_is_said_before_downloading(tmp_path, server, monkeypatch):
    import shutil
    server.routes["/big.svs"] = {"data": payload()}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=1, used=1, free=1000))
    with pytest.raises(SlideError, match="not enough disk space.*free"):
        run(tmp_path, server.url + "/big.svs")
    assert server.routes["/big.svs"]["hits"] == 1
