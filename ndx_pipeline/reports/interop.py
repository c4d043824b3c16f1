"""Interop with OpenAI's neuron-explainer (automated-interpretability) JSON formats.

Export: a layer of one variant of our data contract as
  - `collated-activations/<layer>/<neuron>.json`: one `NeuronRecord` (neuron_id {layer_index, neuron_index},
    random_sample, random_sample_by_quantile, quantile_boundaries, mean, variance, skewness, kurtosis,
    most_positive_activation_records; records are `ActivationRecord` {tokens, activations}), the layout of the
    released GPT-2 XL data;
  - `explanations/<layer>/<neuron>.jsonl`: one `NeuronSimulationResults` line (neuron_id, scored_explanations of
    ScoredExplanation → ScoredSimulation → ScoredSequenceSimulation → SequenceSimulation);
  - `ndx-provenance/<layer>/<neuron>.json` and `ndx-provenance/corpus.jsonl`: what those shapes cannot hold
    (doc_id, token/char spans, window index of each record; the exact max and token count; the documents), kept
    out of the NeuronRecord so OpenAI's loader (which rejects unknown fields) still reads the files.
Every object carries `dataclass_name` as neuron-explainer's serializer writes it. NaN is written as null.

Import: `NeuronRecord` JSON files (ours, or OpenAI's released collated activations) become `activation_records`
rows with the contract's columns, written into a variant of the caller's choosing. With a provenance sidecar the
rows are exactly the exported ones. Without one (released data), each distinct token sequence becomes a document of
its own: its text is the concatenated tokens, `doc_id` is a hash of them, `token_start` 0, and the char span covers
the whole text, so lineage still resolves; `window_index` numbers the distinct sequences of a layer, so a random
window that is also a top window is recognised as such by the excerpt splits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ndx_pipeline.core.contract import (
    ACTIVATION_RECORDS,
    CORPUS,
    EXPLANATIONS,
    RECORD_SCHEMA,
    SCORED_SPLITS,
    SCORES,
    SIMULATIONS,
    STATUS_OK,
    TOKEN_TABLE,
    describe_ids,
    empty,
)
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.method.scoring import Calibration, absolute_dev_explained, pooled_correlation, rsquared
from ndx_pipeline.core.storage import asset_path, write_parquet_atomic, write_text_atomic

ACTIVATIONS_DIR = "collated-activations"
EXPLANATIONS_DIR = "explanations"
PROVENANCE_DIR = "ndx-provenance"
SIMULATED_SCALE = "simulated_normalized_activations"
NEURON_SCALE = "neuron_activations"  # a calibrated simulation is on the neuron's own scale
IMPORTED_DOC_PREFIX = "neuron-record:"
EXTRA_SCHEMA = {
    "neuron_skewness": pl.Float64,
    "neuron_kurtosis": pl.Float64,
    "quantile_boundaries": pl.List(pl.Float64),
}
IMPORT_SCHEMA = {**RECORD_SCHEMA, **EXTRA_SCHEMA}
PROVENANCE_FIELDS = ("doc_id", "token_start", "window_index", "char_start", "char_end")


# ---------------------------------------------------------------------------------------------------- helpers


def _nan_to_none(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _f32_list(values: Sequence[float]) -> list[float | None]:
    """float32 values as the shortest decimal that reads back to the same float32 (NaN → None)."""
    out = []
    for v in np.asarray(values, dtype=np.float32):
        out.append(float(str(v)) if np.isfinite(v) else None)
    return out


def _dc(name: str, **fields: Any) -> dict:
    return {"dataclass_name": name, **fields}


def neuron_id(layer: int, neuron: int) -> dict:
    return _dc("NeuronId", layer_index=int(layer), neuron_index=int(neuron))


def activation_record(tokens: Sequence[str], activations: Sequence[float]) -> dict:
    return _dc("ActivationRecord", tokens=list(tokens), activations=_f32_list(activations))


def _write_json(obj: Any, path: Path, lines: bool = False) -> Path:

    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return write_text_atomic(text + "\n" if lines else text, path)


# ---------------------------------------------------------------------------------------------------- export


def neuron_record(rows: pl.DataFrame) -> dict:
    """One neuron's activation_records rows → a NeuronRecord dict."""
    if rows.is_empty():
        raise NdxInputError("no activation records to export for this neuron.")
    first = rows.row(0, named=True)
    kinds = rows["kind"].unique().to_list()

    def records(kind: str) -> list[dict]:
        part = rows.filter(pl.col("kind") == kind).sort("rank")
        return [activation_record(t, a) for t, a in zip(part["tokens"].to_list(), part["activations"].to_list())]

    quantiles = sorted((int(k.split("_", 1)[1]), k) for k in kinds
                       if k.startswith("quantile_") and k.split("_", 1)[1].isdigit())
    by_quantile = None
    if quantiles:
        count = quantiles[-1][0] + 1
        by_quantile = [records(f"quantile_{i}") for i in range(count)]
    boundaries = None
    if "quantile_boundaries" in rows.columns and first.get("quantile_boundaries") is not None:
        boundaries = [_nan_to_none(b) for b in first["quantile_boundaries"]]
    return _dc(
        "NeuronRecord",
        neuron_id=neuron_id(first["layer"], first["neuron"]),
        random_sample=records("random"),
        random_sample_by_quantile=by_quantile,
        quantile_boundaries=boundaries,
        mean=_nan_to_none(first.get("neuron_mean")),
        variance=_nan_to_none(first.get("neuron_variance")),
        skewness=_nan_to_none(first.get("neuron_skewness")),
        kurtosis=_nan_to_none(first.get("neuron_kurtosis")),
        most_positive_activation_records=records("top"),
    )


