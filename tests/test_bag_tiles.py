"""Bag tiles never depend on annotations (issue 16, item 1).

The tiles that features, MIL, heatmaps and slide features read are the same whether or not the
samples sheet has an `annotations` column: with a cap, a seeded sample over tissue only. A
lesion-enriched sample of test slides would inflate every downstream slide-level result.
Through the workflow (rule `tile_slide` and its params), on a small generated cohort.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_tiles(configfile: Path) -> None:
    exe = BIN / "snakemake"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONHASHSEED="0")
    cmd = [str(exe) if exe.exists() else "snakemake", "--cores", "2", "tiles",
           "--configfile", "config.yaml", str(configfile)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def test_capped_tiles_are_the_same_with_and_without_the_annotations_column(tmp_path):
    demo = pytest.importorskip("histoflow.demo")
    from histoflow.annotations import lesion_geometry, read_annotations

    sheet = Path(demo.make_demo_cohort(tmp_path / "demo", 3, 11, small=True, progress=False))
    with_ann = pd.read_csv(sheet, sep="\t", dtype=str)
    annotated = [r for r in with_ann.to_dict("records")
                 if isinstance(r.get("annotations"), str)
                 and not lesion_geometry(read_annotations(sheet.parent / r["annotations"])).is_empty]
    assert annotated, "the generated cohort must have a slide with lesion polygons for this test to mean anything"
    bare = sheet.parent / "samples_without_annotations.tsv"   # sources are relative to the demo folder
    with_ann.drop(columns=["annotations"]).to_csv(bare, sep="\t", index=False)

    tiles = {}
    for name, samples in (("with", sheet), ("without", bare)):
        cfg = {"samples": str(samples), "outdir": str(tmp_path / name),
               "tiling": {"mpp": [0.5], "tile_px": 128, "min_tissue_fraction": 0.5, "max_tiles_per_slide": 12}}
        configfile = tmp_path / f"{name}.yaml"
        configfile.write_text(yaml.safe_dump(cfg))
        run_tiles(configfile)
        tiles[name] = {sid: pq.read_table(tmp_path / name / "tiles" / f"{sid}.parquet") for sid in with_ann["slide_id"]}

    xy = lambda t: set(zip(t.column("x").to_pylist(), t.column("y").to_pylist()))
    for sid in with_ann["slide_id"]:
        a, b = tiles["with"][sid], tiles["without"][sid]
        assert a.num_rows == 12, f"{sid}: the cap of 12 must bind for the comparison to test the sample"
        assert xy(a) == xy(b), f"{sid}: the capped tile sample depends on the annotations column"
    for sid in with_ann["slide_id"]:   # nothing else differs either: the same table and metadata
        a, b = tiles["with"][sid], tiles["without"][sid]
        assert a.equals(b) and a.schema.metadata == b.schema.metadata
        assert "annotation_fraction" not in a.column_names
