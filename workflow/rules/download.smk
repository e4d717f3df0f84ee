# Stage: download. Each slide's source (URL, gdc:<UUID>, local path) becomes a local file,
# described by a manifest JSON (path to open, md5, size, seconds). Local files are linked.

# Cluster compute nodes often have no internet, and a symlink needs no job: downloads run on
# the submitting host. Cap parallel transfers with `--resources downloads=N`.
localrules:
    download_slide,
    download_slide_batch,
    download,


rule download_slide:
    output:
        manifest=out("downloads/{slide_id}.json"),
    params:
        # the sheet cell, not the URL: a signed URL's query never reaches .snakemake/metadata
        source=sheet_ref("source"),
        md5=slide_field("md5"),
        dest_dir=lambda wc: out(f"downloads/{wc.slide_id}"),
        settings=config["download"],
        on_error=config["on_error"],
    log:
        log_path("download_slide"),
    threads: 1
    resources:
        downloads=1,
        mem_mb=512,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/download_slide.py"


rule download:
    input:
        stage_targets("download"),

