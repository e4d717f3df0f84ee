"""Per-rule conda environments (`--software-deployment-method conda`): each rule's script can
import what it needs in its environment, and gets the narrowest one that has it: torch and the
slide readers (OpenSlide, libvips, OpenCV) only where a rule uses them, so `envs/report.yaml`
carries neither. What a script needs is found statically (tests/import_graph.py: its imports,
and those of the histoflow functions it can reach)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import yaml

from import_graph import script_needs

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "workflow" / "rules"
# narrowest first: a rule gets the first environment that has all it imports
ORDER = ("report.yaml", "slides.yaml", "torch.yaml", "mlflow.yaml")
HEAVY = {"torch", "torchvision", "timm", "openslide-python", "openslide-bin", "pyvips", "pyvips-binary",
         "opencv-python-headless", "mlflow"}
# imports a rule may do without: Phikon/Phikon-v2 need transformers, which is not locked; config
# validation refuses those encoders where it is missing (histoflow.config)
OPTIONAL = {"transformers"}
# import name -> the package that provides it, where they differ
PROVIDER = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "skimage": "scikit-image",
            "cv2": "opencv-python-headless", "openslide": "openslide-python", "huggingface_hub": "huggingface-hub",
            "sksurv": "scikit-survival"}


@cache
def env_packages(name: str) -> frozenset[str]:
    env = yaml.safe_load((REPO / "envs" / name).read_text())
    names = set()
    for dep in env["dependencies"]:
        specs = dep.get("pip", []) if isinstance(dep, dict) else [dep]
        for spec in specs:
            names.add(re.split(r"[=<>! ]", spec, maxsplit=1)[0].lower().replace("_", "-"))
    return frozenset(names)


def rules() -> list[dict]:
    """Every rule with a script: name, conda env file name and script path. (A batch twin
    <rule>_batch, generated in batches.smk, runs its per-slide rule's script in that rule's env.)"""
    found = []
    for smk in sorted(RULES.glob("*.smk")):
        text = smk.read_text()
        heads = list(re.finditer(r"^ *rule (\w+):", text, flags=re.M))
        for i, head in enumerate(heads):
            block = text[head.start(): heads[i + 1].start() if i + 1 < len(heads) else len(text)]
            script = re.search(r'script:\s*\n\s*"([^"]+)"', block)
            if not script:
                continue
            conda = re.search(r'conda:\s*\n\s*"([^"]+)"', block)
            path = (smk.parent / script.group(1)).resolve()
            found.append({"rule": head.group(1), "file": smk.name, "script": path,
                          "env": Path(conda.group(1)).name if conda else None, "entries": []})
    return found


@cache
def needs(script: Path, entries: tuple[str, ...]) -> frozenset[str]:
    required = script_needs(script, list(entries)).required - OPTIONAL
    return frozenset(PROVIDER.get(m, m).lower().replace("_", "-") for m in required)


def rule_needs(rule: dict) -> frozenset[str]:
    return needs(rule["script"], tuple(rule["entries"]))


def test_report_env_carries_no_torch_and_no_slide_reader():
    assert not env_packages("report.yaml") & HEAVY, env_packages("report.yaml") & HEAVY


def test_every_rule_env_has_what_its_script_imports():
    problems = []
    for rule in rules():
        assert rule["env"] in ORDER, f"rule {rule['rule']} ({rule['file']}): env {rule['env']}"
        missing = rule_needs(rule) - env_packages(rule["env"])
        if missing:
            problems.append(f"{rule['rule']} ({rule['file']}, envs/{rule['env']}) imports {sorted(missing)}")
    assert not problems, "\n".join(problems)


def test_every_rule_gets_the_narrowest_env_that_runs_it():
    problems = []
    for rule in rules():
        need = rule_needs(rule)
        best = next((env for env in ORDER if need <= env_packages(env)), None)
        if rule["env"] != best:
            problems.append(f"{rule['rule']} ({rule['file']}): envs/{rule['env']}, narrowest is envs/{best}")
    assert not problems, "\n".join(problems)


def test_the_import_graph_follows_lazy_imports_into_histoflow():
    """The scan itself: it sees the slide readers a tissue job imports inside functions, torch in
    feature extraction, and no torch in the metrics job (its Target class imports torch only in
    the loss methods that MIL training calls)."""
    by_name = {r["rule"]: r for r in rules()}
    assert {"opencv-python-headless", "openslide-python"} <= rule_needs(by_name["detect_tissue"])
    assert {"torch", "timm", "openslide-python"} <= rule_needs(by_name["extract_features"])
    assert {"torch"} <= rule_needs(by_name["train_mil"])
    assert "torch" not in rule_needs(by_name["metrics"]) and "scikit-learn" in rule_needs(by_name["metrics"])
    assert {"mlflow", "torch"} <= rule_needs(by_name["mlflow_log"])


def test_checklist_names_the_pinned_versions_where_its_env_lacks_a_package(monkeypatch):
    """Checklist item 1 run in envs/report.yaml (no torch): torch's version is the pin the torch
    rules ran with, not "absent", and the GPUs say they were not looked for."""
    import builtins
    from importlib import metadata

    from histoflow import checklist

    real_version, real_import = metadata.version, builtins.__import__

    def version(name):
        if name in ("torch", "openslide-python"):
            raise metadata.PackageNotFoundError(name)
        return real_version(name)

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("no torch here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(checklist.metadata, "version", version)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    hw = checklist.hardware_software()
    torch_pin = next(d for d in yaml.safe_load((REPO / "envs" / "torch.yaml").read_text())["dependencies"]
                     if isinstance(d, dict))["pip"]
    assert "torch==" + hw["versions"]["torch"].split()[0] in torch_pin
    assert "envs/" in hw["versions"]["torch"] and "envs/slides.yaml" in hw["versions"]["openslide-python"]
    assert "no torch" in hw["gpus"][0]
