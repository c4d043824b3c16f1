"""Lineage of one neuron's score: every link from the score back to the text of the documents.

`lineage(storage, layer, neuron, variant=...)` follows the data contract's files of one variant (those under
`<storage>/<asset>/<variant>/`; the corpus is every variant's):

    scores ──explanation_id──► explanations ──prompt_sha256──► the explainer prompt, rebuilt from the explain excerpts
       └──explanation_id──► simulations ──excerpt_id──► top_excerpts ──doc_id + char span──► corpus text
    <scorer>_scores ──explanation_id──► <scorer>_judgements ──excerpt_id──► scorer_excerpts ──doc_id + span──► text

and returns one JSON-ready dict. Nothing is trusted blindly: the prompt is rebuilt as the explainer's backend sent
it (known from the stored `explainer` name: `local:…` renders the model's chat template, `openai-compatible:…`
rewrites the system message; fitted to the context as the row's `excerpts_shown` / `prompt_fitted` say) and its hash
compared with the stored one — where the sent form cannot be rebuilt, lineage says so rather than claim a match —,
each excerpt's text is cut out of its document by character span and compared with the concatenation
of its tokens, and the `checks` field says what held. Dagster run ids, partitions and code/data versions are not in
the Parquet files; the Dagster layer passes them in as `runs` (stage → info).

Every function that reads a layer file takes the variant it belongs to, and never guesses one: two variants may hold
the same layer and unit, explained differently.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from ndx_pipeline.core.contract import (
    EXPLAIN,
    MLP_NEURON,
    OUTPUT_TOKENS,
    SCORED_SPLITS,
    SCORER_ASSETS,
    SCORER_EXCERPTS,
    STAGES,
    unit_index,
    unit_label,
)
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.method.prompt_rebuild import rebuild_prompt
from ndx_pipeline.core.storage import asset_path, read_asset, read_asset_if_any, stored_variants, variant_layers

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_CHARS = 200


# ---------------------------------------------------------------------------------------------------- reading


def available_layers(storage_dir: str | os.PathLike, asset: str = "scores", *, variant: str) -> list[int]:
    """The layers of `variant` that have a file for `asset` under `storage_dir`, in order."""
    return variant_layers(storage_dir, asset, variant)


class Documents:
    """doc_id → (source, text) of the corpus, read lazily and once."""

    def __init__(self, storage_dir: str | os.PathLike, frame: pl.DataFrame | None = None):
        self.path = asset_path(storage_dir, "corpus")
        self._frame = frame
        self._by_id: dict[str, tuple[str, str]] | None = None

    def _load(self) -> dict[str, tuple[str, str]]:
        if self._by_id is None:
            frame = self._frame
            if frame is None:
                if not self.path.exists():
                    raise NdxInputError(f"the corpus file {self.path} does not exist: materialize corpus first.")
                frame = pl.read_parquet(self.path, columns=["doc_id", "source", "text"])
            self._by_id = {d: (s, t) for d, s, t in zip(frame["doc_id"], frame["source"], frame["text"])}
        return self._by_id

    def get(self, doc_id: str) -> tuple[str, str] | None:
        return self._load().get(doc_id)


class LayerData:
    """The contract files of one layer of one variant, read once; `neuron(...)` filters them to one neuron."""

    def __init__(self, storage_dir: str | os.PathLike, layer: int, variant: str, documents: Documents | None = None):
        self.storage_dir = Path(storage_dir)
        self.layer = int(layer)
        self.variant = variant
        self.scores = read_asset(storage_dir, "scores", layer, variant)
        self.explanations = read_asset(storage_dir, "explanations", layer, variant)
        self.simulations = read_asset(storage_dir, "simulations", layer, variant)
        self.excerpts = read_asset(storage_dir, "top_excerpts", layer, variant)
        self.records = read_asset_if_any(storage_dir, "activation_records", layer, variant)
        self.output_tokens = read_asset_if_any(storage_dir, OUTPUT_TOKENS, layer, variant)  # older storage: none
        self.documents = documents or Documents(storage_dir)
        # the scorers beside simulation, where they ran (older storage has none of these files)
        self.scorer_excerpts = read_asset_if_any(storage_dir, SCORER_EXCERPTS, layer, variant)
        self.scorers: dict[str, tuple[pl.DataFrame, pl.DataFrame]] = {}
        for name, (judgements, scores) in SCORER_ASSETS.items():
            found = (read_asset_if_any(storage_dir, scores, layer, variant),
                     read_asset_if_any(storage_dir, judgements, layer, variant))
            if found[0] is not None and len(found[0]) and found[1] is not None:
                self.scorers[name] = found

    def neurons(self) -> list[int]:
        return sorted(int(n) for n in self.scores["neuron"].unique())

    def neuron(self, asset: str, neuron: int) -> pl.DataFrame:
        frame = getattr(self, asset)
        if frame is None:
            return pl.DataFrame()
        return frame.filter(pl.col("neuron") == neuron)


# ---------------------------------------------------------------------------------------------------- helpers


def json_safe(value: Any) -> Any:
    """Floats that JSON cannot hold (NaN, ±inf) become None, recursively; tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _row(frame: pl.DataFrame) -> dict:
    return frame.row(0, named=True) if len(frame) else {}


