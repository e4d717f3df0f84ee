"""The per-slide steps of the workflow, each as a function of one `SlideJob`.

A per-slide rule (`snakemake ... results/tiles/S1.parquet`) and a batch rule (`slides_per_job`
> 1: many slides in one job, see `histoflow.batches`) run the very same function here, so a
slide's outputs do not depend on how the cohort was cut into jobs. Each function only maps the
rule's named inputs/params/outputs onto one stage function; stage modules are imported inside
them, so a tissue job never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .logs import log_to      # stdlib only: loaded with the module, not inside a step's timing


@dataclass(frozen=True)
class SlideJob:
    """What a rule gives one slide's step: named inputs, outputs and params, as plain values
    (a path, or a list of paths for list inputs), the wildcards, the log file and the threads."""

    wildcards: dict[str, str]
    input: dict[str, Any] = field(default_factory=dict)
    output: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    log: str | None = None
    threads: int = 1

    @property
    def slide_id(self) -> str:
        return self.wildcards["slide_id"]

    @classmethod
    def from_snakemake(cls, snakemake) -> "SlideJob":
        """The job of a per-slide rule's script (`snakemake` is the object Snakemake injects)."""

        def named(part) -> dict[str, Any]:   # Snakemake's Namedlist, or a plain namespace in tests
            value = getattr(snakemake, part, None)
            if value is None:
                return {}
            return dict(value.items()) if hasattr(value, "items") else dict(vars(value))

        def plain(files: dict[str, Any]) -> dict[str, Any]:   # IOFile -> str, a list input -> list of str
            return {name: [str(v) for v in value] if isinstance(value, list) else str(value)
                    for name, value in files.items()}

        logs = list(getattr(snakemake, "log", []) or [])
        return cls(
            wildcards={name: str(value) for name, value in named("wildcards").items()},
            input=plain(named("input")),
            output=plain(named("output")),
            params=named("params"),
            log=str(logs[0]) if logs else None,
            threads=int(getattr(snakemake, "threads", 1) or 1),
        )


def _single(paths: Any) -> str | None:
    """An optional one-file input (given as a list that is empty or holds one path)."""
    paths = list(paths or [])
    return str(paths[0]) if paths else None


def download_slide(job: SlideJob) -> None:
    from .download import download_slide as run

    from .privacy import resolve_sheet_value

    run(slide_id=job.slide_id, source=resolve_sheet_value(job.params["source"], job.slide_id),
        dest_dir=job.params["dest_dir"],
        manifest_path=job.output["manifest"], md5=job.params["md5"], settings=job.params["settings"],
        on_error=job.params["on_error"])


def qc_slide(job: SlideJob) -> None:
    from .slide_qc import write_slide_metadata

    write_slide_metadata(slide_id=job.slide_id, manifest_path=job.input["manifest"],
                         out_path=job.output["slide"], sheet_mpp=job.params["sheet_mpp"],
                         default_mpp=job.params["default_mpp"], on_error=job.params["on_error"],
                         tile_check=job.params.get("tile_check"))


def detect_tissue(job: SlideJob) -> None:
    from .tissue import detect_tissue_for_slide

    detect_tissue_for_slide(slide_json=job.input["slide"], mask_png=job.output["mask"],
                            geojson_path=job.output["geojson"], overlay_path=job.output["overlay"],
                            stats_json=job.output["stats"], settings=job.params["settings"],
                            on_error=job.params["on_error"], threads=job.threads)


def tile_slide(job: SlideJob) -> None:
    from .tiling import tile_slide_with_preview

    tile_slide_with_preview(slide_json=job.input["slide"], mask_png=job.input["mask"],
                            tissue_json=job.input["stats"], overlay_jpg=job.input["overlay"],
                            out_path=job.output["tiles"], preview_path=job.output["preview"],
                            settings=job.params["settings"], seed=job.params["seed"],
                            on_error=job.params["on_error"])


def export_tile_images(job: SlideJob) -> None:
    from .tiling import export_tile_images as run

    run(slide_json=job.input["slide"], tiles_path=job.input["tiles"], out_dir=job.output["images"],
        image_format=job.params["image_format"])


