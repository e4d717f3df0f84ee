# Stage: tissue detection on a low-resolution pyramid level (never level 0).


rule detect_tissue:
    input:
        slide=out("slides/{slide_id}.json"),
    output:
        mask=out("tissue/{slide_id}.png"),
        geojson=out("tissue/{slide_id}.geojson"),
        overlay=report(
            out("tissue/{slide_id}.overlay.jpg"),
            caption="../report/tissue_overlay.rst",
            category="05. Background removal",
            subcategory="Tissue masks",
            labels={"slide": "{slide_id}"},
        ),
        stats=out("tissue/{slide_id}.json"),
    params:
        settings=config["tissue"],
        on_error=config["on_error"],
    log:
        log_path("detect_tissue"),
    conda:
        "../../envs/slides.yaml"
    script:
        "../scripts/detect_tissue.py"


# Slide batches (config slides_per_job > 1, see common.smk): the same step, a batch of slides per job.
rule detect_tissue_batch:
    input:
        batch_input("detect_tissue"),
    output:
        manifest=batch_manifest("detect_tissue"),
    params:
        rule="detect_tissue",
        jobs=batch_jobs("detect_tissue"),
    log:
        log_path("detect_tissue_batch", "{batch}"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=batch_minutes(3),
    conda:
        "../../envs/slides.yaml"
    script:
        "../scripts/slide_batch.py"


rule tissue:
    input:
        stage_targets("tissue"),

