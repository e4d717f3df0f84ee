# Stage: heatmaps. Per slide and tile-probability source: the held-out (test-fold) probabilities
# (and MIL attention) over the thumbnail, and the tiles as QuPath detections.
import re


rule heatmap:
    input:
        probs=by_wildcard("source", tile_prob_files),
        slide=out("slides/{slide_id}.json"),
        tissue_mask=out("tissue/{slide_id}.png"),
        tissue_stats=out("tissue/{slide_id}.json"),
    output:
        png=out("heatmaps/{source}/{slide_id}.png"),
        geojson=out("heatmaps/{source}/{slide_id}.geojson"),
    params:
        settings=config["heatmaps"],
    wildcard_constraints:
        source="|".join(map(re.escape, TILE_PROB_SOURCES)) or "no-source",
    log:
        log_path("heatmap", "{source}/{slide_id}"),
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        "../../envs/slides.yaml"
    script:
        "../scripts/heatmap.py"


# The report shows the heatmaps of the first heatmaps.report_slides slides of the sheet
# (REPORT_HEATMAP_SLIDES, common.smk); all of them stay in heatmaps/{source}/.


rule report_heatmaps:
    input:
        lambda wc: slide_inputs(f"heatmaps/{wc.source}/{{slide_id}}.png"),
    output:
        gallery=report(directory(out("report/heatmaps/{source}")), patterns=["{slide_id}.png"],
                       caption="../report/heatmap.rst", category="10. Lesion detection",
                       subcategory="heatmaps {source}", labels={"slide": "{slide_id}"}),
    params:
        pngs=lambda wc: [out(f"heatmaps/{wc.source}/{s}.png") for s in REPORT_HEATMAP_SLIDES],
    wildcard_constraints:
        source="|".join(map(re.escape, TILE_PROB_SOURCES)) or "no-source",
    log:
        log_path("report_heatmaps", "{source}"),
    localrule: True
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/report_heatmaps.py"


rule heatmaps:
    input:
        stage_targets("heatmaps"),
