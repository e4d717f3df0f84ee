# Shared wiring: config/sample validation, output paths, input functions.
import functools
import inspect
import os
import re
import sys
from pathlib import Path

import pandas as pd
from snakemake.io import apply_wildcards
from snakemake.iocontainers import Wildcards
from snakemake.exceptions import WorkflowError

from histoflow.batches import slide_batches, slides_per_job
from histoflow.config import SLIDE_ID_PATTERN, load_samples, validate_config
from histoflow.errors import InputError
from histoflow.bundle import predict_bundle
from histoflow.encoders import encoder_slug
from histoflow.encoder_registry import features_model_is_large
from histoflow.features import check_feature_mpp
from histoflow.external import EXTRA_SAMPLES_ENV, extra_sheet_paths, load_extra_sheets
from histoflow.privacy import config_digest, sheet_reference
from histoflow.split import check_sheet_split
from histoflow.targets import check_target_config
from histoflow.tile_probs import resolve_sources

# Bad config or samples sheet: one line naming the field/row and the fix, no traceback.
try:
    # the one validation of the config (histoflow.config: deprecated keys, schema, defaults)
    validate_config(config)
    # load_samples validates every row against workflow/schemas/samples.schema.yaml (column-wise:
    # snakemake.utils.validate on the table would re-check 10,000 rows one by one, ~1 s)
    samples = load_samples(config)
    if config["split"]["strategy"] == "sheet":   # patient leakage across the official split: said now
        check_sheet_split(samples, f"samples sheet {config['samples']!r}")
    # external cohorts and the predict sheet (histoflow/external.py): slide ids unique across sheets
    EXTRA = load_extra_sheets(config, samples)
    # what the run predicts (config target:), its class order from the sheet's labels, and the
    # MIL models / slide classifiers it cannot train, said before any job runs
    TARGET = check_target_config(config, samples)
    # a large encoder (or GPU features jobs) batches even a small cohort: one model load per batch
    SLIDES_PER_JOB = slides_per_job(config["slides_per_job"], len(samples),
                                    large_model=features_model_is_large(config["features"]))
except InputError as err:
    sys.stderr.write(f"histoflow: {err}\n")
    sys.exit(1)

# Jobs (local, SLURM or in per-rule conda envs) import histoflow from this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (workflow.basedir, os.environ.get("PYTHONPATH")) if p)
# ... and know the output folder, the only place their deletes may touch (histoflow.io.safe_remove).
_outdir_abs = os.path.abspath(config["outdir"])
os.environ["HISTOFLOW_OUTDIR"] = _outdir_abs
# ... and where the sheet is: params may name a cell instead of holding it (sheet_ref).
_samples_abs = os.path.abspath(config["samples"])
os.environ["HISTOFLOW_SAMPLES"] = _samples_abs
# ... and the external / predict sheets, for the sheet cells of their slides
os.environ[EXTRA_SAMPLES_ENV] = extra_sheet_paths(EXTRA)

OUTDIR = config["outdir"]
# what jobs need to rebuild the Target (histoflow.targets.Target.from_config)
TARGET_PARAMS = {"target": config["target"], "positive_label": config["positive_label"],
                 "labels": sorted({str(v) for v in samples["label"]})}
TARGET_COLUMNS = [TARGET.time_column, TARGET.event_column] if TARGET.type == "survival" else []
SLIDES = list(samples["slide_id"])
SCRIPTS = str(Path(workflow.basedir) / "workflow" / "scripts")

wildcard_constraints:
    slide_id=SLIDE_ID_PATTERN,   # histoflow.config: a plain file name, never . or ..


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
    for table in (samples, *(e["table"] for e in EXTRA.values()))
    for row in table.to_dict("records")
}
# The slides of each external cohort / the predict sheet: they run the per-slide stages (one job
# per slide, never in slide batches) but are not in SLIDES, so nothing cohort-wide (split, stain
# reference, SSL, training, thresholds) ever reads them.
EXTRA_SLIDES = {name: list(e["table"]["slide_id"]) for name, e in EXTRA.items()}
assert not set(SLIDES) & {s for ids in EXTRA_SLIDES.values() for s in ids}, "an extra sheet's slide in SLIDES"


