# Stage: ssl_pretrain. A small encoder trained with SimCLR on the cohort's own tiles, so the
# workflow runs offline with no pretrained weights (features.encoders: [ssl:<arch>]).
# Checkpoint: {outdir}/ssl/{arch}/encoder.pt (+ training.tsv / training.png curves).
# ssl.fit_on: all trains on every slide (unlabelled, transductive: said in the checklist);
# train_only reads the split and keeps the slides that are train-role in every fold.


rule train_ssl_encoder:
    input:
        slides=slide_inputs("slides/{slide_id}.json"),
        tiles=slide_inputs("tiles/{slide_id}.parquet"),
        splits=fit_on_splits("ssl"),
    output:
        checkpoint=out("ssl/{arch}/encoder.pt"),
        curve=out("ssl/{arch}/training.tsv"),
        plot=report(out("ssl/{arch}/training.png"), caption="../report/ssl_training.rst",
                    category="06. Patch extraction", subcategory="SSL encoder {arch}"),
    params:
        slides=per_slide("slides/{slide_id}.json"),
        tiles=per_slide("tiles/{slide_id}.parquet"),
        settings=config["ssl"],
        seed=config["seed"],
        splits_tsv=(fit_on_splits("ssl") or [None])[0],
        default_mpp=config["features"]["mpp"],
        stain_hed_jitter=config["stain"]["augment"]["hed_jitter"],
    wildcard_constraints:
        arch=r"[A-Za-z0-9._-]+",
    log:
        log_path("train_ssl_encoder", "{arch}"),
    threads: config["ssl"]["threads"]
    resources:
        mem_mb=config["ssl"]["mem_mb"],
        runtime=config["ssl"]["runtime"],
        gpu=config["ssl"]["gpu"],
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/ssl_pretrain.py"


rule ssl_pretrain:
    input:
        stage_targets("ssl_pretrain"),