def neuron_provenance(rows: pl.DataFrame) -> dict:
    """What a NeuronRecord cannot hold, keyed by kind then rank."""
    first = rows.row(0, named=True)
    out: dict[str, Any] = {
        "layer": int(first["layer"]), "neuron": int(first["neuron"]),
        "neuron_max": _nan_to_none(first.get("neuron_max")),
        "neuron_token_count": first.get("neuron_token_count"),
        "records": {},
    }
    for r in rows.sort(["kind", "rank"]).iter_rows(named=True):
        out["records"].setdefault(r["kind"], {})[str(r["rank"])] = {k: r.get(k) for k in PROVENANCE_FIELDS}
    return out


def _sequence(tokens, values, scale: str, uncalibrated: dict | None = None) -> dict:
    return _dc("SequenceSimulation", tokens=list(tokens), expected_activations=_f32_list(values),
               activation_scale=scale,
               # We keep only the expected values, not the per-token distributions.
               distribution_values=[[] for _ in values], distribution_probabilities=[[] for _ in values],
               uncalibrated_simulation=uncalibrated)


def _scores_of(true, predicted, calibrated: bool) -> dict:
    """The three ScoredSimulation numbers; rsquared and absolute deviation only on calibrated predictions (on the
    raw 0–10 scale against raw activations they mean nothing, and our scores leave them undefined too)."""
    return {"ev_correlation_score": _nan_to_none(pooled_correlation(true, predicted).value),
            "rsquared_score": _nan_to_none(rsquared(true, predicted)) if calibrated else None,
            "absolute_dev_explained_score": (_nan_to_none(absolute_dev_explained(true, predicted)) if calibrated
                                             else None)}


