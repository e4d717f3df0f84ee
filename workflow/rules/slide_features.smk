# Stage: slide-level feature engineering from each tumour-probability source (tumour %, area,
# regions, largest region and its major axis, statistics of positive/negative probabilities).


rule slide_features:
    input:
        tile_probs=lambda wc: tile_prob_files(wc.source),
        splits=out("splits/splits.tsv"),
        slides=slide_inputs("slides/{slide_id}.json"),
    output:
        table=out("slide_features/{source}.parquet"),
    params:
        slides=per_slide("slides/{slide_id}.json"),
        settings=config["slide_features"],
    log:
        log_path("slide_features", "{source}"),
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/slide_features.py"


rule slide_features_all:
    input:
        expand(out("slide_features/{source}.parquet"), source=TILE_PROB_SOURCES),
