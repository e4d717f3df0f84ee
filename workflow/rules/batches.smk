# Slide batches (config slides_per_job > 1; see common.smk and histoflow/batches.py): every
# per-slide rule of SLIDE_RULES gets a twin <rule>_batch, generated here from the per-slide rule
# (its script, threads, resources, conda env: common.smk's batch_twin), so a per-slide stage
# declares its rule once. Included last: the per-slide rules exist by then.
for _slide_rule_name in SLIDE_RULES:
    _twin = batch_twin(_slide_rule_name)

    rule:
        name:
            f"{_slide_rule_name}_batch"
        input:
            batch_input(_slide_rule_name),
        output:
            manifest=batch_manifest(_slide_rule_name),
        params:
            rule=_slide_rule_name,
            script=_twin["script"],
            jobs=batch_jobs(_slide_rule_name),
        wildcard_constraints:
            **_twin["wildcard_constraints"],
        log:
            _twin["log"],
        threads: _twin["threads"]
        resources:
            **_twin["resources"],
        conda:
            _twin["conda"]
        script:
            "../scripts/slide_batch.py"


# Snakemake tracks a batch job by its manifest only, so a per-slide file deleted by hand would go
# unnoticed: the batch's input function then asks for a new marker, newer than the manifest, and
# the batch job reruns, redoing only the slides whose files are missing (the others are reused).
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
