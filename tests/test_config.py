"""The config and the samples sheet: bad input is one line naming the row/field and the fix."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest

from histoflow.config import load_samples, validate_config, validate_samples
from histoflow.errors import InputError


def sheet(tmp_path: Path, rows: list[dict], name: str = "samples.tsv") -> Path:
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


@pytest.fixture
def slide_file(tmp_path: Path) -> Path:
    path = tmp_path / "a.svs"
    path.write_bytes(b"not really a slide")
    return path


def row(slide_id="s1", patient="p1", label="tumor", source="a.svs", **extra):
    return {"slide_id": slide_id, "patient_id": patient, "label": label, "source": source, **extra}


def test_defaults_are_filled_from_the_schema():
    config = validate_config({"samples": "x.tsv"})
    assert config["outdir"] == "results"
    assert config["on_error"] == "fail"
    assert config["tiling"]["tile_px"] == 256
    assert config["default_mpp"] is None



@pytest.mark.parametrize("section,old,new,value", [("ssl", "gpus", "gpu", 1),
                                                   ("mil", "max_tiles_train", "max_tiles_per_slide", 100),
                                                   ("stain", "n_reference_tiles", "max_tiles", 12)])
def test_renamed_keys_are_accepted_with_a_deprecation_line(capsys, section, old, new, value):
    """An old config (ssl.gpus, mil.max_tiles_train, stain.n_reference_tiles) still runs: the value
    is used under the new name, and stderr says to rename it."""
    config = validate_config({"samples": "x.tsv", section: {old: value}})
    assert config[section][new] == value and old not in config[section]
    assert f"'{section}.{old}' is deprecated: it is now '{section}.{new}'" in capsys.readouterr().err
    # config.yaml spells out the new key at its default: the old key's value still wins
    assert validate_config({"samples": "x.tsv", section: {old: value, new: validate_config(
        {"samples": "x.tsv"})[section][new]}})[section][new] == value
    with pytest.raises(InputError, match=f"'{section}.{old}'.*'{section}.{new}'.*both"):
        validate_config({"samples": "x.tsv", section: {old: value, new: value + 1}})


@pytest.mark.parametrize("section", ["features", "mlflow"])
def test_features_and_mlflow_refuse_unknown_keys(section):
    with pytest.raises(InputError, match=f"config key '{section}'.*typo_key"):
        validate_config({"samples": "x.tsv", section: {"typo_key": 1}})


def test_settings_classes_take_their_defaults_from_the_schema():
    """Defaults live in the schema only: a settings class built from nothing gets the schema's."""
    from histoflow.config import section_defaults
    from histoflow.mil.train import MILSettings
    from histoflow.tiling import TilingSettings

    schema = section_defaults("tiling")
    assert TilingSettings().tile_px == schema["tile_px"] == TilingSettings.from_config({}).tile_px
    assert TilingSettings().mpp == tuple(schema["mpp"])
    assert MILSettings().max_tiles_per_slide == section_defaults("mil")["max_tiles_per_slide"]

def test_bad_config_value_names_the_key():
    with pytest.raises(InputError) as err:
        validate_config({"samples": "x.tsv", "tiling": {"tile_px": 3}})
    assert "tiling.tile_px" in str(err.value)
    assert "\n" not in str(err.value)


def test_valid_sheet_resolves_relative_paths(tmp_path, slide_file):
    path = sheet(tmp_path, [row(), row("s2", "p2", "normal", "https://example.org/b.svs", mpp="0.25")])
    samples = load_samples({"samples": str(path)})
    assert list(samples.index) == ["s1", "s2"]
    assert samples.loc["s1", "source"] == str(slide_file.resolve())
    assert samples.loc["s2", "mpp"] == 0.25


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([row(), row()], "appears in rows"),
        ([row("bad id!")], "slide 'bad id!'"),
        ([row(source="missing.svs")], "does not exist"),
        ([row(source="gdc:123")], "gdc:<file UUID>"),
        ([row(mpp="fast")], "not a number"),
    ],
    ids=["duplicate-slide", "bad-slide-id", "missing-file", "bad-gdc", "bad-mpp"],
)
def test_bad_sheet_gives_one_line_naming_the_problem(tmp_path, slide_file, rows, expected):
    path = sheet(tmp_path, rows)
    with pytest.raises(InputError) as err:
        load_samples({"samples": str(path)})
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "s.tsv"
    path.write_text("slide_id\tsource\ns1\ta.svs\n")
    with pytest.raises(InputError, match="patient_id, label"):
        load_samples({"samples": str(path)})


def test_snakemake_reports_a_bad_sheet_in_one_line(tmp_path, repo_root, snakemake_exe, slide_file):
    path = sheet(tmp_path, [row(), row()])
    result = subprocess.run(
        [snakemake_exe, "-n", "--cores", "1", "--config", f"samples={path}", f"outdir={tmp_path}/out"],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("histoflow:")]
    assert len(lines) == 1 and "appears in rows" in lines[0]
    assert "Traceback" not in result.stderr


def test_optional_cells_left_empty_are_none(tmp_path, slide_file):
    ann = tmp_path / "a.geojson"
    ann.write_text("{}")
    path = sheet(tmp_path, [row(annotations="a.geojson"), row("s2", "p2", "normal", annotations="")])
    samples = load_samples({"samples": str(path)})
    assert samples.loc["s1", "annotations"] == str(ann.resolve())
    assert samples.loc["s2", "annotations"] is None
    assert samples.loc["s2", "mpp"] is None


def test_a_patient_with_a_tumour_and_a_normal_slide_is_valid(tmp_path, slide_file):
    """Labels are per slide (TCGA -01 tumour and -11 normal slides of one patient)."""
    path = sheet(tmp_path, [row("TCGA-01", "p1", "tumor"), row("TCGA-11", "p1", "normal"), row("s3", "p2", "normal")])
    samples = load_samples({"samples": str(path)})
    assert samples.loc["TCGA-01", "label"] == "tumor" and samples.loc["TCGA-11", "label"] == "normal"
    assert samples.loc["TCGA-01", "patient_id"] == samples.loc["TCGA-11", "patient_id"] == "p1"