def simulation_results(layer: int, neuron: int, simulations: pl.DataFrame, explanations: pl.DataFrame,
                       calibrations: dict[str, Calibration] | None = None) -> dict:
    """NeuronSimulationResults for one neuron: every explanation that has simulations, scored as we score.

    With a calibration line for the explanation (`calibrations[explanation_id]`, from our scores), each sequence's
    `simulation` is the calibrated one (on the neuron's activation scale) and `uncalibrated_simulation` the raw
    0–10 expected values, as neuron-explainer's calibrated simulator writes them."""
    scored = []
    expl = explanations.filter((pl.col("neuron") == neuron) & (pl.col("status") == STATUS_OK)).sort("explanation_id")
    for e in expl.iter_rows(named=True):
        sims = simulations.filter((pl.col("neuron") == neuron) & (pl.col("explanation_id") == e["explanation_id"])
                                  & pl.col("split").is_in(list(SCORED_SPLITS)))
        if sims.is_empty():
            continue
        fit = (calibrations or {}).get(e["explanation_id"])
        calibrated = fit is not None and math.isfinite(fit.slope) and math.isfinite(fit.intercept)
        order = {split: i for i, split in enumerate(SCORED_SPLITS)}
        sims = (sims.with_columns(pl.col("split").replace_strict(order, default=2).alias("_o"))
                .sort(["_o", "excerpt_id"]))
        sequences, true_all, predicted_all = [], [], []
        for s in sims.iter_rows(named=True):
            true, sim = list(s["true_activations"]), list(s["simulated_activations"])
            raw = _sequence(s["tokens"], sim, SIMULATED_SCALE)
            predicted = fit.apply([sim]).tolist() if calibrated else sim
            simulation = _sequence(s["tokens"], predicted, NEURON_SCALE, uncalibrated=raw) if calibrated else raw
            sequences.append(_dc("ScoredSequenceSimulation", simulation=simulation, true_activations=_f32_list(true),
                                 **_scores_of([true], [predicted], calibrated)))
            true_all.append(true)
            predicted_all.append(predicted)
        scored.append(_dc(
            "ScoredExplanation",
            explanation=e["explanation"],
            scored_simulation=_dc("ScoredSimulation", scored_sequence_simulations=sequences,
                                  **_scores_of(true_all, predicted_all, calibrated)),
        ))
    return _dc("NeuronSimulationResults", neuron_id=neuron_id(layer, neuron), scored_explanations=scored)


def calibration_lines(scores_path: Path) -> dict[str, Calibration]:
    """explanation_id → the calibration line our scores fitted (none when there are no scores, or no line)."""
    if not scores_path.exists():
        return {}
    scores = pl.read_parquet(scores_path)
    if "calibration_slope" not in scores.columns:
        return {}
    return {r["explanation_id"]: Calibration(r["calibration_slope"], r["calibration_intercept"],
                                             r["calibration_status"])
            for r in scores.iter_rows(named=True) if r["calibration_slope"] is not None}


@dataclass
class ExportResult:
    layer: int
    neuron_records: list[Path]
    simulation_results: list[Path]
    provenance: list[Path]


def export_layer(storage_dir: str | os.PathLike, layer: int, out_dir: str | os.PathLike,
                 neurons: Iterable[int] | None = None, *, variant: str) -> ExportResult:
    """Write one layer of `variant` in neuron-explainer's shapes under `out_dir` (see the module docstring for the
    layout, which names no variant: export one variant per folder)."""
    layer = int(layer)
    rec_path = asset_path(storage_dir, ACTIVATION_RECORDS, layer, variant)
    if not rec_path.exists():
        raise NdxInputError(f"layer {layer} of variant {variant} has no activation_records at {rec_path}: "
                            "materialize it first.")
    records = pl.read_parquet(rec_path)
    wanted = sorted(set(int(n) for n in neurons)) if neurons is not None else sorted(records["neuron"].unique())
    have = set(records["neuron"].unique().to_list())
    missing = [n for n in wanted if n not in have]
    if missing:
        raise NdxInputError(f"layer {layer} of variant {variant} has no activation records for neurons {missing}.")
    out = Path(out_dir)
    sims_path = asset_path(storage_dir, SIMULATIONS, layer, variant)
    expl_path = asset_path(storage_dir, EXPLANATIONS, layer, variant)
    sims = pl.read_parquet(sims_path) if sims_path.exists() else None
    expl = pl.read_parquet(expl_path) if expl_path.exists() else None
    calibrations = calibration_lines(asset_path(storage_dir, SCORES, layer, variant))
    result = ExportResult(layer, [], [], [])
    doc_ids: set[str] = set()
    for n in wanted:
        rows = records.filter(pl.col("neuron") == n)
        result.neuron_records.append(_write_json(neuron_record(rows), out / ACTIVATIONS_DIR / str(layer) / f"{n}.json"))
        result.provenance.append(_write_json(neuron_provenance(rows), out / PROVENANCE_DIR / str(layer) / f"{n}.json"))
        doc_ids.update(rows["doc_id"].drop_nulls().to_list())
        if sims is not None and expl is not None:
            nsr = simulation_results(layer, n, sims, expl, calibrations)
            if nsr["scored_explanations"]:
                result.simulation_results.append(
                    _write_json(nsr, out / EXPLANATIONS_DIR / str(layer) / f"{n}.jsonl", lines=True))
    corpus_path = asset_path(storage_dir, CORPUS)
    if corpus_path.exists() and doc_ids:
        _merge_corpus_jsonl(pl.read_parquet(corpus_path).filter(pl.col("doc_id").is_in(sorted(doc_ids))),
                            out / PROVENANCE_DIR / "corpus.jsonl")
    return result


