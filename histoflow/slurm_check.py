"""Will every job fit on a node? ``histoflow slurm-check`` (also run by ``make install-profile``).

SLURM never starts a job that asks for more CPUs or memory than any node of its partition has:
it stays PENDING for ever (reason ``PartitionConfig``), with no error. What a job asks for:

* a plain rule: its threads (``threads:`` in the rule file, from config.yaml for train_mil,
  train_ssl_encoder, extract_features, ...; ``set-threads`` in profiles/default overrides),
  scaled down to the slurm profile's ``cores``, and its ``mem_mb``;
* a group job (``groups`` + ``group-components`` in profiles/default: ``per_slide=50`` puts 50
  slides' slide_qc, detect_tissue and tile_slide in one job): Snakemake runs as many of its jobs
  side by side as ``cores`` allows and the rest in series, so it asks for
  ``min(cores, n_jobs x threads)`` CPUs and the memory of the jobs that run side by side
  (``cores / threads`` of the member with the most memory).

This compares those requests, estimated from the profiles, the rule files and the config, with
the largest node ``sinfo`` reports (``sinfo -h -N -o "%c %m"``: CPUs and MB of each node).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import REPO_ROOT
from .errors import InputError


@dataclass(frozen=True)
class Request:
    what: str            # "rule train_mil" / "group per_slide"
    cpus: int
    mem_mb: int | None
    why: str             # where the CPU figure comes from
    mem_why: str = ""    # where the memory figure comes from


def largest_node(sinfo: str = "sinfo", partition: str | None = None) -> tuple[int, int | None]:
    """(CPUs, memory MB) of the largest node sinfo lists (of ``partition``)."""
    exe = shutil.which(sinfo)
    if exe is None:
        raise InputError(f"`{sinfo}` not found: run histoflow slurm-check on a SLURM login node")
    cmd = [exe, "-h", "-N", "-o", "%c %m"] + (["-p", partition] if partition else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise InputError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    cpus, mems = [], []
    for line in proc.stdout.splitlines():
        # "%c" is the node's CPU count; sinfo writes "4+" when one line covers nodes that differ
        fields = [re.match(r"\d+", f) for f in line.split()]
        if fields and fields[0]:
            cpus.append(int(fields[0].group()))
            if len(fields) > 1 and fields[1]:
                mems.append(int(fields[1].group()))
    if not cpus:
        raise InputError(f"`{' '.join(cmd)}` listed no node" + (f" in partition {partition!r}" if partition else ""))
    return max(cpus), (max(mems) if mems else None)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in (over or {}).items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def rule_resources(config: dict, rules_dir: Path) -> dict[str, dict[str, Any]]:
    """rule -> {"threads", "mem_mb"} as the rule files set them (expressions evaluated with the
    config; those that need more, e.g. batch runtimes, are left out)."""
    names = {"config": config, "batch_minutes": lambda *a, **k: 0}
    found: dict[str, dict[str, Any]] = {}
    for smk in sorted(rules_dir.glob("*.smk")):
        text = smk.read_text()
        heads = list(re.finditer(r"^ *rule (\w+):", text, flags=re.M))
        for i, head in enumerate(heads):
            block = text[head.start(): heads[i + 1].start() if i + 1 < len(heads) else len(text)]
            entry: dict[str, Any] = {}
            for key, pattern in (("threads", r"^\s*threads:\s*(.+?)\s*$"), ("mem_mb", r"^\s*mem_mb=(.+?),?\s*$")):
                match = re.search(pattern, block, flags=re.M)
                if match:
                    try:
                        entry[key] = int(eval(match.group(1), {"__builtins__": {}}, names))  # noqa: S307 - our rule files
                    except Exception:   # an expression of wildcards/attempt: not known before the run
                        pass
            found[head.group(1)] = entry
    return found


def requests(slurm_profile: dict, workflow_profile: dict, config: dict, rules_dir: Path) -> list[Request]:
    cores = int(slurm_profile.get("cores") or os.cpu_count() or 1)
    default_mem = (slurm_profile.get("default-resources") or {}).get("mem_mb")
    rules = rule_resources(config, rules_dir)
    for rule, threads in (workflow_profile.get("set-threads") or {}).items():
        rules.setdefault(rule, {})["threads"] = int(threads)
    for rule, res in (workflow_profile.get("set-resources") or {}).items():
        if isinstance(res, dict) and "mem_mb" in res:
            rules.setdefault(rule, {})["mem_mb"] = int(res["mem_mb"])
    out = []
    for rule, res in sorted(rules.items()):
        threads = int(res.get("threads", 1))
        out.append(Request(f"rule {rule}", min(threads, cores), res.get("mem_mb", default_mem),
                           f"threads {threads} (rule file / config / profiles/default set-threads), "
                           f"capped at the slurm profile's cores: {cores}",
                           "mem_mb from the rule file / config / profiles/default set-resources / default-resources"))
    groups: dict[str, list[str]] = {}
    for rule, group in (workflow_profile.get("groups") or {}).items():
        groups.setdefault(str(group), []).append(rule)
    components = {}
    for item in workflow_profile.get("group-components") or []:
        name, _, n = str(item).partition("=")
        components[name.strip()] = int(n)
    for group, members in sorted(groups.items()):
        n = components.get(group, 1)
        threads = max(int(rules.get(r, {}).get("threads", 1)) for r in members)
        mems = [rules.get(r, {}).get("mem_mb", default_mem) for r in members]
        mem = max((m for m in mems if m is not None), default=None)
        side_by_side = max(1, min(n, cores // max(threads, 1)))
        out.append(Request(f"group {group}", min(cores, n * threads), mem * side_by_side if mem else None,
                           f"{n} x ({', '.join(sorted(members))}), up to {side_by_side} side by side: "
                           f"min(cores: {cores}, {n} x {threads} threads)",
                           f"{side_by_side} jobs side by side x {mem} MB (the member with the most)"))
    return out


def check(slurm_profile_dir: str | os.PathLike, workflow_profile_dir: str | os.PathLike | None = None,
          configfiles: list[str] | None = None, sinfo: str = "sinfo", partition: str | None = None) -> list[str]:
    """One warning line per job kind that no node can run (empty: all fit)."""
    slurm = _load(Path(slurm_profile_dir) / "config.yaml")
    workflow = _load(Path(workflow_profile_dir or REPO_ROOT / "profiles" / "default") / "config.yaml")
    config: dict = {}
    for path in configfiles or [REPO_ROOT / "config.yaml"]:
        config = _merge(config, _load(Path(path)))
    node_cpus, node_mem = largest_node(sinfo, partition)
    where = f"partition {partition!r}" if partition else "the cluster"
    warnings = []
    for req in requests(slurm, workflow, config, REPO_ROOT / "workflow" / "rules"):
        if req.cpus > node_cpus:
            fix = f"set `cores: {node_cpus}` in the slurm profile (or pass --cores {node_cpus}): it caps every job"
            if req.what.startswith("rule"):
                fix += f", or lower the rule's threads to {node_cpus}"
            warnings.append(f"{req.what} asks for {req.cpus} CPUs, the largest node of {where} has {node_cpus}: "
                            f"SLURM would keep it PENDING (PartitionConfig). {req.why}. Fix: {fix}.")
        if req.mem_mb and node_mem and req.mem_mb > node_mem:
            warnings.append(f"{req.what} asks for {req.mem_mb} MB, the largest node of {where} has {node_mem} MB: "
                            f"SLURM would keep it PENDING. {req.mem_why}. Fix: lower the rule's mem_mb"
                            + (", or `cores` (fewer jobs side by side)." if req.what.startswith("group") else "."))
    return warnings
