"""Fault injection: nothing is lost, and nothing half-written looks complete.

Each test breaks something the way production breaks (kill -9 of a job mid-run, a full disk, a
tracking server that dies or is down, a download cut mid-stream, eight loggers at once) and
checks that the outputs are then either absent or complete, and that a rerun gives exactly what
an uninterrupted run gives. CI size: a 1024 px slide, 14 small bags, one real `mlflow server`
on 127.0.0.1 for the module (killed and restarted inside it).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from histoflow.io import read_json, write_json, write_parquet
from histoflow.mlflow import COMPLETE_TAG, init_store, log_workflow, result_key

# shared fixtures and helpers of the stage tests (pytest puts tests/ on sys.path)
from test_download import md5, payload, server  # noqa: F401 - `server` is a fixture
from test_download import run as download
from test_features import make_slide, tiles_table
from test_mil import _write_features, synthetic_bags
from test_tracking import config_for, finished_outdir  # noqa: F401 - `finished_outdir` is a fixture

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
BIN = Path(sys.executable).parent
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]), PYTHONHASHSEED="0",
           MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0")


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python(code: str, *args: str) -> subprocess.Popen:
    """A child python running ``code`` (its own process group, so kill -9 takes all of it)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _kill_when(proc: subprocess.Popen, marker: Path, timeout: float = 180) -> None:
    """kill -9 the child's process group once it has written ``marker`` (it then waits there)."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"child exited before the fault point:\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("child never reached the fault point")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _visible_files(folder: Path) -> dict[str, bytes]:
    """What a reader of the folder sees as outputs (temporary files are dot-named)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


class MlflowServer:
    """A real `mlflow server` (SQLite backend, proxied artifacts) on 127.0.0.1 that can be killed
    with SIGKILL and started again on the same port and store."""

    def __init__(self, root: Path):
        self.root, self.port = root, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> None:
        import requests

        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri",
                                      f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination",
                                      str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
                                      "--workers", "1"], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.kill()
        pytest.fail("mlflow server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)   # the server and its uvicorn worker, at once
            self.proc.wait(timeout=30)
        self.proc = None

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.url)


@pytest.fixture(scope="module")
def _hardware():
    from histoflow.checklist import hardware_software

    return hardware_software()


@pytest.fixture(autouse=True)
def _hardware_once(_hardware, monkeypatch):
    """Checklist item 1 probes the machine (git, lscpu, package versions: seconds); these tests
    are about the logging, so it is probed once per module (forked loggers inherit it)."""
    monkeypatch.setattr("histoflow.checklist.hardware_software", lambda: _hardware)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture
def result_copy(finished_outdir, tmp_path):
    """A fresh copy of a finished results folder (its own result key: the key hashes the path)."""
    out = tmp_path / "results"
    shutil.copytree(finished_outdir, out, ignore=shutil.ignore_patterns("mlflow*", "mlruns"))
    return out


def _runs_of(client, out: Path, view: str = "active"):
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name("histoflow-test")
    if exp is None:
        return []
    kind = {"active": ViewType.ACTIVE_ONLY, "deleted": ViewType.DELETED_ONLY}[view]
    return client.search_runs([exp.experiment_id], f"tags.`histoflow.result_key` = '{result_key(str(out))}'",
                              run_view_type=kind)


def _assert_logged_once_and_whole(client, out: Path, status: dict) -> None:
    """Exactly one active parent for the result, marked complete, with its model run and 3 folds,
    every checklist item, and the fold curves."""
    parents = _runs_of(client, out)
    assert [r.info.run_id for r in parents] == [status["run_id"]]
    parent = parents[0]
    assert parent.data.tags[COMPLETE_TAG] == "true" and parent.info.status == "FINISHED"
    assert sum(k.startswith("checklist.") for k in parent.data.tags) == 11
    exp_id = parent.info.experiment_id
    models = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert [m.data.tags["histoflow.model"] for m in models] == ["abmil"]
    folds = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{models[0].info.run_id}'")
    assert len(folds) == 3 and all(f.info.status == "FINISHED" for f in folds)
    assert len(client.get_metric_history(folds[0].info.run_id, "val_auc")) == 3
    assert {a.path for a in client.list_artifacts(folds[0].info.run_id)} >= {"history.tsv", "predictions.tsv"}