def resolve_excerpt_text(documents: Documents, doc_id: str, char_start: int | None, char_end: int | None,
                         tokens: list[str] | None, context_chars: int = CONTEXT_CHARS) -> dict:
    """The document behind an excerpt and the excerpt's text as it stands there.

    `text` is the slice of the document's text by the stored character span. When the span is unknown (-1 or
    null: a tokenizer without offsets), the concatenated tokens are looked up in the document instead and
    `span_from` says so. `text_matches_tokens` is True/False when the tokens round-trip to text, None when they
    cannot (a token holds a partial UTF-8 character, decoded as U+FFFD). `context_before` / `context_after` hold
    up to `context_chars` characters of the document around the excerpt.
    """
    joined = "".join(tokens) if tokens is not None else None
    out: dict[str, Any] = {"doc_id": doc_id, "source": None, "char_start": char_start, "char_end": char_end,
                           "text": None, "span_from": "stored", "document_found": False,
                           "text_matches_tokens": None}
    doc = documents.get(doc_id)
    if doc is None:
        return out
    source, text = doc
    out["source"], out["document_found"] = source, True
    known = char_start is not None and char_end is not None and 0 <= char_start <= char_end <= len(text)
    if not known and joined:
        at = text.find(joined)
        if at >= 0:
            out["char_start"], out["char_end"], out["span_from"] = at, at + len(joined), "token_search"
            known = True
    if not known:
        out["span_from"] = "unknown"
        return out
    out["text"] = text[out["char_start"]:out["char_end"]]
    out["context_before"] = text[max(0, out["char_start"] - context_chars):out["char_start"]]
    out["context_after"] = text[out["char_end"]:out["char_end"] + context_chars]
    if joined is not None and REPLACEMENT_CHAR not in joined:
        out["text_matches_tokens"] = out["text"] == joined
    return out


def partition_of(layer: int, variant: str) -> str:
    """The Dagster partition of a layer of a variant, as the instance names it: `<layer>|<variant>`."""
    return f"{int(layer)}|{variant}"


def normalize_runs(runs: Mapping[str, Any] | None, layer: int, variant: str) -> dict[str, dict | None]:
    """`runs` as given by the Dagster layer (stage → run id, or stage → dict of run_id, partition, code_version,
    data_version, …), with every stage present and the partition filled in where it is implied (`partition_of`;
    none for the corpus)."""
    runs = runs or {}
    unknown = sorted(set(runs) - set(STAGES))
    out: dict[str, dict | None] = {}
    for stage in (*STAGES, *unknown):
        info = runs.get(stage)
        if info is None:
            out[stage] = None
            continue
        entry = {"run_id": info} if isinstance(info, str) else dict(info)
        entry.setdefault("run_id", None)
        entry.setdefault("partition", None if stage == "corpus" else partition_of(layer, variant))
        entry.setdefault("code_version", None)
        entry.setdefault("data_version", None)
        out[stage] = entry
    return out


def _subject_model(explicit: str | None, records: pl.DataFrame, runs: dict) -> str | None:
    if explicit:
        return explicit
    if "subject_model" in records.columns and len(records):
        value = records["subject_model"].drop_nulls()
        if len(value):
            return str(value[0])
    stage = runs.get("activation_records") or {}
    for key in ("subject_model", "model"):
        if stage.get(key):
            return str(stage[key])
        meta = stage.get("metadata") or {}
        if meta.get(key):
            return str(meta[key])
    return None