def extract_features(job: SlideJob) -> None:
    from .features import extract_slide_features

    extract_slide_features(slide_json=job.input["slide"], tiles_path=job.input["tiles"],
                           out_path=job.output["features"], encoder_name=job.params["encoder_name"],
                           settings=job.params["settings"], tiling_mpp=job.params["tiling_mpp"],
                           stain_json=_single(job.input["stain"]),
                           ssl_checkpoint=_single(job.input["ssl_checkpoint"]),
                           seed=job.params["seed"], threads=job.threads,
                           on_error=job.params.get("on_error", "fail"))


def patch_labels(job: SlideJob) -> None:
    from .patch_labels import patch_labels_for_slide

    patch_labels_for_slide(slide_id=job.slide_id, tiles_path=job.input["tiles"], slide_json=job.input["slide"],
                           annotations=job.params["annotations"], slide_label=job.params["label"],
                           positive_label=job.params["positive_label"], settings=job.params["settings"],
                           out_path=job.output["labels"])


def heatmap(job: SlideJob) -> None:
    from .heatmaps import heatmap_for_slide

    heatmap_for_slide(slide_id=job.slide_id, source=job.wildcards["source"], prob_paths=list(job.input["probs"]),
                      slide_json=job.input["slide"], tissue_json=job.input["tissue_stats"],
                      tissue_png=job.input["tissue_mask"], out_png=job.output["png"],
                      out_geojson=job.output["geojson"], settings=job.params["settings"])


def detect_lesions(job: SlideJob) -> None:
    from .lesions import lesions_for_slide

    lesions_for_slide(slide_id=job.slide_id, source=job.wildcards["source"], prob_paths=list(job.input["probs"]),
                      slide_json=job.input["slide"], annotations=job.params["annotations"],
                      slide_label=job.params["label"], positive_label=job.params["positive_label"],
                      cohort_has_annotations=job.params["cohort_has_annotations"],
                      settings=job.params["settings"], label_settings=job.params["label_settings"],
                      out_geojson=job.output["geojson"], out_json=job.output["record"])


# rule name -> its step; a batch rule `<name>_batch` runs the same step for each of its slides
SLIDE_STEPS: dict[str, Callable[[SlideJob], None]] = {
    step.__name__: step
    for step in (download_slide, qc_slide, detect_tissue, tile_slide, export_tile_images, extract_features,
                 patch_labels, heatmap, detect_lesions)
}


# What a step imports before it starts, per rule: the import is then the process's start-up (paid
# once per batch job, before the first slide). benchmarks/ingest.py times the steps the same way.
STEP_IMPORTS: dict[str, tuple[str, ...]] = {
    "qc_slide": ("histoflow.slide_qc", "histoflow.wsi", "openslide", "PIL.Image"),
    # a JPEG-tiled TIFF's level is indexed by tifffile and decoded by OpenCV; OpenSlide (and its
    # progress bar; other formats) is imported when a slide needs it
    "detect_tissue": ("histoflow.tissue", "histoflow.wsi", "tifffile", "histoflow.geojson", "cv2", "shapely",
                      "concurrent.futures"),
    # PIL.Image.open loads the Bmp/Gif/Jpeg/Ppm/Png plugins on its first call; the tile sample
    # draws from numpy.random
    "tile_slide": ("histoflow.tiling", "PIL.Image", "PIL.ImageDraw", "PIL.BmpImagePlugin", "PIL.GifImagePlugin",
                   "PIL.JpegImagePlugin", "PIL.PpmImagePlugin", "PIL.PngImagePlugin", "numpy.random",
                   "pyarrow", "pyarrow.parquet", "histoflow.wsi", "concurrent.futures"),
}


_PREPARED: set[str] = set()


def prepare_step(rule: str) -> None:
    """Import what step ``rule`` needs: the set-up of a rule's process before its first slide. Once
    per rule and process: a batch job calls it for every slide."""
    import importlib

    if rule in _PREPARED:
        return
    for module in STEP_IMPORTS.get(rule, ()):
        importlib.import_module(module)
    _PREPARED.add(rule)


def run_slide_job(rule: str, snakemake) -> None:
    """Run a per-slide rule's step, logging to the rule's log file."""
    job = SlideJob.from_snakemake(snakemake)
    with log_to(job.log):          # an import failure in prepare_step goes to the log too
        prepare_step(rule)
        SLIDE_STEPS[rule](job)
