"""The workflow's shape as users and cluster admins rely on it: thin rules, one conda env per
rule (`--software-deployment-method conda`) pinned like the venv, one rule file per stage."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "workflow" / "rules"
SCRIPTS = REPO / "workflow" / "scripts"


def _rules_with_scripts() -> dict[str, tuple[str, str | None, Path]]:
    """rule name -> (script, conda env or None, rule file), parsed from the rule files."""
    found = {}
    for smk in sorted(RULES.glob("*.smk")):
        rule = conda = None
        lines = smk.read_text().splitlines()
        for i, line in enumerate(lines):
            if m := re.match(r"^rule (\w+):", line):
                rule, conda = m.group(1), None
            elif line.strip() == "conda:" and rule:
                conda = lines[i + 1].strip().strip('"')
            elif line.strip() == "script:" and rule:
                found[rule] = (lines[i + 1].strip().strip('"'), conda, smk)
    return found


def _pip_pins(env: dict) -> dict[str, str]:
    pins = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for spec in dep.get("pip", []):
                name, _, version = spec.partition("==")
                pins[name.lower().replace("_", "-")] = version
    return pins


def test_every_script_rule_names_an_existing_conda_env():
    rules = _rules_with_scripts()
    assert len(rules) >= 25
    for rule, (script, conda, smk) in rules.items():
        assert conda, f"rule {rule} ({smk.name}) has no conda: directive"
        assert (smk.parent / conda).resolve().is_file(), f"rule {rule}: {conda} does not exist"
        assert (smk.parent / script).resolve().is_file(), f"rule {rule}: {script} does not exist"


def test_conda_envs_pin_the_same_versions_as_the_venv():
    """A run with --software-deployment-method conda computes with the versions the tests ran."""
    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.strip().partition("==")
            lock[name.lower().replace("_", "-")] = version
    for env_file in sorted((REPO / "envs").glob("*.yaml")):
        env = yaml.safe_load(env_file.read_text())
        assert "python=3.11" in env["dependencies"], env_file.name
        for name, version in _pip_pins(env).items():
            assert lock.get(name) == version, f"{env_file.name}: {name}=={version}, lock has {lock.get(name)}"


def test_torch_rules_get_the_torch_env_and_ingest_rules_the_light_one():
    rules = _rules_with_scripts()
    for rule in ("extract_features", "train_ssl_encoder", "train_mil"):
        assert rules[rule][1].endswith("envs/torch.yaml"), rule
    # tile_slide reads the mask and overlay only (no slide): envs/report.yaml (tests/test_envs.py)
    for rule in ("qc_slide", "detect_tissue"):
        assert rules[rule][1].endswith("envs/slides.yaml"), rule
    assert "torch" not in _pip_pins(yaml.safe_load((REPO / "envs" / "slides.yaml").read_text()))


def test_rule_scripts_only_unpack_snakemake_and_call_histoflow():
    """A script imports from histoflow only, and its body is one `with log_to(...)` around calls
    of histoflow functions: the logic lives in the package, where it is unit-tested."""
    for script in sorted(SCRIPTS.glob("*.py")):
        tree = ast.parse(script.read_text())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert module.split(".")[0] in ("histoflow", "__future__"), f"{script.name} imports {module}"
            else:
                assert isinstance(node, (ast.With, ast.Expr, ast.Assign)), \
                    f"{script.name}: {ast.dump(node)[:80]} (logic belongs in histoflow/)"
        for node in ast.walk(tree):
            assert not isinstance(node, (ast.For, ast.While, ast.FunctionDef, ast.ClassDef)), \
                f"{script.name} has a {type(node).__name__}: move it into histoflow/"


def test_one_rule_file_per_stage():
    stages = {"download", "slide_qc", "tissue", "tiling", "stain", "ssl_pretrain", "features", "split",
              "mil", "patch_classifier", "heatmaps", "lesions", "slide_features", "slide_classifier",
              "metrics", "mlflow", "checklist"}
    assert stages <= {p.stem for p in RULES.glob("*.smk")}
    snakefile = (REPO / "Snakefile").read_text()
    for stage in stages:
        assert f'include: "workflow/rules/{stage}.smk"' in snakefile, stage


def test_input_functions_live_in_common_smk():
    """Rule files hold rules and their wiring; input functions are in workflow/rules/common.smk
    (the snakemake-workflows layout, and what `snakemake --lint` asks for)."""
    for smk in sorted(RULES.glob("*.smk")):
        if smk.name == "common.smk":
            assert not re.search(r"^rule \w+:", smk.read_text(), flags=re.M)
        else:
            assert not re.search(r"^def \w+", smk.read_text(), flags=re.M), f"{smk.name} defines a function"


def test_each_stage_has_a_target_named_as_its_rule_file_and_no_include_order():
    """`snakemake <stage>` works for each rule file <stage>.smk; no rule file appends to a global
    target list or exits the process (targets: common.smk stage_targets/final_targets)."""
    snakefile = (REPO / "Snakefile").read_text()
    for smk in sorted(RULES.glob("*.smk")):
        if smk.stem in ("common", "batches"):
            continue
        text = smk.read_text()
        assert re.search(rf"^\s*rule {smk.stem}:", text, flags=re.M), f"{smk.name} has no target rule {smk.stem}"
        assert f'stage_targets("{smk.stem}")' in text or smk.stem in ("metrics", "checklist"), smk.name
        for banned in ("TARGETS", "sys.exit", "InputError"):
            assert banned not in text, f"{smk.name} uses {banned} (belongs in common.smk)"
    assert "final_targets()" in snakefile


def test_stage_names_match_across_rule_file_script_module_and_config():
    """rule file = script = module = config section, for the stages whose names differed."""
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())["properties"]
    for stage in ("tiling", "split", "mlflow", "checklist"):
        assert (RULES / f"{stage}.smk").is_file(), stage
        assert (REPO / "histoflow" / f"{stage}.py").is_file(), stage
        assert stage in schema or stage == "checklist", stage
    for stage, script in (("tiling", "tiling"), ("split", "split"), ("checklist", "checklist")):
        assert f'"../scripts/{script}.py"' in (RULES / f"{stage}.smk").read_text(), stage


def test_deprecated_target_names_plan_the_same_jobs_as_the_new_ones(tmp_path, snakemake_exe):
    """The old targets (qc, tiles, slide_features_all, slide_classifiers, report_inputs) still
    work: each dry-runs exactly the jobs of the stage target that replaced it."""
    import subprocess

    rows = ["slide_id\tpatient_id\tlabel\tsource"] + [
        f"S{i:02d}\tP{i // 2:02d}\t{'tumor' if (i // 2) % 2 else 'normal'}\thttp://127.0.0.1:9/S{i:02d}.svs"
        for i in range(12)]
    (tmp_path / "samples.tsv").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"samples: {tmp_path / 'samples.tsv'}\noutdir: {tmp_path / 'out'}\nsplit: {{k: 3}}\n"
                   "slide_classifier: {models: [logreg]}\n")

    def planned(*targets: str) -> set[tuple[str, str]]:
        """(rule, job count) rows of the dry run, without the total."""
        proc = subprocess.run([snakemake_exe, *targets, "-n", "--quiet", "rules", "--configfile",
                               str(REPO / "config.yaml"), str(cfg)], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = {tuple(line.split()) for line in proc.stdout.splitlines() if re.match(r"^\w+\s+\d+$", line)}
        assert rows, proc.stdout[-2000:]
        return {row for row in rows if row[0] != "total"}

    # each alias asks for its stages' targets (read from the Snakefile), and one dry run shows that
    # this plans the same jobs
    snakefile = (REPO / "Snakefile").read_text()
    aliases = {"qc": ["slide_qc"], "tiles": ["tiling"], "slide_features_all": ["slide_features"],
               "slide_classifiers": ["slide_classifier"], "report_inputs": ["checklist", "mlflow"]}
    for old, new in aliases.items():
        body = re.search(rf"^rule {old}:\n    input:\n((?:        .*\n)+)", snakefile, flags=re.M)
        assert body, f"no alias rule {old} in the Snakefile"
        assert re.findall(r'stage_targets\("(\w+)"\)', body.group(1)) == new, old
    old_jobs = {row for row in planned("tiles") if row[0] != "tiles"}
    new_jobs = {row for row in planned("tiling") if row[0] != "tiling"}
    assert old_jobs == new_jobs and len(old_jobs) > 3, sorted(old_jobs ^ new_jobs)


def _per_slide_rules() -> set[str]:
    """The rules whose outputs are per slide (an output path with {slide_id}), from the rule files."""
    found = set()
    for smk in sorted(RULES.glob("*.smk")):
        for m in re.finditer(r"^rule (\w+):\n((?:    .*\n|\n)*)", smk.read_text(), flags=re.M):
            output = re.search(r"^    output:\n((?:        .*\n)+)", m.group(2), flags=re.M)
            if output and re.search(r'out\("[^"]*\{slide_id\}', output.group(1)):
                found.add(m.group(1))
    return found


def test_a_per_slide_stage_is_its_own_files_and_its_batch_twin_is_generated(tmp_path, snakemake_exe):
    """A per-slide rule is written once: its batch twin <rule>_batch is generated from it
    (batches.smk, from the one SLIDE_RULES line in common.smk), and the batch job runs the rule's
    own script for each slide, so no step function lives outside the stage's files
    (docs/adding-a-stage.md)."""
    import subprocess

    common = (RULES / "common.smk").read_text()
    block = re.search(r"^SLIDE_RULES = \{\n((?:    .*\n)+)\}", common, flags=re.M)
    assert block, "no SLIDE_RULES in common.smk"
    registered = set(re.findall(r'^    "(\w+)": ', block.group(1), flags=re.M))
    per_slide = _per_slide_rules()
    assert per_slide == registered, f"per-slide rules {sorted(per_slide)} vs SLIDE_RULES {sorted(registered)}"
    for smk in sorted(RULES.glob("*.smk")):      # no copied twins
        copied = set(re.findall(r"^rule (\w+)_batch:", smk.read_text(), flags=re.M)) & per_slide
        assert not copied, f"{smk.name} copies the batch twin of {sorted(copied)}"
    # the per-slide rule's script is the step: it calls its stage function, not a shared step table
    scripts = _rules_with_scripts()
    for rule in per_slide:
        text = (RULES / scripts[rule][0]).resolve().read_text()
        assert "slide_jobs" not in text and "snakemake.params.rule" not in text, rule
    # the generic batch code names no per-slide rule (STEP_IMPORTS, a table of imports, aside)
    for module in ("slide_jobs", "batches"):
        source = (REPO / "histoflow" / f"{module}.py").read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef):
                body = ast.get_source_segment(source, node)
                named = [r for r in per_slide if re.search(rf"\b{r}\b", body)]
                assert not named, f"histoflow/{module}.py:{node.name} is a step of {named}"
    # and Snakemake sees a twin of each (slides_per_job > 1 asks for them)
    (tmp_path / "samples.tsv").write_text("slide_id\tpatient_id\tlabel\tsource\n" + "".join(
        f"S{i}\tP{i}\t{'tumor' if i % 2 else 'normal'}\thttp://127.0.0.1:9/S{i}.svs\n" for i in range(6)))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"samples: {tmp_path / 'samples.tsv'}\noutdir: {tmp_path / 'out'}\nslides_per_job: 2\n")
    proc = subprocess.run([snakemake_exe, "--list-rules", "--configfile", str(REPO / "config.yaml"), str(cfg)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = set(proc.stdout.split())
    assert {f"{r}_batch" for r in per_slide} <= listed, sorted({f"{r}_batch" for r in per_slide} - listed)
