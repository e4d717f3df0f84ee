# Stage: model bundles, predictions of new slides, external cohorts.
#   models/mil-<model>/bundle.json + fold<k>.safetensors: every MIL model as data (no pickle),
#     with its encoder, tiling/feature settings, target and threshold (histoflow/bundle.py);
#   external/<cohort>/<model>/predictions.tsv: each fold model on an external cohort's slides
#     (config `external`; metrics.json external.<cohort>.<model>, rule metrics);
#   predictions/<name>/slides.tsv (+ tile_scores.parquet, heatmaps/): target `predict`
#     (config `predict`). The external and predict slides run the per-slide stages with this
#     config's settings; they are never in SLIDES, so never in a split or a cohort-level fit.
from histoflow.bundle import (NOT_BUNDLED, bundle_json_path, bundle_settings, check_bundle_config, read_manifest,
                              target_of)

BUNDLE_MODELS = [f"mil-{m}" for m in MIL_MODELS]
BUNDLE_TARGET = target_of(config, samples["label"].tolist())
MIL_SLUG = encoder_slug(MIL_ENCODER)


rule bundle_mil:
    input:
        checkpoints=expand(out("mil/{{model}}/fold{fold}/checkpoint.pt"), fold=FOLDS),
        predictions=expand(out("mil/{{model}}/fold{fold}/predictions.tsv"), fold=FOLDS),
        stain=stain_json_input,
    output:
        bundle=out("models/mil-{model}/bundle.json"),
        weights=expand(out("models/mil-{{model}}/fold{fold}.safetensors"), fold=FOLDS),
    params:
        # read for the encoder's weights checksum only (written by the features stage)
        features=MIL_FEATURES,
        encoder=MIL_ENCODER,
        settings=bundle_settings(config),
        target=BUNDLE_TARGET,
        metrics=config["metrics"],
        seed=config["seed"],
    wildcard_constraints:
        model="|".join(MIL_MODELS),
    log:
        log_path("bundle_mil", "{model}"),
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/bundle_mil.py"


MODEL_TARGETS = expand(out("models/{model}/bundle.json"), model=BUNDLE_MODELS)


rule models:
    input:
        MODEL_TARGETS,


TARGETS.extend(MODEL_TARGETS)

# ------------------------------------------------------------------------------------------------
# External cohorts: each bundle scores each cohort; rule metrics evaluates them.
EXTERNAL = [name for name, e in EXTRA.items() if e["kind"] == "external"]
# an external sheet's targets must encode as the development's do (numeric label, time/event
# columns): said now, in one line naming the slide and field, not in a job
try:
    for _name in EXTERNAL:
        if TARGET.binary:
            continue
        if TARGET.type == "survival":
            _missing = [c for c in TARGET_COLUMNS if c not in EXTRA[_name]["table"].columns]
            if _missing:
                raise InputError(f"external sheet {_name!r} ({EXTRA[_name]['samples']}) has no column {_missing[0]!r}; "
                                 "a survival target needs target.time_column and target.event_column in every sheet")
        TARGET.encode(EXTRA[_name]["table"].reset_index(drop=True))
except InputError as err:
    sys.stderr.write(f"histoflow: external cohort: {err}\n")
    sys.exit(1)


rule predict_external:
    input:
        bundle=out("models/{model}/bundle.json"),
        features=lambda wc: cohort_files(wc.cohort, f"features/{MIL_SLUG}/{{slide_id}}.parquet"),
    output:
        predictions=out("external/{cohort}/{model}/predictions.tsv"),
    params:
        rows=lambda wc: external_rows(wc.cohort),
        positive_label=config["positive_label"],
    wildcard_constraints:
        cohort="|".join(EXTERNAL) or "no-external-cohort",
        model="|".join(BUNDLE_MODELS),
    log:
        log_path("predict_external", "{cohort}/{model}"),
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/predict_external.py"


# ------------------------------------------------------------------------------------------------
# predict: config predict.samples / name / model
PREDICT = config["predict"]
PREDICT_TARGETS = []
if PREDICT.get("samples"):
    try:
        if PREDICT["model"] in BUNDLE_MODELS:
            PREDICT_BUNDLE = out(f"models/{PREDICT['model']}/bundle.json")
        else:
            if "@" in PREDICT["model"]:
                raise InputError(f"config key 'predict.model': {PREDICT['model']!r}: {NOT_BUNDLED}")
            PREDICT_BUNDLE = str(bundle_json_path(PREDICT["model"], OUTDIR))
            if not os.path.exists(PREDICT_BUNDLE):
                raise InputError(f"config key 'predict.model': {PREDICT['model']!r} is not a model of this run "
                                 f"({', '.join(BUNDLE_MODELS)}) nor an existing bundle folder; fix predict.model")
            # a bundle of another run: refused here, in one line, when its settings differ
            check_bundle_config(read_manifest(PREDICT_BUNDLE), bundle_settings(config), MIL_ENCODER)
    except InputError as err:
        sys.stderr.write(f"histoflow: {err}\n")
        sys.exit(1)
    PREDICT_NAME = PREDICT["name"]

    rule predict_slides:
        input:
            bundle=PREDICT_BUNDLE,
            features=cohort_files(PREDICT_NAME, f"features/{MIL_SLUG}/{{slide_id}}.parquet"),
            slides=cohort_files(PREDICT_NAME, "slides/{slide_id}.json"),
            tissue_stats=cohort_files(PREDICT_NAME, "tissue/{slide_id}.json"),
            tissue_masks=cohort_files(PREDICT_NAME, "tissue/{slide_id}.png"),
        output:
            slides=out(f"predictions/{PREDICT_NAME}/slides.tsv"),
            tiles=out(f"predictions/{PREDICT_NAME}/tile_scores.parquet"),
            heatmaps=directory(out(f"predictions/{PREDICT_NAME}/heatmaps")),
        params:
            slide_ids=EXTRA_SLIDES[PREDICT_NAME],
            settings=bundle_settings(config),
            encoder=MIL_ENCODER,
            heatmaps=config["heatmaps"],
        log:
            log_path("predict_slides", PREDICT_NAME),
        conda:
            "../../envs/torch.yaml"
        script:
            "../scripts/predict_slides.py"

    PREDICT_TARGETS.append(out(f"predictions/{PREDICT_NAME}/slides.tsv"))


rule predict:
    input:
        PREDICT_TARGETS,


TARGETS.extend(PREDICT_TARGETS)
