"""Where the data contract's files live, and how they are written and read: atomically (a temporary file beside the
target, then a rename, so a reader never sees half a file and a failure leaves the previous file or nothing), and
read with one clear error naming the missing upstream file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import polars as pl

from ndx_pipeline.core.contract import NEURON_VIEWER
from ndx_pipeline.core.errors import NdxInputError

LLM_CACHE_DIR = "llm_cache"


def asset_path(storage_dir: str | os.PathLike, asset: str, layer: int | str | None = None) -> Path:
    """`<storage>/<asset>/<layer>.parquet`, or `<storage>/<asset>.parquet` for unpartitioned assets."""
    base = Path(storage_dir)
    if layer is None:
        return base / f"{asset}.parquet"
    return base / asset / f"{int(layer)}.parquet"


def viewer_dir(storage_dir: str | os.PathLike) -> Path:
    """The neuron viewer's folder: `<storage>/neuron_viewer`."""
    return Path(storage_dir) / NEURON_VIEWER


def llm_cache_dir(storage_dir: str | os.PathLike) -> Path:
    """The content-addressed cache of LLM answers, beside the data it produced."""
    return Path(storage_dir) / LLM_CACHE_DIR


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], mode: int | None = None) -> Path:
    """Call `write(temporary path)` for a file beside `path`, then rename it into place (removed on failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_parquet_atomic(frame: pl.DataFrame, path: str | os.PathLike) -> Path:
    """Write `frame` as Parquet at `path`, atomically. Without column statistics: a contract file is one row group
    (≤ 512² rows) or a few, read whole, so min/max per row group would skip nothing, and computing them over the list
    columns is 15–20 % of writing an activation_records file."""
    return write_atomic(path, lambda tmp: frame.write_parquet(tmp, statistics=False))


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write UTF-8 `text` at `path`, atomically (world-readable, like any other file of the viewer)."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), mode=0o644)


def read_parquet(path: str | os.PathLike, what: str) -> pl.DataFrame:
    """Read a contract file, with a clear error when the upstream stage has not produced it."""
    path = Path(path)
    if not path.exists():
        raise NdxInputError(f"{what} not found at {path}: materialize the upstream asset for this layer first.")
    return pl.read_parquet(path)


def read_asset(storage_dir: str | os.PathLike, asset: str, layer: int | None = None) -> pl.DataFrame:
    """An asset's file for a layer (or the unpartitioned asset's), or NdxInputError naming which is missing."""
    what = f"{asset} for layer {layer}" if layer is not None else f"the {asset} asset's file"
    return read_parquet(asset_path(storage_dir, asset, layer), what)
