"""Where the data contract's files live (`<storage>/<asset>/<variant>/<layer>.parquet`), and how they are written and
read: atomically (a temporary file beside the target, then a rename, so a reader never sees half a file and a failure
leaves the previous file or nothing), and read with one clear error naming the missing upstream file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import polars as pl

from ndx_pipeline.core.contract import NEURON_VIEWER, scoped, stored_dtype
from ndx_pipeline.core.errors import NdxInputError

LLM_CACHE_DIR = "llm_cache"
# one pass's records of the other variants run with it, until their own runs take them (`joint_extraction_dir`)
JOINT_EXTRACTIONS_DIR = "joint_extractions"


def asset_path(storage_dir: str | os.PathLike, asset: str, layer: int | str | None = None,
               variant: str | None = None) -> Path:
    """`<storage>/<asset>/<variant>/<layer>.parquet`, or `<storage>/<asset>.parquet` for the unpartitioned corpus.
    A layer file always belongs to a variant: there is no path for a layer without one."""
    base = Path(storage_dir)
    if layer is None:
        return base / f"{asset}.parquet"
    if not variant:
        raise ValueError(f"{asset} layer {layer}: a layer file belongs to a variant, and none was given")
    return base / asset / variant / f"{int(layer)}.parquet"


def variant_layers(storage_dir: str | os.PathLike, asset: str, variant: str) -> list[int]:
    """The layers of `variant` that have a file of `asset`."""
    folder = Path(storage_dir) / asset / variant
    return sorted(int(p.stem) for p in folder.glob("*.parquet") if p.stem.isdigit()) if folder.is_dir() else []


def stored_variants(storage_dir: str | os.PathLike, asset: str = "activation_records") -> list[str]:
    """The variants with at least one file of `asset`, by name."""
    folder = Path(storage_dir) / asset
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("*.parquet"))) \
        if folder.is_dir() else []


def legacy_layer_files(storage_dir: str | os.PathLike) -> list[Path]:
    """Layer files in the layout from before variants (`<storage>/<asset>/<layer>.parquet`)."""
    base = Path(storage_dir)
    return sorted(p for p in base.glob("*/*.parquet") if p.stem.isdigit() and p.parent.name != NEURON_VIEWER)


ID_COLUMNS = ("excerpt_id", "explanation_id")  # the ids a variant scopes (`contract.scoped`)


def migrate_storage(storage_dir: str | os.PathLike, variant: str) -> list[tuple[str, int, Path]]:
    """Move every layer file of the layout from before variants (`legacy_layer_files`) into `variant`: rewritten at
    `<asset>/<variant>/<layer>.parquet` with its id columns scoped to the variant, then the old file removed; the
    viewer's old layer folders and index go under `neuron_viewer/<variant>`. Returns (asset, layer, new path) of each
    file moved. A file already at the new place is never overwritten: that is one clear error, before anything
    moves."""
    base = Path(storage_dir)
    old = legacy_layer_files(base)
    moves = [(p, p.parent.name, int(p.stem), asset_path(base, p.parent.name, int(p.stem), variant)) for p in old]
    taken = [new for *_, new in moves if new.exists()]
    if taken:
        raise NdxInputError(f"variant {variant} already has {taken[0].relative_to(base)}: migrate into another "
                            "variant (--variant NAME).")
    done = []
    for source, asset, layer, target in moves:
        frame = pl.read_parquet(source)
        for column in ID_COLUMNS:
            frame = scoped(frame, column, variant)
        write_parquet_atomic(frame, target)
        source.unlink()
        done.append((asset, layer, target))
    viewer = base / NEURON_VIEWER
    if viewer.is_dir():
        pages = [p for p in viewer.iterdir() if (p.is_dir() and p.name.isdigit()) or p.name == "index.html"]
        if pages:
            (viewer / variant).mkdir(parents=True, exist_ok=True)
            for p in pages:
                os.replace(p, viewer / variant / p.name)
    return done


def viewer_dir(storage_dir: str | os.PathLike, variant: str | None = None) -> Path:
    """The neuron viewer's folder, `<storage>/neuron_viewer` (its index of variants), or one variant's pages:
    `<storage>/neuron_viewer/<variant>`."""
    base = Path(storage_dir) / NEURON_VIEWER
    return base / variant if variant else base


def link_atomic(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Put the file at `source` at `path` too, atomically: a hard link where the file system allows it (the bytes
    are stored once; a later atomic rewrite of either path leaves the other as it was), else a copy."""
    import shutil

    def place(tmp: str) -> None:
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

    return write_atomic(path, place)


def joint_extraction_dir(storage_dir: str | os.PathLike, key: str, layer: int) -> Path:
    """Where a pass run for one variant leaves the records it read for another variant run with it (one folder per
    extraction key and layer: the files of `activation_records` and `token_table` and what the pass says of them),
    until that variant's own run takes them as its files. Keyed by the extraction settings, so a folder is only ever
    taken by a run whose files it equals."""
    return Path(storage_dir) / JOINT_EXTRACTIONS_DIR / key / str(int(layer))


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


