"""Prompt health for a small local LLM (issue 7): can it follow our explainer and simulator prompts?

Explainer
  parse rate        share of answers `parse_explanation` accepts (real neurons and probes)
  words             mean length of parsed explanations, share with at most 12 words
  copied few-shot   share of parsed answers that repeat one of the prompt's worked-example explanations
  probe hit rate    synthetic neurons that fire exactly on one kind of token (the keyword return, commas, …) in
                    real corpus text: share of explanations that name that kind of token
Simulator
  value mass        mean probability, per slot, that the next token is one of the values 0..10 (the rest of the
                    distribution is thrown away by the renormalization); also the share of slots with mass ≥ 0.5
  probe score       pooled correlation of the simulation with the synthetic neuron, given the correct hand-written
                    explanation: does the simulator follow an explanation at all?
  real EV spread    mean standard deviation of the expected values within a real neuron's excerpt (0: the
                    simulator predicts the same value everywhere)

Last line: one JSON object with these figures.

    .venv/bin/python benchmarks/prompts.py --neurons 4 --samples 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from quality import log, prepare  # noqa: E402

# (hand-written explanation, which tokens fire, words an explanation naming it would contain). None of these is
# the topic of a worked example in the prompts (before or after tuning), so a copied example never counts as a hit.
PROBES = (
    ('the word "if"', lambda t: t.strip().lower() == "if", ('"if"', "'if'", "word if", "keyword if", "if statement",
                                                          "condition")),
    ("commas", lambda t: "," in t, ("comma", '","')),
    ("numbers", lambda t: t.strip().isdigit(), ("number", "digit", "numeral", "integer")),
    ('the word "the"', lambda t: t.strip().lower() == "the", ('"the"', "'the'", "article", "word the")),
    ("line breaks", lambda t: "\n" in t, ("newline", "line break", "new line", "\\n", "end of line", "end of a line")),
    ('the word "class"', lambda t: t.strip() == "class", ("class",)),
    ("full stops", lambda t: t.strip() == ".", ("period", "full stop", "dot", '"."')),
    ("equals signs", lambda t: "=" in t, ("equal", "=", "assignment")),
    ('the word "is"', lambda t: t.strip() == "is", ('"is"', "'is'", "word is", "verb to be", "forms of be")),
    ("double quotes", lambda t: '"' in t, ("quot",)),
)


def probe_windows(tokenizer, texts, rule, count, seed):
    """`count` 64-token windows of real corpus text where 2..12 tokens match `rule` (seeded, deterministic)."""
    from ndx_pipeline.core.data.windows import TokenTexts, tokenize_windows

    windows = tokenize_windows(tokenizer, [str(i) for i in range(len(texts))], texts, 64)
    decode = TokenTexts(tokenizer)
    order = np.random.default_rng(seed).permutation(len(windows))
    out = []
    for w in order:
        toks = decode(windows.ids[w, : windows.length[w]])
        acts = [10.0 if rule(t) else 0.0 for t in toks]
        if 2 <= sum(a > 0 for a in acts) <= 12:
            out.append((toks, acts))
            if len(out) == count:
                break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", default=None)
    parser.add_argument("--layers", default="0,15,29")
    parser.add_argument("--neurons", type=int, default=4, help="real neurons per layer (the first of the pool)")
    parser.add_argument("--pool", type=int, default=32, help="neurons per layer extracted (as benchmarks/quality.py)")
    parser.add_argument("--samples", type=int, default=2, help="explanations sampled per neuron and probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--dump", default=None, help="write every raw and parsed answer here (JSON)")
    args = parser.parse_args()

    from ndx_pipeline.core.data.corpus import read_corpus
    from ndx_pipeline.core.data.excerpts import split_excerpts
    from ndx_pipeline.core.llm.local import LocalTransformersBackend
    from ndx_pipeline.core.method.explainer import (
        FEW_SHOTS,
        LEAD_IN,
        MAX_EXPLANATION_TOKENS,
        ExplanationParseError,
        explainer_messages,
        parse_explanation,
    )
    from ndx_pipeline.core.method.scoring import pooled_correlation
    from ndx_pipeline.core.method.simulator import expected_values, simulation_prompt

    t0 = time.perf_counter()
    layers = [int(x) for x in args.layers.split(",")]
    records, _ = prepare(layers, args.pool, args.seed, cache_dir=args.cache_dir)
    keep = records.select("layer", "neuron").unique().sort(["layer", "neuron"]).group_by("layer").head(args.neurons)
    excerpts = split_excerpts(records.join(keep, on=["layer", "neuron"]))
    backend = LocalTransformersBackend(args.llm)
    _, tok = backend._lm()
    texts = read_corpus(None)["text"].to_list()
    shots = {s.explanation.lower() for s in FEW_SHOTS}

    answers = {"real": [], "probe": []}
    hits = []

    def explain(shown, seed):
        text = backend.chat(explainer_messages(shown), LEAD_IN, MAX_EXPLANATION_TOKENS, 1.0, seed).text
        try:
            return parse_explanation(text), text
        except ExplanationParseError:
            return None, text

    explain_groups = excerpts.filter(pl.col("split") == "explain").sort(["layer", "neuron", "rank"])
    for (layer, neuron), group in explain_groups.group_by(["layer", "neuron"], maintain_order=True):
        shown = list(zip(group["tokens"].to_list(), group["activations"].to_list()))
        for s in range(args.samples):
            parsed, raw = explain(shown, args.seed * 1000 + s * 7919 + layer * 65537 + neuron)
            answers["real"].append({"layer": layer, "neuron": neuron, "parsed": parsed, "raw": raw})
    log(f"real explanations: {len(answers['real'])}")
    probe_data = []
    for p, (explanation, rule, words) in enumerate(PROBES):
        wins = probe_windows(tok, texts, rule, 6, args.seed + p)
        probe_data.append((explanation, wins))
        for s in range(args.samples):
            parsed, raw = explain(wins[:3], args.seed * 1000 + s * 7919 + p)
            answers["probe"].append({"probe": explanation, "parsed": parsed, "raw": raw})
            hit = parsed is not None and any(w in parsed.lower() for w in words)
            hits.append(hit)
    log("probe explanations done")

    masses, probe_scores, spreads = [], [], []
    for explanation, wins in probe_data:
        true, sim = [], []
        for toks, acts in wins[3:]:
            probs = backend.value_probabilities(simulation_prompt(explanation, toks))
            masses.append(probs.sum(axis=1))
            true.append(acts)
            sim.append(expected_values(probs))
        probe_scores.append(pooled_correlation(true, sim).value)
    real_ok = [a for a in answers["real"] if a["parsed"]]
    seen = set()
    scored = excerpts.filter(pl.col("split").is_in(["score_top", "score_random"]))
    real_true, real_sim = [], []
    for a in real_ok:
        if (a["layer"], a["neuron"]) in seen:
            continue
        seen.add((a["layer"], a["neuron"]))
        mine = scored.filter((pl.col("layer") == a["layer"]) & (pl.col("neuron") == a["neuron"]))
        for split in ("score_top", "score_random"):
            ex = mine.filter(pl.col("split") == split).row(0, named=True)
            probs = backend.value_probabilities(simulation_prompt(a["parsed"], ex["tokens"]))
            masses.append(probs.sum(axis=1))
            ev = expected_values(probs)
            spreads.append(float(ev.std()))
            real_true.append(ex["activations"])
            real_sim.append(ev)
    mass = np.concatenate(masses)

    every = answers["real"] + answers["probe"]
    parsed = [a["parsed"] for a in every if a["parsed"]]
    figures = {
        "explainer_parse_rate": round(len(parsed) / len(every), 4),
        "explainer_parse_rate_real": round(sum(1 for a in answers["real"] if a["parsed"]) / len(answers["real"]), 4),
        "explanation_words_mean": round(float(np.mean([len(p.split()) for p in parsed])), 2) if parsed else None,
        "explanation_at_most_12_words": round(float(np.mean([len(p.split()) <= 12 for p in parsed])), 4)
        if parsed else None,
        "copied_few_shot_rate": round(sum(1 for p in parsed if p.lower() in shots) / max(len(parsed), 1), 4),
        "probe_hit_rate": round(float(np.mean(hits)), 4),
        "value_mass_mean": round(float(mass.mean()), 4),
        "value_mass_ge_half": round(float((mass >= 0.5).mean()), 4),
        "probe_score_mean": round(float(np.nanmean(probe_scores)), 4),
        "real_ev_spread_mean": round(float(np.mean(spreads)) if spreads else float("nan"), 4),
        "real_score_pooled_sample": round(pooled_correlation(real_true, real_sim).value, 4) if real_true else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.dump:
        Path(args.dump).write_text(json.dumps({"answers": answers, "probe_scores": probe_scores}, indent=1,
                                              default=str))
    print("explanations (first per neuron / probe):")
    for a in answers["real"][:: args.samples]:
        print(f"  L{a['layer']}/{a['neuron']}: {a['parsed']!r}" + ("" if a["parsed"] else f"  raw={a['raw'][:80]!r}"))
    for a in answers["probe"]:
        print(f"  probe {a['probe']!r}: {a['parsed']!r}" + ("" if a["parsed"] else f"  raw={a['raw'][:80]!r}"))
    print("probe simulation scores: " + ", ".join(f"{e} {s:.3f}" for (e, _, _), s in zip(PROBES, probe_scores)))
    for k, v in figures.items():
        print(f"{k:>26}: {v}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
