"""Checks of each stage's output, as plain functions (the Dagster layer turns them into asset checks).

Each returns a `Check`: passed, a description, a small dict of counts for the UI, and how serious a failure is
("error": the layer's data must not flow on; "warn": worth a look, nothing stops).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import polars as pl

from ndx_pipeline.core import contract
from ndx_pipeline.core.contract import (
    ACTIVATING,
    CALIBRATION,
    DEAD,
    EXPLAIN,
    FAILED_UNIT,
    NON_ACTIVATING,
    RANDOM,
    SCORE_RANDOM,
    SCORE_TOP,
    STATUS_OK,
    TOP,
)
from ndx_pipeline.core.method import controls

ERROR, WARN = "error", "warn"
FAILURE_SHARE_WARN = 0.25  # above this share of failed LLM items, a stage's failure check warns


class Check(NamedTuple):
    passed: bool
    description: str
    details: dict
    severity: str = ERROR


def top_windows_ordered(records: pl.DataFrame) -> Check:
    """Per unit, `top` rows have ranks 0..k-1 and non-increasing max activation."""
    top = (records.select("kind", "neuron", "rank", "max_activation")  # narrow first: a filter copies what it keeps
           .filter(pl.col("kind") == TOP).sort(["neuron", "rank"]))
    bad = (top.group_by("neuron", maintain_order=True)
           .agg(((pl.col("rank") != pl.int_range(pl.len())).any() | (pl.col("max_activation").diff() > 0).any())
                .alias("bad"))
           .filter(pl.col("bad"))["neuron"].to_list())
    return (not bad, "top windows are ranked by max activation" if not bad
            else f"neurons {bad[:10]} have top windows out of order", {"neurons_out_of_order": len(bad)})


def record_counts(records: pl.DataFrame, neurons: list[int], top_k: int, random_k: int) -> Check:
    """Every selected unit has random_k `random` rows (when the corpus allows) and 1..top_k `top` rows (top_k
    unless it fired in fewer windows), or, when it never fired, exactly one `dead` row and nothing else (one
    `failed` row when its activation was not finite somewhere)."""
    kind = pl.col("kind")
    # narrow first: a group_by over the wide records frame costs 50 ms, over these two columns 3 ms
    counts = records.select("neuron", "kind").group_by("neuron").agg(
        top=(kind == TOP).sum(), random=(kind == RANDOM).sum(),
        dead=((kind == DEAD) | (kind == FAILED_UNIT)).sum(), rows=pl.len())
    wanted = pl.DataFrame({"neuron": neurons}, schema={"neuron": records.schema["neuron"]})
    per_unit = wanted.join(counts, on="neuron", how="left", maintain_order="left").fill_null(0)
    is_dead = pl.col("dead") > 0
    right = pl.when(is_dead).then(pl.col("rows") == 1).otherwise(
        pl.col("top").is_between(1, top_k) & (pl.col("random") == random_k))
    missing = per_unit.filter(~right)["neuron"].to_list()
    dead = per_unit.filter(is_dead)["neuron"].to_list()
    extra = sorted(counts.join(wanted, on="neuron", how="anti")["neuron"].to_list())
    ok = not missing and not extra
    desc = (f"{len(neurons)} units × (≤ {top_k} top + {random_k} random) rows" + (f", {len(dead)} dead" if dead else "")
            if ok else f"row counts differ for units {missing[:10]}; unexpected units {extra[:10]}")
    return ok, desc, {"rows": len(records), "neurons": len(neurons), "neurons_with_wrong_counts": len(missing),
                      "dead_units": len(dead)}


def splits_disjoint(excerpts: pl.DataFrame) -> Check:
    """No window shown to the explainer, or used to choose among candidate explanations (calibration), is scored,
    per unit; and no calibration window was shown to the explainer."""
    rows = excerpts.select("neuron", "split", "window_index")
    explain = rows.filter(pl.col("split") == EXPLAIN)
    scored = rows.filter(pl.col("split").is_in([SCORE_TOP, SCORE_RANDOM]))
    calibration = rows.filter(pl.col("split") == CALIBRATION)
    key = ["neuron", "window_index"]
    leaks = sorted(set(explain.join(scored, on=key, how="semi")["neuron"].to_list())
                   | set(calibration.join(pl.concat([explain, scored]), on=key, how="semi")["neuron"].to_list()))
    return (not leaks, "explain and score excerpts are disjoint" if not leaks
            else f"neurons {leaks[:10]} are scored on windows the explainer saw", {"leaking_neurons": len(leaks)})


def excerpt_counts(excerpts: pl.DataFrame, explain_n: int, score_top_n: int, score_random_n: int) -> Check:
    want = {EXPLAIN: explain_n, SCORE_TOP: score_top_n, SCORE_RANDOM: score_random_n}
    got = excerpts.group_by(["neuron", "split"]).len()
    bad = sorted({int(n) for n, s, c in got.iter_rows() if s in want and c != want[s]})
    n_neurons = excerpts["neuron"].n_unique()
    splits_per_neuron = (excerpts.filter(pl.col("split").is_in(list(want))).group_by("neuron")
                         .agg(pl.col("split").n_unique())["split"].to_list())
    missing_split = any(x != sum(1 for v in want.values() if v) for x in splits_per_neuron)
    ok = not bad and not missing_split
    return (ok, f"{n_neurons} neurons × {want}" if ok else
            f"wrong excerpt counts for neurons {bad[:10]}" + ("; a split is missing" if missing_split else ""),
            {"neurons": n_neurons, "rows": len(excerpts)})


def every_neuron_explained(explanations: pl.DataFrame, excerpts: pl.DataFrame) -> Check:
    """One kept row per neuron of the layer's excerpts: ok with text, or failed with a reason. With best-of-k
    candidates (a `selected` column) exactly one candidate per neuron is the kept one."""
    want = set(excerpts["neuron"].unique().to_list())
    kept = contract.kept(explanations)
    have = kept["neuron"].to_list()
    missing = sorted(want - set(have))
    dup = len(have) - len(set(have))
    bad_ok = explanations.filter((pl.col("status") == STATUS_OK) & (pl.col("explanation").is_null()
                                                                | (pl.col("explanation") == "")))
    bad_failed = explanations.filter((pl.col("status") != STATUS_OK) & pl.col("error").is_null())
    ok = not missing and not dup and bad_ok.is_empty() and bad_failed.is_empty()
    failed = int((explanations["status"] != STATUS_OK).sum())
    desc = (f"{len(have)} neurons explained ({failed} failed, each with a reason)" if ok else
            f"missing neurons {missing[:10]}, {dup} duplicates, {len(bad_ok)} empty ok rows, "
            f"{len(bad_failed)} failed rows without a reason")
    return ok, desc, {"neurons": len(have), "failed": failed, "missing": len(missing)}


def simulations_well_formed(simulations: pl.DataFrame) -> Check:
    """ok rows predict one value in [0, 10] per token; failed rows carry a reason."""
    bad = 0
    for row in simulations.iter_rows(named=True):
        if row["status"] == STATUS_OK:
            sim = row["simulated_activations"]
            if len(sim) != len(row["tokens"]) or any(not (0.0 <= v <= 10.0) for v in sim):
                bad += 1
        elif not row["error"]:
            bad += 1
    failed = int((simulations["status"] != STATUS_OK).sum()) if len(simulations) else 0
    return (bad == 0, f"{len(simulations)} simulated excerpts ({failed} failed)" if bad == 0 else
            f"{bad} simulated excerpts are malformed", {"excerpts": len(simulations), "failed": failed})


def scores_valid(scores: pl.DataFrame) -> Check:
    """Each score is in [-1, 1] with status ok, or NaN with a status saying why."""
    bad = 0
    for row in scores.iter_rows(named=True):
        s = row["score"]
        if s is None or math.isnan(s):
            bad += row["status"] == STATUS_OK or not row["status"]
        else:
            bad += not (-1.0 <= s <= 1.0) or row["status"] != STATUS_OK
    return (bad == 0, "scores within [-1, 1], or NaN with a status" if bad == 0 else f"{bad} invalid score rows",
            {"neurons": len(scores), "invalid": bad})


def token_table_complete(table: pl.DataFrame, records: pl.DataFrame, counted: bool) -> Check:
    """Counted: every neuron of the records has rows, and its counts add up to the tokens its moments were taken
    over (each neuron saw every token of the corpus once). Not counted (lookup baseline off): no rows at all."""
    if not counted:
        return (table.is_empty(), "not counted: the lookup baseline is off" if table.is_empty()
                else f"{len(table)} rows although the lookup baseline is off", {"rows": len(table)})
    want = dict(records.select("neuron", "neuron_token_count").group_by("neuron").first().iter_rows())
    got = dict(table.group_by("neuron").agg(pl.col("count").sum()).iter_rows()) if len(table) else {}
    bad = sorted(int(n) for n in want if got.get(n) != want[n])
    return (not bad, f"{len(want)} neurons, each over all {next(iter(want.values()), 0)} tokens" if not bad
            else f"neurons {bad[:10]} have token counts that differ from their records",
            {"rows": len(table), "neurons": len(got), "neurons_with_wrong_counts": len(bad)})


def baselines_explained(baseline_explanations: pl.DataFrame, excerpts: pl.DataFrame, names) -> Check:
    """One row per neuron for each baseline of `names` (ok, or failed with a reason), and none for any other."""
    neurons = set(excerpts["neuron"].unique().to_list())
    problems = []
    for name in names:
        rows = baseline_explanations.filter(pl.col("baseline") == name)
        if sorted(rows["neuron"].to_list()) != sorted(neurons):
            problems.append(f"{name}: {len(rows)} rows for {len(neurons)} neurons")
    extra = sorted(set(baseline_explanations["baseline"].unique().to_list()) - set(names))
    if extra:
        problems.append(f"rows of baselines that are off: {extra}")
    unexplained = baseline_explanations.filter((pl.col("status") != STATUS_OK) & pl.col("error").is_null())
    if len(unexplained):
        problems.append(f"{len(unexplained)} failed rows without a reason")
    failed = int((baseline_explanations["status"] != STATUS_OK).sum()) if len(baseline_explanations) else 0
    return (not problems, f"{list(names) or 'no baselines'} for {len(neurons)} neurons ({failed} failed)"
            if not problems else "; ".join(problems), {"rows": len(baseline_explanations), "failed": failed})


def failure_share(frame: pl.DataFrame, what: str, blocking: bool = True,
                  warn_above: float = FAILURE_SHARE_WARN) -> Check:
    """How many of an LLM stage's items failed (rows whose `status` is not ok). Every item failed: an error (the
    layer has nothing to go on with) when `blocking`, else a warning; more than `warn_above` of them: a warning."""
    total = len(frame)
    failed = int((frame["status"] != STATUS_OK).sum()) if total else 0
    details = {"items": total, "failed": failed}
    if total and failed == total:
        return Check(False, f"every one of the {total} {what} failed", details, ERROR if blocking else WARN)
    if total and failed > warn_above * total:
        return Check(False, f"{failed} of {total} {what} failed (more than {warn_above:.0%})", details, WARN)
    return Check(True, f"{failed} of {total} {what} failed", details)


def scorer_excerpts_held_out(scorer_excerpts: pl.DataFrame, excerpts: pl.DataFrame, per_split: int,
                             left_out=()) -> Check:
    """The scorers' excerpts: per neuron, no window the explainer saw (explain) or best-of-k chose on
    (calibration), no window both activating and non-activating, and `per_split` of each (no rows at all when
    `per_split` is 0: no scorer runs); none for the neurons `left_out` (too few windows of a kind)."""
    if per_split == 0:
        return (scorer_excerpts.is_empty(), "none: no scorer runs" if scorer_excerpts.is_empty()
                else f"{len(scorer_excerpts)} rows although no scorer runs", {"rows": len(scorer_excerpts)})
    seen = {(int(n), w) for n, w in excerpts.filter(pl.col("split").is_in([EXPLAIN, CALIBRATION]))
            .select("neuron", "window_index").iter_rows()}
    leaks, bad_counts = set(), set()
    for (neuron,), g in scorer_excerpts.group_by(["neuron"], maintain_order=True):
        windows = g["window_index"].to_list()
        if any((int(neuron), w) in seen for w in windows) or len(set(windows)) != len(windows):
            leaks.add(int(neuron))
        counts = dict(g.group_by("split").len().iter_rows())
        if counts != {ACTIVATING: per_split, NON_ACTIVATING: per_split}:
            bad_counts.add(int(neuron))
    missing = sorted(set(excerpts["neuron"].unique().to_list()) - set(scorer_excerpts["neuron"].unique().to_list())
                     - set(left_out))
    ok = not leaks and not bad_counts and not missing
    desc = (f"{scorer_excerpts['neuron'].n_unique()} neurons × {per_split} activating + {per_split} non-activating, "
            "none seen by the explainer" + (f"; {len(left_out)} left out (too few windows of a kind)" if left_out
                                            else "") if ok else
            f"neurons {sorted(leaks)[:10]} judge windows the explainer saw (or one twice); neurons "
            f"{sorted(bad_counts)[:10]} have other counts; neurons {missing[:10]} have none")
    return ok, desc, {"rows": len(scorer_excerpts), "leaking_neurons": len(leaks), "wrong_counts": len(bad_counts)}


def judgements_well_formed(judgements: pl.DataFrame, scorer_excerpts: pl.DataFrame) -> Check:
    """Every row judges an excerpt of its neuron in scorer_excerpts; ok rows carry a verdict or a similarity in
    [-1, 1]; failed rows carry a reason."""
    known = {(int(n), e) for n, e in scorer_excerpts.select("neuron", "excerpt_id").iter_rows()}
    bad = 0
    for row in judgements.iter_rows(named=True):
        if (int(row["neuron"]), row["excerpt_id"]) not in known:
            bad += 1
        elif row["status"] == STATUS_OK:
            sim = row["similarity"]
            bad += row["verdict"] is None and (sim is None or not math.isfinite(sim) or not -1.0001 <= sim <= 1.0001)
        else:
            bad += not row["error"]
    failed = int((judgements["status"] != STATUS_OK).sum()) if len(judgements) else 0
    return (bad == 0, f"{len(judgements)} judgements ({failed} failed, each with a reason)" if bad == 0 else
            f"{bad} judgements are malformed or judge an excerpt that is not in scorer_excerpts",
            {"judgements": len(judgements), "failed": failed, "malformed": bad})


def scorer_scores_valid(scores: pl.DataFrame, explanations: pl.DataFrame, on: bool) -> Check:
    """A scorer's scores: one row per neuron with a kept explanation, each in [0, 1] (balanced accuracy, ROC AUC)
    or NaN with a status saying why; no rows when the scorer is off."""
    if not on:
        return (scores.is_empty(), "none: the scorer is off" if scores.is_empty()
                else f"{len(scores)} rows although the scorer is off", {"neurons": len(scores)})
    kept = contract.kept(explanations)
    want, have = sorted(kept["neuron"].to_list()), sorted(scores["neuron"].to_list())
    bad = 0
    for row in scores.iter_rows(named=True):
        s = row["score"]
        if s is None or math.isnan(s):
            bad += row["status"] == STATUS_OK or not row["status"]
        else:
            bad += not (0.0 <= s <= 1.0) or row["status"] != STATUS_OK
    ok = bad == 0 and want == have
    return (ok, f"{len(scores)} neurons, scores in [0, 1] or NaN with a status" if ok else
            f"{bad} invalid score rows; neurons {have[:10]} scored, {want[:10]} explained",
            {"neurons": len(scores), "invalid": bad})


def judge_separates(found: dict | None, judge: str, control: str | None) -> Check:
    """Warns when the judge (the simulator, or a scorer) cannot be told to rank a planted unit's true explanation
    above a wrong one: its AUC interval over the planted units (`method/controls.separation`) includes chance.
    `control`: the variant whose planted units say so (None: no control was run; nothing to say)."""
    if not found or not found.get("units"):
        return (True, f"no planted control scored by {judge}" + (f" in {control}" if control else ""), {},
                WARN)
    details = {k: found[k] for k in ("auc", "auc_lo", "auc_hi", "gap", "units")}
    text = (f"{judge}, planted units of {control}: right vs wrong explanations AUC {found['auc']:.2f} "
            f"[{found['auc_lo']:.2f}, {found['auc_hi']:.2f}]")
    if controls.includes_chance(found):
        return False, f"{text}: no better than chance, so its scores cannot rank explanations", details, WARN
    return True, text, details, WARN
