# Stage: lesions. Threshold + 8-connected components on each slide's held-out probability map ->
# lesion polygons (and Dice); local maxima of the map over the whole probability range -> FROC
# detections. lesion_metrics scores the test-role slides only (CAMELYON16 FROC, tile-grid Dice).
import re


rule detect_lesions:
    input:
        probs=by_wildcard("source", tile_prob_files),
        slide=out("slides/{slide_id}.json"),
    output:
        geojson=out("lesions/{source}/{slide_id}.geojson"),
        record=out("lesions/{source}/{slide_id}.json"),
    params:
        annotations=slide_field("annotations"),
        label=slide_field("label"),
        positive_label=config["positive_label"],
        cohort_has_annotations=HAS_ANNOTATIONS,
        settings=config["lesions"],
        label_settings=config["patch_labels"],
    wildcard_constraints:
        source="|".join(map(re.escape, TILE_PROB_SOURCES)) or "no-source",
        # only sheet slides, so lesions/{source}/metrics.json is never read as a slide's record
        slide_id="|".join(map(re.escape, SLIDES)),
    log:
        log_path("detect_lesions", "{source}/{slide_id}"),
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/detect_lesions.py"


rule lesion_metrics:
    input:
        records=lambda wc: slide_inputs(f"lesions/{wc.source}/{{slide_id}}.json"),
    output:
        metrics=out("lesions/{source}/metrics.json"),
        per_slide=out("lesions/{source}/per_slide.tsv"),
        froc=report(out("lesions/{source}/froc.png"), caption="../report/froc.rst", category="10. Lesion detection",
                    subcategory="FROC", labels={"source": "{source}"}),
    params:
        records=lambda wc: per_slide(f"lesions/{wc.source}/{{slide_id}}.json"),
        settings=config["lesions"],
    wildcard_constraints:
        source="|".join(map(re.escape, TILE_PROB_SOURCES)) or "no-source",
    log:
        log_path("lesion_metrics", "{source}"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/lesion_metrics.py"


rule lesions:
    input:
        stage_targets("lesions"),
