"""Patient-level splits: what a user relies on to trust a cross-validated AUC."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from histoflow.errors import InputError
from histoflow.split import SplitSettings, check_splits, make_splits, read_splits, write_splits


def cohort(n_patients: int = 12, extra_slides: int = 4, n_sites: int = 4) -> pd.DataFrame:
    """16 slides of 12 patients (the demo's size): half tumour, some patients with two slides."""
    rows = []
    for p in range(n_patients):
        label = "tumor" if p % 2 == 0 else "normal"
        for s in range(2 if p < extra_slides else 1):
            rows.append({"slide_id": f"P{p:02d}-{s}", "patient_id": f"P{p:02d}", "label": label,
                         "site": f"site{p % n_sites}"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("strategy", ["kfold", "holdout"])
@pytest.mark.parametrize("k", [3, 4, 5])
def test_no_patient_ever_sits_in_two_roles_of_one_fold(strategy, k):
    table = make_splits(cohort(), SplitSettings(strategy=strategy, k=k), "tumor", seed=1)
    assert table["fold"].nunique() == k
    for _, part in table.groupby("fold"):
        assert part.groupby("patient_id")["role"].nunique().max() == 1
        assert part["slide_id"].is_unique and len(part) == 16
    check_splits(table)  # the public check agrees


@pytest.mark.parametrize("k", [3, 5])
def test_kfold_tests_every_patient_exactly_once_and_keeps_classes_balanced(k):
    samples = cohort()
    table = make_splits(samples, SplitSettings(k=k), "tumor", seed=3)
    test = table[table["role"] == "test"]
    assert sorted(test["slide_id"]) == sorted(samples["slide_id"])  # out-of-fold predictions cover the cohort
    per_fold = test.drop_duplicates("patient_id").groupby("fold")["y"].agg(["sum", "count"])
    # 6 positive patients over k folds: stratification gives each fold floor/ceil of 6/k positives
    assert per_fold["sum"].min() >= 6 // k and per_fold["sum"].max() <= -(-6 // k)
    assert per_fold["count"].max() - per_fold["count"].min() <= 1
    for fold, part in table.groupby("fold"):
        for role in ("train", "test"):
            assert set(part.loc[part["role"] == role, "y"]) == {0, 1}, (fold, role)


def test_validation_share_is_stratified_and_taken_from_non_test_patients():
    table = make_splits(cohort(24, extra_slides=0), SplitSettings(k=3, val_fraction=0.25), "tumor", seed=0)
    for _, part in table.groupby("fold"):
        val = part[part["role"] == "val"]
        non_test = part[part["role"] != "test"]
        assert len(val) == pytest.approx(0.25 * len(non_test), abs=1)
        assert set(val["y"]) == {0, 1}


def test_holdout_keeps_one_fixed_test_set_with_inner_folds():
    table = make_splits(cohort(20, extra_slides=0), SplitSettings(strategy="holdout", k=3, test_fraction=0.2),
                        "tumor", seed=5)
    tests = [frozenset(p.loc[p["role"] == "test", "patient_id"]) for _, p in table.groupby("fold")]
    assert len(set(tests)) == 1 and len(tests[0]) == 4
    vals = [set(p.loc[p["role"] == "val", "patient_id"]) for _, p in table.groupby("fold")]
    assert all(v and not (v & tests[0]) for v in vals)
    assert set.union(*vals) == set(table["patient_id"]) - tests[0]  # inner CV: every non-test patient validates once
    assert sum(len(v) for v in vals) == len(set.union(*vals))


def test_preserve_site_puts_every_site_on_one_side():
    samples = cohort(24, extra_slides=0, n_sites=6)
    table = make_splits(samples, SplitSettings(k=3, preserve_site=True), "tumor", seed=2)
    for _, part in table.groupby("fold"):
        assert part.groupby("site")["role"].nunique().max() == 1
    check_splits(table, preserve_site=True)


def test_a_patient_spanning_two_sites_pulls_both_sites_together():
    samples = cohort(24, extra_slides=0, n_sites=6)
    samples.loc[len(samples)] = {"slide_id": "P00-x", "patient_id": "P00", "label": "tumor", "site": "site1"}
    table = make_splits(samples, SplitSettings(k=2, preserve_site=True), "tumor", seed=2)
    for _, part in table.groupby("fold"):
        assert part.loc[part["site"].isin(["site0", "site1"]), "role"].nunique() == 1


def test_preserve_site_without_a_site_column_is_a_one_line_error():
    samples = cohort().drop(columns="site")
    with pytest.raises(InputError, match="site") as err:
        make_splits(samples, SplitSettings(k=3, preserve_site=True), "tumor", seed=0)
    assert "\n" not in str(err.value)


def test_a_fold_without_positives_in_test_names_fold_role_and_fix():
    samples = cohort()
    samples.loc[samples["patient_id"].isin(["P00", "P02", "P04", "P06"]), "label"] = "normal"  # 2 tumour patients left
    with pytest.raises(InputError) as err:
        make_splits(samples, SplitSettings(k=3), "tumor", seed=0)
    msg = str(err.value)
    assert "fold" in msg and "'test'" in msg and "split.k" in msg and "\n" not in msg


def test_a_positive_label_absent_from_the_sheet_is_refused():
    with pytest.raises(InputError, match="positive_label"):
        make_splits(cohort(), SplitSettings(k=3), "TUMOUR", seed=0)


def test_check_splits_catches_a_patient_leaking_into_two_roles():
    table = make_splits(cohort(), SplitSettings(k=3), "tumor", seed=0)
    fold0 = table.index[table["fold"] == 0]
    two_slide = table.loc[fold0][table.loc[fold0, "patient_id"] == "P00"].index
    table.loc[two_slide[0], "role"] = "train"
    table.loc[two_slide[1], "role"] = "test"
    with pytest.raises(InputError, match="P00"):
        check_splits(table)


def test_same_seed_same_split_and_another_seed_another():
    a = make_splits(cohort(), SplitSettings(k=4), "tumor", seed=11)
    b = make_splits(cohort().sample(frac=1, random_state=0), SplitSettings(k=4), "tumor", seed=11)
    c = make_splits(cohort(), SplitSettings(k=4), "tumor", seed=12)
    key = ["fold", "slide_id"]
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True))
    assert not a.sort_values(key)["role"].reset_index(drop=True).equals(c.sort_values(key)["role"].reset_index(drop=True))


def test_write_splits_saves_the_long_table_and_a_summary(tmp_path):
    write_splits(cohort().to_dict("records"), {"k": 3, "val_fraction": 0.2}, "tumor", 7,
                 tmp_path / "splits.tsv", tmp_path / "split.json")
    table = read_splits(tmp_path / "splits.tsv")
    assert list(table.columns) == ["slide_id", "patient_id", "label", "y", "site", "fold", "role"]
    assert len(table) == 16 * 3 and set(table["role"]) == {"train", "val", "test"}
    summary = json.loads((tmp_path / "split.json").read_text())
    assert summary["strategy"] == "kfold" and summary["seed"] == 7 and summary["n_folds"] == 3
    for fold, counts in summary["folds"].items():
        part = table[table["fold"] == int(fold)]
        assert sum(c["slides"] for c in counts.values()) == 16
        assert counts["test"]["positive_slides"] == int(part.loc[part["role"] == "test", "y"].sum())


@pytest.mark.e2e
def test_snakemake_split_target_writes_the_split_from_the_sheet_alone(tmp_path, repo_root, snakemake_exe):
    """`snakemake split` needs no slide: the sheet's URLs are never fetched."""
    import subprocess

    sheet = tmp_path / "samples.tsv"
    frame = cohort()
    frame["source"] = [f"http://127.0.0.1:9/{s}.svs" for s in frame["slide_id"]]
    frame.to_csv(sheet, sep="\t", index=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"samples: {sheet}\noutdir: {tmp_path / 'out'}\nsplit: {{k: 3, strategy: holdout}}\n")
    proc = subprocess.run([snakemake_exe, "--cores", "1", "split", "--configfile", str(repo_root / "config.yaml"), str(cfg)],
                          cwd=repo_root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = read_splits(tmp_path / "out" / "splits" / "splits.tsv")
    assert table["fold"].nunique() == 3 and len(table) == 48
    assert json.loads((tmp_path / "out" / "splits" / "split.json").read_text())["strategy"] == "holdout"


def mixed_cohort(n_patients: int = 16) -> pd.DataFrame:
    """Every even patient has a tumour and a normal slide (TCGA -01/-11), odd patients one normal."""
    rows = []
    for p in range(n_patients):
        if p % 2 == 0:
            rows += [{"slide_id": f"P{p:02d}-01", "patient_id": f"P{p:02d}", "label": "tumor", "site": ""},
                     {"slide_id": f"P{p:02d}-11", "patient_id": f"P{p:02d}", "label": "normal", "site": ""}]
        else:
            rows.append({"slide_id": f"P{p:02d}-11", "patient_id": f"P{p:02d}", "label": "normal", "site": ""})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("strategy", ["kfold", "holdout"])
def test_a_patient_with_mixed_slide_labels_stays_on_one_side_of_every_split(strategy):
    samples = mixed_cohort()
    table = make_splits(samples, SplitSettings(strategy=strategy, k=4), "tumor", seed=3)
    for fold, part in table.groupby("fold"):
        roles = part.groupby("patient_id")["role"].nunique()
        assert roles.max() == 1, (fold, roles[roles > 1].index.tolist())
    # labels stay per slide: the normal slide of a tumour patient is a negative slide
    y = table.drop_duplicates("slide_id").set_index("slide_id")["y"]
    assert y["P00-01"] == 1 and y["P00-11"] == 0


def test_stratification_counts_a_mixed_patient_as_positive():
    """Positive-if-any: the 4 patients with a tumour slide are dealt one per fold (majority
    voting would tie them 1-1 and could stack them in one fold)."""
    table = make_splits(mixed_cohort(8), SplitSettings(k=4, val_fraction=0), "tumor", seed=0)
    test = table[table["role"] == "test"]
    per_fold = test[test["y"] == 1].groupby("fold")["patient_id"].nunique()
    assert per_fold.reindex(range(4), fill_value=0).tolist() == [1, 1, 1, 1]


# ---------------------------------------------------------------------------------------------
# split.strategy: sheet (the sheet's own split column, e.g. CAMELYON16's official split)

def sheet_cohort(with_val: bool = True) -> pd.DataFrame:
    """cohort() with an official split by patient: P00-P03 test, P04-P05 val (or train), rest train."""
    frame = cohort()
    number = frame["patient_id"].str[1:].astype(int)
    frame["split"] = ["test" if n < 4 else ("val" if with_val and n < 6 else "train") for n in number]
    return frame


def test_sheet_split_is_used_as_given():
    frame = sheet_cohort()
    table = make_splits(frame, SplitSettings(strategy="sheet", k=1), "tumor", seed=0)
    assert table["fold"].nunique() == 1
    assert dict(zip(table["slide_id"], table["role"])) == dict(zip(frame["slide_id"], frame["split"]))
    # the seed cannot move an official split
    other = make_splits(frame, SplitSettings(strategy="sheet", k=1), "tumor", seed=99)
    assert other["role"].tolist() == table["role"].tolist()


def test_sheet_split_without_val_rows_carves_val_from_train_by_patient():
    frame = sheet_cohort(with_val=False)
    table = make_splits(frame, SplitSettings(strategy="sheet", k=1, val_fraction=0.3), "tumor", seed=0)
    given = dict(zip(frame["slide_id"], frame["split"]))
    assert all(given[s] == "test" for s in table.loc[table["role"] == "test", "slide_id"])
    assert all(given[s] == "train" for s in table.loc[table["role"] == "val", "slide_id"])
    assert (table["role"] == "val").any()


def test_sheet_split_with_k_folds_shares_the_sheet_test_set():
    frame = sheet_cohort(with_val=False)
    table = make_splits(frame, SplitSettings(strategy="sheet", k=2), "tumor", seed=0)
    tests = [set(p.loc[p["role"] == "test", "slide_id"]) for _, p in table.groupby("fold")]
    assert tests[0] == tests[1] == set(frame.loc[frame["split"] == "test", "slide_id"])
    vals = [set(p.loc[p["role"] == "val", "patient_id"]) for _, p in table.groupby("fold")]
    assert vals[0] and vals[1] and not vals[0] & vals[1]
    with pytest.raises(InputError, match="split.k: 1"):   # a sheet that fixes val needs k: 1
        make_splits(sheet_cohort(), SplitSettings(strategy="sheet", k=2), "tumor", seed=0)


def test_a_patient_on_both_sides_of_the_sheet_split_is_named():
    from histoflow.split import check_sheet_split

    frame = sheet_cohort()
    frame.loc[frame["slide_id"] == "P01-1", "split"] = "train"   # P01 has slides P01-0 (test) and P01-1
    with pytest.raises(InputError, match=r"patient 'P01' has slides on both sides") as err:
        check_sheet_split(frame)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="patient 'P01'"):
        make_splits(frame, SplitSettings(strategy="sheet", k=1), "tumor", seed=0)
    frame.loc[frame["slide_id"] == "P01-1", "split"] = "holdout"
    with pytest.raises(InputError, match=r"slide 'P01-1' has split 'holdout'"):
        check_sheet_split(frame)