# --------------------------------------------------------------------------- MLflow: complete or redone


def test_a_logging_job_killed_part_way_is_redone_not_taken_for_logged(mlflow_server, result_copy, tmp_path):
    out, config = result_copy, config_for(result_copy, tracking_uri=mlflow_server.url)
    marker = tmp_path / "parent-created"
    job = _python("""
        import sys, time
        from pathlib import Path
        import histoflow.mlflow as T
        def stuck(*args, **kwargs):          # the job is killed after the parent run exists
            Path(sys.argv[3]).touch()
            time.sleep(600)
        T._log_model = stuck
        T.log_workflow(sys.argv[1], __import__("json").loads(sys.argv[2]), "samples.tsv", sys.argv[1] + "/mlflow/logged.json")
        """, out, json.dumps(config), marker)
    _kill_when(job, marker)
    client = mlflow_server.client()
    [cut] = _runs_of(client, out)
    assert cut.info.status == "RUNNING" and COMPLETE_TAG not in cut.data.tags
    assert not (out / "mlflow" / "logged.json").exists()

    status = log_workflow(str(out), config, "samples.tsv", str(out / "mlflow" / "synced.json"))   # mlflow_sync
    assert status["status"] == "logged" and status.get("note") != "already logged"
    assert status["run_id"] != cut.info.run_id
    _assert_logged_once_and_whole(client, out, status)
    assert [r.info.run_id for r in _runs_of(client, out, "deleted")] == [cut.info.run_id]
    # and now it is logged: a third call adds nothing
    again = log_workflow(str(out), config, "samples.tsv", str(out / "mlflow" / "again.json"))
    assert again["note"] == "already logged" and again["run_id"] == status["run_id"]


def test_a_server_killed_mid_log_and_restarted_gets_the_whole_result_once(mlflow_server, result_copy, monkeypatch):
    import histoflow.mlflow as T

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    out, config = result_copy, config_for(result_copy, tracking_uri=mlflow_server.url)
    real = T._log_model

    def server_dies_first(*args, **kwargs):
        mlflow_server.kill()                  # kill -9 between the parent run and its model runs
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "_log_model", server_dies_first)
    status = log_workflow(str(out), config, "samples.tsv", str(out / "mlflow" / "logged.json"))
    assert status["status"] == "pending" and read_json(out / "mlflow" / "logged.json")["status"] == "pending"
    monkeypatch.setattr(T, "_log_model", real)

    mlflow_server.start()
    client = mlflow_server.client()
    [cut] = _runs_of(client, out)
    assert COMPLETE_TAG not in cut.data.tags
    status = log_workflow(str(out), config, "samples.tsv", str(out / "mlflow" / "synced.json"))
    assert status["status"] == "logged"
    _assert_logged_once_and_whole(client, out, status)


def test_a_server_down_for_the_whole_run_gets_it_all_from_mlflow_sync(mlflow_server, result_copy):
    out = result_copy
    down = config_for(out, tracking_uri=f"http://127.0.0.1:{_free_port()}")   # nothing listens there
    init_store(str(out), down, str(out / "mlflow" / "store.json"))
    assert read_json(out / "mlflow" / "store.json")["status"] == "unreachable"
    status = log_workflow(str(out), down, "samples.tsv", str(out / "mlflow" / "logged.json"))
    assert status["status"] == "pending" and status["result_key"] == result_key(str(out))   # the run completes
    client = mlflow_server.client()
    assert _runs_of(client, out) == []
    up = config_for(out, tracking_uri=mlflow_server.url)
    synced = log_workflow(str(out), up, "samples.tsv", str(out / "mlflow" / "synced.json"))
    assert synced["status"] == "logged"
    _assert_logged_once_and_whole(client, out, synced)


