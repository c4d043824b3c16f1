"""A static neuron viewer: per variant, `index.html` over its scored layers and one page per unit; over the variants,
an index and a comparison page. Every page is opened from disk.

Python reads the contract's files and prepares plain values (scores and their classes, heatmap colours, histogram
geometry, lineage rows); the Jinja2 templates in `templates/` turn them into HTML with autoescaping on, so every
piece of corpus or model text is escaped where it is written. The pages fetch nothing: the CSS and JavaScript of
`static/` are inlined into each page, and data a script needs is embedded as JSON in
`<script type="application/json">` with `<`, `>` and `&` written as `\\u003c` … so corpus text can never close the
element. Files are written to a temporary name and renamed into place.

Layout under `<storage>/neuron_viewer` (`storage.viewer_dir`):

    index.html                        every variant that has scores: units scored and mean score per layer
    compare.html                      the variants side by side, layer by layer, and the units two variants share
    <variant>/index.html              every unit of every layer of the variant whose pages are written
    <variant>/<layer>/<unit>.html     one page per unit, linking to the same unit's page in the other variants

Two variants hold the same unit when their layer, unit kind (neuron or dictionary latent) and unit id are equal:
neuron 5 of `neurons` and of `neurons-both`, never latent 5 of a dictionary and neuron 5.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from ndx_pipeline.core.contract import (
    ACTIVATION_RECORDS,
    BASELINE_COLUMN_PREFIX,
    EXPLANATIONS,
    MLP_NEURON,
    RANDOM,
    RECORD_SCHEMA,
    SCORE_RANDOM,
    SCORE_TOP,
    SCORED_SPLITS,
    SCORER_ASSETS,
    SCORES,
    SIMULATED_BASELINES,
    SIMULATIONS,
    STATUS_OK,
    TOP,
    baseline_column,
)
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.method.scoring import pooled_correlation
from ndx_pipeline.core.models import BUNDLED_MODEL_NOTE, is_bundled
from ndx_pipeline.core.storage import asset_path, stored_variants, viewer_dir, write_text_atomic
from ndx_pipeline.core.variants import control_of
from ndx_pipeline.reports.compare import ALL, compare
from ndx_pipeline.reports.controls import controls_text
from ndx_pipeline.reports.lineage import (
    Documents,
    LayerData,
    available_layers,
    json_safe,
    neuron_lineage,
    unit_of,
)

PACKAGE = "ndx_pipeline.reports"  # templates/ and static/ are its package data
TOP_TOKENS = 8
HISTOGRAM_BINS = 40
# Heatmap and histogram colours (r,g,b): real activations, negative ones, simulated values.
REAL_RGB, NEGATIVE_RGB, SIMULATED_RGB = "245,124,0", "47,111,223", "126,87,194"
SCORED_TITLES = {SCORE_TOP: "Top-activating excerpts", SCORE_RANDOM: "Random excerpts"}


# ---------------------------------------------------------------------------------------------------- paths & values


def neuron_page_path(out_dir: str | os.PathLike, layer: int, neuron: int) -> Path:
    return Path(out_dir) / str(int(layer)) / f"{int(neuron)}.html"


def script_json(value: Any) -> Markup:
    """JSON that is safe inside `<script type="application/json">`: no `<`, `>` or `&` survive literally (nor
    U+2028/2029). Markup because a script element's content is not entity-decoded: autoescaping would corrupt the
    JSON's quotes, and with those three characters escaped here the text cannot close or open any element."""
    text = json.dumps(json_safe(value), ensure_ascii=False, allow_nan=False)
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
                  .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def fmt_score(x: Any, digits: int = 3) -> str:
    x = _num(x)
    return "n/a" if x is None else f"{x:.{digits}f}"


def score_class(x: Any) -> str:
    x = _num(x)
    if x is None:
        return "s-na"
    if x >= 0.5:
        return "s-hi"
    if x >= 0.2:
        return "s-mid"
    if x >= 0:
        return "s-lo"
    return "s-neg"


# ---------------------------------------------------------------------------------------------------- templates


@lru_cache(maxsize=None)
def static_text(name: str) -> Markup:
    """A file of this package's `static/` folder, to inline into a page's `<style>` or `<script>`. Markup because
    it is our own CSS/JS, not data, and entities are not decoded there; it must not hold a closing tag."""
    text = (resources.files(PACKAGE) / "static" / name).read_text(encoding="utf-8")
    if re.search(r"</(style|script)", text, re.IGNORECASE):
        raise ValueError(f"static/{name} holds a closing </style> or </script> tag and cannot be inlined")
    return Markup(text)


