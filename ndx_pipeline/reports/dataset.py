"""The dataset export: what was explained, as a folder that polars, the `datasets` library and the Hugging Face hub
read, with its dataset card.

`write_dataset(storage, out)` reads the data contract's files of every stored variant (or the chosen ones, with their
controls) and writes one Parquet file per asset kind across layers and variants, each row with the `variant` it
belongs to and the `control` that variant is (`planted`, `random-weights`; null for a variant of its own):

    out/README.md                                   the dataset card (YAML front matter: one config per file)
    out/data/scores-00000-of-00001.parquet          scores (with their baseline columns): the default config
    out/data/explanations.parquet                   our explanations (every candidate with best-of-k)
    out/data/baseline_explanations.parquet          the baselines' and controls' explanations the scores compare
    out/data/<scorer>_scores.parquet                each scorer's score per unit (detection, fuzzing, embedding)
    out/data/top_excerpts.parquet                   the excerpts each unit was explained and scored on

Only scores follow the hub's sharded naming (`data/<split>-00000-of-00001.parquet`): that is the one layout
`datasets.load_dataset("parquet", data_dir=out)` resolves to a single table (split `scores`) instead of every
Parquet file of the folder as one (the files' columns differ, so that would fail); the card's `configs` name every
file, for the hub and `datasets.load_dataset(out, "<config>")`.

The folder is written beside its place and renamed into it: a reader never sees half an export, and a failure leaves
the previous export (or nothing). A folder that holds anything else is refused.

The CLI calls it as `ndx-pipeline export --format dataset OUT`:
`write_dataset(storage, OUT, variants=..., layers=..., about={"subject_model": ...})`, with the subject model as the
Dagster runs recorded it (the Parquet files do not name it); the `release` asset calls it the same way.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl

from ndx_pipeline.core.contract import (
    ACTIVATION_RECORDS,
    BASELINE_COLUMN_PREFIX,
    BASELINE_EXPLANATIONS,
    CORPUS,
    EXPLANATIONS,
    MLP_NEURON,
    SCORER_ASSETS,
    SCORES,
    SIMULATIONS,
    TOP_EXCERPTS,
)
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.progress import Log, Progress, quiet
from ndx_pipeline.core.storage import ROW_GROUP_ROWS, asset_path, stored_variants, variant_layers
from ndx_pipeline.core.variants import (
    CONTROLS,
    PLANTED_CONTROL,
    check_name,
    control_name,
    control_of,
    declared_settings,
)

# Bump when the export's layout or columns change (the `release` asset's code version).
FORMAT_REVISION = 1
# the asset kinds exported, the default one first
TABLES = (SCORES, EXPLANATIONS, BASELINE_EXPLANATIONS, *(scores for _, scores in SCORER_ASSETS.values()),
          TOP_EXCERPTS)
DEFAULT_TABLE = SCORES
CARD = "README.md"
DATA_DIR = "data"
VARIANT_COLUMN, CONTROL_COLUMN = "variant", "control"
ONE_ROW_PER = {
    SCORES: "unit: its kept explanation's simulation score, calibrated figures and baselines' scores",
    EXPLANATIONS: "unit × explanation candidate (one candidate without best-of-k)",
    BASELINE_EXPLANATIONS: "unit × baseline explanation (random, token list; a planted control's true and wrong "
                             "explanations)",
    **{scores: f"unit: the {scorer} scorer's score of our explanation, beside the baselines'"
       for scorer, (_, scores) in SCORER_ASSETS.items()},
    TOP_EXCERPTS: "unit × excerpt shown to the explainer or scored (`split` says which)",
}


def table_file(asset: str) -> str:
    """Where an asset kind's table lives in the export folder (relative to it)."""
    name = f"{asset}-00000-of-00001.parquet" if asset == DEFAULT_TABLE else f"{asset}.parquet"
    return f"{DATA_DIR}/{name}"


@dataclass(frozen=True)
class DatasetExport:
    """What `write_dataset` wrote: the folder, each asset kind's file and row count, the variants and layers
    exported, and the card's text (README.md)."""
    out: Path
    files: dict[str, Path]
    rows: dict[str, int]
    variants: list[str]
    layers: dict[str, list[int]]
    card: str


# ---------------------------------------------------------------------------------------------------- choosing


def exportable_variants(storage_dir: str | os.PathLike) -> list[str]:
    """The variants with a file of at least one exported asset kind, by name."""
    return sorted({v for asset in TABLES for v in stored_variants(storage_dir, asset)})


