# Stage: classic slide classifiers (random forest, gradient boosting, logistic regression) on the
# slide-level features, trained on the same folds as MIL.


rule train_slide_classifier:
    input:
        table=out("slide_features/{source}.parquet"),
    output:
        predictions=out("slide_classifier/{source}/{clf}/predictions.tsv"),
        importances=out("slide_classifier/{source}/{clf}/importances.tsv"),
        # each fold's fitted pipeline (skops, no pickle), for the bundle (models.smk)
        models=expand(out("slide_classifier/{{source}}/{{clf}}/fold{fold}.skops"), fold=FOLDS),
    params:
        settings=config["slide_classifier"],
        seed=config["seed"],
        target=TARGET_PARAMS,
    log:
        log_path("train_slide_classifier", "{source}_{clf}"),
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/slide_classifier.py"


rule slide_classifier:
    input:
        stage_targets("slide_classifier"),