def cohort_files(name, pattern):
    """A per-slide pattern expanded over the slides of external cohort / predict sheet `name`."""
    return expand(out(pattern), slide_id=EXTRA_SLIDES[name])


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


def sheet_ref(column):
    """A params function naming one cell of the slide's sheet row (column, kind, hash) instead of
    holding it, for values that must stay out of .snakemake/metadata, logs and the report (a
    signed URL's query string, a local path): the job reads the cell from the sheet itself
    (histoflow.privacy.resolve_sheet_value); the hash reruns the job when the cell changes."""

    def ref(wildcards):
        return sheet_reference(column, SAMPLE_ROWS[wildcards.slide_id][column])

    ref.__name__ = f"sheet_ref_{column}"
    return cheap_input_function(ref)


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
# Slide batches (config `slides_per_job`; histoflow/batches.py). With more than one slide per job,
# each per-slide rule <rule> below runs as <rule>_batch, one job per batch of consecutive sheet
# rows, and the rules downstream depend on the batch manifests instead of on the per-slide files
# (written all the same). Snakemake then tracks ~1/N as many jobs and files.
BATCHED = SLIDES_PER_JOB > 1
BATCHES = slide_batches(SLIDES, SLIDES_PER_JOB)

# The per-slide rules that run in slide batches: their folder (under outdir) of per-slide files
# `<folder>/{slide_id}...` (a folder's wildcards are the batch rule's too), and the minutes a slide
# may take in a batch job (batch_minutes). Each gets a twin <rule>_batch, generated from the
# per-slide rule (batches.smk), so a new per-slide stage adds this one line here.
SLIDE_RULES = {
    "download_slide": ("downloads", 5),
    "qc_slide": ("slides", 2),
    "detect_tissue": ("tissue", 3),
    "tile_slide": ("tiles", 2),
    "export_tile_images": ("tile_images", 20),
    "extract_features": ("features/{encoder}", config["features"]["runtime"]),
    "patch_labels": ("patch_labels", 2),
    "heatmap": ("heatmaps/{source}", 5),
    "detect_lesions": ("lesions/{source}", 5),
}

wildcard_constraints:
    batch=r"b\d{5}",


def batch_manifest(rule_name):
    """The manifest pattern of <rule_name>_batch: {outdir}/batches/<rule>/[<wildcard>/]{batch}.json."""
    extra = "".join(f"{{{name}}}/" for name in re.findall(r"\{(\w+)\}", SLIDE_RULES[rule_name][0]))
    return out(f"batches/{rule_name}/{extra}{{batch}}.json")


def _folder_regex(folder):
    """results/features/{encoder} -> a regex of its per-slide paths, the folder's wildcards as groups."""
    groups = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(folder))
    slide = re.escape("{slide_id}")
    return re.compile(f"{re.escape(out(''))}{groups}[/]{slide}[^/]*$")


_SLIDE_FOLDERS = [(_folder_regex(folder), rule_name) for rule_name, (folder, _) in SLIDE_RULES.items()]


def _producer(path_pattern):
    """(rule name, its other wildcards) of the per-slide rule writing `path_pattern` (a path with
    a literal {slide_id}, e.g. results/features/uni/{slide_id}.parquet), or None."""
    for regex, rule_name in _SLIDE_FOLDERS:
        match = regex.match(path_pattern)
        if match:
            return rule_name, match.groupdict()
    return None


@functools.lru_cache(maxsize=None)
def _slide_inputs(pattern):
    if not BATCHED:
        return _per_slide(out(pattern))
    producer = _producer(out(pattern))
    if producer is None:
        raise WorkflowError(f"slide_inputs({pattern!r}): no per-slide rule in SLIDE_RULES (common.smk) writes it")
    rule_name, extra = producer
    return tuple(expand(batch_manifest(rule_name), batch=list(BATCHES), **{k: [v] for k, v in extra.items()}))


def slide_inputs(pattern):
    """What a rule that reads a per-slide output of every slide waits for (cohort-wide rules and
    the target rules): the per-slide files, or with slide batches the manifests of the batch
    jobs that write them. Cohort-wide rules read the per-slide paths from params
    (`per_slide(pattern)`), the same either way."""
    return list(_slide_inputs(pattern))


