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
    # a low-resolution level only (a batch twin asks the same per job)
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    conda:
        "../../envs/slides.yaml"
    script:
        "../scripts/detect_tissue.py"


rule tissue:
    input:
        stage_targets("tissue"),