@lru_cache(maxsize=1)
def environment() -> Environment:
    """The templates' environment: autoescaping on, an undefined name an error, `static(name)` the inlined files,
    the `score` filter a score as shown (`n/a` when undefined) and `fmt` Python's `format` (`x|fmt(".3g")`)."""
    env = Environment(loader=PackageLoader(PACKAGE, "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                      # A missing value shows as nothing, never as "None".
                      finalize=lambda v: "" if v is None else v)
    env.globals.update(static=static_text, score_class=score_class, real_rgb=REAL_RGB, negative_rgb=NEGATIVE_RGB,
                       simulated_rgb=SIMULATED_RGB, zip=zip)
    env.filters.update(score=fmt_score, fmt=format)
    return env


def _render(template: str, **values: Any) -> str:
    return environment().get_template(template).render(**values)


# ---------------------------------------------------------------------------------------------------- heatmaps


def _heat(value: float, scale: float, rgb: str) -> str:
    if not scale > 0 or value is None or not math.isfinite(value) or value == 0:
        return ""
    alpha = min(1.0, abs(value) / scale)
    return f"background:rgba({rgb},{alpha * 0.85:.3f})" if alpha >= 0.02 else ""


def heatmap(tokens: Sequence[str], activations: Sequence[float] | None, pos_scale: float, neg_scale: float,
            simulated: Sequence[float] | None = None, color: str = "real",
            sim_range: tuple[float, float] = (0.0, 10.0)) -> list[dict]:
    """One excerpt as token cells for the `heatmap` macro: each cell's token and attributes (`data-a` / `data-s`
    hold the exact values for the tooltip, `data-m` the share of the neuron's max, `style` the colour).

    color="real": orange by activation / pos_scale (blue for negatives by / neg_scale);
    color="sim": purple by where the simulated value sits in `sim_range` (the neuron's lowest … highest simulated
    value; the correlation score ignores offset and scale, so this is the contrast that matters).
    """
    cells = []
    for i, tok in enumerate(tokens):
        a = None if activations is None else _num(activations[i])
        s = None if simulated is None else _num(simulated[i])
        attrs = {}
        if a is not None:
            attrs["data-a"] = f"{a:.4g}"
            if pos_scale > 0 and a > 0:
                attrs["data-m"] = f"{100 * a / pos_scale:.0f}%"
        if s is not None:
            attrs["data-s"] = f"{s:.2f}"
        if color == "sim":
            style = _heat((s or 0.0) - sim_range[0], sim_range[1] - sim_range[0], SIMULATED_RGB)
        elif a is not None and a < 0:
            style = _heat(a, neg_scale, NEGATIVE_RGB)
        else:
            style = _heat(a or 0.0, pos_scale, REAL_RGB)
        if style:
            attrs["style"] = style
        cells.append({"token": tok, "attrs": attrs})
    return cells


# ---------------------------------------------------------------------------------------------------- histogram


def histogram_svg(random_values: Sequence[float], top_values: Sequence[float], mean: float | None = None,
                  bins: int = HISTOGRAM_BINS, width: int = 760, height: int = 210) -> dict | None:
    """The geometry of the histogram the `histogram_svg` macro draws (None without any value): token activations
    of the random windows and of the top windows side by side in each bin, counts on a log scale (each bar's exact
    count and range on hover)."""
    rv = np.asarray([v for v in random_values if v is not None and math.isfinite(v)], dtype=np.float64)
    tv = np.asarray([v for v in top_values if v is not None and math.isfinite(v)], dtype=np.float64)
    both = np.concatenate([rv, tv])
    if both.size == 0:
        return None
    lo, hi = float(both.min()), float(both.max())
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    rc, _ = np.histogram(rv, edges)
    tc, _ = np.histogram(tv, edges)
    top_count = max(int(rc.max(initial=0)), int(tc.max(initial=0)), 1)
    peak = math.log10(1 + top_count)
    ml, mr, mt, mb = 48, 12, 10, 36
    pw, ph = width - ml - mr, height - mt - mb
    bw = pw / bins

    def y(count: float) -> float:
        return ph * math.log10(1 + count) / peak

    ticks, tick = [], 1
    while tick <= top_count * 10:
        if ph - y(tick) >= -1:
            ticks.append({"y": ph - y(tick), "count": tick})
        tick *= 10
    series = []
    for offset, counts, rgb, alpha, label, n in ((0.0, rc, NEGATIVE_RGB, ".7", "random windows", rv.size),
                                                 (0.5, tc, REAL_RGB, ".85", "top windows", tv.size)):
        bars = [{"x": (i + offset) * bw + 0.3, "y": ph - max(1.5, y(int(c))), "width": max(bw / 2 - 0.6, 0.8),
                 "height": max(1.5, y(int(c))), "count": int(c), "lo": float(edges[i]), "hi": float(edges[i + 1])}
                for i, c in enumerate(counts) if c != 0]
        series.append({"fill": f"rgba({rgb},{alpha})", "label": label, "tokens": int(n), "bars": bars})
    labels = [lo, hi]
    if lo < 0 < hi and min(-lo, hi) > 0.08 * (hi - lo):
        labels.append(0.0)
    shown_mean = mean if mean is not None and math.isfinite(mean) and lo <= mean <= hi else None
    return {"width": width, "height": height, "left": ml, "top": mt, "plot_width": pw, "plot_height": ph,
            "ticks": ticks, "series": series,
            "labels": [{"x": pw * (v - lo) / (hi - lo), "value": v} for v in labels],
            "mean": None if shown_mean is None else {"x": pw * (shown_mean - lo) / (hi - lo), "value": shown_mean}}


# ---------------------------------------------------------------------------------------------------- index data


def top_tokens(records: pl.DataFrame, k: int = TOP_TOKENS) -> list[str]:
    """The distinct tokens (stripped) with the highest activations in a neuron's top windows, strongest first."""
    best: dict[str, float] = {}
    top = records.filter(pl.col("kind") == TOP) if "kind" in records.columns else records
    for toks, acts in zip(top["tokens"].to_list(), top["activations"].to_list()):
        for t, a in zip(toks, acts):
            key = t.strip()
            if key and a is not None and a > best.get(key, float("-inf")):
                best[key] = a
    ranked = sorted(best.items(), key=lambda kv: -kv[1])
    return [t for t, a in ranked[:k] if a > 0]


def baseline_columns(scores: pl.DataFrame) -> list[str]:
    """Score columns beyond the pooled score: the per-split scores, plus every numeric `baseline_<name>` column."""
    cols = [c for c in SCORED_SPLITS if c in scores.columns]
    cols += [c for c in scores.columns if c.startswith(BASELINE_COLUMN_PREFIX) and scores.schema[c].is_numeric()]
    return cols


def bundled_llm_used(storage_dir: Path, layers: list[int], variant: str) -> bool:
    """Whether the bundled model explained or simulated any of these layers of `variant` (read from the stored
    rows)."""
    for layer in layers:
        for asset, col in ((EXPLANATIONS, "explainer"), (SIMULATIONS, "simulator")):
            path = asset_path(storage_dir, asset, layer, variant)
            if path.exists() and any(is_bundled(v) for v in
                                     pl.read_parquet(path, columns=[col])[col].drop_nulls().unique()):
                return True
    return False


def scorer_scores(storage_dir: Path, layer: int, variant: str) -> dict[str, pl.DataFrame]:
    """scorer → its scores of the layer of `variant`, for the scorers beside simulation that ran (a file with
    rows)."""
    out = {}
    for name, (_, asset) in SCORER_ASSETS.items():
        path = asset_path(storage_dir, asset, layer, variant)
        if path.exists():
            frame = pl.read_parquet(path)
            if len(frame):
                out[name] = frame
    return out


def scorer_summary(storage_dir: Path, layers: list[int], variant: str) -> list[dict]:
    """Per layer of `variant` and scorer that ran: neurons, how many got a score, and the mean score of our
    explanations and of each simulated baseline (the scorer's own floor)."""
    rows = []
    for layer in layers:
        for name, frame in scorer_scores(storage_dir, layer, variant).items():
            valid = [v for v in frame["score"].to_list() if _num(v) is not None]
            rows.append({"layer": layer, "scorer": name, "metric": frame["metric"][0].replace("_", " "),
                         "neurons": len(frame), "scored": len(valid), "mean": _mean(valid),
                         "baselines": [_mean([v for v in frame[baseline_column(b)].to_list() if _num(v) is not None])
                                       for b in SIMULATED_BASELINES]})
    return rows


def _index_rows(storage_dir: Path, layers: list[int], variant: str) -> tuple[list[dict], list[str]]:
    rows, extra = [], []
    for layer in layers:
        scores = pl.read_parquet(asset_path(storage_dir, SCORES, layer, variant))
        for c in baseline_columns(scores):
            if c not in extra:
                extra.append(c)
        # our explanation's score by each scorer
        for name, frame in scorer_scores(storage_dir, layer, variant).items():
            scores = scores.join(frame.select("neuron", pl.col("score").alias(name)), on="neuron", how="left")
            if name not in extra:
                extra.append(name)
        rec_path = asset_path(storage_dir, ACTIVATION_RECORDS, layer, variant)
        wanted = ["neuron", "kind", "tokens", "activations", "unit_kind"]
        records = (pl.read_parquet(rec_path, columns=[c for c in wanted if c in pl.read_parquet_schema(rec_path)])
                   if rec_path.exists() else pl.DataFrame(schema={k: RECORD_SCHEMA[k] for k in wanted}))
        for row in scores.sort("neuron").iter_rows(named=True):
            mine = records.filter(pl.col("neuron") == row["neuron"])
            rows.append(row | {"layer": layer, "top_tokens": top_tokens(mine),
                               "label": unit_of(mine, row["neuron"])["label"]})
    return rows, extra


def _data_number(x: float | None) -> str:
    """A number as a `data-*` attribute for the page's script: '' when undefined."""
    return "" if x is None else repr(x)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


# ---------------------------------------------------------------------------------------------------- index page


def render_index(rows: list[dict], extra: list[str], layers: list[int], note: str | None = None,
                 scorers: list[dict] | None = None, *, variant: str, variants_href: str | None = None,
                 controls: list[str] | None = None) -> str:
    """A variant's index page; `variants_href` links to the index of every variant (None: no link)."""
    baselines = [c for c in extra if c.startswith(BASELINE_COLUMN_PREFIX)]
    table = []
    for r in rows:
        status = r.get("status") or ""
        extras = [_num(r.get(c)) for c in extra]
        table.append({
            "layer": r["layer"], "neuron": r["neuron"], "label": r["label"],
            "score": _num(r.get("score")),
            "score_data": _data_number(_num(r.get("score"))), "explanation": r.get("explanation"),
            "explanation_lower": (r.get("explanation") or "").lower(),
            "tokens": r["top_tokens"],
            "tokens_json": json.dumps([t.lower() for t in r["top_tokens"]], ensure_ascii=False),
            "extras": [{"value": v, "data": _data_number(v)} for v in extras],
            "status": status, "status_short": status.split(":", 1)[0], "ok": status == STATUS_OK})
    summary = []
    for layer in layers:
        mine = [r for r in rows if r["layer"] == layer]
        vals = [s for r in mine if (s := _num(r.get("score"))) is not None]
        summary.append({
            "layer": layer, "neurons": len(mine), "scored": len(vals), "mean": _mean(vals),
            "median": float(np.median(vals)) if vals else None,
            "baselines": [_mean([v for r in mine if (v := _num(r.get(c))) is not None]) for c in baselines]})
    all_scores = [s for r in rows if (s := _num(r.get("score"))) is not None]
    return _render(
        "index.html.j2", variant=variant, variants_href=variants_href, note=note, layers=layers, rows=table,
        summary=summary, scorers=scorers or [], controls=controls or [],
        scorer_baselines=[b.replace("_", " ") for b in SIMULATED_BASELINES],
        extra_labels=[c.replace("_", " ") for c in extra],
        baseline_labels=[c.removeprefix(BASELINE_COLUMN_PREFIX).replace("_", " ") for c in baselines],
        neuron_count=len(rows), high_scores=sum(1 for s in all_scores if s >= 0.5), mean_score=_mean(all_scores))


def _pages_dir(storage_dir: Path, out_dir: str | os.PathLike | None, variant: str) -> tuple[Path, bool]:
    """The folder of a variant's pages (`out_dir`, default `viewer_dir(storage, variant)`), and whether it is the
    default one: only there do the pages sit beside the other variants' and under the index of every variant."""
    default = viewer_dir(storage_dir, variant)
    out = Path(out_dir) if out_dir is not None else default
    return out, out.resolve() == default.resolve()


def write_index(storage_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                layers: Iterable[int] | None = None, *, variant: str) -> Path:
    """(Re)write the `index.html` of `variant` over `layers` (default: every scored layer whose pages are in
    `out_dir`, so the per-layer `neuron_viewer` partitions can each rewrite the index without linking to pages not
    written yet). `out_dir` defaults to `viewer_dir(storage, variant)`."""
    storage_dir = Path(storage_dir)
    out, default = _pages_dir(storage_dir, out_dir, variant)
    have = available_layers(storage_dir, variant=variant)
    if layers is None:
        chosen = [x for x in have if (out / str(x)).is_dir()]
    else:
        chosen = sorted(set(int(x) for x in layers))
    missing = [x for x in chosen if x not in have]
    if missing:
        raise NdxInputError(f"layers {missing} of variant {variant} have no scores under {storage_dir}: "
                            "materialize them first.")
    rows, extra = _index_rows(storage_dir, chosen, variant)
    note = BUNDLED_MODEL_NOTE if bundled_llm_used(storage_dir, chosen, variant) else None
    page = render_index(rows, extra, chosen, note, scorer_summary(storage_dir, chosen, variant), variant=variant,
                        variants_href="../index.html" if default else None,
                        controls=controls_text(storage_dir, variant))
    return write_text_atomic(page, out / "index.html")


# ---------------------------------------------------------------------------------------------------- neuron page


def _excerpt_head(entry: Mapping, note: str) -> dict:
    """What the `excerpt_head` macro shows above an excerpt."""
    return {"excerpt_id": entry.get("excerpt_id") or "", "split": entry.get("split"), "doc_id": entry.get("doc_id"),
            "char_start": entry.get("char_start"), "char_end": entry.get("char_end"), "note": note}


def _prompt_text(prompt: Mapping) -> str:
    """The explainer prompt as its backend sent it (lineage's rebuild): the text the model read (an in-process
    model's chat template), or the messages sent (a chat API: no prefill); the template messages when the sent
    form could not be rebuilt."""
    sent = prompt.get("sent")
    if sent is not None and "text" in sent:
        return f"── the text the model read (its chat template, answer prefilled) ──\n{sent['text']} …"
    messages = sent["messages"] if sent is not None else prompt["messages"]
    parts = [f"── {m['role']} ──\n{m['content']}" for m in messages]
    prefix = sent.get("assistant_prefix") if sent is not None else prompt.get("assistant_prefix")
    if prefix:
        parts.append(f"── assistant (continues) ──\n{prefix} …")
    return "\n\n".join(parts)


def _scales(records: pl.DataFrame, excerpts: list[dict], stats: Mapping) -> tuple[float, float, float]:
    """(positive scale, negative scale, negative scale for the legend: 0 without negative values)."""
    all_acts = [a for acts in records["activations"].to_list() for a in acts] if len(records) else []
    all_acts += [a for e in excerpts for a in (e.get("true_activations") or []) if a is not None]
    pos_scale = max([_num(stats.get("max")) or 0.0] + [a for a in all_acts if a is not None] + [0.0])
    # Negatives share the positive scale, so tiny negative values stay pale.
    neg_scale = max([pos_scale] + [-a for a in all_acts if a is not None and a < 0])
    legend_neg = neg_scale if any(a is not None and a < 0 for a in all_acts) else 0.0
    return pos_scale, neg_scale, legend_neg


def _scored_sections(excerpts: list[dict], pos_scale: float, neg_scale: float) -> tuple[list[dict], tuple]:
    """The scored excerpts by split, real and simulated heatmaps side by side; and the simulated values' range."""
    sim_values = [v for e in excerpts for v in (e.get("simulated_activations") or []) if v is not None]
    sim_range = (min(sim_values, default=0.0), max(sim_values, default=10.0))
    if not sim_range[1] > sim_range[0]:
        sim_range = (0.0, 10.0)
    sections = []
    for split in SCORED_SPLITS:
        items = []
        for e in (e for e in excerpts if e.get("split") == split):
            true = [(_num(v) or 0.0) for v in e["true_activations"]]
            sim = [(_num(v) or 0.0) for v in e["simulated_activations"]]
            corr = pooled_correlation([true], [sim])
            corr_txt = f"r = {corr.value:.3f}" if corr.status == STATUS_OK else "r undefined"
            items.append({"head": _excerpt_head(e, f"{corr_txt} · max {max(true, default=0):.3g}"),
                          "real": heatmap(e["tokens"], true, pos_scale, neg_scale, simulated=sim),
                          "simulated": heatmap(e["tokens"], true, pos_scale, neg_scale, simulated=sim, color="sim",
                                               sim_range=sim_range)})
        if items:
            sections.append({"title": SCORED_TITLES[split], "excerpts": items})
    return sections, sim_range


SCORER_QUESTIONS = {"detection": "does the neuron fire on the excerpt?",
                    "fuzzing": "are the marked tokens what the explanation names?",
                    "embedding": "how close is the excerpt to the explanation (cosine similarity)?"}


def _judged_note(entry: Mapping, scorer: str) -> str:
    """What an excerpt's header says of one judgement: the truth, our explanation's verdict or similarity, and the
    baselines' on the same excerpt."""
    if scorer == "fuzzing":
        truth = "marks on its strongest tokens" if entry["label"] else "marks put elsewhere"
    else:
        truth = "activating" if entry["label"] else "non-activating"
    if entry.get("status") != STATUS_OK:
        return f"{truth} · failed: {entry.get('error') or 'no reason given'}"
    theirs = entry.get("baselines") or {}
    if entry.get("similarity") is not None:
        mine = f"similarity {entry['similarity']:.3f}"
        others = ", ".join(f"{b.replace('_', ' ')} {v:.3f}" for b, v in theirs.items() if v is not None)
    else:
        mine = f"verdict {int(entry['verdict'])} {'✓' if entry['correct'] else '✗'}"
        others = ", ".join(f"{b.replace('_', ' ')} {int(v)} {'✓' if v == entry['label'] else '✗'}"
                           for b, v in theirs.items() if v is not None)
    return f"truth: {truth} · ours: {mine}" + (f" · baselines: {others}" if others else "")


def _scorer_sections(scorers: Mapping, pos_scale: float, neg_scale: float) -> list[dict]:
    """Per scorer that ran: its scores (ours and the baselines'), and every excerpt it judged for our explanation
    as a heatmap of the real activations, the marked tokens outlined (fuzzing), with right/wrong marks."""
    out = []
    for name, found in scorers.items():
        score = found["score"]
        stats = [{"label": score.get("metric", "").replace("_", " "), "value": score.get("score"), "main": True}]
        stats += [{"label": f"baseline {b.replace('_', ' ')}", "value": score.get(baseline_column(b)), "main": False}
                  for b in SIMULATED_BASELINES]
        stats += [{"label": k, "value": score.get(k), "main": False} for k in ("precision", "recall", "f1")
                  if score.get(k) is not None]
        items = []
        for entry in found["judged"]:
            cells = heatmap(entry.get("tokens") or [], entry.get("activations"), pos_scale, neg_scale)
            for i in entry.get("marked") or []:
                if i < len(cells):
                    cells[i]["attrs"]["data-mark"] = "1"
            items.append({"head": _excerpt_head(entry, _judged_note(entry, name)), "cells": cells,
                          "correct": entry.get("correct")})
        answered = [i for i in items if i["correct"] is not None]
        out.append({"name": name, "question": SCORER_QUESTIONS.get(name, ""), "stats": stats,
                    "status": score.get("status") or "", "status_ok": score.get("status") == STATUS_OK,
                    "model": found.get("scorer"), "judged": items,
                    "right": sum(1 for i in answered if i["correct"]), "answered": len(answered)})
    return out


def _record_items(frame: pl.DataFrame, split_of: Mapping, pos_scale: float, neg_scale: float) -> list[dict]:
    """Every kept window of one kind (top or random), as real-activation heatmaps."""
    items = []
    for r in frame.iter_rows(named=True):
        entry = {"excerpt_id": f"{r['kind']} #{r['rank']}", "split": split_of.get((r["kind"], r["rank"])),
                 "doc_id": r.get("doc_id"), "char_start": r.get("char_start"), "char_end": r.get("char_end")}
        mx = _num(r.get("max_activation"))
        if mx is None:
            mx = max((a for a in r["activations"] if a is not None), default=None)
        items.append({"head": _excerpt_head(entry, f"max {fmt_score(mx, 3)}"),
                      "cells": heatmap(r["tokens"], r["activations"], pos_scale, neg_scale)})
    return items


def _document_rows(excerpts: Iterable[Mapping]) -> list[dict]:
    """The lineage table's rows: each excerpt, its document and whether its text equals its tokens."""
    return [{"excerpt_id": e.get("excerpt_id"), "split": e.get("split"), "doc_id": e.get("doc_id"),
             "source": e.get("source"), "char_start": e.get("char_start"), "char_end": e.get("char_end"),
             "text_matches_tokens": e.get("text_matches_tokens"), "text": e.get("text"),
             "ellipsis": bool(e.get("char_start")), "before": e.get("context_before"), "after": e.get("context_after")}
            for e in excerpts]


def render_neuron_page(data: LayerData, neuron: int, runs: Mapping[str, Any] | None = None,
                       neighbours: tuple[int | None, int | None] = (None, None), others: Sequence[Mapping] = (),
                       variants_href: str | None = None) -> str:
    """One unit's page. `others` are the same unit's pages in the other variants (variant, href, score);
    `variants_href` links to the index of every variant (None: no link)."""
    lin = neuron_lineage(data, neuron, runs)
    records = data.neuron("records", neuron)
    score = lin["score"]
    expl = lin["explanation"]
    stats = lin["neuron_stats"] or {}
    top = records.filter(pl.col("kind") == TOP).sort("rank") if len(records) else records
    rnd = records.filter(pl.col("kind") == RANDOM).sort("rank") if len(records) else records
    pos_scale, neg_scale, legend_neg = _scales(records, lin["excerpts"], stats)
    split_of = {(ex["kind"], ex["rank"]): ex["split"] for ex in data.neuron("excerpts", neuron).iter_rows(named=True)}

    score_stats = [{"label": "score", "value": score.get("score"), "note": "pooled, top + random", "main": True}]
    score_stats += [{"label": c.replace("_", " "), "value": score.get(c), "note": "", "main": False}
                    for c in baseline_columns(data.scores)]
    # explained variance only means something once the simulation is calibrated onto the neuron's scale
    score_stats += [{"label": label, "value": score.get(c), "note": "calibrated" if c == "calibrated_ev" else "",
                     "main": False}
                    for c, label in (("calibrated_ev", "explained variance"), ("rsquared", "rsquared"),
                                     ("absolute_dev_explained", "absolute dev explained")) if c in score]
    moments = [{"label": label, "text": str(stats[k]) if k == "token_count" else fmt_score(stats[k], 4)}
               for k, label in (("max", "max activation"), ("mean", "mean"), ("variance", "variance"),
                                ("token_count", "tokens seen")) if stats.get(k) is not None]
    candidates = [{"id": c["explanation_id"], "text": c["explanation"] or c.get("error") or "",
                   "explainer": c.get("explainer"), "status": c.get("status"),
                   "score": score.get("score") if c["explanation_id"] == score.get("explanation_id") else None}
                  for c in lin["explanations"]]
    scored, sim_range = _scored_sections(lin["excerpts"], pos_scale, neg_scale)
    status = score.get("status") or ""
    return _render(
        "neuron.html.j2", variant=data.variant, variants_href=variants_href, others=list(others), layer=data.layer,
        neuron=neuron, unit=lin["unit"], previous=neighbours[0], next=neighbours[1],
        explanation=expl.get("explanation") or "(no explanation)", status=status, status_ok=status == STATUS_OK,
        explainer=expl.get("explainer"), simulator=lin.get("simulator"),
        subject_model=lin.get("subject_model") or "not recorded",
        score_stats=score_stats, moments=moments, candidates=candidates, output_tokens=lin["output_tokens"],
        pos_scale=pos_scale, legend_neg=legend_neg, sim_range=sim_range, scored=scored,
        scorers=_scorer_sections(lin.get("scorers") or {}, pos_scale, neg_scale),
        top=_record_items(top, split_of, pos_scale, neg_scale),
        random=_record_items(rnd, split_of, pos_scale, neg_scale),
        histogram=histogram_svg(
            [a for acts in rnd["activations"].to_list() for a in acts] if len(rnd) else [],
            [a for acts in top["activations"].to_list() for a in acts] if len(top) else [],
            mean=_num(stats.get("mean"))),
        all_links_resolved=bool(lin["checks"].get("all_links_resolved")),
        explanation_id=expl.get("explanation_id"), prompt_sha=(expl.get("prompt_sha256") or "")[:16],
        prompt_verified=bool(expl.get("prompt_verified")), prompt_note=expl.get("prompt_note"),
        prompt_rebuilt=expl.get("rebuilt_prompt_sha256") is not None,
        prompt_fitted=expl["prompt"].get("prompt_fitted"), runs=lin["runs"],
        documents=_document_rows(lin["excerpts"] + expl["excerpts"] + list(
            {x["excerpt_id"]: x for found in (lin.get("scorers") or {}).values() for x in found["judged"]}.values())),
        prompt=_prompt_text(expl["prompt"]),
        lineage_json=script_json(lin))


def same_unit_pages(storage_dir: Path, out: Path, layer: int, variant: str) -> dict[int, list[dict]]:
    """unit → its pages in the variants other than `variant` (those whose folder sits beside `out`): variant, href
    (relative to a unit page in `out`) and score, for every unit of the same kind scored in `layer` whose page is
    written there."""
    kind = unit_kind(storage_dir, layer, variant)
    found: dict[int, list[dict]] = {}
    for other in stored_variants(storage_dir, SCORES):
        if other == variant or not asset_path(storage_dir, SCORES, layer, other).exists() \
                or unit_kind(storage_dir, layer, other) != kind:
            continue
        scores = pl.read_parquet(asset_path(storage_dir, SCORES, layer, other), columns=["neuron", "score"])
        for n, score in zip(scores["neuron"].to_list(), scores["score"].to_list()):
            if neuron_page_path(out.parent / other, layer, n).is_file():
                found.setdefault(int(n), []).append({"variant": other, "href": f"../../{other}/{int(layer)}/{n}.html",
                                                     "score": _num(score)})
    return found


def write_layer_pages(storage_dir: str | os.PathLike, layer: int, out_dir: str | os.PathLike | None = None,
                      runs: Mapping[str, Any] | None = None, documents: Documents | None = None, *,
                      variant: str) -> list[Path]:
    """Write `<out>/<layer>/<unit>.html` for every scored unit of `layer` of `variant` (`out` defaults to
    `viewer_dir(storage, variant)`); pages of units no longer scored are removed. `runs` is the lineage's stage →
    run info for this layer. Each page links to the same unit's page in the other variants whose page is written
    at that moment (`same_unit_pages`): a page written before another variant's gains the link when rewritten."""
    storage_dir = Path(storage_dir)
    out, default = _pages_dir(storage_dir, out_dir, variant)
    data = LayerData(storage_dir, layer, variant, documents)
    neurons = data.neurons()
    others = same_unit_pages(storage_dir, out, layer, variant)
    written = []
    for i, n in enumerate(neurons):
        neighbours = (neurons[i - 1] if i > 0 else None, neurons[i + 1] if i + 1 < len(neurons) else None)
        page = render_neuron_page(data, n, runs, neighbours, others.get(n, ()),
                                  variants_href="../../index.html" if default else None)
        written.append(write_text_atomic(page, neuron_page_path(out, layer, n)))
    keep = {p.name for p in written}
    for stale in (out / str(int(layer))).glob("*.html"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return written


def write_viewer(storage_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 layers: Iterable[int] | None = None, runs: Mapping[int, Mapping[str, Any]] | None = None, *,
                 variant: str) -> Path:
    """Write the viewer of `variant` (the unit pages of `layers`, default every scored layer of the variant, then
    its index) into `out_dir` (default `viewer_dir(storage, variant)`) and return its index path. `runs` maps
    layer → (stage → run info) for the lineage sections. In the default folder the pages over every variant
    (`write_variants_index`) are refreshed too."""
    storage_dir = Path(storage_dir)
    if not storage_dir.is_dir():
        raise NdxInputError(f"storage folder {storage_dir} does not exist: run the pipeline first.")
    have = available_layers(storage_dir, variant=variant)
    chosen = sorted(set(int(x) for x in layers)) if layers is not None else have
    if not chosen:
        scored = stored_variants(storage_dir, SCORES)
        raise NdxInputError(f"no layer of variant {variant} has scores under {storage_dir} (variants with scores: "
                            f"{', '.join(scored) or 'none'}): run the pipeline first.")
    missing = [x for x in chosen if x not in have]
    if missing:
        raise NdxInputError(f"layers {missing} of variant {variant} have no scores under {storage_dir} (scored "
                            f"layers: {have}).")
    out, default = _pages_dir(storage_dir, out_dir, variant)
    documents = Documents(storage_dir)
    runs = runs or {}
    for layer in chosen:
        write_layer_pages(storage_dir, layer, out, runs.get(layer) or runs.get(str(layer)), documents,
                          variant=variant)
    # The index covers the layers just written and any other scored layer whose pages are already there.
    index = write_index(storage_dir, out, variant=variant)
    if default:
        write_variants_index(storage_dir)
    return index


# ---------------------------------------------------------------------------------------------------- variants


def unit_kind(storage_dir: Path, layer: int, variant: str) -> str:
    """The kind of the units of a layer of a variant, from its activation records (a neuron where none say)."""
    path = asset_path(storage_dir, ACTIVATION_RECORDS, layer, variant)
    if not path.exists() or "unit_kind" not in pl.read_parquet_schema(path):
        return MLP_NEURON
    return pl.scan_parquet(path).select(pl.col("unit_kind").drop_nulls().first()).collect().item() or MLP_NEURON


def variants_overview(storage_dir: Path) -> dict:
    """`reports.compare.compare` over every variant with scores, as the pages over the variants show it: `sections`,
    per layer (then pooled, with more than one layer), the variants that have units there and the pairs of them
    whose units are of one kind (`unit_kind`: a neuron's id and a dictionary latent's name different units, so their
    differences mean nothing); beside them compare's `baselines`, `scorers`, `resamples` and `seed`. The figures are
    those `ndx-pipeline compare` prints. No variant with scores: no section."""
    if not stored_variants(storage_dir, SCORES):
        return {"sections": [], "baselines": [], "scorers": [], "resamples": None, "seed": None}
    result = compare(storage_dir)
    kinds = {(r["layer"], r["variant"]): unit_kind(storage_dir, r["layer"], r["variant"])
             for r in result["summary"] if r["layer"] != ALL and r["units"]}

    def comparable(layer: int | str, a: str, b: str) -> bool:
        layers = result["layers"] if layer == ALL else [layer]
        both = [x for x in layers if (x, a) in kinds and (x, b) in kinds]
        return bool(both) and all(kinds[x, a] == kinds[x, b] for x in both)

    sections = []
    for layer in [*result["layers"], *([ALL] if len(result["layers"]) > 1 else [])]:
        rows = [r for r in result["summary"] if r["layer"] == layer and r["units"]]
        pairs = [r for r in result["pairs"] if r["layer"] == layer and comparable(layer, r["a"], r["b"])]
        sections.append({"layer": layer, "rows": rows, "pairs": pairs})
    return {"sections": sections, "baselines": result["baselines"], "scorers": result["scorers"],
            "resamples": result["resamples"], "seed": result["seed"]}


def write_variants_index(storage_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """(Re)write the pages over every variant that has scores, in `out_dir` (default `viewer_dir(storage)`, which
    holds each variant's folder): `index.html` (per variant and layer: units, how many scored, mean score; linking
    to the variant's index where its pages are written) and `compare.html` (`variants_overview`). Returns the index
    path."""
    storage_dir = Path(storage_dir)
    out = Path(out_dir) if out_dir is not None else viewer_dir(storage_dir)
    overview = variants_overview(storage_dir)
    variants = stored_variants(storage_dir, SCORES)
    written = {v for v in variants if (out / v / "index.html").is_file()}
    summary = [{"variant": v, "written": v in written,
                "layers": [r for s in overview["sections"] if s["layer"] != ALL for r in s["rows"]
                           if r["variant"] == v]} for v in variants]
    controls = [lines for v in variants if not control_of(v) and (lines := controls_text(storage_dir, v))]
    write_text_atomic(_render("compare.html.j2", written=written, all_layers=ALL, **overview), out / "compare.html")
    return write_text_atomic(_render("variants.html.j2", variants=summary, controls=controls), out / "index.html")
