"""The tiles table (``tiles/{slide_id}.parquet``): its schema, writer and readers, in one place.

One row per tile: level-0 corner ``x, y``, the level read (``read_level``, ``read_w x read_h``
px there), ``target_mpp`` and ``tile_px`` (the tile's size after resizing), ``tissue_fraction``,
grid ``col, row`` and ``size0`` (side at level 0). Schema metadata ``histoflow.*``: mpp_x,
mpp_y, stride0, target_mpp, tile_px, overlap_px, min_tissue_fraction, max_tiles_per_slide,
status, reason. Rows are sorted by target_mpp (config order), then y, x.
"""

from __future__ import annotations

import os

import numpy as np

from .io import write_parquet
from .wsi import same_mpp_mask


def tiles_schema():
    import pyarrow as pa

    return pa.schema([
        ("slide_id", pa.string()),
        ("x", pa.int64()),
        ("y", pa.int64()),
        ("read_level", pa.int16()),
        ("read_w", pa.int32()),
        ("read_h", pa.int32()),
        ("target_mpp", pa.float64()),
        ("tile_px", pa.int32()),
        ("tissue_fraction", pa.float32()),
        ("col", pa.int32()),
        ("row", pa.int32()),
        ("size0", pa.int32()),
    ])


TILE_COLUMNS = ("slide_id", "x", "y", "read_level", "read_w", "read_h", "target_mpp", "tile_px",
                "tissue_fraction", "col", "row", "size0")


def empty_tiles_table():
    """A table with the full tiles schema and no rows (skipped slides, no tissue)."""
    import pyarrow as pa

    return pa.Table.from_pylist([], schema=tiles_schema())


# Columns are built from raw buffers (pyarrow's public ``Array.from_buffers``): ``pa.array`` and
# ``pa.table`` import pandas just to check whether their input is a pandas object, 0.69 s and
# ~75 MB RSS in a tiling rule's process, ten times the tiling step's own work
# (docs/benchmarks.md, "Kept hand-written code").

def _column(values: np.ndarray, dtype):
    """A pyarrow array (no nulls) of ``values`` cast to the numpy ``dtype``, zero-copy."""
    import pyarrow as pa

    values = np.ascontiguousarray(values, dtype=dtype)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


NUMPY_OF_ARROW = {"int32": np.int32, "int64": np.int64, "float": np.float32, "double": np.float64}


def _numpy_of(column) -> np.ndarray:
    """A numeric pyarrow (chunked) array as numpy, nulls as NaN, read from its buffers:
    ``to_numpy`` imports pandas, as ``pa.array`` does."""
    if str(column.type) not in NUMPY_OF_ARROW:     # not a type the tiles schema uses: the slow path
        values = column.to_numpy() if hasattr(column, "chunks") else column.to_numpy(zero_copy_only=False)
        return values.astype(np.float64) if column.null_count else values
    arrays = column.chunks if hasattr(column, "chunks") else [column]
    parts = []
    for arr in arrays:
        dtype = np.dtype(NUMPY_OF_ARROW[str(arr.type)])
        validity, data = arr.buffers()[:2]
        values = np.frombuffer(data, dtype=dtype, count=arr.offset + len(arr))[arr.offset:] if len(arr) else \
            np.empty(0, dtype)
        if arr.null_count:
            bits = np.unpackbits(np.frombuffer(validity, np.uint8), bitorder="little")[arr.offset:arr.offset + len(arr)]
            values = np.where(bits.astype(bool), values, np.nan)
        parts.append(values)
    return np.concatenate(parts) if parts else np.empty(0)


def _repeated_string(value: str, n: int):
    """A pyarrow string array holding ``value`` ``n`` times."""
    import pyarrow as pa

    data = value.encode()
    offsets = np.arange(n + 1, dtype=np.int32) * len(data)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data * n)])



def write_tiles_table(path: str | os.PathLike, table, metadata: dict[str, str]) -> None:
    """Write a tiles table (pyarrow) atomically with its ``histoflow.*`` metadata."""
    write_parquet(path, table, metadata)


def read_tiles_table(path: str | os.PathLike):
    """A tiles Parquet as a pandas DataFrame (all columns of the schema, in order). The schema
    metadata (mpp_x, mpp_y, stride0, ...) is in ``frame.attrs["histoflow"]``."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    frame = table.to_pandas()
    # an older table's extra columns (annotation_fraction, before bag tiles stopped reading
    # annotations) follow the schema's
    frame = frame[list(TILE_COLUMNS) + [c for c in frame.columns if c not in TILE_COLUMNS]]
    raw = table.schema.metadata or {}
    frame.attrs["histoflow"] = {k.decode()[len("histoflow."):]: v.decode() for k, v in raw.items()
                                if k.decode().startswith("histoflow.")}
    return frame




def read_tile_columns(path: str | os.PathLike, columns):
    """The given columns of a tiles table that it has (pyarrow Table, nothing else read)."""
    import pyarrow.parquet as pq

    present = set(pq.read_schema(path).names)
    return pq.read_table(path, columns=[c for c in columns if c in present])


def load_tiles(path: str | os.PathLike, mpp: float):
    """The tiles at ``mpp`` (:func:`histoflow.wsi.same_mpp`) of a tiles table, sorted by
    (read_level, y, x) so reads walk the slide (features, stain)."""
    frame = read_tiles_table(path)
    if len(frame) == 0:
        return frame
    frame = frame.loc[same_mpp_mask(frame["target_mpp"].to_numpy(float), mpp)]
    return frame.sort_values(["read_level", "y", "x"], kind="stable").reset_index(drop=True)
