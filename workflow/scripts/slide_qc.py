from histoflow.slide_jobs import run_slide_job

# the step lives in histoflow.slide_jobs, shared with the batch rule qc_slide_batch
run_slide_job("qc_slide", snakemake)
