"""Neuronpedia's export shape: write a variant's units as Neuronpedia's own exports lay them out, and read such an
export back as a variant's activation records and explanations.

Layout (REFERENCE.md, "Neuronpedia's export format"; Neuronpedia's export script and database schema):

    OUT/<modelId>/<sourceId>/model.jsonl                        one row: the model
    OUT/<modelId>/<sourceId>/source.jsonl                       one row: the source (a layer's unit set)
    OUT/<modelId>/<sourceId>/features/batch-N.jsonl.gz          one row per unit
    OUT/<modelId>/<sourceId>/activations/batch-N.jsonl.gz       one row per stored window of a unit
    OUT/<modelId>/<sourceId>/explanations/batch-N.jsonl.gz      one row per unit's explanation
    OUT/<modelId>/<sourceId>/scores/batch-N.jsonl.gz            ours: every score of each explanation (Neuronpedia
                                                                keeps scores in a table its export leaves out)
    OUT/<modelId>/<sourceId>/ndx/batch-N.jsonl.gz               ours: per unit what the rows above cannot hold
    OUT/<modelId>/ndx-corpus.jsonl.gz                           ours: the documents the windows come from

Batches hold `BATCH_ROWS` rows, ordered by index (the unit's index as Neuronpedia numbers it). Rows of the files
Neuronpedia reads carry only its fields; what a round trip needs beyond them (each window's document and span, its
record kind and rank, the unit's moments and quantile boundaries, windowless `dead` / `failed` records) is in the
`ndx/` sidecar, so `import_neuronpedia` gives back the exported rows exactly. Without a sidecar (an export made
elsewhere), each window becomes a document of its own and its values give the unit's moments.

Source ids: `<layer>-<set>` (Neuronpedia's convention, e.g. `6-res-jb`); the negative sides of MLP neurons are a
set of their own, `<layer>-<set>-neg`, numbered by their neuron's index. The set is the caller's (`--source-id`),
by default the variant's name.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ndx_pipeline.core import contract
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.storage import (
    asset_path,
    read_asset_if_any,
    read_parquet,
    variant_layers,
    write_atomic,
    write_parquet_atomic,
    write_text_atomic,
)
from ndx_pipeline.reports.controls import read_controls
from ndx_pipeline.reports.interop import window_document

BATCH_ROWS = 1024
MODEL_FILE, SOURCE_FILE, CORPUS_FILE = "model.jsonl", "source.jsonl", "ndx-corpus.jsonl.gz"
FEATURES, ACTIVATIONS, EXPLANATIONS, SCORES, SIDECAR = "features", "activations", "explanations", "scores", "ndx"
# Neuronpedia's name for the method of explaining from token ⇥ activation pairs (OpenAI's)
EXPLANATION_TYPE = "oai_token-act-pair"
NEGATIVE_SET_SUFFIX = "-neg"
# where a unit set reads, in TransformerLens' hook names (what Neuronpedia's `hookName` holds)
HOOK_NAMES = {"mlp_hidden": "blocks.{layer}.mlp.hook_post", "resid_pre": "blocks.{layer}.hook_resid_pre",
              "resid_post": "blocks.{layer}.hook_resid_post", "mlp_in": "blocks.{layer}.ln2.hook_normalized",
              "mlp_out": "blocks.{layer}.hook_mlp_out"}
# The fields of each row, as Neuronpedia names them (the JSON Schemas in the tests check every row against these)
EXPLANATION_FIELDS = ("id", "modelId", "layer", "index", "description", "explanationModelName", "typeName",
                      "authorId")
ACTIVATION_FIELDS = ("id", "modelId", "layer", "index", "creatorId", "dataSource", "tokens", "values", "maxValue",
                     "minValue", "maxValueTokenIndex")
FEATURE_FIELDS = ("modelId", "layer", "index", "maxActApprox", "frac_nonzero", "hookName", "pos_str", "pos_values",
                  "neg_str", "neg_values")
SCORE_FIELDS = ("id", "explanationId", "modelId", "layer", "index", "value", "explanationScoreTypeName",
                "explanationScoreModelName", "jsonDetails")
# what the sidecar keeps of each record beside its window (all of RECORD_SCHEMA but the window's tokens/values)
RECORD_FIELDS = tuple(k for k in contract.RECORD_SCHEMA if k not in ("tokens", "activations"))


# ------------------------------------------------------------------------------------------------ JSON values


def _number(x: Any) -> Any:
    """A float as JSON can hold it: the value, or "NaN" / "Infinity" / "-Infinity" (the sidecar's exact floats)."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    x = float(x)
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _float(x: Any) -> float | None:
    return None if x is None else float(x)  # float("NaN") and float("-Infinity") read the strings back


def _f32(values: Sequence[float]) -> list[float]:
    """float32 values as the shortest decimals that read back to the same float32."""
    return [float(str(v)) for v in np.asarray(values, dtype=np.float32)]


def _jsonable(value: Any) -> Any:
    """`value` with every non-finite float spelled as a string (see `_number`), through mappings and lists."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, pl.Series)):
        return [_jsonable(v) for v in value]
    return _number(value)


def _write_batches(rows: list[dict], folder: Path) -> list[Path]:
    """`rows` (sorted by index) as batch-0.jsonl.gz, batch-1.jsonl.gz, … of BATCH_ROWS rows each, each written
    whole or not at all; a folder's batches from an earlier export are replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("batch-*.jsonl.gz"):
        old.unlink()
    paths = []
    for n, start in enumerate(range(0, len(rows), BATCH_ROWS)):
        text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"
                       for r in rows[start:start + BATCH_ROWS])
        paths.append(_write_gzip(text, folder / f"batch-{n}.jsonl.gz"))
    return paths


