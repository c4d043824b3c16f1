"""What the scorers beside simulation share: the held-out excerpts they judge, how an excerpt is written for a
scorer LLM, the verdicts it answers with (asked in batches, parsed from plain text), and the score of each
explanation from its judgements.

**Held-out excerpts** (`held_out_excerpts`, the `scorer_excerpts` asset). Per neuron, `count` activating and
`count` non-activating windows, none of which the explainer saw (`explain`) or best-of-k chose on (`calibration`):
- activating: the activation-quantile samples of the buckets above the neuron's 0.9 quantile of window max
  (`ACTIVATING_BUCKETS`), taken in turn from the highest bucket down, so that they span the strong end of the
  neuron's range and not only its very top; then, if those run short (or the records have no quantile samples),
  its top windows in rank order;
- non-activating: the samples of the lowest bucket (window max under the median), then the neuron's random windows
  whose max is under the median or not above 0 (any random window outside its top windows when no boundaries are
  known).
Overlap with the simulation's score splits is allowed: those were held out from the explainer too.

**Verdicts** (`verdict_work`). A scorer LLM gets the explanation and a numbered batch of excerpts and answers one
line per excerpt, `<number>: 1` (the neuron fires / the marking fits) or `<number>: 0`. Plain text, so any chat
model answers it, in process or on a server, with no logprobs and no JSON mode; `parse_verdicts` reads it and a
malformed answer fails every excerpt of that prompt with the reason. The batches of a neuron are the same for our
explanation and for each baseline's (same excerpts, same order, same markings): only the explanation differs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from ndx_pipeline.core import contract
from ndx_pipeline.core.contract import (
    ACTIVATING,
    CALIBRATION,
    CONTROL_BASELINES,
    EXCERPT_SCHEMA,
    EXPLAIN,
    JUDGED_BASELINES,
    JUDGEMENT_SCHEMA,
    NON_ACTIVATING,
    QUANTILE_KIND_PREFIX,
    RANDOM,
    SCORER_SCORE_SCHEMA,
    SIMULATED_BASELINES,
    STATUS_FAILED,
    STATUS_OK,
    TOP,
    frame,
    quantile_kind,
    seed_key,
)
from ndx_pipeline.core.data.excerpts import excerpt_row
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.llm.backend import RecordableLLMError, short_text
from ndx_pipeline.core.llm.sent_prompts import sent_prompt_sha256
from ndx_pipeline.core.method.display import escape_token
from ndx_pipeline.core.method.metrics import classification, roc_auc
from ndx_pipeline.core.method.scoring import unscored_reason, with_baselines
from ndx_pipeline.core.method.work import Work

# ---------------------------------------------------------------------------------------------------------------
# Held-out excerpts

ACTIVATING_BUCKETS = (4, 3, 2)  # quantile buckets above the 0.9 quantile of window max (boundaries 0.5/0.9/0.99/0.999)
NON_ACTIVATING_BUCKET = 0  # under the median window max
MEDIAN_BOUNDARY = 0  # index of the median in a record's quantile_boundaries


def _round_robin(groups: Sequence[Sequence[dict]]) -> list[dict]:
    out, longest = [], max((len(g) for g in groups), default=0)
    for i in range(longest):
        out += [g[i] for g in groups if i < len(g)]
    return out


def held_out_excerpts(records: pl.DataFrame, excerpts: pl.DataFrame, count: int = 5,
                      left_out: dict | None = None) -> pl.DataFrame:
    """`count` activating and `count` non-activating windows per neuron of `records` (see the module docstring),
    none of them among the neuron's `explain` or `calibration` windows in `excerpts` (top_excerpts). Rows in the
    excerpts schema, split `activating` / `non_activating`. A neuron with too few: raises NdxInputError, or with
    `left_out` (a dict), is left out and (layer, neuron) → why goes there (a unit that fires in every window has no
    non-activating one: the scorers cannot judge it, and its score says so)."""
    if count < 1:
        raise NdxInputError(f"scorer_excerpts must be at least 1, not {count}.")
    seen: dict[tuple[int, int], set] = {}
    for layer, neuron, window in (excerpts.filter(pl.col("split").is_in([EXPLAIN, CALIBRATION]))
                                  .select("layer", "neuron", "window_index").iter_rows()):
        seen.setdefault((int(layer), int(neuron)), set()).add(window)
    rows = []
    for (layer, neuron), group in records.sort(["layer", "neuron", "kind", "rank"]).group_by(
            ["layer", "neuron"], maintain_order=True):
        layer, neuron = int(layer), int(neuron)
        by_kind = {k: g.sort("rank").to_dicts() for (k,), g in group.group_by(["kind"], maintain_order=True)}
        top = by_kind.get(TOP, [])
        bounds = next((b for b in group["quantile_boundaries"].to_list() if b), None)
        median = bounds[MEDIAN_BOUNDARY] if bounds else None
        top_windows = {r["window_index"] for r in top}
        strong = _round_robin([by_kind.get(quantile_kind(b), []) for b in ACTIVATING_BUCKETS]) + top
        # below the median window's max, or not firing at all (a sparse unit's median window is 0: not below it)
        weak = by_kind.get(quantile_kind(NON_ACTIVATING_BUCKET), []) + [
            r for r in by_kind.get(RANDOM, [])
            if r["window_index"] not in top_windows
            and (median is None or r["max_activation"] < median or r["max_activation"] <= 0)]
        taken = set(seen.get((layer, neuron), set()))
        unit_rows = []
        for split, candidates in ((ACTIVATING, strong), (NON_ACTIVATING, weak)):
            picked = []
            for r in candidates:
                if len(picked) < count and r["window_index"] not in taken:
                    taken.add(r["window_index"])
                    picked.append(excerpt_row(layer, neuron, split, r))
            if len(picked) < count:
                why = (f"layer {layer} neuron {neuron} has only {len(picked)} {split.replace('_', '-')} windows that "
                       f"the explainer did not see, too few for scorer_excerpts={count}")
                if left_out is None:
                    raise NdxInputError(f"{why}: use a larger corpus, more quantile samples or random windows, or a "
                                        "smaller scorer_excerpts.")
                left_out[layer, neuron] = why
                break
            unit_rows += picked
        else:
            rows += unit_rows
    return frame(rows, EXCERPT_SCHEMA)


def quantile_bucket(kind: str) -> int | None:
    """The bucket of a `quantile_<b>` record kind (None for other kinds)."""
    return int(kind[len(QUANTILE_KIND_PREFIX):]) if kind.startswith(QUANTILE_KIND_PREFIX) else None


# ---------------------------------------------------------------------------------------------------------------
# How an excerpt is written for a scorer LLM

MARK_OPEN, MARK_CLOSE = "<<", ">>"

# How every verdict prompt begins and ends; each scorer says what to judge in between.
VERDICT_PREFACE = (
    "You are checking a description of one neuron in a language model. The neuron fires on some pattern in text, "
    "and the description says which. You get the description and a numbered list of text excerpts, one per line "
    "(a line break inside an excerpt is written as \\n). "
)
VERDICT_FORM = ('Write one line per excerpt, in order: its number, a colon and the answer, as in "1: 0". Write '
                "nothing else.")


def excerpt_text(tokens: Sequence[str], marked: Sequence[int] = ()) -> str:
    """The excerpt's text on one line (newlines and tabs written as \\n and \\t), each run of consecutive `marked`
    token positions wrapped in << >> (a run's leading spaces stay outside the marks)."""
    chosen = set(marked)
    out, i = [], 0
    while i < len(tokens):
        if i not in chosen:
            out.append(escape_token(tokens[i]))
            i += 1
            continue
        j = i
        while j + 1 < len(tokens) and j + 1 in chosen:
            j += 1
        run = "".join(escape_token(t) for t in tokens[i:j + 1])
        body = run.lstrip(" ") or run  # a run of spaces alone is marked whole
        out.append(f"{run[:len(run) - len(body)]}{MARK_OPEN}{body}{MARK_CLOSE}")
        i = j + 1
    return "".join(out)


def numbered(texts: Sequence[str]) -> str:
    return "\n".join(f"Excerpt {i}: {t}" for i, t in enumerate(texts, start=1))


def verdict_lines(verdicts: Sequence[bool]) -> str:
    """An answer in the expected form: `1: 1`, `2: 0`, … one line per excerpt."""
    return "\n".join(f"{i}: {int(bool(v))}" for i, v in enumerate(verdicts, start=1))


def verdict_request(explanation: str, texts: Sequence[str]) -> str:
    """The user message: the explanation, then the numbered excerpts."""
    return f"Neuron description: {explanation}\n\n{numbered(texts)}"


def verdict_messages(system: str, description: str, examples: Sequence[tuple[str, bool]], explanation: str,
                     texts: Sequence[str]) -> list[dict]:
    """A verdict chat: the instructions; a worked example (a made-up neuron's `description` and as many of its
    `examples` — text and truth — as there are `texts`, at least one), answered; then the explanation and the
    texts to judge."""
    shown = examples[:max(1, min(len(texts), len(examples)))]
    return [{"role": "system", "content": system},
            {"role": "user", "content": verdict_request(description, [text for text, _ in shown])},
            {"role": "assistant", "content": verdict_lines([truth for _, truth in shown])},
            {"role": "user", "content": verdict_request(explanation, texts)}]


# ---------------------------------------------------------------------------------------------------------------
# The answer


class VerdictParseError(RecordableLLMError, ValueError):
    """The scorer's answer does not give one 0 or 1 for every excerpt of its prompt."""


_VERDICT = re.compile(r"^\s*(?:excerpt\s*)?(\d+)\s*[:.)=-]\s*\**\s*([01])\b", re.IGNORECASE)


def parse_verdicts(text: str, n: int) -> list[bool]:
    """The verdicts of an answer with lines `<k>: 1` / `<k>: 0` (`Excerpt k: 1` also), for excerpts 1..n. Lines
    about other numbers, and text around the lines, are ignored; a missing or contradicted verdict raises
    VerdictParseError."""
    found: dict[int, bool] = {}
    for line in (text or "").splitlines():
        match = _VERDICT.match(line)
        if not match:
            continue
        k, value = int(match.group(1)), match.group(2) == "1"
        if not 1 <= k <= n:
            continue
        if k in found and found[k] != value:
            raise VerdictParseError(f"the scorer answered both 0 and 1 for excerpt {k}: {short_text(text, 120)!r}")
        found[k] = value
    missing = [k for k in range(1, n + 1) if k not in found]
    if missing:
        listed = ", ".join(map(str, missing[:10]))
        raise VerdictParseError(f"the scorer gave no 0/1 verdict for excerpt{'s' if len(missing) > 1 else ''} "
                                f"{listed} of {n}: {short_text(text, 120)!r}")
    return [found[k] for k in range(1, n + 1)]


# ---------------------------------------------------------------------------------------------------------------
# Asking for verdicts


@dataclass(frozen=True)
class Shown:
    """One excerpt as a scorer LLM sees it: the scorer_excerpts row, the truth, and the marked token positions
    (fuzzing; None otherwise)."""

    excerpt: dict
    label: bool
    marked: tuple[int, ...] | None = None

    def text(self) -> str:
        return excerpt_text(self.excerpt["tokens"], self.marked or ())


def judged_explanations(explanations: pl.DataFrame) -> list[dict]:
    """The explanations a scorer judges: every kept, usable one (ours; or a baseline's, named by `baseline`)."""
    ok = contract.usable(explanations).sort(["layer", "neuron", "explanation_id"])
    return [{**r, "baseline": r.get("baseline")} for r in ok.iter_rows(named=True)]


def neuron_rng(seed: int, layer: int, neuron: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(layer), seed_key(neuron), int(stream)])


