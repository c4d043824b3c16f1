"""Controls benchmark: can this explainer and these judges be trusted, on this subject model?

Through the pipeline's own stage functions, on the bundled corpus:
  (1) the planted control: the planted units (known token rules, `core/data/planted.py`) explained by the
      explainer, each judged with the explainer's explanation, its true explanation and a wrong one (another planted
      unit's) by the simulator and each scorer → per judge the ROC AUC of true against wrong over the planted units
      and its 95 % bootstrap interval; the explainer's recovery (its explanations' mean simulation score as a share
      of the true ones') and how many of its explanations name their rule;
  (2) the random-weight control: the same seeded neurons of one layer on the subject model and on a copy with
      re-initialized weights, explained, simulated and embedding-scored alike → trained − random mean score per
      judge, with its interval.

The explainer, simulator and verdict scorers are the bundled SmolLM2-135M-Instruct in process, or with `--llm URL`
any OpenAI-compatible server (`--llm-model NAME`, `--api-key-env VAR`). The LAST line is one JSON object:
{"simulation_auc": …, "detection_auc": …, "fuzzing_auc": …, "embedding_auc": …, "explainer_recovery": …,
 "trained_minus_random": {"simulation": …, "embedding": …}}, each figure with its interval beside
(`<name>_interval`: [low, high]).

    .venv/bin/python benchmarks/controls.py                        # bundled model, every planted unit, 8 neurons
    .venv/bin/python benchmarks/controls.py --llm http://127.0.0.1:8000/v1 --llm-model my-model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def log(message: str) -> None:
    """Progress on stderr (done/total, rate, ETA from the stages), the results on stdout."""
    print(message, file=sys.stderr, flush=True)


def judged_units(documents, model, layer: int, llm, embedder, scorers: list[str], *, units: str, neurons=None,
                 per_layer: int = 8, weights: str = "trained", counts=(5, 5, 5), scorer_excerpts: int = 5):
    """(simulation scores, {scorer: scores}) of one unit set explained and judged by the pipeline's stages."""
    from ndx_pipeline.core import stages
    from ndx_pipeline.core.contract import concat_layers
    from ndx_pipeline.core.data.units import PLANTED
    from ndx_pipeline.core.method.scorers import make_scorer

    what = f"{units} units{'' if weights == 'trained' else ', random weights'}"
    extraction = stages.activation_records(documents, model, [layer], units=units, neurons=neurons,
                                           neurons_per_layer=per_layer, token_table=False, subject_weights=weights,
                                           log=log)
    records = concat_layers([found.records for found in extraction.layers.values()])
    excerpts = stages.top_excerpts(records, *counts)
    made = stages.explanations(excerpts, llm, planted=units == PLANTED, what=f"explanations, {what}", log=log)
    simulated = stages.simulations(made.explanations, made.baseline_explanations, excerpts, llm,
                                   what=f"simulations, {what}", log=log)
    scores = stages.scores(simulated.simulations, made.explanations, excerpts=excerpts,
                           baseline_explanations=made.baseline_explanations,
                           baseline_simulations=simulated.baseline_simulations).scores
    held = stages.scorer_excerpts(records, excerpts, scorer_excerpts, left_out={})
    judged = {}
    for name in scorers:
        backend = embedder if name == "embedding" else llm
        judged[name] = stages.judged(make_scorer(name), made.explanations, made.baseline_explanations, held,
                                     backend, what=f"{name}, {what}", log=log).scores
    return scores, judged


def interval(found: dict, key: str) -> list[float | None]:
    return [None if not math.isfinite(found[f"{key}_lo"]) else round(found[f"{key}_lo"], 4),
            None if not math.isfinite(found[f"{key}_hi"]) else round(found[f"{key}_hi"], 4)]


