# Stage: download. Each slide's source (URL, gdc:<UUID>, local path) becomes a local file,
# described by a manifest JSON (path to open, md5, size, seconds). Local files are linked.


rule download_slide:
    output:
        manifest=out("downloads/{slide_id}.json"),
    params:
        source=lambda wc: sample(wc)["source"],
        md5=lambda wc: sample(wc)["md5"],
        dest_dir=lambda wc: out(f"downloads/{wc.slide_id}"),
        settings=config["download"],
        on_error=config["on_error"],
    log:
        log_path("download_slide"),
    resources:
        downloads=1,
    script:
        "../scripts/download_slide.py"


rule download:
    input:
        per_slide("downloads/{slide_id}.json"),