def chosen_variants(storage_dir: str | os.PathLike, variants: Sequence[str] | None = None,
                    controls: bool = True) -> list[str]:
    """`variants` (default: every stored one) and, with `controls`, the stored controls of each; a name with nothing
    to export is one sentence naming it and the variants there are."""
    stored = exportable_variants(storage_dir)
    if variants is None:
        return stored
    names = [check_name(v) for v in dict.fromkeys(variants)]
    missing = [v for v in names if v not in stored]
    if missing:
        raise NdxInputError(f"variant{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                            f"{'have' if len(missing) > 1 else 'has'} nothing to export under {storage_dir} "
                            f"(variants with files: {', '.join(stored) or 'none'}).")
    out = list(names)
    if controls:
        out += [control_name(v, kind) for v in names if not control_of(v) for kind in CONTROLS
                if control_name(v, kind) in stored]
    return sorted(dict.fromkeys(out))


def _files(storage: Path, asset: str, variants: Sequence[str], layers: Sequence[int] | None,
           with_rows: bool = False) -> list[tuple[str, int, Path]]:
    """(variant, layer, path) of each stored file of `asset` for `variants` and `layers` (None: all), in order;
    with_rows: only the files that hold rows (a stage writes an empty file for an output its settings switched
    off, such as a scorer that did not run)."""
    import pyarrow.parquet as pq

    found = [(v, layer, asset_path(storage, asset, layer, v)) for v in variants
             for layer in variant_layers(storage, asset, v) if layers is None or layer in layers]
    return [f for f in found if pq.read_metadata(f[2]).num_rows] if with_rows else found


# ---------------------------------------------------------------------------------------------------- tables


def _plain(dtype):
    """An Arrow type with its large and view variants made plain (string, list): what every Parquet reader maps
    back the same way."""
    import pyarrow as pa

    def is_(kind: str) -> bool:  # (the view types' tests are newer than the oldest pyarrow supported)
        return getattr(pa.types, f"is_{kind}", lambda _: False)(dtype)

    if is_("large_string") or is_("string_view"):
        return pa.string()
    if is_("large_list") or is_("list") or is_("list_view") or is_("large_list_view"):
        return pa.list_(_plain(dtype.value_type))
    return dtype


def table_schema(paths: Sequence[Path]) -> dict[str, pl.DataType]:
    """The columns of the export's table of `paths`: `variant`, `control`, then every file's columns in the order
    first seen, each with the type all the files' values fit."""
    empties = [pl.DataFrame(schema=pl.read_parquet_schema(p)) for p in paths]
    merged = pl.concat(empties, how="diagonal_relaxed").schema if empties else {}
    return {VARIANT_COLUMN: pl.String, CONTROL_COLUMN: pl.String, **dict(merged)}


