from histoflow.bundle import check_bundle_config, predict_slides, read_manifest
from histoflow.logs import first_log, log_to

with log_to(first_log(snakemake)):
    # the bundle may have been rebuilt since planning: its settings are checked again here
    check_bundle_config(read_manifest(snakemake.input.bundle), dict(snakemake.params.settings), snakemake.params.encoder)
    predict_slides(
        bundle_json=snakemake.input.bundle,
        slide_ids=list(snakemake.params.slide_ids),
        feature_paths=list(snakemake.input.features),
        slide_jsons=list(snakemake.input.slides),
        tissue_jsons=list(snakemake.input.tissue_stats),
        tissue_pngs=list(snakemake.input.tissue_masks),
        out_tsv=snakemake.output.slides,
        out_tiles=snakemake.output.tiles,
        heatmap_dir=snakemake.output.heatmaps,
        heatmap_settings=dict(snakemake.params.heatmaps),
    )
