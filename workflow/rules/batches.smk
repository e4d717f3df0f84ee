# Slide batches (config slides_per_job > 1; see common.smk and histoflow/batches.py). Snakemake
# tracks a batch job by its manifest only, so a per-slide file deleted by hand would go unnoticed:
# the batch's input function then asks for a new marker, newer than the manifest, and the batch
# job reruns, redoing only the slides whose files are missing (the others are reused).


rule redo_slide_batch:
    output:
        marker=out("batches/{redo}.redo{generation}"),
    wildcard_constraints:
        redo=r"[A-Za-z0-9._/-]+/b\d{5}",
        generation=r"\d+",
    log:
        log_path("redo_slide_batch", "{redo}.redo{generation}"),
    localrule: True
    conda:
        "../../envs/slides.yaml"
    shell:
        "echo 'per-slide outputs missing: batch rerun' > {log}; touch {output.marker}"
