"""Small-lesion demo cohorts (``--lesion-fraction LOW-HIGH``, ``--mixed-mpp``; issue 23): the
realised lesion fraction lies in the asked range, made of small foci inside the tissue, same
seed gives the same pixels, and half the slides are 40x scans whose truth is in their own px."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histoflow.demo import make_demo_cohort, parse_lesion_fraction, plan_cohort, small_lesion_plan
from histoflow.demo_slides import lesion_field_fraction, tissue_field
from histoflow.errors import InputError

LOW, HIGH = 0.005, 0.03


@pytest.mark.parametrize("shape", [(375, 500), (150, 187)])   # full-size and --small low-res maps
def test_realised_fraction_is_in_the_range_for_many_draws(shape):
    fractions, foci = [], []
    for seed in range(40):
        rng = np.random.default_rng([seed, 1])
        tissue, _ = tissue_field(rng, shape, almost_empty=False)
        lesion, target = lesion_field_fraction(rng, tissue, LOW, HIGH, max_foci=4)
        realised = lesion.sum() / tissue.sum()
        assert LOW <= realised <= HIGH, (seed, realised, target)
        assert abs(realised - target) <= 4.0 / tissue.sum()     # whole px, a few per focus at most
        assert not (lesion & ~tissue).any()       # foci lie in the tissue
        from scipy import ndimage as ndi

        foci.append(ndi.label(lesion)[1])
        fractions.append(realised)
    # the draw spans the range (log-uniform: about half the slides below the geometric mean)
    assert min(fractions) < 0.008 and max(fractions) > 0.02
    assert np.mean(np.array(fractions) < np.sqrt(LOW * HIGH)) == pytest.approx(0.5, abs=0.2)
    if shape[0] > 300:
        assert min(foci) == 1 and max(foci) >= 3     # 1-N foci


def test_parse_lesion_fraction_and_bad_input_is_one_line():
    assert parse_lesion_fraction("0.005-0.03") == (0.005, 0.03)
    for bad in ("0.03-0.005", "0-0.1", "5-10", "abc", "0.01", "0.01-0.02-0.03"):
        with pytest.raises(InputError) as err:
            parse_lesion_fraction(bad)
        assert "--lesion-fraction" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="binary"):
        make_demo_cohort("/nonexistent", n_slides=2, task="survival", lesion_fraction="0.01-0.02")


def test_mixed_mpp_takes_half_of_each_label_and_leaves_the_rest_alone():
    plain = plan_cohort(24, 23)
    plans = small_lesion_plan(plan_cohort(24, 23), 23, (LOW, HIGH), mixed_mpp=True)
    for label in ("tumor", "normal"):
        group = [p for p in plans if p.label == label]
        assert sum(p.mpp == 0.25 for p in group) == len(group) // 2
    # labels, patients and nuisances are the plain plan's (pen marks on some negatives included)
    assert [(p.label, p.patient_id, p.pen, p.blur, p.almost_empty) for p in plans] == \
           [(p.label, p.patient_id, p.pen, p.blur, p.almost_empty) for p in plain]
    assert any(p.pen and p.label == "normal" for p in plans)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small_lesions")
    make_demo_cohort(out, n_slides=4, seed=5, small=True, progress=False,
                     lesion_fraction=(LOW, HIGH), mixed_mpp=True)
    return out


def test_cohort_truth_records_the_realised_fraction_and_the_pixels_show_it(cohort):
    import openslide
    from shapely.geometry import shape

    sheet = pd.read_csv(cohort / "samples.tsv", sep="\t", dtype=str).fillna("")
    mpps = set()
    for row in sheet.itertuples():
        truth = json.loads((cohort / "truth" / f"{row.slide_id}.json").read_text())
        slide = openslide.OpenSlide(str(cohort / row.source))
        mpp = float(slide.properties["openslide.mpp-x"])
        mpps.add(round(mpp, 3))
        assert mpp == pytest.approx(truth["mpp"], abs=1e-3)
        assert slide.level_dimensions[0] == (truth["width"], truth["height"])
        assert truth["tissue_mask_downsample"] == round(16 * 0.5 / truth["mpp"])
        if row.label == "tumor":
            assert LOW <= truth["lesion_area_fraction_of_tissue"] <= HIGH
            assert truth["lesion_fraction_range"] == [LOW, HIGH]
            # polygons in the slide's own level-0 px: their area in µm² is the truth's
            geo = json.loads((cohort / row.annotations).read_text())
            area_um2 = sum(shape(f["geometry"]).area for f in geo["features"]) * mpp * mpp
            tissue_um2 = truth["tissue_area_mm2"] * 1e6
            assert area_um2 / tissue_um2 == pytest.approx(truth["lesion_area_fraction_of_tissue"], rel=0.35)
            # truth and polygons agree, both in the slide's own level-0 px (40x slides: twice the 20x px)
            centroids = sorted((round(shape(f["geometry"]).centroid.x), round(shape(f["geometry"]).centroid.y))
                               for f in geo["features"])
            assert len(centroids) == len(truth["lesions"])
            for (x, y), lesion in zip(centroids, sorted(truth["lesions"], key=lambda l: l["centroid_px"])):
                assert lesion["centroid_px"] == pytest.approx([x, y], abs=2 / mpp)
        else:
            assert truth["lesion_area_fraction_of_tissue"] == 0 and truth["lesions"] == []
    assert mpps == {0.25, 0.5}


def test_same_seed_gives_identical_pixels(cohort, tmp_path):
    again = tmp_path / "again"
    make_demo_cohort(again, n_slides=4, seed=5, small=True, progress=False,
                     lesion_fraction=(LOW, HIGH), mixed_mpp=True)
    a = pd.read_csv(cohort / "samples.tsv", sep="\t", dtype=str)
    b = pd.read_csv(again / "samples.tsv", sep="\t", dtype=str)
    assert a["md5"].tolist() == b["md5"].tolist()


def test_small_lesion_config_trains_ssl_at_the_tiles_resolution_and_the_plain_demo_is_unchanged(cohort, repo_root):
    import yaml
    from snakemake.utils import update_config

    from histoflow.config import validate_config
    from histoflow.demo import demo_config

    demo = yaml.safe_load((cohort / "config.yaml").read_text())
    assert demo["ssl"] == {"arch": "resnet-tiny", "image_px": 224, "crop_px": 96}
    assert demo["ssl"]["image_px"] == demo["tiling"]["tile_px"]        # no shrinking of the tile
    assert demo["patch_labels"] == {"positive_overlap": 0.1}             # foci are smaller than a tile
    merged = yaml.safe_load((repo_root / "config.yaml").read_text())
    update_config(merged, demo)
    validate_config(merged)
    plain = demo_config(cohort / "samples.tsv")
    assert plain["ssl"] == {"arch": "resnet-tiny"} and "patch_labels" not in plain   # make demo: as before


def test_cli_bad_lesion_fraction_is_one_actionable_line(tmp_path, capsys):
    from histoflow.cli import main

    assert main(["demo-cohort", "--out", str(tmp_path), "--slides", "2", "--lesion-fraction", "3-1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lesion-fraction" in err and "0.005-0.03" in err
    assert not (tmp_path / "slides").exists()      # refused before anything is written
