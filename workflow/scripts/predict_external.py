from histoflow.bundle import predict_external
from histoflow.logs import first_log, log_to

with log_to(first_log(snakemake)):
    predict_external(
        bundle_json=snakemake.input.bundle,
        rows=list(snakemake.params.rows),
        feature_paths=list(snakemake.input.features),
        positive_label=snakemake.params.positive_label,
        out_tsv=snakemake.output.predictions,
        slide_jsons=list(snakemake.input.slides),
    )