def rounded(x: float) -> float | None:
    return round(x, 4) if isinstance(x, (int, float)) and math.isfinite(x) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", help="base URL of an OpenAI-compatible server (default: the bundled model in process)")
    parser.add_argument("--llm-model", dest="llm_model", help="the server's model name")
    parser.add_argument("--api-key-env", dest="api_key_env", help="the variable holding the server's API key")
    parser.add_argument("--model", default=None, help="subject model (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--layer", type=int, default=0, help="the layer of the random-weight comparison")
    parser.add_argument("--neurons", type=int, default=8, help="seeded neurons of that layer")
    parser.add_argument("--rules", default="all", help="planted units: 'all' or a comma list of rule indices")
    parser.add_argument("--scorers", default="detection,fuzzing,embedding")
    parser.add_argument("--excerpts", default="5,5,5", help="explain, score_top, score_random excerpts per unit")
    parser.add_argument("--scorer-excerpts", dest="scorer_excerpts", type=int, default=5)
    args = parser.parse_args()

    from ndx_pipeline.core import stages
    from ndx_pipeline.core.llm.embeddings import EmbeddingSpec, build_embedder
    from ndx_pipeline.core.llm.registry import LLMSpec, build_backend
    from ndx_pipeline.core.method.controls import SIMULATION, judge_controls, trained_minus_random, verdict

    scorers = [x for x in args.scorers.split(",") if x.strip()]
    counts = tuple(int(x) for x in args.excerpts.split(","))
    rules = None if args.rules == "all" else [int(x) for x in args.rules.split(",")]
    spec = (LLMSpec(backend="openai", base_url=args.llm, model=args.llm_model, api_key_env=args.api_key_env)
            if args.llm else LLMSpec())
    documents = stages.corpus(None)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        llm = build_backend(spec, cache)
        embedder = build_embedder(EmbeddingSpec(), cache) if "embedding" in scorers else None
        try:
            scores, judged = judged_units(documents, args.model, args.layer, llm, embedder, scorers, units="planted",
                                          neurons=rules, per_layer=-1, counts=counts,
                                          scorer_excerpts=args.scorer_excerpts)
            planted_seconds = time.perf_counter() - started
            controls = judge_controls(scores, judged)
            sides = {}
            for weights in ("trained", "random"):
                sides[weights] = judged_units(documents, args.model, args.layer, llm, embedder,
                                              [s for s in scorers if s == "embedding"], units="positive",
                                              per_layer=args.neurons, weights=weights, counts=counts,
                                              scorer_excerpts=args.scorer_excerpts)
        finally:
            llm.close()
            if embedder is not None:
                embedder.close()
    difference = {SIMULATION: trained_minus_random(sides["trained"][0], sides["random"][0])[-1]}
    if "embedding" in sides["trained"][1]:
        difference["embedding"] = trained_minus_random(sides["trained"][1]["embedding"],
                                                       sides["random"][1]["embedding"])[-1]
    print(f"explainer and judges: {llm.name}; subject model {args.model or 'bundled SmolLM2-135M-Instruct'}; "
          f"planted control {planted_seconds:.0f} s, all {time.perf_counter() - started:.0f} s")
    print(f"{'judge':<12} {'AUC true vs wrong':>18} {'95 % interval':>18} {'units':>6}  verdict")
    for judge, found in controls["judges"].items():
        lo, hi = interval(found, "auc")
        print(f"{judge:<12} {found['auc']:18.3f} {str([lo, hi]):>18} {found['units']:6d}  {verdict(found)}")
    rec = controls["recovery"] or {}
    print(f"explainer recovery: {rec.get('share', float('nan')):.3f} of the true explanations' simulation score, "
          f"{rec.get('names_rule', 0)} of {rec.get('explained', 0)} explanations name their rule")
    for judge, row in difference.items():
        print(f"trained − random, {judge}, layer {args.layer}: {row['diff']:.3f} "
              f"[{row['diff_lo']:.3f}, {row['diff_hi']:.3f}] over {row['units']} neurons")
    out = {}
    for judge in (SIMULATION, "detection", "fuzzing", "embedding"):
        found = controls["judges"].get(judge)
        out[f"{judge}_auc"] = rounded(found["auc"]) if found else None
        out[f"{judge}_auc_interval"] = interval(found, "auc") if found else None
    out["explainer_recovery"] = rounded(rec.get("share", math.nan))
    out["explainer_recovery_interval"] = interval(rec, "share") if rec else None
    out["explainer_names_rule"] = [rec.get("names_rule"), rec.get("explained")]
    out["trained_minus_random"] = {}
    for judge, row in difference.items():
        out["trained_minus_random"][judge] = rounded(row["diff"])
        out["trained_minus_random"][f"{judge}_interval"] = interval(row, "diff")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
