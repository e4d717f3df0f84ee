from histoflow.slide_jobs import run_slide_job

# the step lives in histoflow.slide_jobs, shared with the batch rule extract_features_batch
run_slide_job("extract_features", snakemake)
