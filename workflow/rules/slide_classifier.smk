# Stage: classic slide classifiers (random forest, gradient boosting, logistic regression) on the
# slide-level features, trained on the same folds as MIL.

SLIDE_CLASSIFIERS = list(config["slide_classifier"]["models"])


rule slide_classifier:
    input:
        table=out("slide_features/{source}.parquet"),
    output:
        predictions=out("slide_classifier/{source}/{clf}/predictions.tsv"),
        importances=out("slide_classifier/{source}/{clf}/importances.tsv"),
    params:
        settings=config["slide_classifier"],
        seed=config["seed"],
        target=TARGET_PARAMS,
    log:
        log_path("slide_classifier", "{source}_{clf}"),
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/slide_classifier.py"


rule slide_classifiers:
    input:
        expand(out("slide_classifier/{source}/{clf}/predictions.tsv"), source=TILE_PROB_SOURCES, clf=SLIDE_CLASSIFIERS),
