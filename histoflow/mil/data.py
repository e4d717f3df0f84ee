"""Bags of tile features, read once per job and kept in memory (float16 halves the footprint)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

COORD_COLUMNS = ("slide_id", "x", "y", "target_mpp", "tile_px", "size0", "col", "row")


def feature_slug(encoder: str) -> str:
    """Folder name of an encoder's features (``features/{slug}/``)."""
    try:
        from ..encoders import encoder_slug
    except ImportError:  # the features stage not installed yet: same rule as encoders.encoder_slug
        return encoder.replace(":", "-").replace("/", "_")
    return encoder_slug(encoder)


@dataclass
class Bag:
    slide_id: str
    coords: pd.DataFrame     # one row per tile: COORD_COLUMNS
    features: np.ndarray     # [n_tiles, dim], float16 or float32

    def __len__(self) -> int:
        return int(self.features.shape[0])


def _read_parquet_features(path: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    column = table.column("feature").combine_chunks()
    dim = column.type.list_size if pa.types.is_fixed_size_list(column.type) else None
    if dim is None:  # variable-size list written by hand: every row must still have one length
        meta = table.schema.metadata or {}
        dim = int(meta.get(b"histoflow.dim", b"0")) or (len(column[0]) if len(column) else 0)
    values = column.flatten().to_numpy(zero_copy_only=False)
    features = values.reshape(len(table), dim) if len(table) else np.zeros((0, dim), dtype=values.dtype)
    coords = table.drop_columns(["feature"]).to_pandas()
    return coords, features


def read_bag(path: str | os.PathLike, dtype: str = "float16") -> Bag:
    """One slide's tiles and features; a slide skipped upstream gives an empty bag."""
    try:
        from ..features import read_features
    except ImportError:
        coords, features = _read_parquet_features(path)
    else:
        coords, features = read_features(path)
    slide_id = Path(path).name.removesuffix(".parquet")
    for col in COORD_COLUMNS:
        if col not in coords.columns:
            coords[col] = slide_id if col == "slide_id" else np.zeros(len(coords), dtype=np.int64)
    return Bag(slide_id=slide_id, coords=coords.reset_index(drop=True), features=np.ascontiguousarray(features, dtype=dtype))


def load_bags(paths: list[str | os.PathLike], dtype: str = "float16") -> dict[str, Bag]:
    """All bags of a cohort, keyed by slide id (the file stem)."""
    from tqdm.auto import tqdm

    bags = {}
    for path in tqdm(list(paths), desc="load features", unit="slide"):
        bag = read_bag(path, dtype)
        bags[bag.slide_id] = bag
    return bags


def feature_dim(bags: dict[str, Bag]) -> int:
    dims = {b.features.shape[1] for b in bags.values() if b.features.ndim == 2 and b.features.shape[1] > 0}
    if len(dims) != 1:
        from ..errors import InputError
        raise InputError(f"tile features have dimensions {sorted(dims) or 'none'}: every slide needs features of one "
                         "encoder with the same size (re-run `snakemake features`; check mil.encoder)")
    return dims.pop()
