from histoflow.slide_jobs import run_slide_job

# the step lives in histoflow.slide_jobs, shared with the batch rule slide_qc_batch
run_slide_job("slide_qc", snakemake)