def _batch_wildcards(wildcards):
    """The wildcards of each slide's job in the batch job with `wildcards`, in sheet order."""
    shared = {name: value for name, value in wildcards.items() if name != "batch"}
    return [Wildcards(fromdict={**shared, "slide_id": slide_id}) for slide_id in BATCHES[wildcards.batch]]


def _slide_rule(rule_name):
    """The per-slide rule named rule_name, checked for what its batch twin can reproduce (named
    inputs, outputs and params only, and params functions of the wildcards alone)."""
    proxy = getattr(rules, rule_name)
    for kind in ("input", "output"):   # a named list of files spans several positions
        items = getattr(proxy, kind)
        if sum(len(v) if isinstance(v, list) else 1 for _, v in items.items()) != len(items):
            raise WorkflowError(f"{rule_name}_batch needs every {kind} item of {rule_name} to be named")
    if len(list(proxy.params.items())) != len(proxy.params):
        raise WorkflowError(f"{rule_name}_batch needs every params item of {rule_name} to be named")
    for name, item in proxy.params.items():
        if callable(item) and len(inspect.signature(item).parameters) != 1:
            raise WorkflowError(f"{rule_name}_batch needs params.{name} of {rule_name} to be a function "
                                f"of the wildcards only")
    for _, pattern in proxy.output.items():   # SLIDE_RULES must say where the rule writes
        if (_producer(str(pattern)) or (None,))[0] != rule_name:
            raise WorkflowError(f"{rule_name} writes {pattern}, outside its folder in SLIDE_RULES (common.smk)")
    return proxy


def _input_function_value(rule_name, item, slide_wildcards):
    """An input function's value for one slide, as Snakemake takes it (str paths, wildcards
    filled; a list stays a list); a per-slide file there would bring per-slide jobs into a
    batched run, so it is refused."""
    value = item(slide_wildcards)
    paths = [apply_wildcards(str(v.as_posix() if isinstance(v, Path) else v), dict(slide_wildcards.items()))
             for v in (value if isinstance(value, (list, tuple)) else [value])]
    for path in paths:
        if BATCHED and _producer(path.replace(slide_wildcards.slide_id, "{slide_id}")):
            raise WorkflowError(f"an input function of {rule_name} returns the per-slide file {path}; "
                                f"name it as a pattern with {{slide_id}} so that {rule_name}_batch can map it")
    return paths if isinstance(value, (list, tuple)) else paths[0]


@functools.lru_cache(maxsize=None)
def _batch_slide_jobs(rule_name, batch_wildcards):
    """Each slide's job in a batch job of <rule_name>_batch (wildcards, inputs, outputs, params,
    log), exactly as the per-slide rule would get it; computed once per batch and shared by the
    batch's input function, its params and its redo check."""
    proxy = getattr(rules, rule_name)
    found = []
    for slide_wildcards in _batch_wildcards(Wildcards(fromdict=dict(batch_wildcards))):
        plain = dict(slide_wildcards.items())

        def value_of(item, paths):
            # as Snakemake does it: input functions give paths with wildcards filled in,
            # params functions are taken as they return, strings in the rule get wildcards
            if callable(item) and paths:
                return _input_function_value(rule_name, item, slide_wildcards)
            if callable(item):
                return item(slide_wildcards)
            if isinstance(item, str):
                return apply_wildcards(str(item), plain)
            if isinstance(item, list):
                return [apply_wildcards(str(v), plain) if isinstance(v, str) else v for v in item]
            return item

        found.append({
            "wildcards": plain,
            "input": {name: value_of(item, True) for name, item in proxy.input.items()},
            "output": {name: apply_wildcards(str(item), plain) for name, item in proxy.output.items()},
            "params": {name: value_of(item, False) for name, item in proxy.params.items()},
            "log": apply_wildcards(str(proxy.log[0]), plain),
        })
    return tuple(found)


def _jobs_of_batch(rule_name, wildcards):
    return _batch_slide_jobs(rule_name, tuple(sorted(wildcards.items())))