def by_neuron(excerpts: pl.DataFrame) -> dict[tuple[int, int], list[dict]]:
    """The scorer excerpts of each neuron, activating first, in rank order within each split."""
    out: dict[tuple[int, int], list[dict]] = {}
    order = {ACTIVATING: 0, NON_ACTIVATING: 1}
    rows = sorted(excerpts.iter_rows(named=True),
                  key=lambda r: (r["layer"], r["neuron"], order.get(r["split"], 2), r["excerpt_id"]))
    for r in rows:
        out.setdefault((int(r["layer"]), int(r["neuron"])), []).append(r)
    return out


def base_row(expl: dict, shown: Shown, scorer: str) -> dict:
    ex = shown.excerpt
    return {"layer": ex["layer"], "neuron": ex["neuron"], "explanation_id": expl["explanation_id"],
            "baseline": expl.get("baseline"), "excerpt_id": ex["excerpt_id"], "split": ex["split"],
            "marked": list(shown.marked) if shown.marked is not None else None, "label": shown.label,
            "verdict": None, "similarity": None, "prompt": None, "prompt_sha256": None, "scorer": scorer,
            "status": STATUS_OK, "error": None}


def verdict_work(explanations: pl.DataFrame, excerpts: pl.DataFrame, backend, *,
                 shown: Callable[[list[dict], int, int], list[Shown]],
                 messages: Callable[[str, Sequence[Shown]], list[dict]],
                 batch_size: int = 5, seed: int = 0) -> Work:
    """One prompt per batch of `batch_size` excerpts per judged explanation: `shown(neuron's excerpts, layer,
    neuron)` says what the scorer sees of the neuron (shuffled here with a generator seeded by (seed, layer,
    neuron), the same for every explanation of the neuron), `messages(explanation, batch)` the chat. Rows: one
    per explanation × excerpt shown (`JUDGEMENT_SCHEMA`); a failed call or unparsable answer fails its batch's
    rows with the reason."""
    if batch_size < 1:
        raise NdxInputError(f"scorer_batch must be at least 1, not {batch_size}.")
    pools = by_neuron(excerpts)
    batches: dict[tuple[int, int], list[list[Shown]]] = {}
    for (layer, neuron), rows in pools.items():
        mine = shown(rows, layer, neuron)
        order = neuron_rng(seed, layer, neuron).permutation(len(mine))
        mine = [mine[i] for i in order]
        batches[(layer, neuron)] = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    items = [(expl, b, batch) for expl in judged_explanations(explanations)
             for b, batch in enumerate(batches.get((int(expl["layer"]), int(expl["neuron"])), []))]

    def run(item) -> list[dict]:
        expl, number, batch = item
        chat = messages(expl["explanation"], batch)
        sha = sent_prompt_sha256(backend.sent_prompt(chat, ""))
        rows = [base_row(expl, s, backend.name) | {"prompt": number, "prompt_sha256": sha} for s in batch]
        try:
            completion = backend.chat(chat, "", max_answer_tokens(len(batch)), 0.0, seed)
            try:
                verdicts = parse_verdicts(completion.text, len(batch))
            except VerdictParseError:
                backend.stats.add(failures=1)
                raise
            for row, verdict in zip(rows, verdicts):
                row["verdict"] = verdict
        except RecordableLLMError as exc:
            for row in rows:
                row.update(status=STATUS_FAILED, error=str(exc))
        return rows

    return Work(items, run, lambda outs: frame([r for rows in outs for r in rows], JUDGEMENT_SCHEMA))


