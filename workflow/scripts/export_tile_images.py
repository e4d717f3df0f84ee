from histoflow.slide_jobs import run_slide_job

# the step lives in histoflow.slide_jobs, shared with the batch rule export_tile_images_batch
run_slide_job("export_tile_images", snakemake)