def batch_input(rule_name):
    """Input function of <rule_name>_batch: the per-slide rule's inputs for the batch's slides,
    where each per-slide file becomes the manifest of the batch job that writes it."""
    proxy = _slide_rule(rule_name)

    def inputs(wildcards):
        found = {}
        jobs = _jobs_of_batch(rule_name, wildcards)
        for name, item in proxy.input.items():
            producer = None if callable(item) else _producer(str(item))
            if producer:   # e.g. slides/{slide_id}.json -> batches/slide_qc/{batch}.json
                upstream, extra = producer
                values = {k: apply_wildcards(v, dict(wildcards.items())) for k, v in extra.items()}
                found[apply_wildcards(batch_manifest(upstream), {**values, "batch": wildcards.batch})] = None
                continue
            for job in jobs:   # cohort files: stain, fold tables, checkpoints, ...
                value = job["input"][name]
                found.update(dict.fromkeys(value if isinstance(value, list) else [value]))
        found.update(dict.fromkeys(_redo_marker(rule_name, wildcards, jobs)))
        return list(found)

    inputs.__name__ = f"batch_input_{rule_name}"
    return cheap_input_function(inputs)


@functools.lru_cache(maxsize=None)
def _files_in(folder):
    return frozenset(os.listdir(folder)) if os.path.isdir(folder) else frozenset()


def _redo_marker(rule_name, wildcards, jobs):
    """The redo marker a batch job waits for (rule redo_slide_batch, batches.smk), if any.

    Snakemake tracks a batch job by its manifest, so a per-slide file deleted by hand would go
    unnoticed. When one is missing, the batch asks for a new marker `<batch>.redo<n+1>`, which
    Snakemake creates and so reruns the batch (its other slides are reused). Afterwards the
    batch keeps asking for its newest marker, which exists and is older than the manifest: the
    set of inputs stays the same, so that is no reason to run it again. The check costs a stat
    per output, only for batches that ran (as Snakemake stats every per-slide job's outputs).
    """
    manifest = apply_wildcards(batch_manifest(rule_name), dict(wildcards.items()))
    folder, name = os.path.split(manifest)
    stem = name[: -len(".json")]
    present = _files_in(folder)
    prefix = f"{stem}.redo"
    generations = [int(f[len(prefix):]) for f in present if f.startswith(prefix) and f[len(prefix):].isdigit()]
    generation = max(generations, default=0)
    newest = os.path.join(folder, f"{stem}.redo{generation}")
    if name in present:   # the batch ran: were any of its slides' files deleted since?
        missing = any(not os.path.exists(path) for job in jobs for path in job["output"].values())
        # a marker newer than the manifest is a redo already under way (e.g. this is the SLURM
        # job's own Snakemake, planning the batch that the main process asked for): the same one
        pending = generation and os.stat(newest).st_mtime_ns > os.stat(manifest).st_mtime_ns
        if missing and not pending:
            generation += 1
    return [os.path.join(folder, f"{stem}.redo{generation}")] if generation else []


def batch_jobs(rule_name):
    """Params function of <rule_name>_batch: each slide's job (wildcards, inputs, outputs, params,
    log) exactly as the per-slide rule <rule_name> would get it."""
    _slide_rule(rule_name)

    def jobs(wildcards):
        return list(_jobs_of_batch(rule_name, wildcards))

    jobs.__name__ = f"batch_jobs_{rule_name}"
    return cheap_input_function(jobs)


def batch_minutes(per_slide_minutes, fixed_minutes=10):
    """A batch job's time limit (min): its slides one after another at a generous per-slide
    bound (a typical slide takes seconds), the start-up once, and more at each retry; at most
    config batch_max_runtime, since a batch that times out resumes at its retry (stamps)."""

    def runtime(wildcards, attempt):
        wanted = fixed_minutes + per_slide_minutes * len(BATCHES[wildcards.batch]) * attempt
        return min(wanted, config["batch_max_runtime"])

    return runtime


def batch_twin(rule_name):
    """What <rule_name>_batch (generated in batches.smk) takes from the per-slide rule, as its rule
    file declares them (profile overrides name the rule), i.e. its script (run for each slide),
    threads, resources (the runtime: batch_minutes), conda env, and its folder's wildcard constraints."""
    info = _slide_rule(rule_name).rule.ruleinfo
    folder, minutes = SLIDE_RULES[rule_name]
    _, resources = info.resources or ((), {})
    _, constraints = info.wildcard_constraints or ((), {})
    folder_wildcards = set(re.findall(r"\{(\w+)\}", folder))
    extra = "".join(f"{{{name}}}/" for name in re.findall(r"\{(\w+)\}", folder))
    return {
        "script": Path(info.script).name,
        "log": log_path(f"{rule_name}_batch", f"{extra}{{batch}}"),
        "threads": info.threads if info.threads is not None else 1,
        "resources": {**resources, "runtime": batch_minutes(minutes)},
        "conda": info.conda_env,
        "wildcard_constraints": {k: v for k, v in constraints.items() if k in folder_wildcards},
    }


