"""`snakemake --profile profiles/slurm` on a real SLURM: what cluster users rely on.

Needs a running SLURM with accounting (CI: `tests/slurm/setup_slurm.sh` before `make test`);
skipped with the reason everywhere else. The demo cohort (3 small slides) goes through sbatch to
`tiles` and `mlflow_init`, with MLflow served by an `mlflow server` on 127.0.0.1 as on a login
node. One run is shared by the tests; the whole module takes about 3-5 minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ACCOUNT = "histoflow"        # created by tests/slurm/setup_slurm.sh
PARTITION = "debug"

pytestmark = pytest.mark.slurm


def _slurm_reason_missing() -> str | None:
    """Why SLURM cannot run jobs here (None when it can)."""
    for tool in ("sbatch", "sacct", "scontrol", "sinfo"):
        if shutil.which(tool) is None:
            return f"{tool} not found (start a test cluster with tests/slurm/setup_slurm.sh)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        acct = subprocess.run(["sacct", "-n", "-X", "-o", "JobID", "--starttime", "now-1minutes"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SLURM does not answer: {err}"
    if "is UP" not in ping.stdout:
        return "slurmctld is not running (tests/slurm/setup_slurm.sh starts one)"
    if acct.returncode != 0:
        return f"sacct does not work (no slurmdbd?): {acct.stderr.strip()[:200]}"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = _slurm_reason_missing()
    if reason:
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(slurm, tmp_path_factory):
    """A tracking server as users start it on a login node (here on 127.0.0.1)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{uri}/health", timeout=2).ok:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-500:]}")
        time.sleep(1)
    else:
        proc.terminate()
        pytest.fail(f"mlflow server did not answer on {uri}")
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _cluster_profile(dest: Path, logdir: Path) -> Path:
    """profiles/slurm as shipped, with this cluster's account/partition filled in (what users do)
    and a short first status check to keep the test quick."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile["default-resources"] = {**profile["default-resources"],
                                    "slurm_account": ACCOUNT, "slurm_partition": PARTITION}
    profile["slurm-init-seconds-before-status-checks"] = 5
    profile["cores"] = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])
    profile["slurm-logdir"] = str(logdir)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile))
    return dest


def _run(profile: Path, targets: list[str], configfile: Path, *extra: str, timeout: int = 420):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    cmd = [str(BIN / "snakemake"), *targets, "--profile", str(profile),
           "--configfile", "config.yaml", str(configfile), *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _sacct(since: datetime, logdir: Path) -> list[dict]:
    """Jobs of this test (allocations only), newest last; `Rule` is the plugin's log folder of the
    job (rule_<name>/... or group_<group>_<rules>/...), which says what ran in it."""
    fields = ["JobID", "JobName", "State", "ExitCode", "ReqMem", "ReqCPUS", "AllocCPUS", "Timelimit",
              "ReqTRES", "Account", "Partition", "Comment"]
    proc = subprocess.run(["sacct", "-X", "-n", "-P", "--starttime", since.strftime("%Y-%m-%dT%H:%M:%S"),
                           "-o", ",".join(fields)], capture_output=True, text=True, timeout=60, check=True)
    jobs = [dict(zip(fields, line.split("|"))) for line in proc.stdout.splitlines() if line.strip()]
    jobs = [j for j in jobs if j["JobName"].startswith("histoflow")]
    folders = {log.stem: str(log.parent.relative_to(logdir)) for log in logdir.rglob("*.log")}
    for job in jobs:
        job["Rule"] = folders.get(job["JobID"], "") + " " + job["Comment"]
    return jobs


def _wait_accounted(since: datetime, logdir: Path, n_min: int, timeout: float = 60) -> list[dict]:
    """slurmdbd records jobs asynchronously: wait until they are all there and finished."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = _sacct(since, logdir)
        done = [j for j in jobs if j["State"].split()[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                            "OUT_OF_MEMORY", "NODE_FAIL")]
        if (len(jobs) >= n_min and len(done) == len(jobs)) or time.monotonic() > deadline:
            return jobs
        time.sleep(2)