def _merge_corpus_jsonl(docs: pl.DataFrame, path: Path) -> None:
    """Add `docs` to a corpus.jsonl (doc_id, source, text), keeping the documents already there."""
    known: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                d = json.loads(line)
                known[d["doc_id"]] = d
    for d in docs.select("doc_id", "source", "text").iter_rows(named=True):
        known.setdefault(d["doc_id"], d)

    write_text_atomic("".join(json.dumps(known[k], ensure_ascii=False) + "\n" for k in sorted(known)), path)


# ---------------------------------------------------------------------------------------------------- import


@dataclass
class ImportedRecords:
    records: pl.DataFrame  # activation_records rows (contract columns + neuron_skewness/kurtosis, quantile_boundaries)
    corpus: pl.DataFrame  # doc_id, source, text of the documents the rows point at (when known)

    def layers(self) -> list[int]:
        return sorted(int(x) for x in self.records["layer"].unique())


def neuron_record_files(source: str | os.PathLike) -> list[Path]:
    """The NeuronRecord files under `source`: a .json file, a layer folder of <neuron>.json, a folder of layer
    folders, or an export root holding `collated-activations/`."""
    p = Path(source).expanduser()
    if not p.exists():
        raise NdxInputError(f"neuron record source {p} does not exist.")
    if p.is_file():
        return [p]
    if (p / ACTIVATIONS_DIR).is_dir():
        p = p / ACTIVATIONS_DIR
    files = [f for f in p.rglob("*.json") if PROVENANCE_DIR not in f.parts and f.stem.isdigit()]
    if not files:
        raise NdxInputError(f"{p} holds no NeuronRecord files (<neuron>.json).")

    def key(f: Path):
        layer = f.parent.name
        return (int(layer) if layer.isdigit() else -1, int(f.stem))

    return sorted(files, key=key)


def _records_list(value: Any, where: str, name: str) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise NdxInputError(f"{where}: {name} is not a list of ActivationRecords.")
    out = []
    for i, r in enumerate(value):
        if not isinstance(r, Mapping) or not isinstance(r.get("tokens"), list) or not isinstance(
                r.get("activations"), list):
            raise NdxInputError(f"{where}: {name}[{i}] is not an ActivationRecord with tokens and activations.")
        if len(r["tokens"]) != len(r["activations"]):
            raise NdxInputError(f"{where}: {name}[{i}] has {len(r['tokens'])} tokens but {len(r['activations'])} "
                                "activations.")
        if not r["tokens"]:
            raise NdxInputError(f"{where}: {name}[{i}] has no tokens.")
        out.append(r)
    return out


def _as_float(x: Any) -> float:
    return float("nan") if x is None else float(x)