def _excerpt_entry(documents: Documents, ex: Mapping) -> dict:
    entry = {
        "excerpt_id": ex.get("excerpt_id"), "split": ex.get("split"), "kind": ex.get("kind"),
        "rank": ex.get("rank"), "window_index": ex.get("window_index"), "token_start": ex.get("token_start"),
        "tokens": list(ex["tokens"]) if ex.get("tokens") is not None else None,
    }
    entry.update(resolve_excerpt_text(documents, ex["doc_id"], ex.get("char_start"), ex.get("char_end"),
                                      entry["tokens"]))
    return entry


# ---------------------------------------------------------------------------------------------------- lineage


def unit_of(records: pl.DataFrame, unit_id: int) -> dict:
    """What a unit is, from its activation records: kind, polarity, index, source and the label people read."""
    first = _row(records) if len(records) else {}
    kind = first.get("unit_kind") or MLP_NEURON
    index, polarity = unit_index(unit_id)
    return {"kind": kind, "polarity": polarity, "index": index, "source": first.get("unit_source"),
            "label": unit_label(unit_id, kind)}


def neuron_lineage(data: LayerData, neuron: int, runs: Mapping[str, Any] | None = None,
                   subject_model: str | None = None) -> dict:
    """Lineage of one neuron from already-read layer files (the viewer calls this once per neuron)."""
    layer, variant = data.layer, data.variant
    neuron = int(neuron)
    score = _score_row(data, neuron)
    run_info = normalize_runs(runs, layer, variant)
    expl_rows = data.neuron("explanations", neuron)
    explanation_id = score.get("explanation_id")
    chosen = _row(expl_rows.filter(pl.col("explanation_id") == explanation_id)) if explanation_id else {}
    excerpts = data.neuron("excerpts", neuron).sort(["split", "kind", "rank"])
    tokens = data.neuron("output_tokens", neuron)
    explanation = _explanation(data, score, chosen, excerpts, tokens)
    scored, unresolved = _scored_excerpts(data, neuron, explanation_id, excerpts)
    scorers = scorer_lineage(data, neuron)
    records = data.neuron("records", neuron)
    result = {
        "variant": variant,
        "layer": layer,
        "neuron": neuron,
        "unit": unit_of(records, neuron),
        "subject_model": _subject_model(subject_model, records, run_info),
        "score": score,
        "explanation": explanation,
        "explanations": [
            {k: r.get(k) for k in ("explanation_id", "explanation", "explainer", "prompt_sha256", "status", "error")}
            for r in expl_rows.sort("explanation_id").iter_rows(named=True)
        ],
        "simulator": next((e["simulator"] for e in scored if e.get("simulator")), None),
        "neuron_stats": _neuron_stats(records),
        # what the unit's output direction promotes and suppresses (its weights'; None: not computed, or a
        # planted unit, which has no weights)
        "output_tokens": {k: _row(tokens)[k] for k in ("promoted_tokens", "promoted_logits", "suppressed_tokens",
                                                        "suppressed_logits", "direction")} if len(tokens) else None,
        "excerpts": scored,
        "scorers": scorers,
        "runs": run_info,
        "files": _files(data, scorers),
        "checks": _checks(explanation, scored, unresolved, scorers),
    }
    return json_safe(result)


def _score_row(data: LayerData, neuron: int) -> dict:
    """The neuron's scores row; a neuron the layer did not score is refused, naming those it did."""
    score_rows = data.neuron("scores", neuron)
    if score_rows.is_empty():
        known = data.neurons()
        shown = ", ".join(map(str, known[:20])) + (" …" if len(known) > 20 else "")
        raise NdxInputError(f"layer {data.layer} of variant {data.variant} has no score for neuron {neuron}; scored "
                            f"neurons: {shown or 'none'}.")
    return _row(score_rows)