def _write_gzip(text: str, path: Path) -> Path:
    """`text` gzip'd at `path`, whole or not at all."""

    def write(tmp: str) -> None:
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            f.write(text)

    return write_atomic(path, write)


def _write_jsonl(rows: list[dict], path: Path) -> Path:
    return write_text_atomic("".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows), path)


def read_rows(path: Path) -> list[dict]:
    """The rows of a .jsonl or .jsonl.gz file."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NdxInputError(f"{path} is not readable JSON lines ({exc}).") from None


def read_batches(folder: Path) -> list[dict]:
    """Every row of a folder's batch-N.jsonl.gz files, in batch order."""
    files = sorted(folder.glob("batch-*.jsonl.gz"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
    return [row for f in files for row in read_rows(f)]


# ------------------------------------------------------------------------------------------------ export


def source_ids(layer: int, set_name: str) -> dict[int, str]:
    """polarity → the source id of a layer's units of that polarity."""
    if set_name.startswith(f"{layer}-"):  # given whole (e.g. 6-res-jb)
        set_name = set_name[len(f"{layer}-"):]
    return {1: f"{layer}-{set_name}", -1: f"{layer}-{set_name}{NEGATIVE_SET_SUFFIX}"}


def hook_name(layer: int, unit_kind: str, unit_source: str | None) -> str:
    """The TransformerLens hook name of where a unit reads (a dictionary says its hook in its description)."""
    hook = "mlp_hidden"
    if unit_kind == contract.DICTIONARY_LATENT and unit_source:
        hook = next((h for h in HOOK_NAMES if f"-wide {h} of" in unit_source), hook)
    return HOOK_NAMES[hook].format(layer=layer)


@dataclass
class NeuronpediaExport:
    root: Path
    sources: dict[str, dict[str, int]] = field(default_factory=dict)  # source id → file kind → rows written
    files: list[Path] = field(default_factory=list)


def _activation_row(r: Mapping, model_id: str, source: str, index: int, creator: str, data_source: str) -> dict:
    values = _f32(r["activations"])
    top = int(np.argmax(values))
    return {"id": f"{r['_scope']}/{r['layer']}/{r['neuron']}/{r['kind']}/{r['rank']}", "modelId": model_id,
            "layer": source, "index": str(index), "creatorId": creator, "dataSource": data_source,
            "tokens": list(r["tokens"]), "values": values, "maxValue": max(values), "minValue": min(values),
            "maxValueTokenIndex": top}


def _frac_nonzero(rows: pl.DataFrame) -> float | None:
    """The share of tokens where the unit fires (> 0), estimated from its random windows (a uniform sample of the
    corpus's windows); None without any."""
    random = rows.filter(pl.col("kind") == contract.RANDOM)["activations"].to_list()
    values = [v for window in random for v in window]
    return float(np.mean(np.asarray(values) > 0)) if values else None


def _feature_row(model_id: str, source: str, index: int, unit: pl.DataFrame, tokens: Mapping | None,
                 layer: int) -> dict:
    first = unit.row(0, named=True)
    maximum = first["neuron_max"]
    return {"modelId": model_id, "layer": source, "index": str(index),
            "maxActApprox": float(maximum) if maximum is not None and math.isfinite(maximum) else 0.0,
            "frac_nonzero": _frac_nonzero(unit) or 0.0,
            "hookName": hook_name(layer, first["unit_kind"], first["unit_source"]),
            "pos_str": list(tokens["promoted_tokens"]) if tokens else [],
            "pos_values": _f32(tokens["promoted_logits"]) if tokens else [],
            "neg_str": list(tokens["suppressed_tokens"]) if tokens else [],
            "neg_values": _f32(tokens["suppressed_logits"]) if tokens else []}


def _lineage(runs: Mapping | None) -> dict:
    """What traces a score here: each stage's run id and data version (from the Dagster instance)."""
    out = {}
    for stage, info in (runs or {}).items():
        if info:
            out[stage] = {k: info.get(k) for k in ("run_id", "partition", "code_version", "data_version")}
    return out


def _score_rows(model_id: str, source: str, index: int, explanation: Mapping, scores: Mapping | None,
                scorer_scores: Mapping[str, Mapping], random_weights: Mapping | None, controls: Mapping | None,
                lineage: Mapping, judges: Mapping[str, str]) -> list[dict]:
    """Every score of one explanation as rows of Neuronpedia's score table (value, type, scorer model, details)."""
    base = {"explanationId": explanation["id"], "modelId": model_id, "layer": source, "index": str(index)}
    details_common = {"variant": explanation["_variant"], "explanation_id": explanation["_explanation_id"],
                      "prompt_sha256": explanation["_prompt_sha256"], "lineage": dict(lineage)}
    judge_controls = (controls or {}).get("judges", {})
    rows = []

    def add(kind: str, value: Any, model: str | None, **details: Any) -> None:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return
        rows.append({"id": f"{explanation['id']}/{kind}", **base, "value": float(value),
                     "explanationScoreTypeName": f"ndx_{kind}", "explanationScoreModelName": model or "",
                     "jsonDetails": _jsonable({**details_common, **details})})

    if scores:
        simulator = judges.get("simulator")
        control = judge_controls.get("simulation")
        add("simulation", scores["score"], simulator, method="pooled Pearson correlation of simulated and true "
            "activations over score_top and score_random", score_top=scores["score_top"],
            score_random=scores["score_random"], scored_tokens=scores["scored_tokens"], status=scores["status"],
            judge_control=control)
        add("calibrated_ev", scores["calibrated_ev"], simulator, rsquared=scores["rsquared"],
            absolute_dev_explained=scores["absolute_dev_explained"], slope=scores["calibration_slope"],
            intercept=scores["calibration_intercept"], calibration_status=scores["calibration_status"])
        for column, value in scores.items():
            if column.startswith(contract.BASELINE_COLUMN_PREFIX):
                name = column[len(contract.BASELINE_COLUMN_PREFIX):]
                add(f"baseline_{name}", value, None if name == contract.LOOKUP_BASELINE else simulator,
                    baseline=name, method="simulation score of the baseline's explanation")
    for scorer, row in scorer_scores.items():
        add(scorer, row["score"], judges.get(scorer), metric=row["metric"], precision=row["precision"],
            recall=row["recall"], f1=row["f1"], judged=row["judged"], status=row["status"],
            judge_control=judge_controls.get(scorer),
            baselines={k.removeprefix(contract.BASELINE_COLUMN_PREFIX): v for k, v in row.items()
                       if k.startswith(contract.BASELINE_COLUMN_PREFIX)})
    if random_weights:
        add("random_weights_simulation", random_weights["score"], judges.get("simulator"),
            control_variant=random_weights["_variant"], method="the same unit's simulation score on the subject "
            "model with re-initialized weights (the random-weight control)")
    return rows


def _by_unit(frame: pl.DataFrame | None) -> dict[int, dict]:
    return {} if frame is None else {int(r["neuron"]): r for r in frame.iter_rows(named=True)}


def export_neuronpedia(storage_dir: str | os.PathLike, out_dir: str | os.PathLike, *, model_id: str, variant: str,
                       set_name: str | None = None, layers: Iterable[int] | None = None,
                       runs: Mapping[int, Mapping] | None = None, about: Mapping[str, Any] | None = None,
                       creator_id: str = "ndx-pipeline") -> NeuronpediaExport:
    """Write `variant`'s layers (default: every layer with activation records) in Neuronpedia's export layout
    under `out_dir/<model_id>/`. `runs`: layer → stage → the run that wrote it (`defs.provenance.stage_runs`), for
    the scores' lineage; `about`: what the files cannot say (subject_model, layers, neurons_per_layer, dimension)."""
    storage, about = Path(storage_dir), dict(about or {})
    set_name = set_name or variant
    chosen = sorted(layers) if layers is not None else variant_layers(storage, contract.ACTIVATION_RECORDS, variant)
    if not chosen:
        raise NdxInputError(f"variant {variant} has no activation_records under {storage}: run it first.")
    root = Path(out_dir).expanduser() / model_id
    result = NeuronpediaExport(root)
    corpus_path = asset_path(storage, contract.CORPUS)
    documents = (read_parquet(corpus_path, "corpus") if corpus_path.exists()
                 else pl.DataFrame(schema=contract.CORPUS_SCHEMA))
    source_of_doc = dict(zip(documents["doc_id"].to_list(), documents["source"].to_list()))
    data_source = str(about.get("corpus") or "ndx-pipeline corpus")
    controls = read_controls(storage, variant)
    control = f"{variant}.random-weights"
    used_docs: set[str] = set()
    for layer in chosen:
        records = read_asset_if_any(storage, contract.ACTIVATION_RECORDS, layer, variant)
        if records is None:
            raise NdxInputError(f"layer {layer} of variant {variant} has no activation_records: run it first.")
        records = records.with_columns(pl.lit(variant).alias("_scope"))
        tokens = _by_unit(read_asset_if_any(storage, contract.OUTPUT_TOKENS, layer, variant))
        explanations = read_asset_if_any(storage, contract.EXPLANATIONS, layer, variant)
        kept = ({int(r["neuron"]): r for r in contract.usable(explanations).iter_rows(named=True)}
                if explanations is not None else {})
        scores = _by_unit(read_asset_if_any(storage, contract.SCORES, layer, variant))
        scorer_scores = {name: _by_unit(read_asset_if_any(storage, asset, layer, variant))
                         for name, (_, asset) in contract.SCORER_ASSETS.items()}
        # the model that judged, per scorer and for the simulation: one column of their files is enough
        named = {name: (judged, "scorer") for name, (judged, _) in contract.SCORER_ASSETS.items()}
        named["simulator"] = (contract.SIMULATIONS, "simulator")
        judges = {}
        for name, (asset, column) in named.items():
            found = read_asset_if_any(storage, asset, layer, variant, columns=[column])
            if found is not None and len(found[column].drop_nulls()):
                judges[name] = str(found[column].drop_nulls()[0])
        random_weights = _by_unit(read_asset_if_any(storage, contract.SCORES, layer, control))
        for r in random_weights.values():
            r["_variant"] = control
        ids = source_ids(layer, set_name)
        rows: dict[int, dict[str, list]] = {sign: {k: [] for k in (FEATURES, ACTIVATIONS, EXPLANATIONS, SCORES,
                                                                    SIDECAR)} for sign in ids}
        for (unit,), unit_rows in sorted(records.group_by(["neuron"]), key=lambda kv: contract.unit_index(kv[0][0])):
            unit = int(unit)
            index, sign = contract.unit_index(unit)
            if unit_rows["unit_kind"][0] == contract.DICTIONARY_LATENT:
                sign = 1
            source, into = ids[sign], rows[sign]
            windowed = unit_rows.filter(pl.col("tokens").is_not_null() & (pl.col("tokens").list.len() > 0))
            into[FEATURES].append(_feature_row(model_id, source, index, unit_rows, tokens.get(unit), layer))
            activation_ids = []
            for r in windowed.iter_rows(named=True):
                row = _activation_row(r, model_id, source, index, creator_id,
                                      source_of_doc.get(r["doc_id"]) or data_source)
                into[ACTIVATIONS].append(row)
                activation_ids.append(row["id"])
            used_docs.update(unit_rows["doc_id"].drop_nulls().to_list())
            records_out = []
            for r in unit_rows.iter_rows(named=True):
                entry = {k: r[k] for k in RECORD_FIELDS}
                has_window = r["tokens"] is not None and len(r["tokens"]) > 0
                entry["activation_id"] = (f"{variant}/{layer}/{unit}/{r['kind']}/{r['rank']}" if has_window
                                          else None)
                entry["tokens"] = None if r["tokens"] is None or has_window else list(r["tokens"])
                entry["activations"] = None if r["activations"] is None or has_window else list(r["activations"])
                records_out.append(_jsonable(entry))
            sidecar = {"modelId": model_id, "layer": source, "index": str(index), "variant": variant,
                       "unit": unit, "records": records_out}
            if unit in tokens:
                sidecar["output_tokens"] = _jsonable(tokens[unit])
            explanation = kept.get(unit)
            if explanation is not None:
                row = {"id": explanation["explanation_id"], "modelId": model_id, "layer": source,
                       "index": str(index), "description": explanation["explanation"],
                       "explanationModelName": explanation["explainer"], "typeName": EXPLANATION_TYPE,
                       "authorId": creator_id}
                into[EXPLANATIONS].append(row)
                sidecar["explanation"] = _jsonable({k: explanation[k] for k in contract.EXPLANATION_SCHEMA})
                into[SCORES].extend(_score_rows(
                    model_id, source, index,
                    {**row, "_variant": variant, "_explanation_id": explanation["explanation_id"],
                     "_prompt_sha256": explanation["prompt_sha256"]},
                    scores.get(unit), {n: s[unit] for n, s in scorer_scores.items() if unit in s},
                    random_weights.get(unit), controls, _lineage((runs or {}).get(layer)), judges))
            into[SIDECAR].append(sidecar)
        for sign, kinds in rows.items():
            if not kinds[FEATURES]:
                continue
            source = ids[sign]
            folder = root / source
            for kind, found in kinds.items():
                result.files += _write_batches(found, folder / kind)
            result.sources[source] = {kind: len(found) for kind, found in kinds.items()}
            hook = kinds[FEATURES][0]["hookName"]
            result.files.append(_write_jsonl([_model_row(model_id, about, creator_id)], folder / MODEL_FILE))
            result.files.append(_write_jsonl([{
                "id": source, "modelId": model_id, "setName": source.split("-", 1)[1], "hookName": hook,
                "hasDashboards": True, "visibility": "PUBLIC", "creatorId": creator_id,
                "dataset": data_source, "num_prompts": len(documents),
                "num_tokens_in_prompt": int(records["tokens"].list.len().max() or 0),
                "notes": f"exported by ndx-pipeline from variant {variant}, layer {layer}"}], folder / SOURCE_FILE))
    docs = documents.filter(pl.col("doc_id").is_in(sorted(used_docs)))
    result.files += [_write_corpus(docs, root / CORPUS_FILE)]
    return result


def _model_row(model_id: str, about: Mapping, creator_id: str) -> dict:
    return {"id": model_id, "displayName": str(about.get("subject_model") or model_id),
            "displayNameShort": model_id, "creatorId": creator_id, "layers": about.get("layers"),
            "neuronsPerLayer": about.get("neurons_per_layer"), "dimension": about.get("dimension"),
            "visibility": "PUBLIC", "inferenceEnabled": False, "instruct": False}


def _write_corpus(docs: pl.DataFrame, path: Path) -> Path:
    """The documents the windows come from, added to those an earlier export of another variant left there."""
    known = {d["doc_id"]: d for d in read_rows(path)} if path.exists() else {}
    known.update({d["doc_id"]: d for d in docs.select("doc_id", "source", "text").iter_rows(named=True)})
    return _write_gzip("".join(json.dumps(known[k], ensure_ascii=False) + "\n" for k in sorted(known)), path)


# ------------------------------------------------------------------------------------------------ import


@dataclass
class ImportedNeuronpedia:
    records: pl.DataFrame  # activation_records rows (RECORD_SCHEMA)
    corpus: pl.DataFrame  # the documents the rows point at
    explanations: pl.DataFrame  # EXPLANATION_SCHEMA rows, one per unit explained
    output_tokens: pl.DataFrame  # OUTPUT_TOKENS_SCHEMA rows, for units whose features carry pos/neg tokens

    def layers(self) -> list[int]:
        return sorted(int(x) for x in self.records["layer"].unique())


def source_folders(path: str | os.PathLike) -> list[Path]:
    """The source folders (holding `features/` or `activations/`) at or below `path`."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise NdxInputError(f"Neuronpedia export {root} is not a folder.")
    found = sorted({p.parent for kind in (FEATURES, ACTIVATIONS) for p in root.rglob(kind) if p.is_dir()})
    if not found:
        raise NdxInputError(f"{root} holds no Neuronpedia source folder (one with features/ or activations/).")
    return found


def _layer_of(source: str, folder: Path) -> int:
    head = source.split("-", 1)[0]
    if not head.isdigit():
        raise NdxInputError(f"source {source!r} ({folder}) does not start with its layer (<layer>-<set>).")
    return int(head)


def _unit_id(index: str, source: str, where: Path) -> int:
    if not str(index).isdigit():
        raise NdxInputError(f"{where}: index {index!r} is not a non-negative integer.")
    return contract.negative_id(int(index)) if source.endswith(NEGATIVE_SET_SUFFIX) else int(index)


def _windowless(entry: Mapping) -> tuple[list | None, list | None]:
    return entry.get("tokens"), [_float(v) for v in entry["activations"]] if entry.get("activations") else None


def _records_with_sidecar(sidecars: list[dict], activations: Mapping[str, dict], folder: Path) -> list[dict]:
    rows = []
    for unit in sidecars:
        for entry in unit["records"]:
            row = {k: entry.get(k) for k in RECORD_FIELDS}
            for k, dtype in contract.RECORD_SCHEMA.items():
                if dtype in (pl.Float32, pl.Float64) and k in row:
                    row[k] = _float(row[k])
            if row.get("quantile_boundaries") is not None:
                row["quantile_boundaries"] = [_float(v) for v in row["quantile_boundaries"]]
            if entry.get("activation_id"):
                window = activations.get(entry["activation_id"])
                if window is None:
                    raise NdxInputError(f"{folder}: activation {entry['activation_id']} named by the ndx sidecar is "
                                        "not in activations/.")
                row["tokens"], row["activations"] = list(window["tokens"]), [float(v) for v in window["values"]]
            else:
                row["tokens"], row["activations"] = _windowless(entry)
            rows.append(row)
    return rows


def _records_without_sidecar(activations: list[dict], source: str, layer: int, folder: Path,
                             docs: dict[str, dict]) -> list[dict]:
    """Rows from Neuronpedia's activation rows alone: each unit's windows as its top records (by max value), each
    window a document of its own; moments from the values shown."""
    by_unit: dict[int, list[dict]] = {}
    for a in activations:
        by_unit.setdefault(_unit_id(a["index"], source, folder), []).append(a)
    rows = []
    for unit, found in sorted(by_unit.items()):
        found.sort(key=lambda a: -float(a["maxValue"]))
        values = np.asarray([v for a in found for v in a["values"]], dtype=np.float64)
        for rank, a in enumerate(found):
            doc_id, text = window_document(a["tokens"])
            docs.setdefault(doc_id, {"doc_id": doc_id, "source": str(a.get("dataSource") or folder), "text": text})
            rows.append({"layer": layer, "neuron": unit, "kind": contract.TOP, "rank": rank, "doc_id": doc_id,
                         "token_start": 0, "tokens": list(a["tokens"]), "activations": [float(v) for v in a["values"]],
                         "window_index": None, "char_start": 0, "char_end": len(text),
                         "max_activation": float(a["maxValue"]), "neuron_mean": float(values.mean()),
                         "neuron_variance": float(values.var()), "neuron_max": float(values.max()),
                         "neuron_token_count": int(values.size), "quantile_boundaries": None, "error": None,
                         **{k: v[0] for k, v in contract.describe_ids([unit]).items()}})
    return rows


def import_neuronpedia(path: str | os.PathLike, layers: Iterable[int] | None = None) -> ImportedNeuronpedia:
    """Read a Neuronpedia-shaped export (ours, or one made elsewhere) as activation records, explanations and
    output tokens. With our `ndx/` sidecar the rows are exactly the exported ones."""
    wanted = None if layers is None else {int(x) for x in layers}
    records: list[dict] = []
    explanations: list[dict] = []
    output_tokens: list[dict] = []
    docs: dict[str, dict] = {}
    for folder in source_folders(path):
        source = folder.name
        layer = _layer_of(source, folder)
        if wanted is not None and layer not in wanted:
            continue
        corpus = folder.parent / CORPUS_FILE
        if corpus.exists():
            for d in read_rows(corpus):
                docs.setdefault(d["doc_id"], d)
        activations = read_batches(folder / ACTIVATIONS)
        sidecars = read_batches(folder / SIDECAR)
        if sidecars:
            records += _records_with_sidecar(sidecars, {a["id"]: a for a in activations}, folder)
            explanations += [{**s["explanation"], "seconds": _float(s["explanation"].get("seconds"))}
                             for s in sidecars if s.get("explanation")]
            output_tokens += [s["output_tokens"] for s in sidecars if s.get("output_tokens")]
            continue
        records += _records_without_sidecar(activations, source, layer, folder, docs)
        for e in read_batches(folder / EXPLANATIONS):
            unit = _unit_id(e["index"], source, folder)
            explanations.append({"layer": layer, "neuron": unit, "explanation_id": contract.explanation_id(layer, unit),
                                 "explanation": e["description"], "explainer": e.get("explanationModelName"),
                                 "status": contract.STATUS_OK})
        for f in read_batches(folder / FEATURES):
            if f.get("pos_str"):
                unit = _unit_id(f["index"], source, folder)
                output_tokens.append({"layer": layer, "neuron": unit, "promoted_tokens": f["pos_str"],
                                      "promoted_logits": f["pos_values"], "suppressed_tokens": f["neg_str"],
                                      "suppressed_logits": f["neg_values"], "direction": "imported (Neuronpedia)",
                                      **{k: v[0] for k, v in contract.describe_ids([unit]).items()}})
    if not records:
        raise NdxInputError(f"{path} holds no activations for layers {sorted(wanted or [])}.")
    frame = pl.DataFrame(records, schema=contract.RECORD_SCHEMA)
    used = set(frame["doc_id"].drop_nulls().to_list())
    corpus = pl.DataFrame([docs[d] for d in sorted(docs) if d in used], schema=contract.CORPUS_SCHEMA)
    return ImportedNeuronpedia(frame, corpus, pl.DataFrame(explanations, schema=contract.EXPLANATION_SCHEMA),
                               pl.DataFrame(output_tokens, schema=contract.OUTPUT_TOKENS_SCHEMA))


def write_imported_explanations(storage_dir: str | os.PathLike, imported: ImportedNeuronpedia, *,
                                variant: str) -> list[tuple[str, int, str, Path]]:
    """Write the imported explanations and output tokens of each layer (those the export has) into `variant`;
    (asset, layer, variant, path) of every file written, for the caller to record as materializations."""
    written = []
    for layer in imported.layers():
        for asset, frame in ((contract.EXPLANATIONS, imported.explanations),
                             (contract.OUTPUT_TOKENS, imported.output_tokens)):
            part = frame.filter(pl.col("layer") == layer)
            if len(part):
                written.append((asset, layer, variant,
                                write_parquet_atomic(part, asset_path(storage_dir, asset, layer, variant))))
    return written
