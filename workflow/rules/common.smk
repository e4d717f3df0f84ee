# Shared wiring: config/sample validation, output paths, input functions.
import os
import sys
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

from histoflow.config import load_samples, validate_config
from histoflow.errors import InputError

# Bad config or samples sheet: one line naming the field/row and the fix, no traceback.
try:
    validate_config(config)
    validate(config, schema="../schemas/config.schema.yaml")
    samples = load_samples(config)
    validate(samples.astype(object).where(samples.notna(), None), schema="../schemas/samples.schema.yaml")
except InputError as err:
    sys.stderr.write(f"histoflow: {err}\n")
    sys.exit(1)

# Jobs (local, SLURM or in per-rule conda envs) import histoflow from this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (workflow.basedir, os.environ.get("PYTHONPATH")) if p)

OUTDIR = config["outdir"]
SLIDES = list(samples["slide_id"])
SCRIPTS = str(Path(workflow.basedir) / "workflow" / "scripts")

# Each stage file appends the files its target rule builds; `rule all` asks for all of them.
TARGETS = []

wildcard_constraints:
    slide_id=r"[A-Za-z0-9._-]+",


def out(path):
    """A path under the output folder (config `outdir`)."""
    return f"{OUTDIR}/{path}"


def log_path(rule_name, name="{slide_id}"):
    return f"{OUTDIR}/logs/{rule_name}/{name}.log"


def sample(wildcards):
    """The samples-sheet row of a slide, as a dict."""
    return {k: (None if (not isinstance(v, str) and pd.isna(v)) else v)
            for k, v in samples.loc[wildcards.slide_id].to_dict().items()}


def per_slide(pattern):
    """Expand a per-slide output pattern over every slide of the sheet."""
    return expand(out(pattern), slide_id=SLIDES)
