"""Metadata a researcher reads in the UI: column schemas, score histograms, best and worst neurons, baselines side by
side, LLM accounting, content hashes."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from ndx_pipeline.core.contract import PLANTED_TRUE, PLANTED_WRONG, baseline_column, stored_dtype
from ndx_pipeline.core.llm.cache import LLMStats
from ndx_pipeline.core.llm.errors import RecordableLLMError
from ndx_pipeline.core.method.controls import separation, verdict
from ndx_pipeline.core.variants import control_name, control_of
from ndx_pipeline.reports.controls import read_controls


def column_schema(frame: pl.DataFrame) -> dg.TableSchema:
    """The columns as the file stores them (text held as codes is stored as strings)."""
    return dg.TableSchema(columns=[dg.TableColumn(name, str(stored_dtype(dtype)))
                                   for name, dtype in frame.schema.items()])


def file_digest(path: Path) -> str:
    """sha256 of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(paths: list[Path], digests: Mapping[Path, str] | None = None) -> str:
    """The data version of a materialization: sha256 over the names and byte digests (`file_digest`) of the files
    it wrote; `digests` holds those already taken (by the thread that wrote the file, while its bytes were fresh)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=str):
        h.update(str(p.name).encode())
        h.update(((digests or {}).get(p) or file_digest(p)).encode())
    return h.hexdigest()[:24]


def score_histogram(scores: pl.Series, bins: int = 10) -> str:
    """A markdown histogram of scores over [-1, 1] (NaN counted apart)."""
    valid = [s for s in scores.to_list() if s is not None and s == s]
    width = 2.0 / bins
    counts = [0] * bins
    for s in valid:
        counts[min(bins - 1, int((s + 1.0) / width))] += 1
    top = max(counts) or 1
    lines = ["| score | neurons | |", "|---|---:|---|"]
    for i, c in enumerate(counts):
        lo = -1.0 + i * width
        lines.append(f"| {lo:+.1f} … {lo + width:+.1f} | {c} | {'█' * round(20 * c / top)} |")
    lines.append(f"| undefined (NaN) | {len(scores) - len(valid)} | |")
    return "\n".join(lines)


def neuron_table(frame: pl.DataFrame, best: bool, n: int = 10) -> dg.TableMetadataValue:
    valid = frame.filter(pl.col("score").is_not_nan() & pl.col("score").is_not_null())
    chosen = valid.sort("score", descending=best).head(n)
    schema = dg.TableSchema(columns=[dg.TableColumn("neuron", "int"), dg.TableColumn("score", "float"),
                                     dg.TableColumn("explanation", "string")])
    records = [dg.TableRecord({"neuron": int(r["neuron"]), "score": round(float(r["score"]), 4),
                               "explanation": r["explanation"] or ""}) for r in chosen.iter_rows(named=True)]
    return dg.MetadataValue.table(records, schema=schema)


def candidates_table(frame: pl.DataFrame, n: int = 30) -> dg.TableMetadataValue:
    """Best-of-k candidates side by side: neuron, candidate, calibration score, kept or not, explanation."""
    schema = dg.TableSchema(columns=[dg.TableColumn("neuron", "int"), dg.TableColumn("candidate", "int"),
                                     dg.TableColumn("calibration_score", "float"), dg.TableColumn("kept", "bool"),
                                     dg.TableColumn("explanation", "string")])
    records = []
    for r in frame.sort(["neuron", "candidate"]).head(n).iter_rows(named=True):
        cal = r.get("calibration_score")
        records.append(dg.TableRecord({
            "neuron": int(r["neuron"]), "candidate": int(r["candidate"]),
            "calibration_score": round(float(cal), 4) if cal is not None and cal == cal else None,
            "kept": bool(r.get("selected")), "explanation": r.get("explanation") or r.get("error") or ""}))
    return dg.MetadataValue.table(records, schema=schema)


def file_metadata(frame: pl.DataFrame, path: Path) -> dict:
    """Where a file is and what its columns are: on every asset's every partition."""
    return {"rows": len(frame), "path": dg.MetadataValue.path(str(path)), "dagster/column_schema": column_schema(frame)}


def finite_mean(values: pl.Series) -> float:
    finite = values.cast(pl.Float64).drop_nulls().drop_nans()
    return round(float(finite.mean()), 4) if len(finite) else float("nan")


