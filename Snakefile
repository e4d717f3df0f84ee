# histoflow: whole-slide images from download to an audited slide-level model.
#   snakemake --cores 2                 the whole DAG (rule `all`: final_targets(), common.smk)
#   snakemake --cores 2 tiling          stop after tiling; each stage's target is named as its
#                                       rule file (download, slide_qc, tissue, ...; see README)
# Logic lives in the `histoflow` package; this file only wires the stages together.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# common.smk puts this checkout on PYTHONPATH (jobs import histoflow from it) and tells jobs the
# output folder and the sheets (histoflow.io.safe_remove, histoflow.privacy.resolve_sheet_value);
# declared so that Snakemake passes them on to jobs it runs elsewhere
envvars:
    "PYTHONPATH",
    "HISTOFLOW_OUTDIR",
    "HISTOFLOW_SAMPLES",
    "HISTOFLOW_EXTRA_SAMPLES",


include: "workflow/rules/download.smk"
include: "workflow/rules/slide_qc.smk"
include: "workflow/rules/tissue.smk"
include: "workflow/rules/tiling.smk"
include: "workflow/rules/stain.smk"
include: "workflow/rules/ssl_pretrain.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/split.smk"
include: "workflow/rules/mil.smk"
include: "workflow/rules/patch_classifier.smk"
include: "workflow/rules/heatmaps.smk"
include: "workflow/rules/lesions.smk"
include: "workflow/rules/slide_features.smk"
include: "workflow/rules/slide_classifier.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/mlflow.smk"
include: "workflow/rules/checklist.smk"
# last: it generates the per-slide rules' batch twins (<rule>_batch) from the rules above
include: "workflow/rules/batches.smk"


rule all:
    default_target: True
    input:
        final_targets(),


# Old target names (deprecated, docs/interface.md): each builds what its stage's target builds.
rule qc:
    input:
        stage_targets("slide_qc"),


rule tiles:
    input:
        stage_targets("tiling"),


rule slide_features_all:
    input:
        stage_targets("slide_features"),


rule slide_classifiers:
    input:
        stage_targets("slide_classifier"),


# what `snakemake --report` reads: the checklist and the MLflow log
rule report_inputs:
    input:
        stage_targets("checklist"),
        stage_targets("mlflow"),
