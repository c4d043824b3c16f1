"""The controls of a variant, read from the data contract: its planted control (`<variant>.planted`, units whose
activation is a known token rule) says, per judge (the simulator and each scorer), whether it tells a right
explanation from a wrong one, and how close the explainer comes to the rules; its random-weight control
(`<variant>.random-weights`, the same units on a re-initialized subject model) says how much of each score the
training accounts for (`core/method/controls.py`).

Read by the CLI's summary, `compare` and the viewer's index; computed from the stored scores files alone."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from ndx_pipeline.core.contract import SCORER_ASSETS, SCORES
from ndx_pipeline.core.data.planted import RULES
from ndx_pipeline.core.method.controls import SIMULATION, judge_controls, trained_minus_random, verdict
from ndx_pipeline.core.storage import asset_path, variant_layers
from ndx_pipeline.core.variants import RANDOM_WEIGHTS_CONTROL, control_name


def read_controls(storage: str | Path, variant: str) -> dict | None:
    """`judge_controls` of `variant`'s planted control (or of `variant` itself when it is one), from its files;
    None when it has no scores."""
    storage = Path(storage)
    for name in (variant, control_name(variant)):
        layers = variant_layers(storage, SCORES, name)
        if not layers or "baseline_planted_true" not in pl.read_parquet_schema(asset_path(storage, SCORES,
                                                                                          layers[0], name)):
            continue  # no scores, or a variant of real units: its control is the other name
        scores = pl.concat([pl.read_parquet(asset_path(storage, SCORES, layer, name)) for layer in layers],
                           how="diagonal_relaxed")
        judged = {}
        for scorer, (_, asset) in SCORER_ASSETS.items():
            found = [asset_path(storage, asset, layer, name) for layer in layers]
            frames = [pl.read_parquet(p) for p in found if p.exists()]
            if frames:
                judged[scorer] = pl.concat(frames, how="diagonal_relaxed")
        return {"variant": variant, "control": name, "layers": layers, **judge_controls(scores, judged)}
    return None


def _f(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "nan"


def judge_line(judge: str, found: dict) -> str:
    """One judge's separation in one line, with what it means."""
    return (f"{judge}: right vs wrong explanations AUC {_f(found['auc'])} [{_f(found['auc_lo'])}, "
            f"{_f(found['auc_hi'])}], gap {_f(found['gap'], 3)} [{_f(found['gap_lo'], 3)}, {_f(found['gap_hi'], 3)}] "
            f"over {found['units']} planted units — {verdict(found)}")


def control_lines(found: dict | None) -> list[str]:
    """The controls in a few lines: the heading, one line per judge, one for the explainer."""
    if not found:
        return []
    lines = [f"Controls of {found['variant']} (variant {found['control']}: {len(RULES)} planted units, known token "
             "rules; each judged with its true explanation and another unit's):"]
    judges = found["judges"]
    for judge in [SIMULATION, *sorted(j for j in judges if j != SIMULATION)]:
        if judge in judges:
            lines.append("  " + judge_line(judge, judges[judge]))
    rec = found.get("recovery")
    if rec:
        lines.append(f"  explainer recovery: its own explanations score {_f(rec['share'])} [{_f(rec['share_lo'])}, "
                     f"{_f(rec['share_hi'])}] of the true ones' (simulation); {rec['names_rule']} of "
                     f"{rec['explained']} name their rule")
    return lines


def _frames(storage: Path, asset: str, variant: str) -> pl.DataFrame | None:
    found = [asset_path(storage, asset, layer, variant) for layer in variant_layers(storage, asset, variant)]
    frames = [pl.read_parquet(p) for p in found if p.exists()]
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


def read_random_weights(storage: str | Path, variant: str) -> dict | None:
    """Trained minus random weights for `variant` and its random-weight control, per judge (simulation and each
    scorer both have scores for), per layer and pooled; None when the control has no scores."""
    storage, control = Path(storage), control_name(variant, RANDOM_WEIGHTS_CONTROL)
    judges = {SIMULATION: SCORES, **{scorer: asset for scorer, (_, asset) in SCORER_ASSETS.items()}}
    out = {}
    for judge, asset in judges.items():
        trained, random = _frames(storage, asset, variant), _frames(storage, asset, control)
        if trained is not None and random is not None and len(trained) and len(random):
            out[judge] = trained_minus_random(trained, random)
    return {"variant": variant, "control": control, "judges": out} if out else None


def random_weight_lines(found: dict | None) -> list[str]:
    """Trained minus random weights, one line per judge (each layer, then pooled)."""
    if not found:
        return []
    lines = [f"Random-weight control of {found['variant']} (variant {found['control']}: the same units on the subject "
             "model with re-initialized weights), trained − random mean score [95 % interval]:"]
    for judge, rows in found["judges"].items():
        parts = [f"layer {r['layer']} {_f(r['diff'], 3)} [{_f(r['diff_lo'], 3)}, {_f(r['diff_hi'], 3)}] "
                 f"({r['units']} units)" for r in rows]
        lines.append(f"  {judge}: " + "; ".join(parts))
    return lines


def controls_text(storage: str | Path, variant: str) -> list[str]:
    """Every control of `variant` that has scores, in lines (nothing when none ran)."""
    planted = control_lines(read_controls(storage, variant))
    random = random_weight_lines(read_random_weights(storage, variant))
    return [*planted, *([""] if planted and random else []), *random]