# ------------------------------------------------------------------------------------------------
# Stage settings: the config values that several rule files and input functions read, derived
# once here, so no rule file depends on another having been included first.
STAIN_ON = config["stain"]["method"] != "none"
# the ssl:<arch> encoders that feature extraction asks for; `snakemake ssl_pretrain` alone trains ssl.arch
SSL_ARCHS = sorted({e[len("ssl:"):] for e in config["features"]["encoders"] if e.startswith("ssl:")})
# fold indices of splits.tsv (split.k), known before any split exists: per-fold jobs expand over them
FOLDS = list(range(config["split"]["k"]))
MIL_ENCODER = config["mil"]["encoder"] or config["features"]["encoders"][0]
MIL_MODELS = list(config["mil"]["models"])
PC_CFG = config["patch_classifier"]
PC_ENCODER = PC_CFG["encoder"] or config["features"]["encoders"][0]
HAS_ANNOTATIONS = bool(samples["annotations"].notna().any())
SLIDE_CLASSIFIERS = list(config["slide_classifier"]["models"])
# cross-fitted tile probabilities (slide_features.smk) only when slide classifiers train on them
CROSSFIT = bool(SLIDE_CLASSIFIERS)
INNER_FOLDS = list(range(int(config["slide_classifier"]["inner_folds"])))
# every model of metrics.json gets a bundle (models.smk); the slide classifiers' are added once
# the tile-probability sources are known (below). MODEL_ENCODERS: model -> the encoder of its features
BUNDLE_MODELS = [f"mil-{m}" for m in MIL_MODELS]
MODEL_ENCODERS = {m: MIL_ENCODER for m in BUNDLE_MODELS}
# external cohorts (models.smk): each bundle scores each cohort; rule metrics evaluates them
EXTERNAL = [name for name, e in EXTRA.items() if e["kind"] == "external"]
# predict: config predict.samples / name / model (models.smk)
PREDICT = config["predict"]
PREDICT_NAME = PREDICT["name"] if PREDICT.get("samples") else None
# the report shows the heatmaps of the first heatmaps.report_slides slides (heatmaps.smk)
REPORT_HEATMAP_SLIDES = SLIDES[: config["heatmaps"]["report_slides"]]
try:
    check_feature_mpp(config["features"]["mpp"], config["tiling"]["mpp"])
    FEATURE_ENCODERS = {encoder_slug(name): name for name in config["features"]["encoders"]}
    TILE_PROB_SOURCES, TILE_PROB_REASON = resolve_sources(config["tile_probs"]["sources"], HAS_ANNOTATIONS, MIL_MODELS)
    for _source in TILE_PROB_SOURCES:
        for _clf in SLIDE_CLASSIFIERS:
            MODEL_ENCODERS[f"{_clf}@{_source}"] = PC_ENCODER if _source == "patch_classifier" else MIL_ENCODER
    BUNDLE_MODELS = list(MODEL_ENCODERS)
    PREDICT_BUNDLE, PREDICT_ENCODER = (predict_bundle(PREDICT, MODEL_ENCODERS, config, OUTDIR, MIL_ENCODER)
                                       if PREDICT_NAME else (None, MIL_ENCODER))
    # an external sheet's targets must encode as the development's do (numeric label, time/event
    # columns): said now, in one line naming the cohort and field, not in a job
    for _name in EXTERNAL:
        if TARGET.binary:
            continue
        _missing = [c for c in TARGET_COLUMNS if c not in EXTRA[_name]["table"].columns]
        if _missing:
            raise InputError(f"external sheet {_name!r} ({EXTRA[_name]['samples']}) has no column {_missing[0]!r}; "
                             "a survival target needs target.time_column and target.event_column in every sheet")
        TARGET.encode(EXTRA[_name]["table"].reset_index(drop=True))