ANSWER_TOKENS_BASE, ANSWER_TOKENS_PER_EXCERPT = 4, 5  # "12: 1\n" is at most 5 tokens in the tokenizers we know


def max_answer_tokens(n: int) -> int:
    """The answer's length limit for a batch of n excerpts (part of every cached request)."""
    return ANSWER_TOKENS_BASE + ANSWER_TOKENS_PER_EXCERPT * n


# ---------------------------------------------------------------------------------------------------------------
# Scores

BALANCED_ACCURACY, ROC_AUC = "balanced_accuracy", "roc_auc"
_UNDEFINED = {k: float("nan") for k in ("score", "precision", "recall", "f1")}


def score_judgements(judgements: pl.DataFrame, explanations: pl.DataFrame, scorer: str,
                     metric: str) -> pl.DataFrame:
    """One row per kept explanation of `explanations` (SCORER_SCORE_SCHEMA, no baselines): `metric` over its
    judgements — balanced accuracy of the verdicts (with precision, recall, F1) or the ROC AUC of the
    similarities. Any failed judgement fails the row with the first reason (a score over fewer excerpts would
    be another score); a metric with one class missing is NaN with a status saying so."""
    rows = []
    for expl in contract.kept(explanations).sort(["layer", "neuron"]).iter_rows(named=True):
        row = {"layer": expl["layer"], "neuron": expl["neuron"], "explanation_id": expl["explanation_id"],
               "explanation": expl["explanation"], "scorer": scorer, "metric": metric, "judged": 0}
        mine = judgements.filter(pl.col("explanation_id") == expl["explanation_id"])
        reason = unscored_reason(expl, mine, "judgements")
        if reason:
            rows.append({**row, **_UNDEFINED, "status": reason})
            continue
        labels = mine["label"].to_list()
        row["judged"] = len(mine)
        if metric == ROC_AUC:
            row.update(score=roc_auc(labels, mine["similarity"].to_list()), precision=None, recall=None, f1=None)
        else:
            found = classification(labels, mine["verdict"].to_list())
            row.update(score=found.balanced_accuracy, precision=found.precision, recall=found.recall, f1=found.f1)
        row["status"] = STATUS_OK if np.isfinite(row["score"]) else \
            "undefined: the excerpts judged are all of one class"
        rows.append(row)
    return frame(rows, SCORER_SCORE_SCHEMA)