def _explanation(data: LayerData, score: Mapping, chosen: Mapping, excerpts: pl.DataFrame,
                 tokens: pl.DataFrame) -> dict:
    """The scored explanation, with its explainer prompt rebuilt as explain_layer built it (the explain excerpts in
    rank order, and the unit's output tokens where prompts listed them) and its backend sent it, and whether the
    stored hash is that prompt's; and its explain excerpts, each with its document."""
    explain = excerpts.filter(pl.col("split") == EXPLAIN).sort("rank")
    output = (tokens["promoted_tokens"][0].to_list(), tokens["suppressed_tokens"][0].to_list()) if len(tokens) else None
    prompt = rebuild_prompt(chosen, list(zip(explain["tokens"].to_list(), explain["activations"].to_list())), output)
    return {
        "explanation_id": score.get("explanation_id"),
        "explanation": chosen.get("explanation", score.get("explanation")),
        "explainer": chosen.get("explainer"),
        "status": chosen.get("status"),
        "error": chosen.get("error"),
        "prompt_sha256": chosen.get("prompt_sha256"),
        "rebuilt_prompt_sha256": prompt.pop("sha256"),
        "prompt_verified": prompt.pop("verified"),
        "prompt_note": prompt.pop("note"),
        "prompt": prompt,
        "excerpts": [_excerpt_entry(data.documents, ex) | {"activations": list(ex["activations"])}
                     for ex in explain.iter_rows(named=True)],
    }


def _scored_excerpts(data: LayerData, neuron: int, explanation_id, excerpts: pl.DataFrame) -> tuple[list, list]:
    """(every excerpt the explanation was scored on: its simulation, true and simulated activations, and its
    document, in split and rank order; the excerpt ids of simulations that name no stored excerpt)."""
    sims = data.neuron("simulations", neuron)
    if explanation_id is not None:
        sims = sims.filter(pl.col("explanation_id") == explanation_id)
    by_id = {ex["excerpt_id"]: ex for ex in excerpts.iter_rows(named=True)}
    scored = []
    unresolved = []
    for sim in sims.iter_rows(named=True):
        ex = by_id.get(sim["excerpt_id"])
        if ex is None:
            unresolved.append(sim["excerpt_id"])
            entry = {"excerpt_id": sim["excerpt_id"], "split": sim.get("split"), "tokens": sim.get("tokens"),
                     "doc_id": None, "source": None, "char_start": None, "char_end": None, "text": None,
                     "document_found": False, "text_matches_tokens": None, "span_from": "unknown"}
        else:
            entry = _excerpt_entry(data.documents, ex)
        entry["true_activations"] = list(sim["true_activations"])
        entry["simulated_activations"] = list(sim["simulated_activations"])
        entry["simulator"] = sim.get("simulator")
        scored.append(entry)
    scored.sort(key=lambda e: (SCORED_SPLITS.index(e["split"]) if e["split"] in SCORED_SPLITS else 9,
                               e.get("rank") if e.get("rank") is not None else 0))
    return scored, unresolved


def _neuron_stats(records: pl.DataFrame) -> dict:
    """The unit's mean, variance, max and token count over the corpus, from its activation records ({}: none)."""
    if not len(records):
        return {}
    first = _row(records)
    return {k: first.get(f"neuron_{k}") for k in ("mean", "variance", "max", "token_count")}


def _files(data: LayerData, scorers: Mapping) -> dict:
    """The files the lineage read: every stage's (the corpus is every variant's) and the scorers' that ran."""
    layer, variant = data.layer, data.variant
    return ({stage: str(asset_path(data.storage_dir, stage) if stage == "corpus" else
                        asset_path(data.storage_dir, stage, layer, variant)) for stage in STAGES}
            | {asset: str(asset_path(data.storage_dir, asset, layer, variant))
               for name in scorers for asset in (*SCORER_ASSETS[name], SCORER_EXCERPTS)})


def _checks(explanation: Mapping, scored: list, unresolved: list, scorers: Mapping) -> dict:
    """What held: the prompt's hash, every simulation resolved to an excerpt, every excerpt's document found and its
    text equal to its tokens, the scorers' excerpts likewise; `all_links_resolved` when every one did."""
    every = scored + explanation["excerpts"]
    checks = {
        "prompt_sha256_matches": explanation["prompt_verified"],
        "simulations": len(scored),
        "simulations_resolved_to_excerpts": len(scored) - len(unresolved),
        "unresolved_excerpt_ids": unresolved,
        "documents_found": all(e["document_found"] for e in every),
        "texts_match_tokens": all(e["text_matches_tokens"] is not False for e in every),
        "text_mismatches": [e["excerpt_id"] for e in every if e["text_matches_tokens"] is False],
        "texts_unverifiable": [e["excerpt_id"] for e in every if e["text_matches_tokens"] is None],
    }
    judged = [x for found in scorers.values() for x in found["judged"]]
    checks["scorer_judgements"] = len(judged)
    checks["scorer_excerpts_resolved"] = all(x["document_found"] and x["text_matches_tokens"] is not False
                                             for x in judged)
    checks["all_links_resolved"] = bool(
        scored and not unresolved and checks["documents_found"] and checks["texts_match_tokens"]
        and checks["prompt_sha256_matches"] and all(e["text"] is not None for e in every)
        and checks["scorer_excerpts_resolved"]
    )
    return checks


