# Stage: checklist. `{outdir}/checklist.md` states what was done for each of the 11 checklist
# items; `snakemake --report {outdir}/report.html` gathers the captioned figures and tables.


rule checklist:
    input:
        metrics=out("metrics/metrics.json"),
        qc=out("qc/slides.tsv"),
        # a published froc_score (config `published`, histoflow.presets) is read from these
        lesions=[out(f"lesions/{s}/metrics.json") for s in TILE_PROB_SOURCES]
        if any(p.get("metric") == "froc_score" for p in config.get("published", [])) else [],
    output:
        checklist=report(
            out("checklist.md"),
            caption="../report/checklist.rst",
            category="00. Checklist",
        ),
    params:
        # the report shows a rule's params: a digest of the config (a changed config reruns the
        # checklist), not the config with its paths; the script reads snakemake.config
        config_digest=config_digest(config),
    log:
        log_path("checklist", "checklist"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/checklist.py"


