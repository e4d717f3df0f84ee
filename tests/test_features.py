"""Feature extraction: what downstream stages and users rely on from features/{encoder}/{slide}.parquet."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from histoflow import features as F
from histoflow.wsi import OpenSlideReader, SlideReader, open_slide
from histoflow.errors import InputError
from histoflow.io import write_json, write_parquet
from histoflow.stain import fit_stain_for_cohort, od_to_rgb

MPP0 = 0.25


@dataclass(frozen=True)
class TinyEncoder:
    """Stands in for histoflow.encoders.LoadedEncoder: a small CNN, 32 px input, 16 features."""

    model: nn.Module
    name: str = "tiny"
    input_size: int = 32
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.25, 0.25, 0.25)
    dim: int = 16


def tiny_encoder(seed: int = 0) -> TinyEncoder:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return TinyEncoder(model.eval())


def make_slide(path, size=1024, seed=0):
    """A JPEG-compressed tiled pyramid (levels 1, 2, 4, ...) with stained tissue on the left
    three quarters and glass on the right."""
    import pyvips

    rng = np.random.default_rng(seed)
    low = rng.gamma(2.0, 0.3, (size // 16, size // 16, 2))
    conc = np.kron(low, np.ones((16, 16, 1)))
    conc[:, 3 * size // 4:] = 0
    stains = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    rgb = od_to_rgb(conc @ stains)
    img = pyvips.Image.new_from_memory(np.ascontiguousarray(rgb).tobytes(), size, size, 3, "uchar")
    img.tiffsave(str(path), tile=True, pyramid=True, compression="jpeg", Q=90, tile_width=256,
                 tile_height=256, xres=1000 / MPP0, yres=1000 / MPP0, resunit="cm")
    return path


def tiles_table(slide_id: str, tile_px=64, mpp=0.5, level=1, n=None, size=1024):
    """Tiles like the tiling stage writes them: a grid at `mpp` read at level 1 (2x downsample)."""
    size0 = int(tile_px * mpp / MPP0)
    rows = []
    for r, y in enumerate(range(0, size - size0 + 1, size0)):
        for c, x in enumerate(range(0, size - size0 + 1, size0)):
            rows.append(dict(slide_id=slide_id, x=x, y=y, read_level=level, read_w=tile_px, read_h=tile_px,
                             target_mpp=mpp, tile_px=tile_px, tissue_fraction=1.0, col=c, row=r, size0=size0))
    columns = ["slide_id", "x", "y", "read_level", "read_w", "read_h", "target_mpp", "tile_px",
               "tissue_fraction", "col", "row", "size0"]
    frame = pd.DataFrame(rows[:n], columns=columns)
    return frame.astype({"read_level": "int16", "read_w": "int32", "read_h": "int32", "tile_px": "int32",
                         "col": "int32", "row": "int32", "size0": "int32", "tissue_fraction": "float32"})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """One slide: slides/s1.json + tiles/s1.parquet, as the earlier stages leave them."""
    root = tmp_path_factory.mktemp("feat")
    slide = make_slide(root / "s1.tiff")
    write_json(root / "s1.json", {"slide_id": "s1", "status": "ok", "path": str(slide)})
    tiles = tiles_table("s1")
    write_parquet(root / "s1.tiles.parquet", tiles)
    return root, tiles


SETTINGS = {"mpp": 0.5, "batch_size": 8, "num_workers": 0, "dtype": "float16", "device": "cpu"}


def run(root, out_name, encoder=None, settings=None, stain_json=None, slide="s1", tiles=None):
    out = root / out_name
    meta = F.extract_slide_features(str(root / f"{slide}.json"), str(tiles or root / f"{slide}.tiles.parquet"),
                                    str(out), "tiny", {**SETTINGS, **(settings or {})}, [0.5], stain_json,
                                    encoder=encoder or tiny_encoder(), threads=1)
    return out, meta


def test_one_row_per_tile_with_coordinates_and_a_fixed_size_feature_column(cohort):
    root, tiles = cohort
    out, meta = run(root, "a.parquet")
    schema = pq.read_schema(out)
    assert schema.field("feature").type == pa.list_(pa.float16(), 16)
    for col in F.COORD_COLUMNS:
        assert col in schema.names
    for key in F.FEATURE_METADATA:
        assert key.encode() in schema.metadata
    coords, feats = F.read_features(out)
    assert feats.dtype == np.float32 and feats.shape == (len(tiles), 16)
    assert np.isfinite(feats).all() and feats.std(axis=0).max() > 0
    got = set(zip(coords["x"], coords["y"]))
    assert got == set(zip(tiles["x"], tiles["y"]))
    assert meta["histoflow.dim"] == "16" and meta["histoflow.dropped_tiles"] == "0"


def test_features_are_the_encoder_applied_to_the_tiles(cohort):
    """The pipeline adds nothing: a feature row equals the model on that tile, read and normalised."""
    root, _ = cohort
    enc = tiny_encoder()
    out, _ = run(root, "f32.parquet", enc, {"dtype": "float32"})
    coords, feats = F.read_features(out)
    reader = open_slide(root / "s1.tiff")
    row = F.load_tiles(root / "s1.tiles.parquet", 0.5).iloc[5]
    tile = reader.read_tile(row)
    assert tile.shape == (64, 64, 3)
    from PIL import Image

    x = np.asarray(Image.fromarray(tile).resize((32, 32), Image.BILINEAR)).astype(np.float32) / 255
    x = (torch.from_numpy(x).permute(2, 0, 1)[None] - 0.5) / 0.25
    with torch.inference_mode():
        expected = enc.model(x).numpy()[0]
    i = int(np.nonzero((coords["x"] == row["x"]).to_numpy() & (coords["y"] == row["y"]).to_numpy())[0][0])
    np.testing.assert_allclose(feats[i], expected, rtol=1e-4, atol=1e-5)


def test_parallel_workers_and_reruns_give_identical_features(cohort):
    root, _ = cohort
    ca, a = F.read_features(run(root, "w0.parquet", settings={"num_workers": 0})[0])
    cb, b = F.read_features(run(root, "w2.parquet", settings={"num_workers": 2})[0])
    _, c = F.read_features(run(root, "w0b.parquet", settings={"num_workers": 0})[0])
    assert np.array_equal(a, c)
    assert np.array_equal(a, b) and ca.equals(cb)


def test_skipped_slide_gives_an_empty_table_with_the_full_schema(cohort, tmp_path):
    root, _ = cohort
    write_json(tmp_path / "bad.json", {"slide_id": "bad", "status": "skipped", "reason": "corrupt"})
    write_parquet(tmp_path / "bad.tiles.parquet", tiles_table("bad", n=0))
    with pytest.warns(UserWarning, match="skipped"):
        out, _ = run(tmp_path, "bad.parquet", slide="bad")
    coords, feats = F.read_features(out)
    assert len(coords) == 0 and feats.shape == (0, 16)
    assert pq.read_schema(out).field("feature").type == pa.list_(pa.float16(), 16)


def test_slide_without_tiles_at_the_feature_resolution_gives_an_empty_table(cohort):
    root, _ = cohort
    write_parquet(root / "other.tiles.parquet", tiles_table("s1", mpp=1.0, level=2, tile_px=64))
    with pytest.warns(UserWarning, match="no tiles"):
        out, meta = run(root, "none.parquet", tiles=root / "other.tiles.parquet")
    assert F.read_features(out)[1].shape == (0, 16) and meta["histoflow.n_tiles"] == "0"


def test_a_tile_that_fails_to_decode_is_dropped_and_counted(cohort, monkeypatch):
    root, tiles = cohort
    real = SlideReader.read_tile
    bad_x = int(tiles["x"].iloc[3]), int(tiles["y"].iloc[3])

    def flaky(self, row, *args):
        if (row["x"], row["y"]) == bad_x:
            raise OSError("JPEG decode error: corrupt data")
        return real(self, row, *args)

    monkeypatch.setattr(SlideReader, "read_tile", flaky)
    # under features.max_failed_tile_fraction (tests/test_failed_tiles.py: above it)
    out, meta = run(root, "drop.parquet", settings={"max_failed_tile_fraction": 0.5})
    coords, feats = F.read_features(out)
    assert meta["histoflow.dropped_tiles"] == "1" and meta["histoflow.dropped_decode"] == "1"
    assert len(coords) == len(tiles) - 1 and bad_x not in set(zip(coords["x"], coords["y"]))


class Exploding(nn.Module):
    """Returns NaN for the first tile of each batch and a float16-overflowing value for the second."""

    def forward(self, x):
        out = x.mean(dim=(2, 3)).repeat(1, 6)[:, :16].clone()
        out[0] = float("nan")
        if len(out) > 1:
            out[1] = 1e6
        return out


def test_no_nan_or_inf_ever_reaches_the_output(cohort):
    root, tiles = cohort
    out, meta = run(root, "nan.parquet", TinyEncoder(Exploding()), {"batch_size": 16, "max_failed_tile_fraction": 0.5})
    _, feats = F.read_features(out)
    n_batches = -(-len(tiles) // 16)
    assert np.isfinite(feats).all()
    assert meta["histoflow.dropped_nonfinite"] == str(2 * n_batches)
    assert len(feats) == len(tiles) - 2 * n_batches


def test_feature_mpp_must_be_tiled_one_line_error():
    with pytest.raises(InputError, match="features.mpp") as err:
        F.FeatureSettings.from_config({"mpp": 0.25}, [0.5, 1.0])
    assert "\n" not in str(err.value) and "tiling.mpp" in str(err.value)


def test_tta_makes_features_invariant_to_rotations_and_flips():
    enc = tiny_encoder()
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(enc.mean).view(1, 3, 1, 1)
    std = torch.tensor(enc.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        a = F.embed_batch(enc.model, x, mean, std, "cpu", tta=True)
        b = F.embed_batch(enc.model, torch.rot90(x, 1, (2, 3)).flip(3), mean, std, "cpu", tta=True)
        plain = F.embed_batch(enc.model, torch.rot90(x, 1, (2, 3)), mean, std, "cpu", tta=False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, plain)


def test_read_features_is_vectorised_and_honours_sliced_tables(tmp_path):
    feats = np.arange(40, dtype=np.float32).reshape(10, 4)
    coords = tiles_table("s", n=10)
    table = F.feature_table(coords, feats, "float32").slice(3, 5)
    write_parquet(tmp_path / "t.parquet", table)
    got_coords, got = F.read_features(tmp_path / "t.parquet")
    np.testing.assert_array_equal(got, feats[3:8])
    assert list(got_coords["x"]) == list(coords["x"][3:8])


def test_stain_normalisation_is_applied_and_recorded(cohort):
    root, tiles = cohort
    info = fit_stain_for_cohort([str(root / "s1.json")], [str(root / "s1.tiles.parquet")], str(root / "stain.json"),
                                str(root / "reference.png"), {"method": "macenko", "max_tiles": 12}, 1, 0.5)
    ref_tile = info["reference_tile"]
    assert ref_tile["x"] < 768 * 0.75  # a tissue tile, not glass
    assert (root / "reference.png").stat().st_size > 0
    out, meta = run(root, "stain.parquet", settings={"dtype": "float32"}, stain_json=str(root / "stain.json"))
    _, plain = F.read_features(run(root, "plain.parquet", settings={"dtype": "float32"})[0])
    _, normed = F.read_features(out)
    assert meta["histoflow.stain_method"] == "macenko"
    assert normed.shape == plain.shape and not np.allclose(normed, plain)


def test_tiles_give_openslide_pixels_aligned_or_not(cohort):
    """The features dataset's reader decodes the stored JPEG tiles that cover a request and
    crops: aligned, unaligned, smaller than a stored tile or overhanging, OpenSlide's pixels."""
    root, _ = cohort
    reader = open_slide(root / "s1.tiff")
    assert 1 in reader.pages and reader._level_ok(1)       # the fast path is on for this pyramid
    with OpenSlideReader(root / "s1.tiff") as plain:
        for x, y, level, w in [(512, 256, 1, 256), (0, 0, 0, 256), (100, 60, 1, 256), (512, 512, 1, 64),
                               (300, 900, 1, 224)]:
            ours = reader.read_region(x, y, level, w, w)
            np.testing.assert_array_equal(ours, plain.read_region(x, y, level, w, w))
    assert reader._region(101, 60, 1, 256, 256, 255) is None   # level-1 position 50.5: OpenSlide's