def _mem_mb(req_mem: str) -> float:
    """sacct ReqMem ('1000M', '2G', '1000Mn' on old versions) in MB."""
    value = req_mem.rstrip("nc")
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[value[-1]]
    return float(value[:-1]) * scale


def _minutes(limit: str) -> float:
    days, _, hms = limit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + s / 60


@pytest.fixture(scope="module")
def cohort(slurm, tmp_path_factory):
    from histoflow.demo import make_demo_cohort

    root = tmp_path_factory.mktemp("slurm_cohort")
    sheet = make_demo_cohort(root / "demo", n_slides=3, seed=1, small=True, progress=False)
    return root, Path(sheet)


@pytest.fixture(scope="module")
def first_run(cohort, mlflow_server):
    root, sheet = cohort
    demo_cfg = yaml.safe_load((sheet.parent / "config.yaml").read_text())
    cfg = {**demo_cfg, "samples": str(sheet), "outdir": str(root / "results"),
           "mlflow": {"tracking_uri": mlflow_server, "experiment": f"slurm-test-{root.name}"}}
    configfile = root / "e2e.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    profile = _cluster_profile(root / "profile", root / "slurm_logs")
    since = datetime.now() - timedelta(seconds=2)
    # mlflow_init asks for 2 CPUs here, to see a per-rule thread count reach SLURM
    proc = _run(profile, ["tiles", "mlflow_init"], configfile, "--set-threads", "mlflow_init=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = _wait_accounted(since, root / "slurm_logs", n_min=2)
    cores = yaml.safe_load((profile / "config.yaml").read_text())["cores"]
    return {"cores": cores, "root": root, "cfg": cfg, "configfile": configfile, "profile": profile, "proc": proc,
            "jobs": jobs, "outdir": Path(cfg["outdir"])}


def _jobs_of(jobs: list[dict], rule_or_group: str) -> list[dict]:
    return [j for j in jobs if rule_or_group in j["Rule"]]


def test_every_job_runs_through_sbatch_and_is_accounted(first_run):
    jobs = first_run["jobs"]
    assert jobs, f"no histoflow job in sacct; snakemake said:\n{first_run['proc'].stderr[-3000:]}"
    assert all(j["State"] == "COMPLETED" for j in jobs), jobs
    assert {j["Account"] for j in jobs} == {ACCOUNT} and {j["Partition"] for j in jobs} == {PARTITION}
    for slide in ("demo_000", "demo_001", "demo_002"):
        assert (first_run["outdir"] / "tiles" / f"{slide}.parquet").is_file()
    # the plugin kept every job's log (slurm-keep-successful-logs)
    logs = list((first_run["root"] / "slurm_logs").rglob("*.log"))
    assert len(logs) >= len(jobs)


def test_small_per_slide_rules_are_grouped_into_one_job(first_run):
    """3 slides x (qc_slide, detect_tissue, tile_slide) = 9 rule jobs, one SLURM job (group
    per_slide, 50 slides per job); download_slide ran on the submit host and is not in SLURM."""
    jobs = first_run["jobs"]
    grouped = _jobs_of(jobs, "per_slide")
    assert len(grouped) == 1, [j["Rule"] for j in jobs]
    assert not _jobs_of(jobs, "download_slide")
    assert not [j for j in jobs if "qc_slide" in j["Rule"] and "per_slide" not in j["Rule"]]
    # a group job asks for what its largest member needs (detect_tissue: 2000 MB, 15 min), runs at
    # most `cores` (profile) members side by side, and its time limit covers the members in series
    assert _mem_mb(grouped[0]["ReqMem"]) >= 2000
    assert int(grouped[0]["ReqCPUS"]) <= first_run["cores"]
    assert _minutes(grouped[0]["Timelimit"]) >= 10 + 15 + 10


def test_per_rule_memory_cpus_and_time_limit_reach_the_job(first_run):
    """profiles/default: mlflow_init mem_mb 1000, runtime 10; --set-threads mlflow_init=2."""
    (job,) = _jobs_of(first_run["jobs"], "mlflow_init")
    assert _mem_mb(job["ReqMem"]) == 1000
    assert _minutes(job["Timelimit"]) == 10
    assert int(job["ReqCPUS"]) == 2 and int(job["AllocCPUS"]) == 2


def test_mlflow_on_the_login_node_is_reached_from_a_compute_job(first_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    store = json.loads((first_run["outdir"] / "mlflow" / "store.json").read_text())
    assert store["status"] == "ready", store
    experiment = MlflowClient(tracking_uri=mlflow_server).get_experiment_by_name(
        first_run["cfg"]["mlflow"]["experiment"])
    assert experiment is not None and experiment.experiment_id == store["experiment_id"]


def test_rerun_redoes_only_what_is_missing(first_run):
    outdir = first_run["outdir"]
    tiles = {p.name: p.stat().st_mtime_ns for p in (outdir / "tiles").glob("*.parquet")}
    qc = {p.name: p.stat().st_mtime_ns for p in (outdir / "slides").glob("*.json")}
    (outdir / "tiles" / "demo_001.parquet").unlink()
    since = datetime.now() - timedelta(seconds=1)
    proc = _run(first_run["profile"], ["tiles", "mlflow_init"], first_run["configfile"],
                "--set-threads", "mlflow_init=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = _wait_accounted(since, first_run["root"] / "slurm_logs", n_min=1)
    assert len(jobs) == 1 and jobs[0]["State"] == "COMPLETED", jobs
    assert "tile_slide" in jobs[0]["Rule"], jobs
    assert (outdir / "tiles" / "demo_001.parquet").is_file()
    for name, mtime in tiles.items():
        if name != "demo_001.parquet":
            assert (outdir / "tiles" / name).stat().st_mtime_ns == mtime, f"{name} was redone"
    assert {p.name: p.stat().st_mtime_ns for p in (outdir / "slides").glob("*.json")} == qc


def test_a_corrupt_slide_fails_its_rule_with_a_readable_message(cohort, slurm, tmp_path):
    root, sheet = cohort
    bad = tmp_path / "bad_slide.svs"
    bad.write_bytes(b"II*\x00" + os.urandom(4096))      # TIFF magic, garbage after: unopenable
    bad_sheet = tmp_path / "samples.tsv"
    bad_sheet.write_text("slide_id\tpatient_id\tlabel\tsource\nbad_slide\tP9\ttumor\tbad_slide.svs\n")
    configfile = tmp_path / "bad.yaml"
    configfile.write_text(yaml.safe_dump({"samples": str(bad_sheet), "outdir": str(tmp_path / "results"),
                                          "on_error": "fail"}))
    profile = _cluster_profile(tmp_path / "profile", tmp_path / "slurm_logs")
    since = datetime.now() - timedelta(seconds=1)
    proc = _run(profile, [str(tmp_path / "results" / "slides" / "bad_slide.json")], configfile)
    assert proc.returncode != 0
    jobs = _wait_accounted(since, tmp_path / "slurm_logs", n_min=1)
    assert jobs and all(j["State"] == "FAILED" for j in jobs), jobs
    # Snakemake names the failed rule and its log; the log holds histoflow's one-line reason
    assert "qc_slide" in proc.stderr, proc.stderr[-3000:]
    log = tmp_path / "results" / "logs" / "qc_slide" / "bad_slide.log"
    assert log.is_file(), proc.stderr[-3000:]
    text = log.read_text()
    assert "bad_slide" in text and "Traceback" not in text.splitlines()[-1], text[-2000:]
    assert not (tmp_path / "results" / "slides" / "bad_slide.json").exists()


def test_slide_batches_submit_one_ingest_job_per_batch(cohort, slurm, tmp_path):
    """slides_per_job: 2 on 3 slides = 2 batches: qc_slide, detect_tissue and tile_slide of a batch
    are one SLURM job (group ingest_batch), whose time limit covers the batch's slides in series."""
    root, sheet = cohort
    configfile = tmp_path / "batched.yaml"
    configfile.write_text(yaml.safe_dump({**yaml.safe_load((sheet.parent / "config.yaml").read_text()),
                                          "samples": str(sheet), "outdir": str(tmp_path / "results"),
                                          "slides_per_job": 2}))
    profile = _cluster_profile(tmp_path / "profile", tmp_path / "slurm_logs")
    since = datetime.now() - timedelta(seconds=1)
    proc = _run(profile, ["tiles"], configfile)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = _wait_accounted(since, tmp_path / "slurm_logs", n_min=2)
    assert len(jobs) == 2 and all(j["State"] == "COMPLETED" for j in jobs), [(j["Rule"], j["State"]) for j in jobs]
    assert all("ingest_batch" in j["Rule"] for j in jobs), [j["Rule"] for j in jobs]
    for job in jobs:
        assert _mem_mb(job["ReqMem"]) >= 2000
        assert _minutes(job["Timelimit"]) >= 3 * 10 + 2 + 3 + 2  # 3 steps x 10 min + per-slide minutes
    tiles = tmp_path / "results" / "tiles"
    for slide in ("demo_000", "demo_001", "demo_002"):
        assert (tiles / f"{slide}.parquet").is_file()
        assert (tmp_path / "results" / "logs" / "tile_slide" / f"{slide}.log").is_file()

    # a per-slide file deleted by hand: its batch (b00001: demo_002 alone) reruns as a SLURM job,
    # whose own Snakemake must plan the same redo as the main process did
    before = {p.name: p.stat().st_mtime_ns for p in tiles.glob("*.parquet")}
    (tiles / "demo_002.parquet").unlink()
    since = datetime.now() - timedelta(seconds=1)
    proc = _run(profile, ["tiles"], configfile)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = _wait_accounted(since, tmp_path / "slurm_logs", n_min=1)
    assert len(jobs) == 1 and jobs[0]["State"] == "COMPLETED", [(j["Rule"], j["State"]) for j in jobs]
    assert (tiles / "demo_002.parquet").is_file()
    assert {n: t for n, t in before.items() if n != "demo_002.parquet"} == \
        {p.name: p.stat().st_mtime_ns for p in tiles.glob("*.parquet") if p.name != "demo_002.parquet"}
    proc = _run(profile, ["tiles", "-n"], configfile)
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr, proc.stderr[-3000:]


def test_profile_layering_rules_hold():
    """Snakemake does not merge a key set in two profiles (the workflow profile wins): the slurm
    profile must not set what profiles/default sets, or its values are silently lost."""
    default = yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())
    cluster = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    clash = {key for key in set(default) & set(cluster) if default[key] != cluster[key]}
    assert not clash, f"keys in both profiles (slurm's value would be ignored): {sorted(clash)}"
    assert "default-resources" not in default, "default-resources belongs to the site profile (account, partition)"
    assert cluster["executor"] == "slurm"
    assert default["group-components"] == ["per_slide=50"]
    # only rules fed by the slide's own files are grouped: a member waiting for cohort-wide jobs
    # would make the group depend on itself, and Snakemake's group check grows with the square
    # of the group (planning 1,000 slides took 5 min with 5 rules + a heatmap group, 17 s with none)
    assert default["groups"] == {"qc_slide": "per_slide", "detect_tissue": "per_slide", "tile_slide": "per_slide",
                                 "qc_slide_batch": "ingest_batch", "detect_tissue_batch": "ingest_batch",
                                 "tile_slide_batch": "ingest_batch"}
    assert "download_slide" not in default["groups"]   # a localrule: compute nodes may lack internet
