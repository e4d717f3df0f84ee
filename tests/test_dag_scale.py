"""Samples-sheet checks that stay fast on big cohorts and still name the first bad row exactly."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from histoflow.config import load_samples
from histoflow.errors import InputError


def write_sheet(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "samples.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def cohort(n: int, source: str = "a.svs") -> list[dict]:
    return [{"slide_id": f"s{i:05d}", "patient_id": f"P{i // 2:05d}",
             "label": "tumor" if (i // 2) % 2 else "normal", "source": source} for i in range(n)]


@pytest.fixture
def slide(tmp_path: Path) -> Path:
    path = tmp_path / "a.svs"
    path.write_bytes(b"not really a slide")
    return path


def test_the_first_bad_row_of_a_big_sheet_is_the_one_reported(tmp_path, slide):
    rows = cohort(3000)
    rows[2500]["mpp"] = "fast"            # a later row, different problem
    rows[1200]["slide_id"] = "bad id!"    # the first bad row
    rows[2999]["patient_id"] = ""
    with pytest.raises(InputError) as err:
        load_samples({"samples": str(write_sheet(tmp_path, rows))})
    message = str(err.value)
    assert "row 1201 (slide 'bad id!'), field 'slide_id'" in message
    assert "\n" not in message


def test_a_bad_mpp_and_a_schema_error_in_one_row_report_the_mpp(tmp_path, slide):
    rows = cohort(10)
    rows[3].update(mpp="fast", md5="xyz")
    with pytest.raises(InputError, match=r"row 4 \(slide 's00003'\): mpp 'fast' is not a number"):
        load_samples({"samples": str(write_sheet(tmp_path, rows))})


def test_a_missing_file_is_named_by_its_row(tmp_path, slide):
    rows = cohort(500)
    rows[321]["source"] = "gone.svs"
    with pytest.raises(InputError, match=r"row 322 \(slide 's00321'\): local source 'gone.svs' does not exist"):
        load_samples({"samples": str(write_sheet(tmp_path, rows))})


def test_local_sources_resolve_through_symlinks_like_realpath(tmp_path, slide):
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "rel.svs").symlink_to(Path("..") / "a.svs")   # relative link
    (tmp_path / "abs.svs").symlink_to(slide)
    (tmp_path / "folder").symlink_to(tmp_path / "links", target_is_directory=True)
    sources = ["links/rel.svs", "abs.svs", "folder/rel.svs", "folder/../a.svs", "./links//rel.svs", str(slide)]
    rows = cohort(len(sources))
    for row, source in zip(rows, sources):
        row["source"] = source
    table = load_samples({"samples": str(write_sheet(tmp_path, rows))})
    expected = [os.path.realpath(tmp_path / s) for s in sources]
    assert list(table["source"]) == expected
    assert set(table["source"]) == {str(slide.resolve()), os.path.realpath(tmp_path / "folder/../a.svs")}


def test_empty_and_nan_mpp_cells_are_none_and_numbers_are_floats(tmp_path, slide):
    rows = cohort(3)
    rows[0]["mpp"], rows[1]["mpp"], rows[2]["mpp"] = "", "nan", "0.25"
    table = load_samples({"samples": str(write_sheet(tmp_path, rows))})
    assert table["mpp"].tolist() == [None, None, 0.25]
    assert table["annotations"].tolist() == [None, None, None]


def test_a_cohort_above_500_slides_is_planned_in_slide_batches(tmp_path):
    """slides_per_job: auto: 600 slides -> 3 per job, 200 batches per per-slide step, and no
    per-slide job at all, so big cohorts plan in seconds (benchmarks/dag.py: 10,000 in ~10 s)."""
    import re
    import subprocess
    import sys

    import pyvips
    import yaml

    tiny = tmp_path / "tiny.tiff"
    pyvips.Image.black(256, 256, bands=3).new_from_image([230, 200, 220]).cast("uchar").tiffsave(
        str(tiny), tile=True, pyramid=True, compression="jpeg", xres=2000, yres=2000)
    rows = cohort(600, source=str(tiny))
    for row in rows:
        link = tmp_path / f"{row['slide_id']}.tiff"
        link.symlink_to(tiny)
        row["source"] = str(link)
    config = tmp_path / "big.yaml"
    config.write_text(yaml.safe_dump({"samples": str(write_sheet(tmp_path, rows)), "outdir": str(tmp_path / "out")}))
    repo = Path(__file__).resolve().parent.parent
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run([str(bin_dir / "snakemake"), "-n", "--quiet", "rules", "--configfile", "config.yaml",
                           str(config)], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, flags=re.M))
    for rule in ("download_slide", "qc_slide", "detect_tissue", "tile_slide", "extract_features", "heatmap",
                 "detect_lesions"):
        assert counts.get(f"{rule}_batch") == "200", (rule, counts)
        assert rule not in counts, (rule, counts)
    assert int(counts["total"]) < 2000