def scorer_lineage(data: LayerData, neuron: int) -> dict:
    """Per scorer that ran for the layer: the neuron's score row (ours, with the baselines' beside it) and every
    excerpt it judged for our explanation — the excerpt and its document, the truth (`label`), the verdict or
    similarity, whether the verdict was right (`correct`), the marked positions (fuzzing), and the baselines'
    verdicts or similarities on the same excerpt."""
    out = {}
    excerpts = data.neuron("scorer_excerpts", neuron)
    by_id = {ex["excerpt_id"]: ex for ex in excerpts.iter_rows(named=True)}
    for name, (scores, judgements) in data.scorers.items():
        score = _row(scores.filter(pl.col("neuron") == neuron))
        if not score:
            continue
        mine = judgements.filter(pl.col("neuron") == neuron)
        theirs: dict[tuple, dict] = {}
        for r in mine.filter(pl.col("baseline").is_not_null()).iter_rows(named=True):
            theirs.setdefault((r["excerpt_id"], tuple(r["marked"] or ())), {})[r["baseline"]] = (
                r["similarity"] if r["similarity"] is not None else r["verdict"])
        judged = []
        for r in mine.filter(pl.col("explanation_id") == score["explanation_id"]).iter_rows(named=True):
            ex = by_id.get(r["excerpt_id"])
            entry = _excerpt_entry(data.documents, ex) if ex is not None else {
                "excerpt_id": r["excerpt_id"], "split": r["split"], "tokens": None, "document_found": False,
                "text_matches_tokens": None, "text": None}
            entry.update(activations=list(ex["activations"]) if ex is not None else None,
                         label=r["label"], verdict=r["verdict"], similarity=r["similarity"],
                         marked=list(r["marked"]) if r["marked"] is not None else None, prompt=r["prompt"],
                         status=r["status"], error=r["error"],
                         correct=None if r["verdict"] is None else r["verdict"] == r["label"],
                         baselines=theirs.get((r["excerpt_id"], tuple(r["marked"] or ())), {}))
            judged.append(entry)
        judged.sort(key=lambda e: (not e["label"], e["excerpt_id"], e["marked"] or []))
        out[name] = {"score": score, "scorer": mine["scorer"].drop_nulls().first() if len(mine) else None,
                     "judged": judged}
    return out


def lineage(storage_dir: str | os.PathLike, layer: int, neuron: int, runs: Mapping[str, Any] | None = None,
            subject_model: str | None = None, *, variant: str) -> dict:
    """Everything behind the score of `neuron` in `layer` of `variant`, as a JSON-ready dict.

    Keys: variant, layer, neuron, unit, subject_model, score (the scores row), explanation (id, text, explainer,
    prompt_sha256, the prompt rebuilt as its backend sent it, whether its hash matches and if not why —
    `prompt_note` —, its explain excerpts), explanations (all candidates),
    simulator, neuron_stats, excerpts (every scored excerpt: tokens, true and simulated activations, doc_id,
    source, char_start, char_end and the text cut from the document), runs (stage → run id, partition, code and
    data version, as passed in; the partition `<layer>|<variant>`), files (the variant's), checks. Raises
    NdxInputError when the variant, layer or neuron is not there.
    """
    try:
        layer = int(layer)
        neuron = int(neuron)
    except (TypeError, ValueError):
        raise NdxInputError(f"layer {layer!r} and neuron {neuron!r} must be integers.") from None
    if not Path(storage_dir).is_dir():
        raise NdxInputError(f"storage folder {storage_dir} does not exist: run the pipeline first.")
    if not asset_path(storage_dir, "scores", layer, variant).exists():
        have = available_layers(storage_dir, variant=variant)
        if not have:
            others = stored_variants(storage_dir, "scores")
            raise NdxInputError(f"variant {variant} has no scores under {storage_dir} (variants with scores: "
                                f"{', '.join(others) or 'none'}).")
        raise NdxInputError(
            f"layer {layer} of variant {variant} has no scores under {storage_dir} (scored layers: "
            f"{', '.join(map(str, have))}): materialize the pipeline for layer {layer} first."
        )
    return neuron_lineage(LayerData(storage_dir, layer, variant), neuron, runs, subject_model)