def scores_with_baselines(judgements: pl.DataFrame, explanations: pl.DataFrame,
                          baseline_explanations: pl.DataFrame | None,
                          score: Callable[[pl.DataFrame, pl.DataFrame], pl.DataFrame]) -> pl.DataFrame:
    """`score(judgements, explanations)` of our explanations, with a `baseline_<name>` column per simulated
    baseline (random, token_list): its explanation judged and scored the same way, NaN where it has none."""
    ours = score(judgements, explanations)
    theirs = {}
    if baseline_explanations is not None and len(baseline_explanations):
        for name in JUDGED_BASELINES:
            rows = baseline_explanations.filter(pl.col("baseline") == name)
            if len(rows):
                theirs[name] = score(judgements, rows)
    out = with_baselines(ours.drop([contract.baseline_column(b) for b in SIMULATED_BASELINES]), theirs)
    for name in SIMULATED_BASELINES:
        if contract.baseline_column(name) not in out.columns:
            out = out.with_columns(pl.lit(float("nan")).alias(contract.baseline_column(name)))
    # a planted unit's controls (true and wrong explanation) beside, when it has them
    controls = [contract.baseline_column(b) for b in CONTROL_BASELINES if b in theirs]
    return out.select([*SCORER_SCORE_SCHEMA, *controls]).cast(
        {**SCORER_SCORE_SCHEMA, **{col: pl.Float64 for col in controls}})
