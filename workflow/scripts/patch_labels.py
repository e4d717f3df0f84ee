from histoflow.slide_jobs import run_slide_job

# the step lives in histoflow.slide_jobs, shared with the batch rule patch_labels_batch
run_slide_job("patch_labels", snakemake)
