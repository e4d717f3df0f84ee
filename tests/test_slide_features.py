"""Slide-level features from a probability map, and the classic classifiers trained on them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from histoflow.slide_classifier import SlideClassifierSettings, train_and_predict
from histoflow.slide_features import (SlideFeatureSettings, cohort_slide_features, grid_step_um,
                                      probability_stats, region_features, slide_features)


def grid_tiles(prob_grid: np.ndarray, size0: int = 200):
    rows, cols = np.nonzero(~np.isnan(prob_grid))
    return cols, rows, prob_grid[rows, cols]


def test_tumour_percentage_area_and_regions_on_a_known_map():
    grid = np.zeros((10, 10))
    grid[1:3, 1:4] = 0.95          # region of 6 cells
    grid[7, 7] = 0.8               # region of 1 cell
    cols, rows, probs = grid_tiles(grid)
    feats = slide_features(cols, rows, probs, cell_um=100.0, settings=SlideFeatureSettings(thresholds=(0.5, 0.9)))
    assert feats["t50_tumour_pct"] == pytest.approx(7.0)
    assert feats["t50_tumour_area_mm2"] == pytest.approx(7 * 0.01)
    assert feats["t50_n_regions"] == 2
    assert feats["t90_n_regions"] == 1
    assert feats["t50_largest_region_um2"] == pytest.approx(6 * 100.0 ** 2)
    assert feats["t50_largest_region_major_axis_um"] > feats["t50_largest_region_um2"] ** 0.5  # elongated 2x3
    assert feats["t50_pos_max"] == pytest.approx(0.95)
    assert feats["t50_neg_count"] == 93


def test_diagonal_neighbours_form_one_region():
    grid = np.zeros((4, 4))
    grid[0, 0] = grid[1, 1] = grid[2, 2] = 1.0
    assert region_features(grid, 0.5, 10.0)["n_regions"] == 1


def test_statistics_of_an_empty_set_are_zero_and_mode_is_binned():
    assert probability_stats(np.array([]), "pos")["pos_mean"] == 0.0
    stats = probability_stats(np.array([0.91, 0.93, 0.95, 0.2]), "all")
    assert stats["all_mode"] == pytest.approx(0.95)
    assert stats["all_range"] == pytest.approx(0.75)


def test_grid_step_comes_from_the_level0_stride():
    tiles = pd.DataFrame({"col": [0, 1, 3], "x": [0, 448, 1344], "size0": [448, 448, 448]})
    assert grid_step_um(tiles, 0.5) == pytest.approx(224.0)


def _cohort(n_slides=24, folds=3, seed=0):
    rng = np.random.default_rng(seed)
    tiles, splits = [], []
    for i in range(n_slides):
        y = i % 2
        for fold in range(folds):
            role = "test" if i % folds == fold else "train"
            splits.append({"slide_id": f"s{i}", "patient_id": f"p{i}", "y": y, "fold": fold, "role": role})
            grid = rng.uniform(0, 0.4, (8, 8))
            if y:
                r, c = rng.integers(0, 5, 2)
                grid[r:r + 3, c:c + 3] = rng.uniform(0.8, 1.0, (3, 3))
            rows, cols = np.nonzero(np.ones_like(grid, dtype=bool))
            tiles.append(pd.DataFrame({"slide_id": f"s{i}", "fold": fold, "col": cols, "row": rows,
                                       "x": cols * 400, "size0": 400, "prob": grid[rows, cols]}))
    return pd.concat(tiles, ignore_index=True), pd.DataFrame(splits)


def test_every_slide_and_fold_gets_a_row_even_without_tiles():
    tiles, splits = _cohort()
    tiles = tiles[tiles["slide_id"] != "s3"]
    table = cohort_slide_features(tiles, {f"s{i}": 0.5 for i in range(24)}, splits, SlideFeatureSettings())
    assert len(table) == len(splits)
    assert (table.loc[table["slide_id"] == "s3", "n_tissue_tiles"] == 0).all()


@pytest.mark.parametrize("name", ["rf", "gb", "logreg"])
def test_slide_classifiers_separate_tumour_maps_and_train_only_on_train_slides(name):
    tiles, splits = _cohort()
    # the train rows' maps stand for cross-fitted ones (tests/test_crossfit.py checks the real path)
    crossfit = {(r["fold"], r["slide_id"]): f"fold{r['fold']}.inner0" for r in splits.to_dict("records") if r["role"] == "train"}
    table = cohort_slide_features(tiles, {f"s{i}": 0.5 for i in range(24)}, splits, SlideFeatureSettings(), crossfit)
    preds, _ = train_and_predict(table, name, SlideClassifierSettings(n_estimators=50), seed=1)
    test = preds[preds["role"] == "test"]
    assert len(test) == 24
    assert ((test["prob"] >= 0.5) == (test["y"] == 1)).mean() >= 0.9
    again, _ = train_and_predict(table, name, SlideClassifierSettings(n_estimators=50), seed=1)
    assert np.array_equal(preds["prob"].to_numpy(), again["prob"].to_numpy())


@pytest.mark.parametrize("name", ["rf", "gb", "logreg"])
def test_survival_slide_models_rank_risk_by_tumour_burden(name):
    """Random survival forest / boosted Cox / ridge Cox (scikit-survival) on slide features:
    slides with a tumour focus die earlier; out-of-fold risk must rank them (Harrell's c above
    the 99th percentile of its risk-permutation null), time and event are targets, never features."""
    from histoflow.slide_classifier import feature_columns
    from histoflow.targets import Target, harrell_c, permutation_null

    tiles, splits = _cohort(n_slides=30)
    rng = np.random.default_rng(4)
    time = {f"s{i}": float((2.0 if i % 2 else 10.0) * rng.lognormal(0, 0.5)) for i in range(30)}
    event = {f"s{i}": int(i % 5 != 0) for i in range(30)}
    splits["time"], splits["event"] = splits["slide_id"].map(time), splits["slide_id"].map(event)
    splits["y"] = splits["event"]
    crossfit = {(r["fold"], r["slide_id"]): f"fold{r['fold']}.inner0" for r in splits.to_dict("records") if r["role"] == "train"}
    table = cohort_slide_features(tiles, {f"s{i}": 0.5 for i in range(30)}, splits, SlideFeatureSettings(), crossfit)
    assert {"time", "event"} <= set(table.columns) and not {"time", "event"} & set(feature_columns(table))
    preds, _ = train_and_predict(table, name, SlideClassifierSettings(n_estimators=50), seed=1, target=Target(type="survival"))
    test = preds[preds["role"] == "test"]
    assert len(test) == 30 and list(test.columns[:5]) == ["slide_id", "patient_id", "y", "time", "event"]
    t, e, r = (test[k].to_numpy(float) for k in ("time", "event", "risk"))
    c = harrell_c(t, e, r)
    null99 = np.quantile(permutation_null(lambda p: harrell_c(t, e, r[p]), len(t), n_perm=1000), 0.99)
    assert c > null99, (c, null99)