def lineage_json(result: Mapping, indent: int | None = 2) -> str:
    """Strict JSON (no NaN) for machines: `ndx-pipeline lineage L N --json`."""
    return json.dumps(json_safe(result), indent=indent, ensure_ascii=False, allow_nan=False)


def _fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _prompt_check(e: Mapping) -> str:
    if e["prompt_verified"]:
        return "matches the rebuilt prompt, as sent"
    if e.get("rebuilt_prompt_sha256") is None:
        return f"cannot be checked: {e.get('prompt_note')}"
    return f"DOES NOT match the rebuilt prompt {e['rebuilt_prompt_sha256']}: {e.get('prompt_note')}"


def format_lineage(result: Mapping, max_text: int = 160) -> str:
    """A human-readable account of a lineage dict, for the terminal."""
    s, e, c = result["score"], result["explanation"], result["checks"]
    lines = [
        f"layer {result['layer']} {result['unit']['label']}  (unit id {result['neuron']}; variant "
        f"{result.get('variant')}; subject model: "
        f"{result.get('subject_model') or 'n/a'})" + (f"\n  {result['unit']['source']}" if result['unit']['source']
                                                     else ""),
        f"score {_fmt(s.get('score'))}  (top {_fmt(s.get('score_top'))}, random {_fmt(s.get('score_random'))})"
        f"  status: {s.get('status')}",
        f"explanation {e['explanation_id']}: {e['explanation']!r}",
        f"  explainer: {e['explainer']}   simulator: {result.get('simulator')}",
        f"  prompt sha256: {e['prompt_sha256']}  ({_prompt_check(e)})",
        "",
        f"scored excerpts ({len(result['excerpts'])}):",
    ]
    for x in result["excerpts"]:
        text = (x.get("text") or "").replace("\n", "⏎")
        text = text if len(text) <= max_text else text[: max_text - 1] + "…"
        true, sim = x.get("true_activations") or [], x.get("simulated_activations") or []
        ok = {True: "text = tokens", False: "TEXT ≠ TOKENS", None: "text unverified"}[x.get("text_matches_tokens")]
        lines.append(
            f"  {x['excerpt_id']} [{x.get('split')}] {x.get('doc_id')} chars {x.get('char_start')}–{x.get('char_end')}"
            f" ({x.get('source')}); max true {_fmt(max((v for v in true if v is not None), default=None))},"
            f" max sim {_fmt(max((v for v in sim if v is not None), default=None))}; {ok}"
        )
        lines.append(f"      {text}")
    if result.get("scorers"):
        lines.append("")
        lines.append("scorers beside simulation (our explanation; the baselines judged on the same excerpts):")
    for name, found in (result.get("scorers") or {}).items():
        sc = found["score"]
        right = sum(1 for x in found["judged"] if x.get("correct"))
        answered = sum(1 for x in found["judged"] if x.get("correct") is not None)
        tally = f"; {right} of {answered} verdicts right" if answered else ""
        lines.append(f"  {name:<10} {sc.get('metric')} {_fmt(sc.get('score'))}  (random "
                     f"{_fmt(sc.get('baseline_random'))}, token list {_fmt(sc.get('baseline_token_list'))})  "
                     f"{sc.get('status')}; {len(found['judged'])} excerpts judged by {found.get('scorer')}{tally}")
    lines.append("")
    lines.append("runs:")
    for stage, info in result["runs"].items():
        if info is None:
            lines.append(f"  {stage:<18} (not given)")
        else:
            lines.append(f"  {stage:<18} run {info.get('run_id')}  partition {info.get('partition')}  "
                         f"code {info.get('code_version')}  data {info.get('data_version')}")
    lines.append("")
    lines.append("checks: " + ("every link resolves to document text" if c["all_links_resolved"] else
                               "NOT every link resolves — " + json.dumps({k: v for k, v in c.items() if v})))
    return "\n".join(lines)
