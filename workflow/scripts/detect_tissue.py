from histoflow.slide_jobs import run_slide_job

# the step lives in histoflow.slide_jobs, shared with the batch rule detect_tissue_batch
run_slide_job("detect_tissue", snakemake)