def llm_accounting(backend, before: dict, started: float) -> dict:
    """One partition's LLM work on a backend shared by the run: requests, cache hits, tokens, failures, wall time;
    and the precision an in-process model computed in (with `auto`: the calibration's timings too)."""
    delta = LLMStats.difference(backend.stats.snapshot(), before)
    dtype = backend.dtype  # (an in-process model with `dtype: auto` has chosen by now: `precision` says how)
    return {
        **({"llm_dtype": dtype} if dtype else {}),
        **(backend.precision.metadata() if backend.precision else {}),
        "llm_requests": int(delta["requests"]), "llm_calls": int(delta["calls"]),
        "llm_retries": int(delta["retries"]), "llm_cache_hits": int(delta["cache_hits"]),
        "llm_failures": int(delta["failures"]), "prompt_tokens": int(delta["prompt_tokens"]),
        "completion_tokens": int(delta["completion_tokens"]),
        "llm_cache_hit_rate": float("nan") if delta["cache_hit_rate"] is None else round(delta["cache_hit_rate"], 4),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


def llm_cost_per(accounting: dict, counts: Mapping[str, int]) -> dict:
    """What one partition's `llm_accounting` sent per item, for each kind of item counted in `counts` (e.g.
    {"excerpt": 96, "unit": 6}): `llm_requests_per_<item>` and `prompt_tokens_per_<item>`, so a user sees the
    cost before scaling up. Answers from the cache cost nothing (a rerun shows 0)."""
    out = {}
    for item, count in counts.items():
        if count:
            out[f"llm_requests_per_{item}"] = round(accounting["llm_requests"] / count, 3)
            out[f"prompt_tokens_per_{item}"] = round(accounting["prompt_tokens"] / count, 1)
    return out


def simulator_scale(backend, mode: str, simulated: int) -> dict:
    """The value scale the all-at-once simulator's prompts asked for: "0–10", or "0–9" on a server that writes
    "10" as two tokens (`ten_probe`, README); nothing for the JSON simulator or when nothing was simulated."""
    if mode != "all_at_once" or not simulated:
        return {}
    try:
        return {"simulator_scale": f"0–{backend.simulation_top_value()}"}
    except RecordableLLMError:  # the server could not say (then every excerpt failed, with the reason)
        return {}


def baseline_metadata(frame: pl.DataFrame, names) -> dict:
    """Per baseline: its mean score, and how many neurons our explanation beats it on."""
    out = {}
    ours = frame["score"].to_numpy()
    for name in names:
        col = baseline_column(name)
        if col not in frame.columns:
            continue
        theirs = frame[col].to_numpy()
        both = np.isfinite(ours) & np.isfinite(theirs)
        out[f"mean_{col}"] = round(float(np.nanmean(theirs)), 4) if np.isfinite(theirs).any() else float("nan")
        out[f"beats_{name}"] = f"{int((ours[both] > theirs[both]).sum())} of {int(both.sum())} neurons"
    return out


def variant_control(storage: Path, variant: str) -> dict | None:
    """The judges' controls of `variant`'s planted control, from its files (read once per step, not per layer);
    None for a control itself (its own partitions say it) or when none was run."""
    return None if control_of(variant) else read_controls(storage, control_name(variant))


def judge_control(found: dict | None, frame: pl.DataFrame, variant: str,
                  judge: str) -> tuple[dict | None, str | None]:
    """(the judge's separation over planted units, the variant they are in): this partition's own planted units
    when it has them (a control variant), else those of the variant's control (`found`: `variant_control`);
    (None, None) when there is none."""
    true, wrong = baseline_column(PLANTED_TRUE), baseline_column(PLANTED_WRONG)
    if {true, wrong} <= set(frame.columns):
        return separation(frame[true].to_numpy(), frame[wrong].to_numpy()), variant
    return (found["judges"].get(judge), found["control"]) if found else (None, None)


def control_metadata(found: dict | None, control: str | None, judge: str) -> dict:
    """What a score partition says of its judge's control (nothing when no control was run)."""
    if not found or not found.get("units"):
        return {}
    return {"controls": control, "judge_auc": float(found["auc"]),
            "judge_auc_interval": f"[{found['auc_lo']:.3f}, {found['auc_hi']:.3f}]",
            "judge_verdict": f"{judge} on {found['units']} planted units: {verdict(found)}"}
