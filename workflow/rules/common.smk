# Shared wiring: config/sample validation, output paths, input functions.
import functools
import inspect
import os
import sys
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

from histoflow.config import load_samples, validate_config
from histoflow.errors import InputError
from histoflow.encoders import encoder_slug

# Bad config or samples sheet: one line naming the field/row and the fix, no traceback.
try:
    validate_config(config)
    validate(config, schema="../schemas/config.schema.yaml")
    # load_samples validates every row against workflow/schemas/samples.schema.yaml (column-wise:
    # snakemake.utils.validate on the table would re-check 10,000 rows one by one, ~1 s)
    samples = load_samples(config)
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


def outdir_of(relative):
    """A params function giving the output folder, derived from the rule's own file
    `{outdir}/<relative>` (an input or output), for the cohort-wide rules that read the whole
    tree (checklist, MLflow): the folder as the job sees it, not a string fixed at parse time."""

    tail = Path(relative).parts

    def outdir(wildcards, input, output):
        for path in (*output, *input):
            parts = Path(path).parts
            if parts[-len(tail):] == tail:
                return str(Path(*parts[: -len(tail)]))
        raise ValueError(f"outdir_of: no input or output of the rule ends with {relative!r}")

    outdir.__name__ = "outdir_of_" + "_".join(tail)
    return outdir


def log_path(rule_name, name="{slide_id}"):
    return f"{OUTDIR}/logs/{rule_name}/{name}.log"


# Input functions and params run once per job (~8 jobs per slide): at 10,000 slides they must be
# dict look-ups, not DataFrame indexing (samples.loc costs ~100 µs a call).
SAMPLE_ROWS = {
    row["slide_id"]: {k: (None if (not isinstance(v, str) and pd.isna(v)) else v) for k, v in row.items()}
    for row in samples.to_dict("records")
}


def cheap_input_function(func):
    """Mark an input/params function so Snakemake does not re-inspect its signature per job.

    Snakemake calls inspect.signature on every input/params function of every job to find which
    arguments it takes (~10 µs each, ~100k calls for a 10,000-slide DAG); Snakemake's own helpers
    (snakemake.ioutils) pre-set that answer with overwrite_function_params, as we do here.
    """
    try:
        from snakemake.common import overwrite_function_params
    except ImportError:   # a Snakemake without it: the function still works, just slower
        return func
    overwrite_function_params(func, inspect.signature(func).parameters)
    return func


def sample(wildcards):
    """The samples-sheet row of a slide, as a dict (missing cells are None); a copy, so a
    caller may change it and params may pickle it."""
    return dict(SAMPLE_ROWS[wildcards.slide_id])


def slide_field(column):
    """A params function giving one column of the slide's samples-sheet row:
    `params: mpp=slide_field("mpp")` (cheaper per job than `lambda wc: sample(wc)["mpp"]`)."""

    def field(wildcards):
        return SAMPLE_ROWS[wildcards.slide_id][column]

    field.__name__ = f"slide_field_{column}"
    return cheap_input_function(field)


def by_wildcard(name, func):
    """An input function `wc -> func(wc.<name>)`, computed once per wildcard value:
    `probs=by_wildcard("source", tile_prob_files)` instead of `lambda wc: tile_prob_files(wc.source)`,
    which would rebuild the list for every slide's job."""
    cache = {}

    def per_value(wildcards):
        value = getattr(wildcards, name)
        if value not in cache:
            cache[value] = func(value)
        found = cache[value]
        return list(found) if isinstance(found, list) else found

    per_value.__name__ = f"by_{name}_{getattr(func, '__name__', 'function')}"
    return cheap_input_function(per_value)


@functools.lru_cache(maxsize=None)
def _per_slide(path):
    return tuple(expand(path, slide_id=SLIDES))


def per_slide(pattern):
    """Expand a per-slide output pattern over every slide of the sheet (a new list each call;
    the expansion itself is cached, so input functions may call it per job)."""
    return list(_per_slide(out(pattern)))


# ------------------------------------------------------------------------------------------------
# Input functions of the stages. They read globals that the stage files define when included
# (STAIN_ON, FEATURE_ENCODERS, MIL_MODELS, FOLDS, TILE_PROB_SOURCES, SLIDE_CLASSIFIERS), and are
# only called after those includes.


def stain_json_input(wildcards=None):
    """The cohort's stain.json for rules that normalise tiles (empty when stain.method is none)."""
    return [out("stain/stain.json")] if STAIN_ON else []


def ssl_checkpoint_input(wildcards):
    """The checkpoint of an ssl:<arch> encoder (trained by train_ssl_encoder) is an input."""
    name = FEATURE_ENCODERS[wildcards.encoder]
    return [out(f"ssl/{name[len('ssl:'):]}/encoder.pt")] if name.startswith("ssl:") else []


def features_for(encoder_name):
    """Per-slide features files of one encoder (for downstream stages)."""
    return per_slide(f"features/{encoder_slug(encoder_name)}/{{slide_id}}.parquet")


def tile_prob_files(source):
    """Every fold's tile-probability table of one source (for heatmaps, lesions, slide features)."""
    return expand(out("tile_probs/{source}/fold{fold}.parquet"), source=source, fold=FOLDS)


def model_predictions():
    """Model name -> its per-fold prediction tables (all roles, so thresholds come from validation)."""
    models = {f"mil-{m}": expand(out("mil/{model}/fold{fold}/predictions.tsv"), model=m, fold=FOLDS)
              for m in MIL_MODELS}
    for source in TILE_PROB_SOURCES:
        for clf in SLIDE_CLASSIFIERS:
            models[f"{clf}@{source}"] = [out(f"slide_classifier/{source}/{clf}/predictions.tsv")]
    return models
