# Stage: stain normalisation. One normaliser per cohort (Macenko, Reinhard or Vahadane), fitted
# on a reference tile (given, or the most typical tissue tile of a seeded sample across slides)
# and applied tile by tile while features are extracted. Method `none` builds nothing.
# stain.fit_on: all draws the auto reference from every slide (unlabelled, transductive: said in
# the checklist); train_only reads the split and keeps the slides train-role in every fold.

rule fit_stain:
    input:
        slides=slide_inputs("slides/{slide_id}.json"),
        tiles=slide_inputs("tiles/{slide_id}.parquet"),
        splits=fit_on_splits("stain"),
    output:
        stain=out("stain/stain.json"),
        reference=report(
            out("stain/reference.png"),
            caption="../report/stain_reference.rst",
            category="04. Stain normalisation",
        ),
    params:
        slides=per_slide("slides/{slide_id}.json"),
        tiles=per_slide("tiles/{slide_id}.parquet"),
        settings=config["stain"],
        seed=config["seed"],
        splits_tsv=(fit_on_splits("stain") or [None])[0],
        mpp=config["features"]["mpp"],
    log:
        log_path("fit_stain", "fit_stain"),
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/slides.yaml"
    script:
        "../scripts/fit_stain.py"


rule stain:
    input:
        stage_targets("stain"),
