# Stage: slide-level feature engineering from each tumour-probability source (tumour %, area,
# regions, largest region and its major axis, statistics of positive/negative probabilities).
#
# The slide classifiers train on honest features: each outer fold's train-role slides are scored
# by inner-fold models that did not see them (cross-fitting, histoflow/crossfit.py), as test
# slides are by the outer fold's model. Inner splits: crossfit/splits/fold{k}.tsv; cross-fitted
# tile probabilities: tile_probs/{source}/fold{k}.crossfit.parquet. Built only when slide
# classifiers are configured (slide_classifier.models non-empty).


rule make_inner_splits:
    input:
        splits=out("splits/splits.tsv"),
    output:
        splits=out("crossfit/splits/fold{fold}.tsv"),
    params:
        n_inner=len(INNER_FOLDS),
        seed=config["seed"],
    log:
        log_path("make_inner_splits", "fold{fold}"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/make_inner_splits.py"


# Inner patch classifiers of one outer fold, trained as the outer one is (logreg by default:
# seconds), each scoring only the train slides it held out.
rule crossfit_patch_classifier:
    input:
        splits=out("crossfit/splits/fold{fold}.tsv"),
        features=feature_inputs(PC_ENCODER),
        labels=slide_inputs("patch_labels/{slide_id}.parquet"),
    output:
        probs=out("tile_probs/patch_classifier/fold{fold}.crossfit.parquet"),
        metrics=out("crossfit/patch_classifier/fold{fold}/metrics.json"),
    params:
        features=features_for(PC_ENCODER),
        labels=per_slide("patch_labels/{slide_id}.parquet"),
        settings=PC_CFG,
        seed=config["seed"],
    log:
        log_path("crossfit_patch_classifier", "fold{fold}"),
    threads: 2
    resources:
        mem_mb=PC_CFG["mem_mb"],
        runtime=PC_CFG["runtime"],
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/crossfit_patch_classifier.py"


# Inner MIL models: one job per (model, outer fold, inner fold), trained as train_mil trains the
# outer one (inner fold j of crossfit/splits/fold{k}.tsv). Costs inner_folds x the MIL training,
# only for mil-<model> sources (tile_probs.sources; auto picks them when there are no annotations).
rule train_mil_inner:
    input:
        splits=out("crossfit/splits/fold{fold}.tsv"),
        features=feature_inputs(MIL_ENCODER),
    output:
        checkpoint=out("crossfit/mil/{model}/fold{fold}/inner{inner}/checkpoint.pt"),
        history=out("crossfit/mil/{model}/fold{fold}/inner{inner}/history.tsv"),
        predictions=out("crossfit/mil/{model}/fold{fold}/inner{inner}/predictions.tsv"),
        tile_scores=out("crossfit/mil/{model}/fold{fold}/inner{inner}/tile_scores.parquet"),
    params:
        features=features_for(MIL_ENCODER),
        settings=config["mil"],
        seed=config["seed"],
        encoder=MIL_ENCODER,
        target=TARGET_PARAMS,
    wildcard_constraints:
        model="|".join(MIL_MODELS) or "no-model",
        inner=r"\d+",
    log:
        log_path("train_mil_inner", "{model}/fold{fold}/inner{inner}"),
    threads: config["mil"]["threads"]
    resources:
        mem_mb=config["mil"]["mem_mb"],
        runtime=config["mil"]["runtime"],
        gpu=config["mil"]["gpu"],
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/train_mil.py"


rule crossfit_tile_probs_mil:
    input:
        splits=out("crossfit/splits/fold{fold}.tsv"),
        tile_scores=expand(out("crossfit/mil/{{model}}/fold{{fold}}/inner{inner}/tile_scores.parquet"), inner=INNER_FOLDS),
    output:
        probs=out("tile_probs/mil-{model}/fold{fold}.crossfit.parquet"),
    wildcard_constraints:
        model="|".join(MIL_MODELS) or "no-model",
    log:
        log_path("crossfit_tile_probs", "mil-{model}/fold{fold}"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/crossfit_tile_probs_mil.py"


rule compute_slide_features:
    input:
        tile_probs=lambda wc: tile_prob_files(wc.source),
        crossfit=lambda wc: crossfit_files(wc.source),
        splits=out("splits/splits.tsv"),
        slides=slide_inputs("slides/{slide_id}.json"),
    output:
        table=out("slide_features/{source}.parquet"),
    params:
        slides=per_slide("slides/{slide_id}.json"),
        settings=config["slide_features"],
    log:
        log_path("compute_slide_features", "{source}"),
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/slide_features.py"


rule slide_features:
    input:
        stage_targets("slide_features"),
