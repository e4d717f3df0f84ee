# Stage: model bundles, predictions of new slides, external cohorts.
#   models/mil-<model>/bundle.json + fold<k>.safetensors: every MIL model as data (no pickle),
#     with its encoder, tiling/feature settings, target and threshold (histoflow/bundle.py);
#   external/<cohort>/<model>/predictions.tsv: each fold model on an external cohort's slides
#     (config `external`; metrics.json external.<cohort>.<model>, rule metrics);
#   predictions/<name>/slides.tsv (+ tile_scores.parquet, heatmaps/): target `predict`
#     (config `predict`). The external and predict slides run the per-slide stages with this
#     config's settings; they are never in SLIDES, so never in a split or a cohort-level fit.
from histoflow.bundle import bundle_settings, target_of

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
        features=features_for(MIL_ENCODER),
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


rule models:
    input:
        stage_targets("models"),

# ------------------------------------------------------------------------------------------------
# External cohorts (EXTERNAL, common.smk): each bundle scores each cohort; rule metrics evaluates them.


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
# predict: config predict.samples / name / model (PREDICT_NAME, PREDICT_BUNDLE: common.smk)
if PREDICT_NAME:

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


rule predict:
    input:
        stage_targets("predict"),
