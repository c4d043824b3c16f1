"""Scorer benchmark (issue 14): simulation, detection, fuzzing and embedding on the same explanations.

On a fixed, seeded set of neurons of the subject model (default: the bundled SmolLM2-135M-Instruct, layers 0 and 15,
the first 4 of the 32 neurons the pipeline would choose in each, seed 0) over the default corpus, the pipeline's own
stages explain every neuron once (and make the random and token-list baseline explanations), then every scorer
judges ours and both baselines':

  simulation  the simulator predicts each token's activation on the scored excerpts; pooled Pearson
  detection   the scorer LLM says which held-out excerpts fire (activating vs not); balanced accuracy
  fuzzing     the scorer LLM says whether the marked tokens fit the explanation; balanced accuracy
  embedding   all-MiniLM-L6-v2 ranks held-out excerpts by similarity to the explanation; ROC AUC

Per scorer it prints the mean score of our explanations and of each baseline, LLM tokens and seconds per neuron
(the work for our explanation and both baselines'; embedding uses no LLM tokens, its count is the characters
embedded), the share of failed judgements, and Spearman agreement between scorers across neurons (our
explanations). The LAST line is one JSON object:
{"simulation": {…}, "detection": {…}, "fuzzing": {…}, "embedding": {…}, "cost_tokens": {…}, "agreement": {…}}.

    .venv/bin/python benchmarks/scorers.py                          # 2 layers × 4 neurons
    .venv/bin/python benchmarks/scorers.py --layers 0,15,29 --neurons 8 --cache-dir /tmp/ndx-scorers
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import polars as pl  # noqa: E402
from quality import log, mean, prepare  # noqa: E402  (the same extraction and helpers as the quality benchmark)

from ndx_pipeline.core import stages  # noqa: E402
from ndx_pipeline.core.contract import SCORERS, SIMULATED_BASELINES, baseline_column  # noqa: E402
from ndx_pipeline.core.llm.cache import LLMStats  # noqa: E402
from ndx_pipeline.core.llm.embeddings import EmbeddingSpec, build_embedder  # noqa: E402
from ndx_pipeline.core.llm.local import LocalTransformersBackend  # noqa: E402
from ndx_pipeline.core.method import best_of_k as bk  # noqa: E402
from ndx_pipeline.core.method.metrics import spearman  # noqa: E402
from ndx_pipeline.core.method.scorers import make_scorer  # noqa: E402

ALL = ("simulation", *SCORERS)


def timed(backend, fn):
    """fn()'s result, its seconds and the LLM tokens it used on `backend` (prompt + completion)."""
    before, started = backend.stats.snapshot(), time.perf_counter()
    out = fn()
    delta = LLMStats.difference(backend.stats.snapshot(), before)
    return out, time.perf_counter() - started, int(delta["prompt_tokens"] + delta["completion_tokens"]), delta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="0,15")
    parser.add_argument("--pool", type=int, default=32, help="neurons per layer chosen (seeded, as the pipeline does)")
    parser.add_argument("--neurons", type=int, default=4, help="the first N of each layer's pool")
    parser.add_argument("--scorer-excerpts", type=int, default=5, help="held-out activating (and non-activating) "
                                                                       "excerpts per neuron")
    parser.add_argument("--scorer-batch", type=int, default=5, help="excerpts per detection / fuzzing prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llm", default=None, help="explainer, simulator and scorer model (default: bundled)")
    parser.add_argument("--cache-dir", default=None, help="keep the extraction and the LLM answers here")
    args = parser.parse_args()

    layers = [int(x) for x in args.layers.split(",")]
    t0 = time.perf_counter()
    records, table = prepare(layers, args.pool, args.seed, cache_dir=args.cache_dir, quantile_k=4)
    keep = (records.select("layer", "neuron").unique().sort(["layer", "neuron"])
            .group_by("layer", maintain_order=True).head(args.neurons))
    records, table = records.join(keep, on=["layer", "neuron"]), table.join(keep, on=["layer", "neuron"])
    excerpts = stages.top_excerpts(records)
    held = stages.scorer_excerpts(records, excerpts, args.scorer_excerpts)

    with tempfile.TemporaryDirectory(prefix="ndx-scorers-") as tmp:
        cache = Path(args.cache_dir or tmp) / "llm_cache"
        backend = LocalTransformersBackend(args.llm, cache=cache)
        embedder = build_embedder(EmbeddingSpec(), cache)
        made = stages.explanations(excerpts, backend, seed=args.seed, baselines=SIMULATED_BASELINES,
                                   token_list_explainer="llm", log=log)
        ours = bk.choose(made.explanations, bk.no_calibration_scores())
        theirs = made.baseline_explanations
        log(f"explanations: {len(ours)} ours, {len(theirs)} baselines'")

        scores, seconds, tokens, failed = {}, {}, {}, {}

        def simulation():
            sims = stages.simulations(ours, theirs, excerpts, backend, what="simulation", log=log)
            scored = stages.scores(sims.simulations, ours, excerpts=excerpts, baselines=SIMULATED_BASELINES,
                                   baseline_explanations=theirs, baseline_simulations=sims.baseline_simulations)
            every = pl.concat([sims.simulations, sims.baseline_simulations])
            return scored.scores, float((every["status"] != "ok").mean())

        (scores["simulation"], failed["simulation"]), seconds["simulation"], tokens["simulation"], _ = timed(
            backend, simulation)
        for name in SCORERS:
            judge = embedder if name == "embedding" else backend
            scorer = make_scorer(name, args.scorer_batch, args.seed)
            made_j, seconds[name], tokens[name], _ = timed(judge, lambda: stages.judged(
                scorer, ours, theirs, held, judge, what=name, log=log))
            scores[name], failed[name] = made_j.scores, float((made_j.judgements["status"] != "ok").mean())
            if name == "embedding":  # no LLM: count what was embedded instead
                tokens[name] = 0
        backend.close()
        embedder.close()

    neurons = len(ours)
    summary: dict = {}
    print(f"scorer benchmark: {neurons} neurons (layers {layers}, the first {args.neurons} of {args.pool} seeded "
          f"neurons each), seed {args.seed}, LLM {backend.name}, embedder {embedder.name}, "
          f"{args.scorer_excerpts}+{args.scorer_excerpts} held-out excerpts per neuron")
    header = (f"{'scorer':<11}{'metric':<19}{'ours':>8}" + "".join(f"{b:>12}" for b in SIMULATED_BASELINES)
              + f"{'tokens/neuron':>15}{'s/neuron':>10}{'failed':>8}")
    print(header)
    print("-" * len(header))
    for name in ALL:
        frame = scores[name]
        metric = "pooled_pearson" if name == "simulation" else frame["metric"][0]
        row = {"ours": round(mean(frame["score"].to_list()), 4),
               **{b: round(mean(frame[baseline_column(b)].to_list()), 4) for b in SIMULATED_BASELINES},
               "metric": metric, "tokens_per_neuron": round(tokens[name] / neurons, 1),
               "seconds_per_neuron": round(seconds[name] / neurons, 3), "failed_share": round(failed[name], 4),
               "defined": int(frame["score"].is_finite().sum())}
        summary[name] = row
        print(f"{name:<11}{metric:<19}{row['ours']:>8.4f}" + "".join(f"{row[b]:>12.4f}" for b in SIMULATED_BASELINES)
              + f"{row['tokens_per_neuron']:>15.0f}{row['seconds_per_neuron']:>10.2f}{row['failed_share']:>8.1%}")
    joined = None
    for name in ALL:
        part = scores[name].select("layer", "neuron", pl.col("score").alias(name))
        joined = part if joined is None else joined.join(part, on=["layer", "neuron"], how="full", coalesce=True)
    agreement = {f"{a}~{b}": round(spearman(joined[a].to_list(), joined[b].to_list()), 4)
                 for a, b in itertools.combinations(ALL, 2)}
    print("Spearman agreement across neurons (our explanations): "
          + ", ".join(f"{k} {v:+.3f}" for k, v in agreement.items()))
    print(f"total {time.perf_counter() - t0:.0f} s")
    summary["cost_tokens"] = {name: summary[name]["tokens_per_neuron"] for name in ALL}
    summary["agreement"] = agreement
    summary["neurons"] = neurons
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
