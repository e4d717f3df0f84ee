# Stage: report. `{outdir}/checklist.md` states what was done for each of the 11 checklist
# items; `snakemake --report {outdir}/report.html` gathers the captioned figures and tables.


rule checklist:
    input:
        metrics=out("metrics/metrics.json"),
        qc=out("qc/slides.tsv"),
    output:
        checklist=report(
            out("checklist.md"),
            caption="../report/checklist.rst",
            category="0. Checklist",
        ),
    params:
        outdir=outdir_of("checklist.md"),
        config=config,
        samples=config["samples"],
    log:
        log_path("checklist", "checklist"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/checklist.py"


rule report_inputs:
    input:
        out("checklist.md"),
        out("mlflow/logged.json"),


TARGETS.append(out("checklist.md"))