def parse_neuron_record(obj: Any, where: str) -> dict:
    """Check a decoded NeuronRecord and return it as {layer, neuron, kinds: {kind: [records]}, moments}."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("neuron_id"), Mapping):
        raise NdxInputError(f"{where} is not a NeuronRecord: it has no neuron_id object.")
    if obj.get("dataclass_name", "NeuronRecord") != "NeuronRecord":
        raise NdxInputError(f"{where} holds a {obj['dataclass_name']}, not a NeuronRecord.")
    nid = obj["neuron_id"]
    try:
        layer, neuron = int(nid["layer_index"]), int(nid["neuron_index"])
    except (KeyError, TypeError, ValueError):
        raise NdxInputError(f"{where}: neuron_id needs integer layer_index and neuron_index.") from None
    kinds = {"top": _records_list(obj.get("most_positive_activation_records"), where,
                                  "most_positive_activation_records"),
             "random": _records_list(obj.get("random_sample"), where, "random_sample")}
    by_q = obj.get("random_sample_by_quantile")
    if by_q is not None:
        if not isinstance(by_q, list):
            raise NdxInputError(f"{where}: random_sample_by_quantile is not a list of lists.")
        for i, bucket in enumerate(by_q):
            kinds[f"quantile_{i}"] = _records_list(bucket, where, f"random_sample_by_quantile[{i}]")
    if not kinds["top"] and not kinds["random"]:
        raise NdxInputError(f"{where}: the NeuronRecord has no activation records.")
    boundaries = obj.get("quantile_boundaries")
    return {
        "layer": layer, "neuron": neuron, "kinds": kinds,
        "mean": _as_float(obj.get("mean")), "variance": _as_float(obj.get("variance")),
        "skewness": _as_float(obj.get("skewness")), "kurtosis": _as_float(obj.get("kurtosis")),
        "quantile_boundaries": [_as_float(b) for b in boundaries] if isinstance(boundaries, list) else None,
    }


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise NdxInputError(f"{path} is not UTF-8 text.") from None
    except json.JSONDecodeError as exc:
        raise NdxInputError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None


def _provenance_for(path: Path, layer: int, neuron: int) -> tuple[dict | None, Path | None]:
    """The sidecar of an exported NeuronRecord: <root>/ndx-provenance/<layer>/<neuron>.json, if any."""
    if path.parent.parent.name == ACTIVATIONS_DIR:
        root = path.parent.parent.parent
        side = root / PROVENANCE_DIR / str(layer) / f"{neuron}.json"
        if side.exists():
            return _load_json(side), root / PROVENANCE_DIR / "corpus.jsonl"
    return None, None


def window_document(tokens: Sequence[str]) -> tuple[str, str]:
    text = "".join(tokens)
    digest = hashlib.sha256(json.dumps(list(tokens), ensure_ascii=False).encode("utf-8")).hexdigest()[:20]
    return IMPORTED_DOC_PREFIX + digest, text


def import_neuron_records(source: str | os.PathLike, layers: Iterable[int] | None = None,
                          use_provenance: bool = True) -> ImportedRecords:
    """Read NeuronRecord JSON (OpenAI's released collated activations, or our export) into activation_records rows.

    `layers` keeps only those layers. Rows come sorted by layer, neuron, kind (top, random, quantile_*), rank.
    """
    wanted = None if layers is None else {int(x) for x in layers}
    rows = {k: [] for k in IMPORT_SCHEMA}
    docs: dict[str, dict] = {}
    window_of: dict[tuple[int, str], int] = {}
    next_window: dict[int, int] = {}
    corpus_files: set[Path] = set()
    seen: dict[tuple[int, int], Path] = {}
    for path in neuron_record_files(source):
        rec = parse_neuron_record(_load_json(path), str(path))
        layer, neuron = rec["layer"], rec["neuron"]
        if wanted is not None and layer not in wanted:
            continue
        if (layer, neuron) in seen:
            raise NdxInputError(f"layer {layer} neuron {neuron} appears twice: {seen[(layer, neuron)]} and {path}.")
        seen[(layer, neuron)] = path
        next_window.setdefault(layer, 0)
        prov, corpus_file = _provenance_for(path, layer, neuron) if use_provenance else (None, None)
        if corpus_file is not None and corpus_file.exists():
            corpus_files.add(corpus_file)
        all_acts = [a for recs in rec["kinds"].values() for r in recs for a in r["activations"] if a is not None]
        neuron_max = max(all_acts) if all_acts else float("nan")
        token_count = None
        if prov is not None:
            neuron_max = _as_float(prov.get("neuron_max"))
            token_count = prov.get("neuron_token_count")
        for kind, recs in rec["kinds"].items():
            for rank, r in enumerate(recs):
                tokens = [str(t) for t in r["tokens"]]
                acts = [_as_float(a) for a in r["activations"]]
                where = ((prov or {}).get("records", {}).get(kind, {}) or {}).get(str(rank))
                if where is None:
                    doc_id, text = window_document(tokens)
                    docs.setdefault(doc_id, {"doc_id": doc_id, "source": f"{path}#{kind}[{rank}]", "text": text})
                    if (layer, doc_id) not in window_of:
                        window_of[(layer, doc_id)] = next_window[layer]
                        next_window[layer] = next_window.get(layer, 0) + 1
                    window = window_of[(layer, doc_id)]
                    where = {"doc_id": doc_id, "token_start": 0, "window_index": window, "char_start": 0,
                             "char_end": len(text)}
                finite = [a for a in acts if math.isfinite(a)]
                values = {
                    "layer": layer, "neuron": neuron, "kind": kind, "rank": rank, "tokens": tokens,
                    "activations": acts, "max_activation": max(finite) if finite else float("nan"),
                    "neuron_mean": rec["mean"], "neuron_variance": rec["variance"], "neuron_max": neuron_max,
                    "neuron_token_count": token_count, "neuron_skewness": rec["skewness"],
                    "neuron_kurtosis": rec["kurtosis"], "quantile_boundaries": rec["quantile_boundaries"],
                    "error": None,
                    **{k: v[0] for k, v in describe_ids([neuron]).items()},
                    **{k: where.get(k) for k in PROVENANCE_FIELDS},
                }
                for k in rows:
                    rows[k].append(values[k])
    if not seen:
        raise NdxInputError(f"{source} holds no NeuronRecord for layers {sorted(wanted or [])}.")
    frame = pl.DataFrame(rows, schema=IMPORT_SCHEMA)
    kind_order = pl.when(pl.col("kind") == "top").then(0).when(pl.col("kind") == "random").then(1).otherwise(2)
    frame = frame.with_columns(kind_order.alias("_k")).sort(["layer", "neuron", "_k", "kind", "rank"]).drop("_k")
    for corpus_file in sorted(corpus_files):
        for line in corpus_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                d = json.loads(line)
                docs.setdefault(d["doc_id"], {"doc_id": d["doc_id"], "source": d["source"], "text": d["text"]})
    corpus = pl.DataFrame(sorted(docs.values(), key=lambda d: d["doc_id"]),
                          schema={"doc_id": pl.String, "source": pl.String, "text": pl.String})
    return ImportedRecords(frame, corpus)


def write_imported(storage_dir: str | os.PathLike, imported: ImportedRecords, write_corpus: bool = True, *,
                   variant: str) -> list[tuple[str, int | None, str | None, Path]]:
    """Write `activation_records/<variant>/<layer>.parquet` for each imported layer (with an empty token table:
    released records carry none, so the lookup baseline has nothing to count), and add the imported documents to
    `corpus.parquet`, which every variant shares (documents already there are kept; a doc_id with different text is
    an error). Returns (asset, layer, variant, path) for every file written — layer and variant None for the
    corpus —, for the caller to record as materializations."""
    written: list[tuple[str, int | None, str | None, Path]] = []
    if write_corpus and not imported.corpus.is_empty():
        corpus_path = asset_path(storage_dir, CORPUS)
        if corpus_path.exists():
            current = pl.read_parquet(corpus_path)
            have = dict(zip(current["doc_id"].to_list(), current["text"].to_list()))
            pairs = zip(imported.corpus["doc_id"], imported.corpus["text"])
            clash = [d for d, t in pairs if d in have and have[d] != t]
            if clash:
                raise NdxInputError(f"corpus {corpus_path} already has documents {clash[:3]} with different text.")
            new = imported.corpus.filter(~pl.col("doc_id").is_in(list(have)))
            merged = pl.concat([current.select("doc_id", "source", "text"), new]) if len(new) else None
        else:
            merged = imported.corpus
        if merged is not None:
            written.append((CORPUS, None, None, write_parquet_atomic(merged, corpus_path)))
    for layer in imported.layers():
        part = imported.records.filter(pl.col("layer") == layer)
        for asset, frame in ((ACTIVATION_RECORDS, part), (TOKEN_TABLE, empty(TOKEN_TABLE))):
            path = write_parquet_atomic(frame, asset_path(storage_dir, asset, layer, variant))
            written.append((asset, layer, variant, path))
    return written