def test_eight_jobs_logging_in_parallel_lose_nothing(finished_outdir, tmp_path):
    """Eight results logged at once into one SQLite store (the default store kind): each is
    there once and whole."""
    from mlflow.tracking import MlflowClient

    store = tmp_path / "shared.db"
    outs = []
    for i in range(8):
        out = tmp_path / f"results{i}"
        shutil.copytree(finished_outdir, out, ignore=shutil.ignore_patterns("mlflow*", "mlruns"))
        outs.append(out)
    config = config_for(outs[0], tracking_uri=f"sqlite:///{store}", artifact_location=(tmp_path / "art").as_uri())
    # separate processes (forked: mlflow is imported once; this process never opens the store
    # before they fork, so none shares a connection): the rule mlflow_init once, then 8 loggers
    context = multiprocessing.get_context("fork")
    first = context.Process(target=init_store, args=(str(outs[0]), config, str(tmp_path / "store.json")))
    first.start()
    first.join(120)
    assert first.exitcode == 0
    jobs = [context.Process(target=log_workflow, args=(str(out), config, "samples.tsv", str(out / "logged.json")))
            for out in outs]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(240)
        assert job.exitcode == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    for out in outs:
        _assert_logged_once_and_whole(client, out, read_json(out / "logged.json"))


# --------------------------------------------------------------------------- kill -9 of a job, then rerun


def _features(root: Path, out: Path) -> None:
    """The uninterrupted job (in this process: the job pins its own threads and seed)."""
    from histoflow.features import extract_slide_features
    from test_features import tiny_encoder

    extract_slide_features(str(root / "s1.json"), str(root / "s1.tiles.parquet"), str(out), "tiny",
                           {"mpp": 0.5, "num_workers": 0, "batch_size": 16}, [0.5], encoder=tiny_encoder(), seed=3)


FEATURES_JOB = """
    import sys, time
    from pathlib import Path
    import pyarrow.parquet as pq
    from histoflow.features import extract_slide_features
    from test_features import tiny_encoder
    root, out, fault, marker = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    encoder = tiny_encoder()
    if fault == "compute":                   # stop inside the second batch
        forward, calls = encoder.model.forward, []
        def slow(x):
            calls.append(1)
            if len(calls) == 2:
                marker.touch()
                time.sleep(600)
            return forward(x)
        encoder.model.forward = slow
    if fault == "write":                     # stop with half of the file's bytes on disk
        write_table = pq.write_table
        def half(table, where, **kw):
            write_table(table, where, **kw)
            data = Path(where).read_bytes()
            Path(where).write_bytes(data[: len(data) // 2])
            marker.touch()
            time.sleep(600)
        pq.write_table = half
    extract_slide_features(str(root / "s1.json"), str(root / "s1.tiles.parquet"), out, "tiny",
                           {"mpp": 0.5, "num_workers": 0, "batch_size": 16}, [0.5], encoder=encoder, seed=3)
"""


@pytest.fixture(scope="module")
def feature_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-features")
    slide = make_slide(root / "s1.tiff")
    write_json(root / "s1.json", {"slide_id": "s1", "status": "ok", "path": str(slide)})
    write_parquet(root / "s1.tiles.parquet", tiles_table("s1"))
    reference = root / "reference" / "s1.parquet"
    _features(root, reference)
    return root, reference.read_bytes()


@pytest.mark.parametrize("fault", ["compute", "write"])
def test_a_features_job_killed_mid_run_leaves_nothing_and_its_rerun_is_byte_identical(feature_inputs, tmp_path, fault):
    root, reference = feature_inputs
    out = tmp_path / "features" / "tiny" / "s1.parquet"
    out.parent.mkdir(parents=True)
    marker = tmp_path / "marker"
    _kill_when(_python(FEATURES_JOB, root, out, fault, marker), marker)
    assert not out.exists()                                     # no output that looks complete
    assert _visible_files(out.parent) == {}
    if fault == "write":                                        # the half file carries a temporary name
        assert [p.name.startswith(".s1.parquet.") and ".part" in p.name for p in out.parent.iterdir()] == [True]
    # the job the killed one was a copy of really is that (same output when not stopped)
    _features(root, out)                                        # Snakemake reruns the job
    assert out.read_bytes() == reference


MIL_JOB = """
    import sys, time
    from pathlib import Path
    import torch
    root, out, fault, marker = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    if fault == "train":                     # stop in the middle of the second epoch
        step, steps = torch.optim.AdamW.step, []
        def slow(self, *args, **kwargs):
            steps.append(1)
            if len(steps) == 15:
                marker.touch()
                time.sleep(600)
            return step(self, *args, **kwargs)
        torch.optim.AdamW.step = slow
    from test_faults import _train
    _train(root, out)
"""


