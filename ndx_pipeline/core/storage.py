"""Where the data contract's Parquet files live, and how they are written (atomically)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import polars as pl

PARTITIONED_ASSETS = ("activation_records", "top_excerpts", "explanations", "simulations", "scores")


def asset_path(storage_dir: str | os.PathLike, asset: str, layer: int | str | None = None) -> Path:
    """`<storage>/<asset>/<layer>.parquet`, or `<storage>/<asset>.parquet` for unpartitioned assets."""
    base = Path(storage_dir)
    if layer is None:
        return base / f"{asset}.parquet"
    return base / asset / f"{int(layer)}.parquet"


def write_parquet_atomic(frame: pl.DataFrame, path: str | os.PathLike) -> Path:
    """Write `frame` to a temporary file beside `path`, then rename it into place.

    A reader never sees a half-written file, and a failure leaves the previous file (or nothing).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        frame.write_parquet(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_parquet(path: str | os.PathLike, what: str) -> pl.DataFrame:
    """Read a contract file, with a clear error when the upstream stage has not produced it."""
    path = Path(path)
    if not path.exists():
        from .errors import NdxInputError

        raise NdxInputError(f"{what} not found at {path}: materialize the upstream asset for this layer first.")
    return pl.read_parquet(path)