except InputError as err:
    sys.stderr.write(f"histoflow: {err}\n")
    sys.exit(1)


# ------------------------------------------------------------------------------------------------
# Input functions of the stages (they read the stage settings above).


def fit_on_splits(section):
    """splits.tsv when `{section}.fit_on` is train_only (the fit keeps the train-in-every-fold
    slides), else nothing: the default fit on all slides does not wait for the split."""
    return [out("splits/splits.tsv")] if config[section]["fit_on"] == "train_only" else []


def stain_json_input(wildcards=None):
    """The cohort's stain.json for rules that normalise tiles (empty when stain.method is none)."""
    return [out("stain/stain.json")] if STAIN_ON else []


def ssl_checkpoint_input(wildcards):
    """The checkpoint of an ssl:<arch> encoder (trained by train_ssl_encoder) is an input."""
    name = FEATURE_ENCODERS[wildcards.encoder]
    return [out(f"ssl/{name[len('ssl:'):]}/encoder.pt")] if name.startswith("ssl:") else []


def features_for(encoder_name):
    """Per-slide features files of one encoder (the paths downstream stages read, as params)."""
    return per_slide(f"features/{encoder_slug(encoder_name)}/{{slide_id}}.parquet")


def feature_inputs(encoder_name):
    """What a rule reading features_for(encoder_name) waits for (see slide_inputs)."""
    return slide_inputs(f"features/{encoder_slug(encoder_name)}/{{slide_id}}.parquet")


def tile_prob_files(source):
    """Every fold's tile-probability table of one source (for heatmaps, lesions, slide features)."""
    return expand(out("tile_probs/{source}/fold{fold}.parquet"), source=source, fold=FOLDS)


def crossfit_files(source):
    """Every outer fold's cross-fitted tile probabilities of one source, on which the slide
    classifiers train (CROSSFIT, slide_features.smk: none without slide classifiers)."""
    return expand(out("tile_probs/{source}/fold{fold}.crossfit.parquet"), source=source, fold=FOLDS) if CROSSFIT else []


def model_predictions():
    """Model name -> its per-fold prediction tables (all roles, so thresholds come from validation)."""
    models = {f"mil-{m}": expand(out("mil/{model}/fold{fold}/predictions.tsv"), model=m, fold=FOLDS)
              for m in MIL_MODELS}
    for source in TILE_PROB_SOURCES:
        for clf in SLIDE_CLASSIFIERS:
            models[f"{clf}@{source}"] = [out(f"slide_classifier/{source}/{clf}/predictions.tsv")]
    return models


def slide_classifier_source_models(wildcards):
    """The fold tile models a slide-classifier bundle holds (bundle_slide_classifier, models.smk):
    the patch classifier's safetensors files, or the MIL bundle's fold weights."""
    if wildcards.source == "patch_classifier":
        return expand(out("patch_classifier/fold{fold}/model.safetensors"), fold=FOLDS)
    return expand(out("models/{source}/fold{fold}.safetensors"), source=wildcards.source, fold=FOLDS)


def slide_classifier_mil_bundle(wildcards):
    """The MIL bundle.json of a mil-<model> source (its fold models' architecture), else nothing."""
    return [out(f"models/{wildcards.source}/bundle.json")] if wildcards.source.startswith("mil-") else []


def bundle_features(model, cohort=None):
    """Per-slide features files of a bundled model's encoder (MODEL_ENCODERS): the development
    slides' (cohort None) or an extra cohort's."""
    path = f"features/{encoder_slug(MODEL_ENCODERS[model])}/{{slide_id}}.parquet"
    return cohort_files(cohort, path) if cohort else per_slide(path)


def external_rows(name):
    """The sheet rows (slide_id, patient_id, label; survival: + time/event columns) of external
    cohort `name` (models.smk)."""
    table = EXTRA[name]["table"]
    return table[["slide_id", "patient_id", "label", *TARGET_COLUMNS]].to_dict("records")


def external_predictions():
    """{cohort: {model: external predictions.tsv}} for the metrics rule: every bundled model
    (BUNDLE_MODELS, models.smk) on every external cohort (EXTERNAL)."""
    return {c: {m: out(f"external/{c}/{m}/predictions.tsv") for m in BUNDLE_MODELS} for c in EXTERNAL}


