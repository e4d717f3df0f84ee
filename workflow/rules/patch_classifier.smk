# Stage: patch_classifier. Tile labels from annotation polygons (patch_labels), a tile classifier
# per fold on frozen features, and the unified tumour probability per tile (tile_probs/{source})
# that heatmaps, lesions and slide features read. Sources: patch_classifier (needs annotations)
# and mil-<model> (MIL instance probabilities); tile_probs.sources: auto picks (see docs/lesions.md).


wildcard_constraints:
    fold=r"\d+",


rule patch_labels:
    input:
        slide=out("slides/{slide_id}.json"),
        tiles=out("tiles/{slide_id}.parquet"),
    output:
        labels=out("patch_labels/{slide_id}.parquet"),
    params:
        annotations=slide_field("annotations"),
        label=slide_field("label"),
        positive_label=config["positive_label"],
        settings=config["patch_labels"],
    log:
        log_path("patch_labels"),
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/patch_labels.py"


rule patch_label_counts:
    input:
        labels=slide_inputs("patch_labels/{slide_id}.parquet"),
    output:
        counts=out("patch_labels/counts.tsv"),
    params:
        labels=per_slide("patch_labels/{slide_id}.parquet"),
    log:
        log_path("patch_label_counts", "cohort"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/patch_label_counts.py"


rule train_patch_classifier:
    input:
        splits=out("splits/splits.tsv"),
        features=feature_inputs(PC_ENCODER),
        labels=slide_inputs("patch_labels/{slide_id}.parquet"),
    output:
        model=out("patch_classifier/fold{fold}/model.safetensors"),
        metrics=out("patch_classifier/fold{fold}/metrics.json"),
    params:
        features=features_for(PC_ENCODER),
        labels=per_slide("patch_labels/{slide_id}.parquet"),
        settings=PC_CFG,
        seed=config["seed"],
    log:
        log_path("train_patch_classifier", "fold{fold}"),
    threads: 2
    resources:
        mem_mb=PC_CFG["mem_mb"],
        runtime=PC_CFG["runtime"],
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/train_patch_classifier.py"


rule tile_probs_patch_classifier:
    input:
        model=out("patch_classifier/fold{fold}/model.safetensors"),
        splits=out("splits/splits.tsv"),
        features=feature_inputs(PC_ENCODER),
    output:
        probs=out("tile_probs/patch_classifier/fold{fold}.parquet"),
    params:
        features=features_for(PC_ENCODER),
    log:
        log_path("tile_probs", "patch_classifier/fold{fold}"),
    threads: 1
    resources:
        mem_mb=PC_CFG["mem_mb"],
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/tile_probs_patch_classifier.py"


rule tile_probs_mil:
    input:
        scores=out("mil/{model}/fold{fold}/tile_scores.parquet"),
    output:
        probs=out("tile_probs/mil-{model}/fold{fold}.parquet"),
    log:
        log_path("tile_probs", "mil-{model}/fold{fold}"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/tile_probs_mil.py"


rule tile_prob_sources:
    output:
        sources=out("tile_probs/sources.json"),
    params:
        sources=TILE_PROB_SOURCES,
        reason=TILE_PROB_REASON,
        has_annotations=HAS_ANNOTATIONS,
        mil_models=MIL_MODELS,
    log:
        log_path("tile_prob_sources", "cohort"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/tile_prob_sources.py"


rule patch_classifier:
    input:
        stage_targets("patch_classifier"),
