# Stage: slide metadata / QC. One JSON per slide (vendor, levels, µm/px and where it came from,
# objective power, associated images, size, md5), and one cohort table with status ok/skipped.


rule qc_slide:
    input:
        manifest=out("downloads/{slide_id}.json"),
    output:
        slide=out("slides/{slide_id}.json"),
    params:
        sheet_mpp=slide_field("mpp"),
        default_mpp=config["default_mpp"],
        on_error=config["on_error"],
        # decode a grid of tiles at the level features read (histoflow.slide_qc.check_tiles)
        tile_check={"mpp": config["features"]["mpp"], "tile_px": config["tiling"]["tile_px"],
                    "max_failed_tile_fraction": config["features"]["max_failed_tile_fraction"]},
    log:
        log_path("qc_slide"),
    # the header and a grid of tiles: small and short (a batch twin asks the same per job)
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/slides.yaml"
    script:
        "../scripts/slide_qc.py"


rule qc_table:
    input:
        slides=slide_inputs("slides/{slide_id}.json"),
        tissue=slide_inputs("tissue/{slide_id}.json"),
        tiles=slide_inputs("tiles/{slide_id}.parquet"),
    output:
        table=report(
            out("qc/slides.tsv"),
            caption="../report/qc_table.rst",
            category="02. Data source",
        ),
    params:
        slides=per_slide("slides/{slide_id}.json"),
        tissue=per_slide("tissue/{slide_id}.json"),
        tiles=per_slide("tiles/{slide_id}.parquet"),
        privacy=config["privacy"]["export"],
    log:
        log_path("qc_table", "qc_table"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/qc_table.py"


rule slide_qc:
    input:
        stage_targets("slide_qc"),
