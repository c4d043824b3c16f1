"""A static neuron viewer: `index.html` over every scored layer and one page per neuron, opened from disk.

Everything is rendered here, in Python, with every piece of corpus or model text passed through `html.escape`;
the pages hold their own CSS and a little JavaScript (hover values, sorting, filtering) and fetch nothing. Data a
script needs is embedded as JSON in `<script type="application/json">` with `<`, `>` and `&` written as `\\u003c`
… so corpus text can never close the element. Files are written to a temporary name and renamed into place.

Layout under the output folder (default `<storage>/neuron_viewer`):

    index.html              every neuron of every layer that has scores
    <layer>/<neuron>.html   one page per neuron
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.reports.lineage import Documents, LayerData, available_layers, json_safe, neuron_lineage
from ndx_pipeline.core.method.scoring import pooled_correlation
from ndx_pipeline.core.storage import asset_path, viewer_dir, write_text_atomic

VIEWER_ASSET = "neuron_viewer"
TOP_TOKENS = 8
HISTOGRAM_BINS = 40
SCORE_COLUMNS = ("score", "score_top", "score_random")
NON_BASELINE = {"layer", "neuron", "explanation_id", "explanation", "status", "scored_tokens", *SCORE_COLUMNS}


# ---------------------------------------------------------------------------------------------------- paths & io


def neuron_page_path(out_dir: str | os.PathLike, layer: int, neuron: int) -> Path:
    return Path(out_dir) / str(int(layer)) / f"{int(neuron)}.html"


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def script_json(value: Any) -> str:
    """JSON that is safe inside `<script type="application/json">`: no `<`, `>` or `&` survive literally."""
    text = json.dumps(json_safe(value), ensure_ascii=False, allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
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


# ---------------------------------------------------------------------------------------------------- shared look

CSS = """
:root{--bg:#f6f7f9;--card:#fff;--ink:#1d232b;--muted:#667085;--line:#e3e6ea;--accent:#2f6fdf;
--hot:245,124,0;--cold:47,111,223;--sim:126,87,194;--mono:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
header.top{background:#1d232b;color:#fff;padding:10px 24px;display:flex;gap:18px;align-items:baseline;flex-wrap:wrap}
header.top a{color:#cfe0ff;text-decoration:none}
header.top .brand{font-weight:600;letter-spacing:.02em}
header.top .crumbs{color:#aab4c3}
main{max-width:1280px;margin:0 auto;padding:18px 24px 48px}
h1{font-size:22px;margin:4px 0 6px}
h2{font-size:16px;margin:0 0 10px}
h3{font-size:13px;margin:12px 0 6px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px;margin:14px 0}
.card.note{border-left:4px solid #c99a06;background:#fff9e3;color:#4a3b00}
.muted{color:var(--muted)}
.mono{font-family:var(--mono)}
.explanation{font-size:17px;margin:6px 0 10px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;white-space:nowrap}
.s-hi{background:#d7f3df;color:#146c2e}.s-mid{background:#fff0c2;color:#7a5700}.s-lo{background:#eceff3;color:#4a5462}
.s-neg{background:#fde0de;color:#a1261b}.s-na{background:#eceff3;color:#8a94a3}
.ok{color:#146c2e}.bad{color:#a1261b}
.stats{display:flex;gap:22px;flex-wrap:wrap;margin:6px 0}
.stat .v{font-size:20px;font-weight:600}.stat .k{font-size:12px;color:var(--muted)}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;color:var(--muted);font-weight:600;background:#fafbfc;position:sticky;top:0}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.ex{font-family:var(--mono);font-size:12.5px;line-height:1.9;white-space:pre-wrap;word-break:break-word;
padding:6px 8px;border:1px solid var(--line);border-radius:6px;background:#fff;margin:0 0 8px}
.ex .t{border-radius:2px;padding:1px 0;cursor:default}
.ex .t:hover{outline:1.5px solid #1d232b}
.ex .nl{color:#b0b7c3}
.exhead{display:flex;gap:10px;align-items:baseline;font-size:12px;color:var(--muted);margin:2px 0 3px;flex-wrap:wrap}
.exhead .id{font-family:var(--mono);color:var(--ink)}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:12px}
@media (max-width:900px){.pair{grid-template-columns:1fr}}
.pairlabel{font-size:11px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted);margin-bottom:2px}
.legend{display:flex;gap:16px;align-items:center;font-size:12px;color:var(--muted);flex-wrap:wrap}
.ramp{display:inline-block;width:90px;height:10px;border-radius:3px;vertical-align:middle;margin:0 4px}
.tag{display:inline-block;font-size:11px;padding:0 6px;border-radius:8px;background:#eef2f8;color:#3b4a60}
.tag.explain{background:#e6f0ff;color:#1f4fa8}.tag.score_top{background:#fff0c2;color:#7a5700}
.tag.score_random{background:#efe6fb;color:#5b3a93}
.chip{display:inline-block;font-family:var(--mono);font-size:11.5px;background:#fff3e4;border:1px solid #f5d7b0;
border-radius:4px;padding:0 4px;margin:1px 2px;white-space:pre}
#tip{position:fixed;pointer-events:none;background:#1d232b;color:#fff;font:12px/1.4 var(--mono);padding:6px 8px;
border-radius:6px;box-shadow:0 4px 14px rgba(0,0,0,.25);display:none;z-index:10;max-width:360px;white-space:pre}
details>summary{cursor:pointer;color:var(--accent)}
pre.block{font-family:var(--mono);font-size:12px;background:#f3f5f8;border:1px solid var(--line);border-radius:6px;
padding:10px;white-space:pre-wrap;word-break:break-word;max-height:480px;overflow:auto}
.controls{display:flex;gap:14px;flex-wrap:wrap;align-items:end}
.controls label{display:flex;flex-direction:column;font-size:12px;color:var(--muted);gap:3px}
.controls input,.controls select{font:inherit;padding:5px 8px;border:1px solid #c9ced6;border-radius:6px;background:#fff}
.controls input[type=search]{width:260px}.controls input[type=number]{width:90px}
th.sortable{cursor:pointer;user-select:none}th.sortable:hover{color:var(--ink)}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
td.expl{max-width:520px}
td.expl .clip{display:-webkit-box;-webkit-line-clamp:2;-webkit-box-orient:vertical;overflow:hidden}
a{color:var(--accent)}
.nav a{margin-right:12px}
svg text{font:11px system-ui,sans-serif;fill:#667085}
tr.ctxrow td{border-bottom:1px solid var(--line);padding-top:0}
tr.ctxrow details>summary{font-size:12px}
.ctx{font-family:var(--mono);font-size:12px;white-space:pre-wrap;word-break:break-word;color:#8a94a3;
background:#fafbfc;border:1px solid var(--line);border-radius:6px;padding:8px;margin-top:4px}
.ctx mark{background:#fff0c2;color:var(--ink);border-radius:2px}
"""

TOOLTIP_JS = """
(function(){
  var tip=document.getElementById('tip');
  function show(e){
    var el=e.target.closest('.t'); if(!el){tip.style.display='none';return;}
    var lines=['token  '+JSON.stringify(el.textContent.replace(/\\u21B5\\n$/,'\\n'))];
    if(el.dataset.a!==undefined) lines.push('activation  '+el.dataset.a);
    if(el.dataset.s!==undefined) lines.push('simulated   '+el.dataset.s+' / 10');
    if(el.dataset.a!==undefined && el.dataset.m) lines.push('of max      '+el.dataset.m);
    tip.textContent=lines.join('\\n'); tip.style.display='block';
    var x=e.clientX+14, y=e.clientY+14, r=tip.getBoundingClientRect();
    if(x+r.width>innerWidth-8) x=e.clientX-r.width-14;
    if(y+r.height>innerHeight-8) y=e.clientY-r.height-14;
    tip.style.left=x+'px'; tip.style.top=y+'px';
  }
  document.addEventListener('mouseover',show);
  document.addEventListener('mousemove',function(e){ if(tip.style.display==='block') show(e); });
  document.addEventListener('mouseleave',function(){tip.style.display='none';});
  var lj=document.getElementById('lineage-json'), out=document.getElementById('lineage-json-view');
  if(lj && out){
    var d=out.closest('details');
    d.addEventListener('toggle',function(){ if(d.open && !out.textContent){
      out.textContent=JSON.stringify(JSON.parse(lj.textContent),null,2);} });
  }
})();
"""

INDEX_JS = """
(function(){
  var table=document.getElementById('neurons'), tbody=table.tBodies[0];
  var rows=Array.prototype.slice.call(tbody.rows);
  var layer=document.getElementById('f-layer'), lo=document.getElementById('f-min'), hi=document.getElementById('f-max');
  var q=document.getElementById('f-text'), tq=document.getElementById('f-token'), count=document.getElementById('count');
  rows.forEach(function(r){ r._tokens=JSON.parse(r.dataset.tokens); });
  function apply(){
    var L=layer.value, mn=parseFloat(lo.value), mx=parseFloat(hi.value);
    var text=q.value.trim().toLowerCase(), tok=tq.value.trim().toLowerCase(), shown=0;
    rows.forEach(function(r){
      var s=r.dataset.score===''?NaN:parseFloat(r.dataset.score);
      var ok=(L==='all'||r.dataset.layer===L)
        &&(isNaN(mn)||(!isNaN(s)&&s>=mn))&&(isNaN(mx)||(!isNaN(s)&&s<=mx))
        &&(!text||r.dataset.expl.indexOf(text)>=0)
        &&(!tok||r._tokens.some(function(t){return t.indexOf(tok)>=0;}));
      r.hidden=!ok; if(ok) shown++;
    });
    count.textContent=shown+' of '+rows.length+' neurons';
  }
  [layer,lo,hi,q,tq].forEach(function(el){ el.addEventListener('input',apply); el.addEventListener('change',apply); });
  var current=null, dir=1;
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th){
    if(!th.dataset.key) return;
    th.classList.add('sortable');
    th.addEventListener('click',function(){
      var key=th.dataset.key, num=th.dataset.type==='num';
      dir=(current===th)?-dir:(num?-1:1); current=th;
      Array.prototype.forEach.call(table.tHead.rows[0].cells,function(c){c.classList.remove('sorted-asc','sorted-desc');});
      th.classList.add(dir>0?'sorted-asc':'sorted-desc');
      rows.sort(function(a,b){
        var x=a.dataset[key], y=b.dataset[key];
        if(num){ x=x===''?NaN:parseFloat(x); y=y===''?NaN:parseFloat(y);
          if(isNaN(x)&&isNaN(y)) return 0; if(isNaN(x)) return 1; if(isNaN(y)) return -1; return (x-y)*dir; }
        return x.localeCompare(y)*dir;
      });
      rows.forEach(function(r){tbody.appendChild(r);});
    });
  });
  apply();
})();
"""


def page(title: str, crumbs: str, body: str, script: str = "", data: str = "") -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        # Nothing on these pages may reach the network; inline code only.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header class=\"top\"><span class=\"brand\">ndx neuron viewer</span><span class=\"crumbs\">{crumbs}</span>"
        "</header>"
        f"<main>{body}</main><div id=\"tip\"></div>{data}<script>{TOOLTIP_JS}{script}</script></body></html>\n"
    )


# ---------------------------------------------------------------------------------------------------- heatmaps


def _token_html(token: str) -> str:
    if token == "":
        return "<span class=\"nl\">∅</span>"
    parts = token.split("\n")
    return "<span class=\"nl\">↵</span>\n".join(esc(p) for p in parts)


def _heat(value: float, scale: float, rgb: str) -> str:
    if not scale > 0 or value is None or not math.isfinite(value) or value == 0:
        return ""
    alpha = min(1.0, abs(value) / scale)
    return f"background:rgba({rgb},{alpha * 0.85:.3f})" if alpha >= 0.02 else ""


def heatmap(tokens: Sequence[str], activations: Sequence[float] | None, pos_scale: float, neg_scale: float,
            simulated: Sequence[float] | None = None, color: str = "real",
            sim_range: tuple[float, float] = (0.0, 10.0)) -> str:
    """One excerpt as token spans coloured by value; `data-a` / `data-s` hold the exact values for the tooltip.

    color="real": orange by activation / pos_scale (blue for negatives by / neg_scale);
    color="sim": purple by where the simulated value sits in `sim_range` (the neuron's lowest … highest simulated
    value; the correlation score ignores offset and scale, so this is the contrast that matters).
    """
    spans = []
    for i, tok in enumerate(tokens):
        a = None if activations is None else _num(activations[i])
        s = None if simulated is None else _num(simulated[i])
        attrs = []
        if a is not None:
            attrs.append(f"data-a=\"{a:.4g}\"")
            if pos_scale > 0 and a > 0:
                attrs.append(f"data-m=\"{100 * a / pos_scale:.0f}%\"")
        if s is not None:
            attrs.append(f"data-s=\"{s:.2f}\"")
        if color == "sim":
            style = _heat((s or 0.0) - sim_range[0], sim_range[1] - sim_range[0], "126,87,194")
        elif a is not None and a < 0:
            style = _heat(a, neg_scale, "47,111,223")
        else:
            style = _heat(a or 0.0, pos_scale, "245,124,0")
        if style:
            attrs.append(f"style=\"{style}\"")
        spans.append(f"<span class=\"t\" {' '.join(attrs)}>{_token_html(tok)}</span>")
    return "<div class=\"ex\">" + "".join(spans) + "</div>"


def _legend(pos_scale: float, neg_scale: float, sim_range: tuple[float, float] | None = None) -> str:
    out = [
        "<div class=\"legend\">",
        f"<span>real activation <span class=\"ramp\" style=\"background:linear-gradient(90deg,#fff,rgba(245,124,0,.85))\">"
        f"</span>0 … {pos_scale:.3g} (neuron max)</span>",
    ]
    if neg_scale > 0:
        out.append("<span>negative <span class=\"ramp\" style=\"background:linear-gradient(90deg,#fff,"
                   f"rgba(47,111,223,.85))\"></span>0 … −{neg_scale:.3g}</span>")
    if sim_range is not None:
        out.append("<span>simulated <span class=\"ramp\" style=\"background:linear-gradient(90deg,#fff,"
                   f"rgba(126,87,194,.85))\"></span>{sim_range[0]:.2g} … {sim_range[1]:.2g} (on the 0–10 scale)</span>")
    out.append("<span>hover a token for its values</span></div>")
    return "".join(out)


# ---------------------------------------------------------------------------------------------------- histogram


def histogram_svg(random_values: Sequence[float], top_values: Sequence[float], mean: float | None = None,
                  bins: int = HISTOGRAM_BINS, width: int = 760, height: int = 210) -> str:
    """Inline SVG: token activations of the random windows and of the top windows side by side in each bin,
    counts on a log scale (each bar's exact count and range on hover)."""
    rv = np.asarray([v for v in random_values if v is not None and math.isfinite(v)], dtype=np.float64)
    tv = np.asarray([v for v in top_values if v is not None and math.isfinite(v)], dtype=np.float64)
    both = np.concatenate([rv, tv])
    if both.size == 0:
        return "<p class=\"muted\">No activations recorded.</p>"
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

    parts = [f"<svg role=\"img\" aria-label=\"activation histogram\" width=\"{width}\" height=\"{height}\" "
             f"viewBox=\"0 0 {width} {height}\" xmlns=\"http://www.w3.org/2000/svg\">",
             f"<g transform=\"translate({ml},{mt})\">"]
    tick = 1
    while tick <= top_count * 10:
        yy = ph - y(tick)
        if yy >= -1:
            parts.append(f"<line x1=\"0\" x2=\"{pw}\" y1=\"{yy:.1f}\" y2=\"{yy:.1f}\" stroke=\"#eceff3\"/>"
                         f"<text x=\"-6\" y=\"{yy + 4:.1f}\" text-anchor=\"end\">{tick:,}</text>")
        tick *= 10
    for offset, counts, fill, label in ((0.0, rc, "rgba(47,111,223,.7)", "random windows"),
                                        (0.5, tc, "rgba(245,124,0,.85)", "top windows")):
        for i, c in enumerate(counts):
            if c == 0:
                continue
            h = max(1.5, y(int(c)))
            parts.append(f"<rect class=\"bar\" x=\"{(i + offset) * bw + 0.3:.1f}\" y=\"{ph - h:.1f}\" "
                         f"width=\"{max(bw / 2 - 0.6, 0.8):.1f}\" height=\"{h:.1f}\" fill=\"{fill}\"><title>{label}: "
                         f"{int(c)} tokens in [{edges[i]:.3g}, {edges[i + 1]:.3g})</title></rect>")
    parts.append(f"<line x1=\"0\" x2=\"{pw}\" y1=\"{ph}\" y2=\"{ph}\" stroke=\"#98a2b3\"/>")
    labels = [lo, hi]
    if lo < 0 < hi and min(-lo, hi) > 0.08 * (hi - lo):
        labels.append(0.0)
    for v in labels:
        xx = pw * (v - lo) / (hi - lo)
        parts.append(f"<line x1=\"{xx:.1f}\" x2=\"{xx:.1f}\" y1=\"{ph}\" y2=\"{ph + 4}\" stroke=\"#98a2b3\"/>"
                     f"<text x=\"{xx:.1f}\" y=\"{ph + 16}\" text-anchor=\"middle\">{v:.3g}</text>")
    if mean is not None and math.isfinite(mean) and lo <= mean <= hi:
        xx = pw * (mean - lo) / (hi - lo)
        parts.append(f"<line x1=\"{xx:.1f}\" x2=\"{xx:.1f}\" y1=\"0\" y2=\"{ph}\" stroke=\"#1d232b\" "
                     f"stroke-dasharray=\"3,3\"><title>mean over the corpus {mean:.4g}</title></line>")
    parts.append(f"<text x=\"{pw / 2}\" y=\"{ph + 32}\" text-anchor=\"middle\">activation per token "
                 "(count on a log scale)</text></g></svg>")
    legend = ("<div class=\"legend\"><span><span class=\"ramp\" style=\"width:14px;background:rgba(47,111,223,.7)\">"
              f"</span>tokens of random windows ({rv.size})</span><span><span class=\"ramp\" style=\"width:14px;"
              f"background:rgba(245,124,0,.85)\"></span>tokens of top windows ({tv.size})</span>"
              "<span>dashed line: mean over every corpus token</span></div>")
    return "".join(parts) + legend


# ---------------------------------------------------------------------------------------------------- index data


def top_tokens(records: pl.DataFrame, k: int = TOP_TOKENS) -> list[str]:
    """The distinct tokens (stripped) with the highest activations in a neuron's top windows, strongest first."""
    best: dict[str, float] = {}
    top = records.filter(pl.col("kind") == "top") if "kind" in records.columns else records
    for toks, acts in zip(top["tokens"].to_list(), top["activations"].to_list()):
        for t, a in zip(toks, acts):
            key = t.strip()
            if key and a is not None and a > best.get(key, float("-inf")):
                best[key] = a
    ranked = sorted(best.items(), key=lambda kv: -kv[1])
    return [t for t, a in ranked[:k] if a > 0]


def baseline_columns(scores: pl.DataFrame) -> list[str]:
    """Score columns beyond the pooled score: the splits, plus any column named baseline*/…_baseline."""
    cols = [c for c in ("score_top", "score_random") if c in scores.columns]
    cols += [c for c in scores.columns if "baseline" in c and c not in NON_BASELINE
             and scores.schema[c].is_numeric()]
    return cols


def bundled_llm_used(storage_dir: Path, layers: list[int]) -> bool:
    """Whether the bundled SmolLM2 explained or simulated any of these layers (read from the stored rows)."""
    for layer in layers:
        for asset, col in (("explanations", "explainer"), ("simulations", "simulator")):
            path = asset_path(storage_dir, asset, layer)
            if path.exists() and any("SmolLM2" in str(v) for v in pl.read_parquet(path, columns=[col])[col].unique()):
                return True
    return False


def _index_rows(storage_dir: Path, layers: list[int]) -> tuple[list[dict], list[str]]:
    rows, extra = [], []
    for layer in layers:
        scores = pl.read_parquet(asset_path(storage_dir, "scores", layer))
        for c in baseline_columns(scores):
            if c not in extra:
                extra.append(c)
        rec_path = asset_path(storage_dir, "activation_records", layer)
        records = pl.read_parquet(rec_path, columns=["neuron", "kind", "tokens", "activations"]) \
            if rec_path.exists() else None
        for row in scores.sort("neuron").iter_rows(named=True):
            toks = top_tokens(records.filter(pl.col("neuron") == row["neuron"])) if records is not None else []
            rows.append(row | {"layer": layer, "top_tokens": toks})
    return rows, extra


# ---------------------------------------------------------------------------------------------------- index page


def render_index(rows: list[dict], extra: list[str], layers: list[int], note: str | None = None) -> str:
    head = ["<th data-key=\"layer\" data-type=\"num\" class=\"num\">layer</th>",
            "<th data-key=\"neuron\" data-type=\"num\" class=\"num\">neuron</th>",
            "<th data-key=\"score\" data-type=\"num\" class=\"num\">score</th>"]
    for i, c in enumerate(extra):
        head.append(f"<th data-key=\"x{i}\" data-type=\"num\" class=\"num\">{esc(c.replace('_', ' '))}</th>")
    head += ["<th data-key=\"expl\">explanation</th>", "<th>top tokens</th>", "<th data-key=\"status\">status</th>"]
    body = []
    for r in rows:
        score = _num(r.get("score"))
        data = [f"data-layer=\"{r['layer']}\"", f"data-neuron=\"{r['neuron']}\"",
                f"data-score=\"{'' if score is None else repr(score)}\"",
                f"data-expl=\"{esc((r.get('explanation') or '').lower())}\"",
                f"data-status=\"{esc(r.get('status') or '')}\"",
                f"data-tokens=\"{esc(json.dumps([t.lower() for t in r['top_tokens']], ensure_ascii=False))}\""]
        cells = [f"<td class=\"num\">{r['layer']}</td>",
                 f"<td class=\"num\"><a href=\"{r['layer']}/{r['neuron']}.html\">{r['neuron']}</a></td>",
                 f"<td class=\"num\"><span class=\"badge {score_class(score)}\">{fmt_score(score)}</span></td>"]
        for i, c in enumerate(extra):
            v = _num(r.get(c))
            data.append(f"data-x{i}=\"{'' if v is None else repr(v)}\"")
            cells.append(f"<td class=\"num\">{fmt_score(v)}</td>")
        expl = r.get("explanation")
        cells.append(f"<td class=\"expl\"><div class=\"clip\" title=\"{esc(expl)}\">"
                     f"{esc(expl) if expl else '<span class=muted>(no explanation)</span>'}</div></td>")
        cells.append("<td>" + "".join(f"<span class=\"chip\">{esc(t)}</span>" for t in r["top_tokens"]) + "</td>")
        status = r.get("status") or ""
        cells.append(f"<td class=\"{'ok' if status == 'ok' else 'bad'}\" title=\"{esc(status)}\">"
                     f"{esc(status.split(':', 1)[0])}</td>")
        body.append(f"<tr {' '.join(data)}>{''.join(cells)}</tr>")

    summary = []
    for layer in layers:
        vals = [s for r in rows if r["layer"] == layer and (s := _num(r.get("score"))) is not None]
        n = sum(1 for r in rows if r["layer"] == layer)
        mean = f"{np.mean(vals):.3f}" if vals else "n/a"
        median = f"{np.median(vals):.3f}" if vals else "n/a"
        base = []
        for c in extra:
            if c.startswith("baseline_"):
                bv = [v for r in rows if r["layer"] == layer and (v := _num(r.get(c))) is not None]
                base.append(f"<td class=\"num\">{np.mean(bv):.3f}</td>" if bv else "<td class=\"num\">n/a</td>")
        summary.append(f"<tr><td class=\"num\">{layer}</td><td class=\"num\">{n}</td><td class=\"num\">{len(vals)}</td>"
                       f"<td class=\"num\">{mean}</td><td class=\"num\">{median}</td>{''.join(base)}</tr>")
    base_head = "".join(f"<th class=\"num\">mean {esc(c.removeprefix('baseline_').replace('_', ' '))}</th>"
                        for c in extra if c.startswith("baseline_"))
    options = "".join(f"<option value=\"{layer}\">layer {layer}</option>" for layer in layers)
    all_scores = [s for r in rows if (s := _num(r.get("score"))) is not None]
    body_html = f"""
<h1>Neurons and their explanations</h1>
{f'<div class="card note" id="model-note"><b>Note.</b> {esc(note)}</div>' if note else ''}
<div class="card" style="display:flex;gap:48px;flex-wrap:wrap;align-items:flex-start">
<div class="stats" style="flex-direction:column;gap:10px">
 <div class="stats">
  <div class="stat"><div class="v">{len(rows)}</div><div class="k">neurons</div></div>
  <div class="stat"><div class="v">{len(layers)}</div><div class="k">layers</div></div>
  <div class="stat"><div class="v">{sum(1 for s in all_scores if s >= 0.5)}</div><div class="k">score ≥ 0.5</div></div>
 </div>
 <div class="stat"><div class="v">{fmt_score(np.mean(all_scores) if all_scores else None)}</div>
   <div class="k">mean score (pooled Pearson of simulated vs real, top + random excerpts)</div></div>
</div>
<div><h3 style="margin-top:0">By layer</h3><table style="width:auto"><thead><tr><th class="num">layer</th>
<th class="num">neurons</th><th class="num">scored</th><th class="num">mean</th><th class="num">median</th>{base_head}</tr></thead>
<tbody>{''.join(summary)}</tbody></table></div>
</div>
<div class="card">
<div class="controls">
 <label>layer<select id="f-layer"><option value="all">all layers</option>{options}</select></label>
 <label>score ≥<input id="f-min" type="number" step="0.05" placeholder="min"></label>
 <label>score ≤<input id="f-max" type="number" step="0.05" placeholder="max"></label>
 <label>explanation contains<input id="f-text" type="search" placeholder="e.g. parenthes"></label>
 <label>fires on token<input id="f-token" type="search" placeholder="e.g. return"></label>
 <span id="count" class="muted"></span>
</div>
<div style="overflow-x:auto"><table id="neurons" style="margin-top:10px"><thead><tr>{''.join(head)}</tr></thead>
<tbody>{''.join(body)}</tbody></table></div>
<p class="muted">Click a column header to sort. Scores are the pooled Pearson correlation of simulated and true
activations over the scored excerpts; n/a means undefined (see status).</p>
</div>"""
    return page("Neuron viewer — index", "index", body_html, INDEX_JS)


def write_index(storage_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                layers: Iterable[int] | None = None) -> Path:
    """(Re)write `index.html` over `layers` (default: every scored layer whose pages are in `out_dir`, so the
    per-layer `neuron_viewer` partitions can each rewrite the index without linking to pages not written yet)."""
    storage_dir = Path(storage_dir)
    out = Path(out_dir) if out_dir is not None else viewer_dir(storage_dir)
    have = available_layers(storage_dir)
    if layers is None:
        chosen = [x for x in have if (out / str(x)).is_dir()]
    else:
        chosen = sorted(set(int(x) for x in layers))
    missing = [x for x in chosen if x not in have]
    if missing:
        raise NdxInputError(f"layers {missing} have no scores under {storage_dir}: materialize them first.")
    rows, extra = _index_rows(storage_dir, chosen)
    from ndx_pipeline.core.models import BUNDLED_MODEL_NOTE

    note = BUNDLED_MODEL_NOTE if bundled_llm_used(storage_dir, chosen) else None
    return write_text_atomic(render_index(rows, extra, chosen, note), out / "index.html")


# ---------------------------------------------------------------------------------------------------- neuron page


def _excerpt_head(entry: Mapping, extra: str = "") -> str:
    bits = [f"<span class=\"id\">{esc(entry.get('excerpt_id') or '')}</span>"]
    if entry.get("split"):
        bits.append(f"<span class=\"tag {esc(entry['split'])}\">{esc(entry['split'])}</span>")
    if entry.get("doc_id") is not None:
        bits.append(f"<span>{esc(entry['doc_id'])} · chars {esc(entry.get('char_start'))}–{esc(entry.get('char_end'))}"
                    "</span>")
    bits.append(extra)
    return "<div class=\"exhead\">" + "".join(bits) + "</div>"


def _runs_table(runs: Mapping[str, Any]) -> str:
    out = ["<table><thead><tr><th>stage</th><th>run</th><th>partition</th><th>code version</th>"
           "<th>data version</th></tr></thead><tbody>"]
    for stage, info in runs.items():
        if info is None:
            out.append(f"<tr><td>{esc(stage)}</td><td colspan=\"4\" class=\"muted\">not recorded</td></tr>")
            continue
        out.append(f"<tr><td>{esc(stage)}</td><td class=\"mono\">{esc(info.get('run_id') or '—')}</td>"
                   f"<td>{esc(info.get('partition') or '—')}</td><td class=\"mono\">{esc(info.get('code_version') or '—')}"
                   f"</td><td class=\"mono\">{esc(info.get('data_version') or '—')}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _prompt_text(messages: Sequence[Mapping], prefix: str) -> str:
    parts = [f"── {m['role']} ──\n{m['content']}" for m in messages]
    parts.append(f"── assistant (continues) ──\n{prefix} …")
    return "\n\n".join(parts)


def render_neuron_page(data: LayerData, neuron: int, runs: Mapping[str, Any] | None = None,
                       neighbours: tuple[int | None, int | None] = (None, None)) -> str:
    layer = data.layer
    lin = neuron_lineage(data, neuron, runs)
    records = data.neuron("records", neuron)
    score = lin["score"]
    expl = lin["explanation"]
    stats = lin["neuron_stats"] or {}
    top = records.filter(pl.col("kind") == "top").sort("rank") if len(records) else records
    rnd = records.filter(pl.col("kind") == "random").sort("rank") if len(records) else records
    all_acts = [a for acts in records["activations"].to_list() for a in acts] if len(records) else []
    all_acts += [a for e in lin["excerpts"] for a in (e.get("true_activations") or []) if a is not None]
    pos_scale = max([_num(stats.get("max")) or 0.0] + [a for a in all_acts if a is not None] + [0.0])
    # Negatives share the positive scale, so tiny negative values stay pale.
    neg_scale = max([pos_scale] + [-a for a in all_acts if a is not None and a < 0])
    legend_neg = neg_scale if any(a is not None and a < 0 for a in all_acts) else 0.0
    split_of = {}
    for ex in data.neuron("excerpts", neuron).iter_rows(named=True):
        split_of[(ex["kind"], ex["rank"])] = ex["split"]

    # ---- header
    prev_n, next_n = neighbours
    nav = ["<a href=\"../index.html\">← all neurons</a>"]
    if prev_n is not None:
        nav.append(f"<a href=\"{prev_n}.html\">‹ neuron {prev_n}</a>")
    if next_n is not None:
        nav.append(f"<a href=\"{next_n}.html\">neuron {next_n} ›</a>")
    score_stats = [("score", score.get("score"), "pooled, top + random")]
    score_stats += [(c.replace("_", " "), score.get(c), "") for c in baseline_columns(data.scores)]
    for extra_name in ("rsquared", "absolute_dev_explained"):
        if extra_name in score:
            score_stats.append((extra_name.replace("_", " "), score.get(extra_name), ""))
    stat_html = "".join(
        f"<div class=\"stat\"><div class=\"v\"><span class=\"badge {score_class(v) if k == 'score' else ''}\" "
        f"style=\"font-size:18px\">{fmt_score(v)}</span></div><div class=\"k\">{esc(k)}"
        f"{(' · ' + esc(note)) if note else ''}</div></div>" for k, v, note in score_stats)
    moments = "".join(
        f"<div class=\"stat\"><div class=\"v\">{fmt_score(stats.get(k), 4) if k != 'token_count' else esc(stats.get(k))}"
        f"</div><div class=\"k\">{label}</div></div>"
        for k, label in (("max", "max activation"), ("mean", "mean"), ("variance", "variance"),
                         ("token_count", "tokens seen")) if stats.get(k) is not None)
    status = score.get("status") or ""
    cand_rows = []
    for c in lin["explanations"]:
        s = score.get("score") if c["explanation_id"] == score.get("explanation_id") else None
        cand_rows.append(
            f"<tr><td class=\"mono\">{esc(c['explanation_id'])}</td><td>{esc(c['explanation'] or c.get('error') or '')}"
            f"</td><td>{esc(c.get('explainer'))}</td><td>{esc(c.get('status'))}</td>"
            f"<td class=\"num\"><span class=\"badge {score_class(s)}\">{fmt_score(s)}</span></td></tr>")
    header = f"""
<div class="nav">{''.join(nav)}</div>
<h1>Layer {layer} · neuron {neuron}</h1>
<div class="explanation">{esc(expl.get('explanation') or '(no explanation)')}</div>
<div class="muted">status: <span class="{'ok' if status == 'ok' else 'bad'}">{esc(status)}</span> ·
 explainer {esc(expl.get('explainer'))} · simulator {esc(lin.get('simulator'))} · subject model
 {esc(lin.get('subject_model') or 'not recorded')}</div>
<div class="card"><div class="stats">{stat_html}</div><div class="stats">{moments}</div>
<h3>Explanations</h3><table><thead><tr><th>id</th><th>explanation</th><th>explainer</th><th>status</th>
<th class="num">score</th></tr></thead><tbody>{''.join(cand_rows)}</tbody></table></div>"""

    # ---- scored excerpts: real on the left, simulated beside
    sim_values = [v for e in lin["excerpts"] for v in (e.get("simulated_activations") or []) if v is not None]
    sim_range = (min(sim_values, default=0.0), max(sim_values, default=10.0))
    if not sim_range[1] > sim_range[0]:
        sim_range = (0.0, 10.0)
    scored_html = []
    for split, title in (("score_top", "Top-activating excerpts"), ("score_random", "Random excerpts")):
        items = [e for e in lin["excerpts"] if e.get("split") == split]
        if not items:
            continue
        scored_html.append(f"<h3>{title} ({len(items)})</h3>")
        for e in items:
            true = [(_num(v) or 0.0) for v in e["true_activations"]]
            sim = [(_num(v) or 0.0) for v in e["simulated_activations"]]
            corr = pooled_correlation([true], [sim])
            corr_txt = f"r = {corr.value:.3f}" if corr.status == "ok" else "r undefined"
            scored_html.append(
                _excerpt_head(e, f"<span>{esc(corr_txt)} · max {max(true, default=0):.3g}</span>")
                + "<div class=\"pair\"><div><div class=\"pairlabel\">real activations</div>"
                + heatmap(e["tokens"], true, pos_scale, neg_scale, simulated=sim)
                + "</div><div><div class=\"pairlabel\">simulated from the explanation</div>"
                + heatmap(e["tokens"], true, pos_scale, neg_scale, simulated=sim, color="sim", sim_range=sim_range)
                + "</div></div>")
    scored = (f"<div class=\"card\" id=\"scored\"><h2>Scored excerpts: real vs simulated</h2>"
              f"{_legend(pos_scale, legend_neg, sim_range)}{''.join(scored_html) or '<p class=muted>No simulations.</p>'}</div>")

    # ---- every kept record
    def record_block(frame: pl.DataFrame, title: str, anchor: str) -> str:
        if frame.is_empty():
            return ""
        blocks = []
        for r in frame.iter_rows(named=True):
            split = split_of.get((r["kind"], r["rank"]))
            entry = {"excerpt_id": f"{r['kind']} #{r['rank']}", "split": split, "doc_id": r.get("doc_id"),
                     "char_start": r.get("char_start"), "char_end": r.get("char_end")}
            mx = _num(r.get("max_activation"))
            if mx is None:
                mx = max((a for a in r["activations"] if a is not None), default=None)
            blocks.append(_excerpt_head(entry, f"<span>max {fmt_score(mx, 3)}</span>")
                          + heatmap(r["tokens"], r["activations"], pos_scale, neg_scale))
        return (f"<div class=\"card\" id=\"{anchor}\"><h2>{title} ({len(frame)})</h2>"
                f"{_legend(pos_scale, legend_neg)}{''.join(blocks)}</div>")

    top_html = record_block(top, "Top-activating windows (real activations)", "top")
    rnd_html = record_block(rnd, "Random windows (real activations)", "random")

    hist = histogram_svg(
        [a for acts in rnd["activations"].to_list() for a in acts] if len(rnd) else [],
        [a for acts in top["activations"].to_list() for a in acts] if len(top) else [],
        mean=_num(stats.get("mean")))
    hist_html = f"<div class=\"card\" id=\"histogram\"><h2>Activation histogram</h2>{hist}</div>"

    # ---- lineage
    checks = lin["checks"]
    verified = expl.get("prompt_verified")
    doc_rows = []
    for e in lin["excerpts"] + expl["excerpts"]:
        match = {True: "<span class=\"ok\">✓ text = tokens</span>", False: "<span class=\"bad\">✗ differs</span>",
                 None: "<span class=\"muted\">unverified</span>"}[e.get("text_matches_tokens")]
        context = ""
        if e.get("text") is not None:
            context = (f"<tr class=\"ctxrow\"><td></td><td colspan=\"5\"><details><summary>in its document</summary>"
                       f"<div class=\"ctx\">{'…' if e.get('char_start') else ''}{esc(e.get('context_before'))}"
                       f"<mark>{esc(e['text'])}</mark>{esc(e.get('context_after'))}…</div></details></td></tr>")
        doc_rows.append(
            f"<tr><td class=\"mono\">{esc(e.get('excerpt_id'))}</td><td><span class=\"tag {esc(e.get('split'))}\">"
            f"{esc(e.get('split'))}</span></td><td class=\"mono\">{esc(e.get('doc_id'))}</td><td>{esc(e.get('source'))}"
            f"</td><td class=\"num\">{esc(e.get('char_start'))}–{esc(e.get('char_end'))}</td><td>{match}</td></tr>"
            + context)
    lineage_html = f"""
<div class="card" id="lineage"><h2>Lineage</h2>
<p>{'<span class="ok">✓ every link resolves to document text</span>' if checks.get('all_links_resolved')
    else '<span class="bad">✗ not every link resolves (see the JSON below)</span>'} ·
 explanation <span class="mono">{esc(expl.get('explanation_id'))}</span> ·
 prompt sha256 <span class="mono">{esc((expl.get('prompt_sha256') or '')[:16])}…</span>
 {'<span class="ok">✓ matches the rebuilt prompt</span>' if verified else '<span class="bad">✗ differs from the rebuilt prompt</span>'}</p>
<h3>Runs</h3>{_runs_table(lin['runs'])}
<h3>Excerpts and their documents</h3>
<table><thead><tr><th>excerpt</th><th>split</th><th>doc_id</th><th>source</th><th class="num">chars</th><th>check</th>
</tr></thead><tbody>{''.join(doc_rows)}</tbody></table>
<h3>Explainer prompt</h3>
<details><summary>show the exact prompt the explainer saw</summary>
<pre class="block">{esc(_prompt_text(expl['prompt']['messages'], expl['prompt']['assistant_prefix']))}</pre></details>
<details><summary>show the lineage as JSON</summary><pre class="block" id="lineage-json-view"></pre></details>
</div>"""
    data_script = f"<script type=\"application/json\" id=\"lineage-json\">{script_json(lin)}</script>"
    body = header + scored + hist_html + top_html + rnd_html + lineage_html
    crumbs = f"<a href=\"../index.html\">index</a> / layer {layer} / neuron {neuron}"
    return page(f"Layer {layer} neuron {neuron} — neuron viewer", crumbs, body, data=data_script)


def write_layer_pages(storage_dir: str | os.PathLike, layer: int, out_dir: str | os.PathLike | None = None,
                      runs: Mapping[str, Any] | None = None, documents: Documents | None = None) -> list[Path]:
    """Write `<out>/<layer>/<neuron>.html` for every scored neuron of `layer`; pages of neurons no longer scored
    are removed. `runs` is the lineage's stage → run info for this layer."""
    out = Path(out_dir) if out_dir is not None else viewer_dir(storage_dir)
    data = LayerData(storage_dir, layer, documents)
    neurons = data.neurons()
    written = []
    for i, n in enumerate(neurons):
        neighbours = (neurons[i - 1] if i > 0 else None, neurons[i + 1] if i + 1 < len(neurons) else None)
        written.append(write_text_atomic(render_neuron_page(data, n, runs, neighbours),
                                          neuron_page_path(out, layer, n)))
    keep = {p.name for p in written}
    for stale in (out / str(int(layer))).glob("*.html"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return written


def write_viewer(storage_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 layers: Iterable[int] | None = None,
                 runs: Mapping[int, Mapping[str, Any]] | None = None) -> Path:
    """Write the whole viewer (neuron pages of `layers`, default every scored layer, then the index) and return
    the index path. `runs` maps layer → (stage → run info) for the lineage sections."""
    storage_dir = Path(storage_dir)
    if not storage_dir.is_dir():
        raise NdxInputError(f"storage folder {storage_dir} does not exist: run the pipeline first.")
    have = available_layers(storage_dir)
    chosen = sorted(set(int(x) for x in layers)) if layers is not None else have
    if not chosen:
        raise NdxInputError(f"no layer has scores under {storage_dir}: run the pipeline first.")
    missing = [x for x in chosen if x not in have]
    if missing:
        raise NdxInputError(f"layers {missing} have no scores under {storage_dir} (scored layers: {have}).")
    out = Path(out_dir) if out_dir is not None else viewer_dir(storage_dir)
    documents = Documents(storage_dir)
    runs = runs or {}
    for layer in chosen:
        write_layer_pages(storage_dir, layer, out, runs.get(layer) or runs.get(str(layer)), documents)
    # The index covers the layers just written and any other scored layer whose pages are already there.
    return write_index(storage_dir, out)
