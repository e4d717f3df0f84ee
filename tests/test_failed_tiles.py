"""Failed tiles are counted and can fail a slide (features.max_failed_tile_fraction): a tiled
TIFF whose level-0 tile bytes are partly zeroed opens, and its coarsest level decodes, but slide
QC samples tiles at the tiling level and refuses it; features count every tile that fails and
fail (on_error: fail) or skip (on_error: skip) the slide above the limit; the counts reach
qc/features.tsv and checklist item 6 (hence MLflow)."""

from __future__ import annotations

import numpy as np
import pytest

from histoflow import features as F
from histoflow.errors import SlideError
from histoflow.io import read_json, write_json, write_parquet
from histoflow.slide_qc import write_slide_metadata

from test_features import make_slide, tiles_table, tiny_encoder

SIZE = 2048                     # 8 x 8 JPEG tiles of 256 px at level 0
TILE_CHECK = {"mpp": 0.25, "tile_px": 128, "max_failed_tile_fraction": 0.01}


def zero_tiles(path, every: int, keep: int) -> int:
    """Zero the bytes of level-0 JPEG tiles i with i % every >= keep (in place); returns how many."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    hit = [span for i, span in enumerate(spans) if i % every >= keep]
    with open(path, "r+b") as handle:
        for offset, count in hit:
            handle.seek(offset)
            handle.write(b"\0" * count)
    return len(hit)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("failed")
    good = make_slide(root / "good.tiff", size=SIZE)
    bad = make_slide(root / "bad.tiff", size=SIZE)
    assert zero_tiles(bad, 5, 3) == 25          # 25 of 64 tiles: 40 % of the level's bytes
    few = make_slide(root / "few.tiff", size=SIZE)
    assert zero_tiles(few, 64, 63) == 1         # one tile of 64
    for name in ("good", "bad", "few"):
        write_json(root / f"{name}.manifest.json", {"slide_id": name, "status": "ok", "path": str(root / f"{name}.tiff"),
                                                     "md5": "0" * 32})
        write_json(root / f"{name}.json", {"slide_id": name, "status": "ok", "path": str(root / f"{name}.tiff")})
        write_parquet(root / f"{name}.tiles.parquet", tiles_table(name, tile_px=128, mpp=0.25, level=0, size=SIZE))
    return root


def test_qc_samples_the_tiling_level_and_refuses_a_slide_with_corrupt_tiles(slides):
    ok = write_slide_metadata("good", slides / "good.manifest.json", slides / "qc_good.json", tile_check=TILE_CHECK)
    assert ok["status"] == "ok" and ok["qc_tiles_sampled"] == 64 and ok["qc_tiles_failed"] == 0
    with pytest.raises(SlideError) as err:
        write_slide_metadata("bad", slides / "bad.manifest.json", slides / "qc_bad.json", tile_check=TILE_CHECK)
    msg = str(err.value)
    assert "\n" not in msg and "'bad'" in msg and "of 64 tiles sampled" in msg and "on_error: skip" in msg
    skipped = write_slide_metadata("bad", slides / "bad.manifest.json", slides / "qc_bad.json",
                                   on_error="skip", tile_check=TILE_CHECK)
    assert skipped["status"] == "skipped" and "fail to decode" in skipped["reason"]
    # without the tile check (the coarsest level only) the same file passes: what it used to do
    assert write_slide_metadata("bad", slides / "bad.manifest.json", slides / "qc_old.json")["status"] == "ok"


def test_qc_does_not_fail_a_slide_for_one_bad_tile_under_the_limit(slides):
    record = write_slide_metadata("few", slides / "few.manifest.json", slides / "qc_few.json",
                                  tile_check=dict(TILE_CHECK, max_failed_tile_fraction=0.05))
    assert record["status"] == "ok" and record["qc_tiles_failed"] <= 1


def _extract(slides, name, **kw):
    return F.extract_slide_features(str(slides / f"{name}.json"), str(slides / f"{name}.tiles.parquet"),
                                    str(slides / f"{name}.{kw.get('on_error', 'fail')}.parquet"), "tiny",
                                    dict({"mpp": 0.25, "num_workers": 0, "batch_size": 64}, **kw.pop("settings", {})),
                                    [0.25], encoder=tiny_encoder(), **kw)


def test_features_fail_a_slide_above_the_limit_with_one_line_and_write_nothing(slides):
    with pytest.raises(SlideError) as err:
        _extract(slides, "bad")
    msg = str(err.value)
    n_tiles = 256
    assert "\n" not in msg and "'bad'" in msg and f"of {n_tiles} tiles failed" in msg
    assert "features.max_failed_tile_fraction" in msg
    failed = int(msg.split("'bad': ")[1].split(" of ")[0])
    assert 0.3 * n_tiles < failed < 0.5 * n_tiles           # 4 of the 128-px tiles in each zeroed 256-px tile
    assert not (slides / "bad.fail.parquet").exists()


def test_features_skip_a_slide_above_the_limit_with_the_reason_and_the_counts(slides):
    meta = _extract(slides, "bad", on_error="skip")
    assert meta["histoflow.status"] == "skipped" and "tiles failed" in meta["histoflow.reason"]
    coords, feats = F.read_features(slides / "bad.skip.parquet")
    assert len(coords) == 0 and feats.shape == (0, 16)      # nothing from a corrupt slide goes on
    qc = F.write_features_qc([slides / "bad.skip.parquet"], slides / "features.tsv")
    row = qc.iloc[0]
    assert row["slide_id"] == "bad" and row["status"] == "skipped" and row["n_tiles"] == 256
    assert row["failed_tiles"] == int(meta["histoflow.dropped_tiles"]) > 0


def test_failed_tiles_under_the_limit_are_dropped_and_counted(slides):
    meta = _extract(slides, "few", settings={"max_failed_tile_fraction": 0.05})
    assert meta["histoflow.status"] == "ok" and meta["histoflow.dropped_decode"] == "4"
    coords, _ = F.read_features(slides / "few.fail.parquet")
    assert len(coords) == 256 - 4


def test_checklist_item_6_reports_failed_tiles_per_slide(slides, tmp_path):
    import shutil

    from histoflow.checklist import collect_checklist

    out = tmp_path / "results"
    (out / "features" / "tiny").mkdir(parents=True)
    meta = _extract(slides, "few", settings={"max_failed_tile_fraction": 0.05})
    shutil.copy(slides / "few.fail.parquet", out / "features" / "tiny" / "few.parquet")
    items = {it.number: it for it in collect_checklist(str(out), {"features": {"max_failed_tile_fraction": 0.05}},
                                                       str(tmp_path / "samples.tsv"))}
    item = items[6]
    assert item.metrics["n_failed_tiles.few"] == float(meta["histoflow.dropped_tiles"]) == 4.0
    assert item.metrics["n_failed_tiles_total"] == 4.0
    assert item.params["features.max_failed_tile_fraction"] == 0.05
    assert "4 tiles failed to read" in " ".join(item.summary)


def test_qc_of_a_healthy_slide_does_not_import_scipy_stats(slides):
    """The binomial test is needed only when a sampled tile fails; importing scipy.stats costs
    about a second, dozens of times the rest of a slide's QC (docs/benchmarks.md, ingest)."""
    import subprocess
    import sys

    code = ("import sys; from histoflow.slide_qc import write_slide_metadata as w; "
            f"r = w('good', {str(slides / 'good.manifest.json')!r}, {str(slides / 'qc_sub.json')!r}, tile_check={TILE_CHECK!r}); "
            "assert r['qc_tiles_failed'] == 0; print('scipy.stats' in sys.modules)")
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False"


def test_qc_reads_start_on_stored_tiles_when_the_sample_stays_as_large():
    """Each of the 8 x 8 reads decodes one stored tile when it can (a read across a tile corner
    decodes four); where aligning would merge positions (a level under 8 tiles across) or the
    read spans tiles, the positions are the evenly spread ones."""
    from histoflow.slide_qc import QC_TILE_GRID, _grid

    aligned = _grid(50_000, 256, 256)
    assert len(aligned) == QC_TILE_GRID and all(v % 256 == 0 for v in aligned)
    assert aligned == sorted(v // 256 * 256 for v in _grid(50_000, 256, None))
    assert _grid(1_000, 100, 256) == _grid(1_000, 100, None) and len(_grid(1_000, 100, None)) == QC_TILE_GRID
    assert _grid(50_000, 512, 256) == _grid(50_000, 512, None)