def _aligned(frame: pl.DataFrame, schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    missing = [pl.lit(None, dtype=dtype).alias(name) for name, dtype in schema.items() if name not in frame.columns]
    return frame.with_columns(missing).select(pl.col(name).cast(dtype) for name, dtype in schema.items())


def _write_table(path: Path, files: Sequence[tuple[str, int, Path]], progress: Progress,
                 read: Callable[[str, int, pl.DataFrame], None] | None = None) -> int:
    """One table of every (variant, layer) file, streamed a file at a time (`read(variant, layer, frame)` sees each
    file as stored); returns its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = table_schema([p for *_, p in files])
    arrow = pa.schema([f.with_type(_plain(f.type)) for f in pl.DataFrame(schema=schema).to_arrow().schema])
    rows = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, arrow, compression="zstd") as writer:
        for variant, layer, source in files:
            frame = pl.read_parquet(source)
            if read is not None:
                read(variant, layer, frame)
            frame = _aligned(frame.with_columns(pl.lit(variant).alias(VARIANT_COLUMN),
                                                pl.lit(control_of(variant)).alias(CONTROL_COLUMN)), schema)
            for start in range(0, frame.height, ROW_GROUP_ROWS):
                writer.write_table(frame.slice(start, ROW_GROUP_ROWS).to_arrow().cast(arrow))
            rows += frame.height
            progress.advance()
    return rows


# ---------------------------------------------------------------------------------------------------- the card


def corpus_digest(corpus: pl.DataFrame) -> str:
    """sha256 of the corpus's content: every document's doc_id, source and text, in file order, each field as its
    UTF-8 byte length (8 bytes, big-endian) and its bytes; independent of how the Parquet file was encoded."""
    digest = hashlib.sha256()
    for row in corpus.select("doc_id", "source", "text").iter_rows():
        for field in row:
            data = (field or "").encode("utf-8")
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)
    return digest.hexdigest()


def _num(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def score_table(scores: Mapping[tuple[str, int], pl.DataFrame]) -> list[dict]:
    """Per variant and layer: units (rows of scores), scored (a finite score), and the mean, median, min and max of
    the finite scores (NaN without any)."""
    out = []
    for (variant, layer), frame in sorted(scores.items()):
        finite = frame["score"].filter(frame["score"].is_finite()) if len(frame) else pl.Series([], dtype=pl.Float64)
        stats = ({k: float(getattr(finite, k)()) for k in ("mean", "median", "min", "max")} if len(finite) else
                 {k: math.nan for k in ("mean", "median", "min", "max")})
        out.append({"variant": variant, "layer": layer, "units": len(frame), "scored": len(finite), **stats})
    return out


def _unique(paths: Sequence[Path], column: str) -> list[str]:
    present = [p for p in paths if column in pl.read_parquet_schema(p)]
    if not present:
        return []
    found = pl.scan_parquet(present).select(pl.col(column).cast(pl.String)).unique().collect()[column]
    return sorted(str(v) for v in found.drop_nulls())


def _units(storage: Path, variant: str, layers: Sequence[int]) -> str:
    """What the units of a variant are, from its activation records' unit columns."""
    paths = [p for *_, p in _files(storage, ACTIVATION_RECORDS, [variant], layers)]
    present = [p for p in paths if "unit_kind" in pl.read_parquet_schema(p)]
    if not present:
        return "not recorded (no activation_records with unit columns)"
    cols = [n for n in ("unit_kind", "polarity", "unit_source") if n in pl.read_parquet_schema(present[0])]
    kinds = pl.scan_parquet(present).select(cols).unique().collect()
    parts = []
    for kind in sorted(kinds["unit_kind"].drop_nulls().unique()):
        mine = kinds.filter(pl.col("unit_kind") == kind)
        text = kind
        if kind == MLP_NEURON and "polarity" in mine.columns:
            sides = sorted({"positive" if p > 0 else "negative" for p in mine["polarity"].drop_nulls()})
            text += f" ({' and '.join(sides)} side{'s' if len(sides) > 1 else ''})"
        sources = sorted(mine["unit_source"].drop_nulls().unique()) if "unit_source" in mine.columns else []
        if sources and kind != MLP_NEURON:
            text += f" from {'; '.join(sources[:3])}" + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
        parts.append(text)
    return ", ".join(parts) or "none recorded"


def _settings_text(fields: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(fields.items())) or "the configured defaults"


def _variant_lines(storage: Path, variant: str, layers: Sequence[int], explainers: Sequence[str],
                   baselines: Sequence[str]) -> list[str]:
    settings = declared_settings(storage, variant)
    sims = _unique([p for *_, p in _files(storage, SIMULATIONS, [variant], layers)], "simulator")
    lines = [f"### `{variant}`", ""]
    control = control_of(variant)
    if control:
        base = variant[:-len(control) - 1]
        what = ("planted units whose activation is a known token rule, judged with their true and a wrong "
                "explanation" if control == PLANTED_CONTROL else
                "the same units on the subject model with re-initialized weights (same architecture, tokenizer "
                "and corpus)")
        lines.append(f"- control of `{base}`: {what}")
    lines += [f"- layers: {', '.join(map(str, layers))}",
              f"- units: {_units(storage, variant, layers)}",
              f"- explainer: {', '.join(f'`{e}`' for e in explainers) or 'not recorded'}",
              f"- simulator: {', '.join(f'`{s}`' for s in sims) or 'not recorded'}",
              f"- baselines scored beside (`baseline_<name>` columns): {', '.join(baselines) or 'none'}"]
    for scorer, (judgements, scores) in SCORER_ASSETS.items():
        if _files(storage, scores, [variant], layers, with_rows=True):
            models = _unique([p for *_, p in _files(storage, judgements, [variant], layers)], "scorer")
            lines.append(f"- {scorer} scorer: {', '.join(f'`{m}`' for m in models) or 'not recorded'}")
    for resource in ("explainer_llm", "simulator_llm", "scorer_llm", "embedder", "selection", "quality"):
        if settings.get(resource):
            lines.append(f"- {resource} settings (variants file): {_settings_text(settings[resource])}")
    return lines + [""]


def _front_matter(pretty_name: str, files: Mapping[str, str]) -> str:
    import yaml

    configs = []
    for asset, path in files.items():
        entry = {"config_name": asset, "data_files": [{"split": asset, "path": path}]}
        if asset == DEFAULT_TABLE:
            entry["default"] = True
        configs.append(entry)
    meta = {"pretty_name": pretty_name, "tags": ["interpretability", "neuron-explanations",
                                                 "automated-interpretability"],
            "configs": configs}
    return ("---\n# license: fill in before publishing (an SPDX id such as cc-by-4.0, or other); the subject model's\n"
            "# and the corpus's own terms apply to what is derived from them\nlicense:\n"
            + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n")


def dataset_card(storage: Path, written: Mapping[str, str], rows: Mapping[str, int], layers: Mapping[str, list[int]],
                 scores: Mapping[tuple[str, int], pl.DataFrame], explainers: Mapping[str, list[str]],
                 about: Mapping[str, Any] | None = None) -> str:
    """The card (README.md) of an export: YAML front matter the hub and `datasets` read, then what the data is."""
    about = dict(about or {})
    subject = about.pop("subject_model", None)
    corpus_path = asset_path(storage, CORPUS)
    name = f"Neuron explanations of {subject}" if subject else "Neuron explanations (ndx-pipeline)"
    lines = [_front_matter(name, written), f"# {name}", "",
             "Explanations of the units of a language model written by an explainer LLM, each scored by how well a "
             "simulator LLM predicts the unit's activations from the explanation alone (the method of Bills et al., "
             "2023, \"Language models can explain neurons in language models\"), beside baselines and controls. "
             "Written by ndx-pipeline's dataset export.", "",
             "## What was explained", "",
             f"- subject model: {f'`{subject}`' if subject else 'not recorded in the files'}"]
    if corpus_path.exists():
        corpus = pl.read_parquet(corpus_path, columns=["doc_id", "source", "text"])
        examples = ", ".join(f"`{d}`" for d in corpus["doc_id"].head(3))
        lines.append(f"- corpus: {len(corpus)} documents, {int(corpus['text'].str.len_chars().sum())} characters "
                     f"(doc_ids such as {examples}); content sha256 `{corpus_digest(corpus)}` (of every document's "
                     "doc_id, source and text in file order, each as its UTF-8 byte length, 8 bytes big-endian, "
                     "then its bytes). The corpus itself is not part of this dataset; every excerpt carries its "
                     "tokens and its `doc_id` and `token_start` in it.")
    else:
        lines.append("- corpus: not stored beside the files (no corpus.parquet)")
    for key, value in sorted(about.items()):
        lines.append(f"- {key}: {value}")
    lines += ["- variants (a named setup of units, explainer, simulator, scorers and method settings; every row says "
              "its `variant`, and `control` says which control a variant is, null for a variant of its own):", ""]
    for variant in layers:
        columns = {n for (v, _), frame in scores.items() if v == variant for n in frame.columns}
        baselines = sorted(n.removeprefix(BASELINE_COLUMN_PREFIX) for n in columns
                           if n.startswith(BASELINE_COLUMN_PREFIX))
        lines += _variant_lines(storage, variant, layers[variant], explainers.get(variant, []), baselines)

    lines += ["## Files", "", "| config | file | rows | one row per |", "|---|---|---:|---|"]
    for asset, path in written.items():
        lines.append(f"| `{asset}` | `{path}` | {rows[asset]} | {ONE_ROW_PER[asset]} |")
    lines += ["", "Columns are the pipeline's data contract (ndx-pipeline's DESIGN.md and `core/contract.py`) plus "
              "`variant` and `control`. `score` is the Pearson correlation of the true and simulated activations "
              "over all scored tokens pooled (NaN, with `status` saying why, where it is undefined); "
              "`baseline_<name>` is that baseline's explanation scored the same way.", ""]

    lines += ["## Scores per layer", "",
              "Simulation scores (`score` of the `scores` config): units per layer, how many got a finite score, and "
              "their distribution.", "",
              "| variant | layer | units | scored | mean | median | min | max |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in score_table(scores):
        lines.append(f"| {row['variant']} | {row['layer']} | {row['units']} | {row['scored']} | {_num(row['mean'])} "
                     f"| {_num(row['median'])} | {_num(row['min'])} | {_num(row['max'])} |")
    first = next(iter(written))
    other = next((a for a in written if a != DEFAULT_TABLE), DEFAULT_TABLE)
    lines += ["", "## Loading", "", "With polars:", "", "```python", "import polars as pl", "",
              f'{first} = pl.read_parquet("OUT/{written[first]}")',
              f'{other} = pl.read_parquet("OUT/{written[other]}")',
              f'{first}.filter(pl.col("variant") == "{next(iter(layers))}").group_by("layer").agg(pl.col("score")'
              '.filter(pl.col("score").is_finite()).mean())', "```", "",
              "With the `datasets` library (`OUT` is this folder):", "", "```python", "import datasets", "",
              f'scores = datasets.load_dataset("parquet", data_dir=OUT)["{DEFAULT_TABLE}"]  # the default table',
              f'{other} = datasets.load_dataset(OUT, "{other}")["{other}"]  # any config of this card',
              "```", "",
              "## License", "",
              "Not set: fill in the `license` field of the front matter above before publishing.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- writing


def _known_entries() -> set[str]:
    return {CARD, DATA_DIR, *(table_file(a) for a in TABLES)}


def check_out(out: Path) -> None:
    """Refuse an output folder that holds anything but an earlier export (which the new one replaces)."""
    if out.exists() and not out.is_dir():
        raise NdxInputError(f"output {out} is a file: the dataset export writes a folder.")
    if not out.is_dir():
        return
    known = _known_entries()
    other = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.relative_to(out).as_posix() not in known)
    if other:
        raise NdxInputError(f"output folder {out} holds {other[0]}"
                            + (f" and {len(other) - 1} more" if len(other) > 1 else "")
                            + ", which is not part of a dataset export: choose an empty or new folder.")


def _place(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` into `out`, replacing an earlier export there."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _tables(storage: Path, variants: Sequence[str], layers: Sequence[int] | None) -> Iterator[tuple[str, list]]:
    """Each asset kind that has rows for `variants` and `layers`, with its files that hold them."""
    for asset in TABLES:
        files = _files(storage, asset, variants, layers, with_rows=True)
        if files:
            yield asset, files


def write_dataset(storage_dir: str | os.PathLike, out: str | os.PathLike, variants: Sequence[str] | None = None,
                  layers: Sequence[int] | None = None, about: Mapping[str, Any] | None = None,
                  controls: bool = True, log: Log = quiet) -> DatasetExport:
    """Write the dataset export of `storage_dir` into the folder `out` (see the module's docstring).

    variants: the variants to export (default: every stored one), each with its stored controls (`controls`);
    layers: only these layers (default: every stored one); about: what the files do not say, shown in the card
    (`subject_model`: the subject model's name; any other key is listed as it is). Refuses, in one sentence,
    storage with nothing to export (no scores for the chosen variants and layers) and an output folder that holds
    anything but an earlier export, which the new one replaces whole."""
    storage, out = Path(storage_dir), Path(out).expanduser().resolve()
    if not storage.is_dir():
        raise NdxInputError(f"storage folder {storage} does not exist: run the pipeline first.")
    chosen = chosen_variants(storage, variants, controls)
    wanted = None if layers is None else sorted({int(x) for x in layers})
    if not _files(storage, DEFAULT_TABLE, chosen, wanted, with_rows=True):
        scope = f"variants {', '.join(chosen)}" if chosen else "any variant"
        raise NdxInputError(f"nothing to export under {storage}: no scores for {scope}"
                            + (f" on layers {', '.join(map(str, wanted))}" if wanted is not None else "")
                            + " (run the pipeline through scores first).")
    check_out(out)
    tables = list(_tables(storage, chosen, wanted))
    progress = Progress(f"dataset export to {out}", sum(len(files) for _, files in tables), log, unit="files")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    scores: dict[tuple[str, int], pl.DataFrame] = {}
    explainers: dict[str, set[str]] = {}

    def read(asset: str, variant: str, layer: int, frame: pl.DataFrame) -> None:
        if asset == SCORES:  # one row per unit: kept for the card's figures
            scores[(variant, layer)] = frame.select("score", pl.col(f"^{BASELINE_COLUMN_PREFIX}.*$"))
        elif asset == EXPLANATIONS and "explainer" in frame.columns:
            explainers.setdefault(variant, set()).update(frame["explainer"].drop_nulls().unique().to_list())

    try:
        written, rows = {}, {}
        for asset, files in tables:
            written[asset] = table_file(asset)
            rows[asset] = _write_table(tmp / written[asset], files, progress, partial(read, asset))
        exported = sorted({v for _, files in tables for v, *_ in files})
        by_variant = {v: sorted({layer for _, files in tables for w, layer, _ in files if w == v}) for v in exported}
        card = dataset_card(storage, written, rows, by_variant, scores,
                            {v: sorted(e) for v, e in explainers.items()}, about)
        (tmp / CARD).write_text(card, encoding="utf-8")
        for path in tmp.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.chmod(tmp, 0o755)
        _place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DatasetExport(out=out, files={a: out / p for a, p in written.items()}, rows=rows, variants=exported,
                         layers=by_variant, card=card)
