# Stage: features. For each encoder of features.encoders and each slide, the tiles at
# features.mpp go through a DataLoader (workers read + stain-normalise) into batched inference;
# one Parquet per (encoder, slide): features/{encoder_slug}/{slide_id}.parquet.
import re


rule extract_features:
    input:
        slide=out("slides/{slide_id}.json"),
        tiles=out("tiles/{slide_id}.parquet"),
        stain=stain_json_input,
        ssl_checkpoint=ssl_checkpoint_input,
    output:
        features=out("features/{encoder}/{slide_id}.parquet"),
    params:
        encoder_name=lambda wc: FEATURE_ENCODERS[wc.encoder],
        settings=config["features"],
        tiling_mpp=config["tiling"]["mpp"],
        seed=config["seed"],
        on_error=config["on_error"],
    wildcard_constraints:
        encoder="|".join(map(re.escape, FEATURE_ENCODERS)),
    log:
        log_path("extract_features", "{encoder}/{slide_id}"),
    threads: config["features"]["num_workers"] + 1
    resources:
        mem_mb=config["features"]["mem_mb"],
        runtime=config["features"]["runtime"],
        gpu=config["features"]["gpu"],
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/extract_features.py"


rule features:
    input:
        stage_targets("features"),


# qc/features.tsv: failed-tile counts per slide and encoder (features.max_failed_tile_fraction)
rule features_qc:
    input:
        stage_targets("features"),
    output:
        table=out("qc/features.tsv"),
    params:
        features=[f for name in config["features"]["encoders"] for f in features_for(name)],
    log:
        log_path("features_qc", "features_qc"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/features_qc.py"

