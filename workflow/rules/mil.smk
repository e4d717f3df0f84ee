# Stage: multiple-instance learning. One job per (model, fold): train with early stopping on
# the fold's validation patients, then score every slide and tile of the cohort with that
# fold's model (heatmaps read tile_scores.parquet). collect_mil gathers the out-of-fold
# (test-role) predictions and training curves per model. The fold count comes from config
# (split.k), so the DAG is known before any split or checkpoint exists.


rule train_mil:
    input:
        splits=out("splits/splits.tsv"),
        features=feature_inputs(MIL_ENCODER),
    output:
        checkpoint=out("mil/{model}/fold{fold}/checkpoint.pt"),
        history=out("mil/{model}/fold{fold}/history.tsv"),
        predictions=out("mil/{model}/fold{fold}/predictions.tsv"),
        tile_scores=out("mil/{model}/fold{fold}/tile_scores.parquet"),
    params:
        features=features_for(MIL_ENCODER),
        settings=config["mil"],
        seed=config["seed"],
        encoder=MIL_ENCODER,
        target=TARGET_PARAMS,
    wildcard_constraints:
        model="|".join(MIL_MODELS),
        fold=r"\d+",
    log:
        log_path("train_mil", "{model}/fold{fold}"),
    threads: config["mil"]["threads"]
    resources:
        mem_mb=config["mil"]["mem_mb"],
        runtime=config["mil"]["runtime"],
        gpu=config["mil"]["gpu"],
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/train_mil.py"


rule collect_mil:
    input:
        predictions=expand(out("mil/{{model}}/fold{fold}/predictions.tsv"), fold=FOLDS),
        histories=expand(out("mil/{{model}}/fold{fold}/history.tsv"), fold=FOLDS),
    output:
        predictions=out("mil/{model}/predictions.tsv"),
        curves=report(out("mil/{model}/curves.png"), caption="../report/mil_curves.rst", category="09. Slide classifier",
                      subcategory="{model}"),
        summary=out("mil/{model}/summary.json"),
    wildcard_constraints:
        model="|".join(MIL_MODELS),
    log:
        log_path("collect_mil", "{model}"),
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/collect_mil.py"


rule mil:
    input:
        stage_targets("mil"),