# ------------------------------------------------------------------------------------------------
# Targets. Each stage's target (`snakemake <stage>`, named as its rule file) asks for
# stage_targets(<stage>); `rule all` (Snakefile) asks for final_targets(). As in the
# snakemake-workflows template (rna-seq-star-deseq2, get_final_output): one function, not a
# list that each rule file appends to in include order.


def _mil_files():
    return expand(out("mil/{model}/{name}"), model=MIL_MODELS, name=["predictions.tsv", "curves.png", "summary.json"])


def _feature_files():
    return [f for name in config["features"]["encoders"] for f in feature_inputs(name)]


def _tile_files():
    return slide_inputs("tiles/{slide_id}.parquet") + slide_inputs("tiles/{slide_id}.preview.jpg")


def _patch_classifier_files():
    labelled = ([out("patch_labels/counts.tsv")] + expand(out("patch_classifier/fold{fold}/metrics.json"), fold=FOLDS)
                if HAS_ANNOTATIONS else [])
    return labelled + [out("tile_probs/sources.json")] + [f for s in TILE_PROB_SOURCES for f in tile_prob_files(s)]


STAGE_TARGETS = {
    "download": lambda: slide_inputs("downloads/{slide_id}.json"),
    "slide_qc": lambda: [out("qc/slides.tsv")],
    "tissue": lambda: slide_inputs("tissue/{slide_id}.geojson"),
    "tiling": lambda: _tile_files()
    + (slide_inputs("tile_images/{slide_id}") if config["tiling"]["export_images"] != "none" else []),
    "stain": lambda: stain_json_input(),
    "ssl_pretrain": lambda: expand(out("ssl/{arch}/{name}"), arch=SSL_ARCHS or [config["ssl"]["arch"]],
                                   name=["encoder.pt", "training.tsv", "training.png"]),
    "features": _feature_files,
    "split": lambda: [out("splits/splits.tsv")],
    "mil": _mil_files,
    "patch_classifier": _patch_classifier_files,
    "heatmaps": lambda: [f for s in TILE_PROB_SOURCES for f in slide_inputs(f"heatmaps/{s}/{{slide_id}}.png")],
    "lesions": lambda: [out(f"lesions/{s}/{name}") for s in TILE_PROB_SOURCES
                        for name in ("metrics.json", "per_slide.tsv", "froc.png")],
    "slide_features": lambda: expand(out("slide_features/{source}.parquet"), source=TILE_PROB_SOURCES),
    "slide_classifier": lambda: expand(out("slide_classifier/{source}/{clf}/predictions.tsv"),
                                       source=TILE_PROB_SOURCES, clf=SLIDE_CLASSIFIERS),
    "models": lambda: expand(out("models/{model}/bundle.json"), model=BUNDLE_MODELS),
    "predict": lambda: [out(f"predictions/{PREDICT_NAME}/slides.tsv")] if PREDICT_NAME else [],
    "metrics": lambda: [out("metrics/metrics.json")],
    "mlflow": lambda: [out("mlflow/logged.json")],
    "checklist": lambda: [out("checklist.md")],
}


def stage_targets(stage):
    """The files that target `stage` builds."""
    return list(STAGE_TARGETS[stage]())


def final_targets():
    """The files that target `all` builds, i.e. every stage's outputs except tile image exports and
    ssl.arch trained on its own; slide features and classifiers come in through the metrics."""
    files = [
        *stage_targets("download"), *stage_targets("slide_qc"), *stage_targets("tissue"), *_tile_files(),
        *stage_targets("stain"), *expand(out("ssl/{arch}/training.png"), arch=SSL_ARCHS),
        *_feature_files(), out("qc/features.tsv"), *stage_targets("split"), *_mil_files(),
        *_patch_classifier_files(), *stage_targets("heatmaps"), *stage_targets("lesions"),
        *([out(f"report/heatmaps/{s}") for s in TILE_PROB_SOURCES] if REPORT_HEATMAP_SLIDES else []),
        *stage_targets("models"), *stage_targets("predict"), *stage_targets("metrics"),
        *stage_targets("mlflow"), out("checklist.md"),
    ]
    return list(dict.fromkeys(files))
