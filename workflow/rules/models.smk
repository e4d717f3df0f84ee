# Stage: model bundles, predictions of new slides, external cohorts.
#   models/mil-<model>/bundle.json + fold<k>.safetensors: every MIL model as data (no pickle),
#     with its encoder, tiling/feature settings, target and threshold (histoflow/bundle.py);
#   models/<clf>@<source>/bundle.json + fold<k>.skops + source_fold<k>.safetensors: every slide
#     classifier with its tile-probability source's fold models (histoflow/slide_bundle.py);
#   external/<cohort>/<model>/predictions.tsv: each fold model on an external cohort's slides
#     (config `external`; metrics.json external.<cohort>.<model>, rule metrics);
#   predictions/<name>/slides.tsv (+ tile_scores.parquet, heatmaps/): target `predict`
#     (config `predict`). The external and predict slides run the per-slide stages with this
#     config's settings; they are never in SLIDES, so never in a split or a cohort-level fit.
from histoflow.bundle import bundle_settings, target_of

BUNDLE_TARGET = target_of(config, samples["label"].tolist())


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


# A slide classifier's bundle: its fold pipelines (written by train_slide_classifier) with the fold
# tile models of its source and the slide-feature settings (histoflow/slide_bundle.py).
rule bundle_slide_classifier:
    input:
        models=expand(out("slide_classifier/{{source}}/{{clf}}/fold{fold}.skops"), fold=FOLDS),
        predictions=out("slide_classifier/{source}/{clf}/predictions.tsv"),
        table=out("slide_features/{source}.parquet"),
        source_models=slide_classifier_source_models,
        mil_bundle=slide_classifier_mil_bundle,
        stain=stain_json_input,
    output:
        bundle=out("models/{clf}@{source}/bundle.json"),
        weights=expand(out("models/{{clf}}@{{source}}/fold{fold}.skops"), fold=FOLDS),
        source_weights=expand(out("models/{{clf}}@{{source}}/source_fold{fold}.safetensors"), fold=FOLDS),
    params:
        # read for the encoder's weights checksum only (written by the features stage)
        features=lambda wc: features_for(MODEL_ENCODERS[f"{wc.clf}@{wc.source}"]),
        encoder=lambda wc: MODEL_ENCODERS[f"{wc.clf}@{wc.source}"],
        settings=bundle_settings(config),
        slide_features=config["slide_features"],
        target=BUNDLE_TARGET,
        metrics=config["metrics"],
        seed=config["seed"],
    wildcard_constraints:
        clf="|".join(SLIDE_CLASSIFIERS) or "no-slide-classifier",
        source="|".join(TILE_PROB_SOURCES) or "no-source",
    log:
        log_path("bundle_slide_classifier", "{clf}@{source}"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/bundle_slide_classifier.py"


rule models:
    input:
        stage_targets("models"),

# ------------------------------------------------------------------------------------------------
# External cohorts (EXTERNAL, common.smk): each bundle scores each cohort; rule metrics evaluates them.


rule predict_external:
    input:
        bundle=out("models/{model}/bundle.json"),
        features=lambda wc: bundle_features(wc.model, wc.cohort),
        # the slides' µm/px (slide classifiers' region features)
        slides=lambda wc: cohort_files(wc.cohort, "slides/{slide_id}.json"),
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
            features=cohort_files(PREDICT_NAME, f"features/{encoder_slug(PREDICT_ENCODER)}/{{slide_id}}.parquet"),
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
            encoder=PREDICT_ENCODER,
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