def _train(root: Path, out: Path) -> None:
    from histoflow.mil.train import train_fold

    paths = sorted(str(p) for p in (root / "features").glob("*.parquet"))
    settings = {"models": ["abmil"], "epochs": 3, "lr": 2e-3, "hidden_dim": 32, "device": "cpu"}
    train_fold(root / "splits.tsv", paths, "abmil", 0, settings, 1337, "tiny", out / "checkpoint.pt",
               out / "history.tsv", out / "predictions.tsv", out / "tile_scores.parquet", threads=1)


@pytest.fixture(scope="module")
def mil_inputs(tmp_path_factory):
    from histoflow.split import write_splits

    root = tmp_path_factory.mktemp("kill-mil")
    bags, ys, _ = synthetic_bags(14, seed=7)
    (root / "features").mkdir()
    samples = []
    for i, (bag, y) in enumerate(zip(bags, ys)):
        _write_features(root / "features" / f"S{i:02d}.parquet", f"S{i:02d}", bag)
        samples.append({"slide_id": f"S{i:02d}", "patient_id": f"P{i}", "label": "tumor" if y else "normal"})
    write_splits(samples, {"k": 2, "val_fraction": 0.25}, "tumor", 3, root / "splits.tsv", root / "split.json")
    reference = root / "reference"
    _train(root, reference)
    return root, _visible_files(reference)


def test_a_mil_training_job_killed_mid_run_leaves_nothing_and_its_rerun_is_byte_identical(mil_inputs, tmp_path):
    root, reference = mil_inputs
    assert set(reference) == {"checkpoint.pt", "history.tsv", "predictions.tsv", "tile_scores.parquet"}
    out = tmp_path / "mil" / "abmil" / "fold0"
    out.parent.mkdir(parents=True)
    marker = tmp_path / "marker"
    _kill_when(_python(MIL_JOB, root, out, "train", marker), marker)
    assert not out.exists() or _visible_files(out) == {}
    _train(root, out)
    assert _visible_files(out) == reference


# --------------------------------------------------------------------------- a full disk


def test_a_full_disk_during_a_write_is_a_clear_error_and_leaves_no_half_file(tmp_path):
    """A file-size limit (what a full disk or a quota does to a write): one line naming the
    file and the fix; the previous version of the output stays whole, no temporary is left."""
    out = tmp_path / "out"
    write_json(out / "record.json", {"version": 1})
    proc = _python("""
        import resource, signal, sys
        import numpy as np, pandas as pd
        from histoflow.errors import OutputError
        from histoflow.io import write_json, write_parquet
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a full disk fails the write, not the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))
        for write in (lambda: write_parquet(sys.argv[1] + "/table.parquet", pd.DataFrame({"a": np.arange(200_000.0)})),
                      lambda: write_json(sys.argv[1] + "/record.json", {"version": 2, "rows": list(range(50_000))})):
            try:
                write()
            except OutputError as err:
                print("ERROR", err)
            else:
                print("WROTE")
        """, out)
    lines = _finish(proc).splitlines()
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(errors) == 2 and "WROTE" not in lines, lines
    assert "table.parquet" in errors[0] and "record.json" in errors[1]
    assert all("File too large" in e and "free space" in e for e in errors)
    assert sorted(p.name for p in out.iterdir()) == ["record.json"]          # no table, no temporary
    assert read_json(out / "record.json") == {"version": 1}


# --------------------------------------------------------------------------- a download cut mid-stream


def test_a_download_refused_twice_then_cut_mid_stream_resumes_and_is_md5_checked(tmp_path, server):  # noqa: F811
    data = payload(400_000)
    server.routes["/cut.svs"] = {"data": data, "fail": 2, "fail_status": 500, "drop": 3}
    manifest, dest = download(tmp_path, server.url + "/cut.svs", md5(data))
    assert manifest["attempts"] == 4 and manifest["resumed"]
    assert manifest["md5"] == md5(data) and manifest["md5_checked"] is True
    assert Path(manifest["path"]).read_bytes() == data
    ranges = [headers.get("Range") for _path, headers in server.requests]
    assert ranges[:3] == [None, None, None] and ranges[3].startswith("bytes=") and int(ranges[3][6:-1]) > 0
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == ["cut.svs"]
