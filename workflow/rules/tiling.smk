# Stage: tiling. A grid at each requested µm/px, read from the best pyramid level; tile
# coordinates (level 0) go to one Parquet per slide. No tile images unless asked.


rule tile_slide:
    input:
        slide=out("slides/{slide_id}.json"),
        mask=out("tissue/{slide_id}.png"),
        stats=out("tissue/{slide_id}.json"),
        overlay=out("tissue/{slide_id}.overlay.jpg"),
    output:
        tiles=out("tiles/{slide_id}.parquet"),
        preview=report(
            out("tiles/{slide_id}.preview.jpg"),
            caption="../report/tile_preview.rst",
            category="06. Patch extraction",
            subcategory="Tile grids",
            labels={"slide": "{slide_id}"},
        ),
    params:
        settings=config["tiling"],
        seed=config["seed"],
        # no annotations: bag tiles must be the same with or without them (a lesion-enriched
        # sample of test slides would inflate MIL, heatmap and slide-feature results)
        on_error=config["on_error"],
    log:
        log_path("tile_slide"),
    # only the slide JSON, the low-resolution mask and the overlay are read: light whatever
    # the slide size. The preview is drawn in the same job (one job per slide, not two).
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/tiling.py"


rule export_tile_images:
    input:
        slide=out("slides/{slide_id}.json"),
        tiles=out("tiles/{slide_id}.parquet"),
    output:
        images=directory(out("tile_images/{slide_id}")),
    params:
        image_format=config["tiling"]["export_images"],
    log:
        log_path("export_tile_images"),
    # reads every tile from the slide: I/O and JPEG bound, one tile in memory at a time
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    conda:
        "../../envs/slides.yaml"
    script:
        "../scripts/export_tile_images.py"


rule tiling:
    input:
        stage_targets("tiling"),
