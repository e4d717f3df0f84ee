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