# rows per row group: a whole-model records file (176k rows) has 3, which a reader decodes in parallel (polars: 0.26 s
# against 0.42 s for one row group; writing costs 4 % more)
ROW_GROUP_ROWS = 2**16


def write_parquet_atomic(frame: pl.DataFrame, path: str | os.PathLike) -> Path:
    """Write `frame` as Parquet at `path`, atomically, in row groups of ROW_GROUP_ROWS rows. A list-of-strings column
    (the contract's `tokens`) may be given as List(String) or as codes, List(Enum): either way it is stored as
    strings, dictionary-encoded with a canonical dictionary (`_dictionary_lists`), so the same rows give the same
    bytes however they were held, and a reader sees List(String) (no Arrow schema is stored: the file's types are the
    contract's). From codes, writing a whole-model activation_records file takes 0.40 s of CPU instead of 0.80 s:
    its 11M token strings are not hashed again to find the dictionary the records were built with.

    Without column statistics: a contract file is read whole, so min/max per row group would skip nothing, and
    computing them over the list columns is 15–20 % of writing an activation_records file. Float columns are stored
    byte-stream-split (the records file 8 % smaller, at the same cost)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = frame.rechunk()  # one chunk per column: the pages written do not depend on how the frame was assembled
    columns, dictionary, split = [], [], []
    for name, dtype in frame.schema.items():
        inner = dtype.inner if isinstance(dtype, pl.List) else None
        path_of = f"{name}.list.element" if inner is not None else name
        if inner is not None and _is_text(inner):
            columns.append(_dictionary_lists(frame[name]))
            dictionary.append(path_of)
            continue
        columns.append(frame[name].to_arrow())
        if _is_text(dtype):
            dictionary.append(path_of)
        elif (dtype if inner is None else inner) in (pl.Float32, pl.Float64):
            split.append(path_of)
    table = pa.Table.from_arrays(columns, names=frame.columns)
    return write_atomic(path, lambda tmp: pq.write_table(
        table, tmp, row_group_size=ROW_GROUP_ROWS, compression="zstd", write_statistics=False, store_schema=False,
        use_dictionary=dictionary, use_byte_stream_split=split))


def _is_text(dtype: pl.DataType) -> bool:
    return stored_dtype(dtype) == pl.String


def _dictionary_lists(series: pl.Series):
    """A List(String) or List(Enum) column as Arrow list<dictionary<int32, string>> whose dictionary is the distinct
    strings the lists hold, in ascending (byte) order: the canonical form, whatever the column's categories were."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    lists = series.to_arrow()
    flat = lists.flatten()  # the items of the non-null lists, in order
    if not pa.types.is_dictionary(flat.type):
        flat = pc.dictionary_encode(flat.cast(pa.large_string()))
    if flat.indices.null_count:
        raise ValueError(f"column {series.name!r} holds null items inside its lists.")
    codes = flat.indices.to_numpy()
    used = np.zeros(len(flat.dictionary), dtype=bool)
    used[codes] = True  # (half the time of a bincount, which widens 11M codes to int64 first)
    present = np.flatnonzero(used)
    values = flat.dictionary.cast(pa.string()).take(pa.array(present))
    order = pc.sort_indices(values).to_numpy()
    if len(present) == len(flat.dictionary) and (order == np.arange(len(order))).all():
        indices = flat.indices  # already canonical (codes of the distinct texts in order, as records are built)
    else:
        rank = np.zeros(len(flat.dictionary), dtype=np.int32)
        rank[present[order]] = np.arange(len(present), dtype=np.int32)
        indices = pa.array(rank[codes])
    items = pa.DictionaryArray.from_arrays(indices, values.take(pa.array(order)))
    lengths = lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    return pa.LargeListArray.from_arrays(offsets, items, mask=lists.is_null() if lists.null_count else None)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write UTF-8 `text` at `path`, atomically (world-readable, like any other file of the viewer)."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), mode=0o644)


def read_parquet(path: str | os.PathLike, what: str, columns: list[str] | None = None) -> pl.DataFrame:
    """Read a contract file (only `columns`, when given), with a clear error when the upstream stage has not
    produced it."""
    path = Path(path)
    if not path.exists():
        raise NdxInputError(f"{what} not found at {path}: materialize the upstream asset for this layer first.")
    return pl.read_parquet(path, columns=columns)


def read_asset_if_any(storage_dir: str | os.PathLike, asset: str, layer: int, variant: str,
                      columns: list[str] | None = None) -> pl.DataFrame | None:
    """An asset's file for a layer of a variant (only `columns`, when given), or None where there is none (an asset
    older storage lacks, or a stage whose setting was off)."""
    path = asset_path(storage_dir, asset, layer, variant)
    return pl.read_parquet(path, columns=columns) if path.exists() else None


def read_asset(storage_dir: str | os.PathLike, asset: str, layer: int | None = None,
               variant: str | None = None, columns: list[str] | None = None) -> pl.DataFrame:
    """An asset's file for a layer of a variant (or the unpartitioned asset's; only `columns`, when given), or
    NdxInputError naming which is missing."""
    what = (f"{asset} for layer {layer} of variant {variant}" if layer is not None else f"the {asset} asset's file")
    return read_parquet(asset_path(storage_dir, asset, layer, variant), what, columns)
