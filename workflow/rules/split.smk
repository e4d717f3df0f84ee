# Stage: split. Patient-level, label-stratified folds from the samples sheet alone (no slide
# needs to exist), so the fold count and every fold's roles are fixed before any training.


rule make_splits:
    input:
        sheet=config["samples"],
    output:
        splits=out("splits/splits.tsv"),
        summary=out("splits/split.json"),
    params:
        # split.strategy sheet: the sheet's own split column travels too
        samples=samples[["slide_id", "patient_id", "label", "site"] + TARGET_COLUMNS
                        + (["split"] if config["split"]["strategy"] == "sheet" else [])].to_dict("records"),
        settings=config["split"],
        positive_label=config["positive_label"],
        target=config["target"],
        seed=config["seed"],
    log:
        log_path("make_splits", "splits"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/split.py"


rule split:
    input:
        stage_targets("split"),
