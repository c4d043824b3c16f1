"""Explanation quality benchmark (issue 7): is an explanation better than trivial predictors, and does best-of-k help?

On a fixed, seeded set of neurons of the subject model (default: the bundled SmolLM2-135M-Instruct, layers 0, 15,
29, 32 neurons each, chosen exactly as the pipeline chooses them; --neurons N keeps the first N of each layer) over
the default corpus, with the same splits as the pipeline, it scores on the same score_top + score_random excerpts
(pooled Pearson):

  k1          one explanation per neuron (candidate 0: the pipeline's k = 1 explanation)
  best_of_k   the best of k candidates by their score on the calibration split (disjoint from explain and scoring)
  lookup      token lookup table (each token's mean activation for the neuron over the corpus, held out: the scored
              excerpts' own activations are taken out of the table first)
  lookup_in_sample  the same table without holding out (the paper's construction; for reference)
  random      the kept explanation of another, seeded neuron of the same layer
  token_list  the explainer LLM reading only the neuron's strongest tokens of its explain excerpts
  token_template    the fixed template "the tokens "a", "b", …" from the same list (no LLM)

Prints a table of mean and median score per layer and method, the parse-failure rates, then as its LAST line one
JSON object: {"k1", "best_of_k", "lookup", "random", "token_list", …} means over all neurons with a defined score.

    .venv/bin/python benchmarks/quality.py                      # 3 layers × 32 neurons, k = 3
    .venv/bin/python benchmarks/quality.py --neurons 4 --k 2    # a quick run on 3 × 4 of the same neurons
    .venv/bin/python benchmarks/quality.py --cache-dir /tmp/ndx-quality   # keep the extraction for the next run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl  # noqa: E402

from ndx_pipeline.core import contract, stages  # noqa: E402
from ndx_pipeline.core.contract import (  # noqa: E402
    BASELINES,
    LOOKUP_BASELINE,
    RANDOM_BASELINE,
    SIMULATED_BASELINES,
    TOKEN_LIST_BASELINE,
    baseline_column,
)
from ndx_pipeline.core.llm.local import LocalTransformersBackend  # noqa: E402
from ndx_pipeline.core.method import baselines as bl  # noqa: E402
from ndx_pipeline.core.method import best_of_k as bk  # noqa: E402

METHODS = ("k1", "best_of_k", "lookup", "lookup_in_sample", "random", "token_list", "token_template")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare(layers: list[int], neurons: int, seed: int = 0, model: str | None = None, corpus: str | None = None,
            top_k: int = 20, random_k: int = 20, cache_dir: str | None = None, quantile_k: int = 0):
    """(activation_records, token table) of the chosen neurons of `layers`, from one extraction pass (the
    pipeline's own stage; cached as Parquet under cache_dir when given). `quantile_k`: activation-quantile samples
    per bucket (none by default: the quality methods do not use them)."""
    tag = (f"{model or 'bundled'}-{corpus or 'default'}-L{'_'.join(map(str, layers))}-n{neurons}-s{seed}-k{top_k}"
           f"-r{random_k}" + (f"-q{quantile_k}" if quantile_k else ""))
    tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
    if cache_dir:
        rec_path, tab_path = Path(cache_dir) / f"{tag}.records.parquet", Path(cache_dir) / f"{tag}.table.parquet"
        if rec_path.exists() and tab_path.exists():
            log(f"extraction: cached {rec_path}")
            return pl.read_parquet(rec_path), pl.read_parquet(tab_path)
    extraction = stages.activation_records(stages.corpus(corpus), model, layers, neurons_per_layer=neurons, seed=seed,
                                           top_k=top_k, random_k=random_k, quantile_k=quantile_k, token_table=True,
                                           log=log)
    log(f"extraction: {extraction.stats.tokens} tokens, layers {layers}, {extraction.stats.seconds:.0f} s")
    records = contract.concat_layers([found.records for found in extraction.layers.values()])
    table = contract.concat_layers([found.token_table for found in extraction.layers.values()])
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        records.write_parquet(rec_path)
        table.write_parquet(tab_path)
    return records, table


def finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def mean(values) -> float:
    v = finite(values)
    return sum(v) / len(v) if v else float("nan")


def median(values) -> float:
    v = sorted(finite(values))
    if not v:
        return float("nan")
    m = len(v) // 2
    return v[m] if len(v) % 2 else (v[m - 1] + v[m]) / 2


def evaluate(records: pl.DataFrame, table: pl.DataFrame, backend, k: int = 3, seed: int = 0,
             calibration_top: int = 3, calibration_random: int = 3, digest: bool = True,
             output_tokens: pl.DataFrame | None = None) -> dict:
    """Every method on every neuron of `records` with one LLM `backend` as explainer and simulator, through the
    pipeline's own stages (`ndx_pipeline.core.stages`): the same splits, explanations, baselines, simulations and
    scores as a run; k1 is candidate 0 of each neuron scored as if it had been kept.

    Returns {"scores": one row per neuron with a score column per method (and `<method>_text`), "candidates": the
    best-of-k candidates with calibration scores, "token_list": the token-list explanations, "timings": seconds}."""
    excerpts = stages.top_excerpts(records, calibration_top=calibration_top, calibration_random=calibration_random)
    timings = {}
    t = time.perf_counter()
    made = stages.explanations(excerpts, backend, candidates=k, chooser=backend, seed=seed, digest=digest,
                               output_tokens=output_tokens, baselines=SIMULATED_BASELINES, token_list_explainer="llm",
                               log=log)
    chosen = made.explanations if k > 1 else bk.choose(made.explanations, bk.no_calibration_scores())
    # the pipeline runs one token-list explainer or the other; here the fixed template runs beside the LLM one
    template = bl.baseline_explanations(chosen, excerpts, seed, names=[TOKEN_LIST_BASELINE])
    timings["explain"] = time.perf_counter() - t
    log(f"explanations: {len(chosen)} candidates and {len(made.baseline_explanations)} baseline explanations in "
        f"{timings['explain']:.0f} s")

    t = time.perf_counter()
    k1 = chosen.with_columns((pl.col("candidate") == 0).alias("selected"))  # candidate 0, kept or not
    best = stages.simulations(chosen, made.baseline_explanations, excerpts, backend, what="best", log=log)
    first = stages.simulations(k1, template, excerpts, backend, what="k1 and the template baseline", log=log)
    timings["simulate"] = time.perf_counter() - t
    log(f"simulations: {len(best.simulations) + len(first.simulations)} excerpts in {timings['simulate']:.0f} s")

    def scored(expl, sims, **baselines):
        return stages.scores(sims, expl, excerpts=excerpts, token_table=table, **baselines).scores

    ours = scored(chosen, best.simulations, baselines=BASELINES, baseline_explanations=made.baseline_explanations,
                  baseline_simulations=best.baseline_simulations)
    columns = {
        "k1": scored(k1, first.simulations)["score"],
        "best_of_k": ours["score"],
        "lookup": ours[baseline_column(LOOKUP_BASELINE)],
        "lookup_in_sample": scored(chosen, best.simulations, baselines=[LOOKUP_BASELINE], lookup_held_out=False)[
            baseline_column(LOOKUP_BASELINE)],
        "random": ours[baseline_column(RANDOM_BASELINE)],
        "token_list": ours[baseline_column(TOKEN_LIST_BASELINE)],
        "token_template": scored(chosen, best.simulations, baselines=[TOKEN_LIST_BASELINE],
                                 baseline_explanations=template, baseline_simulations=first.baseline_simulations)[
            baseline_column(TOKEN_LIST_BASELINE)],
    }
    texts = {
        "k1": k1.filter(pl.col("selected")), "best_of_k": contract.kept(chosen),
        "random": made.baseline_explanations.filter(pl.col("baseline") == RANDOM_BASELINE),
        "token_list": made.baseline_explanations.filter(pl.col("baseline") == TOKEN_LIST_BASELINE),
        "token_template": template,
    }
    joined = ours.select("layer", "neuron").with_columns(**{name: col for name, col in columns.items()})
    for name, frame in texts.items():
        joined = joined.join(frame.select("layer", "neuron", pl.col("explanation").alias(f"{name}_text")),
                             on=["layer", "neuron"], how="left")
    return {"scores": joined.sort(["layer", "neuron"]), "candidates": chosen, "digest": digest,
            "explainer_logits": output_tokens is not None,
            "token_list": texts["token_list"], "timings": timings}


def report(result: dict, k: int, title: str = "", seconds: float | None = None) -> dict:
    """Print the table and the notes; the last line printed is the JSON summary (also returned)."""
    joined, candidates, token_llm = result["scores"], result["candidates"], result["token_list"]
    layers = sorted(set(joined["layer"].to_list()))
    failures = {
        "explainer": float((candidates["status"] != "ok").mean()),
        "token_list": float((token_llm["status"] != "ok").mean()),
    }
    best = candidates.filter(pl.col("selected"))
    picked_other = float((best["candidate"] != 0).mean())
    header = f"{'layer':>5}  {'method':<17}{'n':>4}{'mean':>9}{'median':>9}"
    if title:
        print(title)
    print(header)
    print("-" * len(header))
    for layer in layers + ["all"]:
        rows = joined if layer == "all" else joined.filter(pl.col("layer") == layer)
        for name in METHODS:
            vals = rows[name].to_list()
            print(f"{layer!s:>5}  {name:<17}{len(finite(vals)):>4}{mean(vals):>9.4f}{median(vals):>9.4f}")
        print()
    print(f"parse failures: explainer {failures['explainer']:.1%} of {len(candidates)} candidates, "
          f"token-list explainer {failures['token_list']:.1%} of {len(token_llm)}")
    both = [(a, b) for a, b in zip(joined["k1"], joined["best_of_k"])
            if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    print(f"best-of-{k} kept a candidate other than the k=1 one for {picked_other:.1%} of neurons; mean "
          f"best_of_k − k1 over the {len(both)} neurons where both are defined: "
          f"{mean([b - a for a, b in both]):+.4f}")
    wins = {name: mean([float(x > y) for x, y in zip(joined["k1"], joined[name])
                        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)])
            for name in ("lookup", "random", "token_list")}
    print("share of neurons where k1 beats: " + ", ".join(f"{n} {v:.0%}" for n, v in wins.items()))
    print("timings (s): " + ", ".join(f"{n} {v:.0f}" for n, v in result["timings"].items())
          + (f", total {seconds:.0f}" if seconds is not None else ""))
    summary = {name: round(mean(joined[name].to_list()), 5) for name in METHODS}
    summary.update({
        "median": {name: round(median(joined[name].to_list()), 5) for name in METHODS},
        "defined": {name: len(finite(joined[name].to_list())) for name in METHODS},
        "neurons": len(joined), "layers": layers, "k": k, "digest": result.get("digest", True),
        "explainer_logits": result.get("explainer_logits", False),
        "parse_failure_rate": {n: round(v, 4) for n, v in failures.items()},
        "best_of_k_replaced_k1": round(picked_other, 4),
    })
    if seconds is not None:
        summary["seconds"] = round(seconds, 1)
    print(json.dumps(summary))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="subject model (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--llm", default=None, help="explainer and simulator model (default: bundled)")
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--layers", default="0,15,29")
    parser.add_argument("--pool", type=int, default=32, help="neurons per layer chosen (seeded, as the pipeline does)")
    parser.add_argument("--neurons", type=int, default=None,
                        help="evaluate only the first N neurons (by index) of each layer's pool: a quick run")
    parser.add_argument("--k", type=int, default=3, help="candidates for best-of-k")
    parser.add_argument("--digest", choices=("on", "off"), default="on",
                        help='the "Strongest tokens" line under the explainer\'s excerpts (issue 16: measure both)')
    parser.add_argument("--explainer-logits", choices=("on", "off"), default="off",
                        help="list each unit's output tokens (what it makes more and less likely) under the "
                             "explainer's excerpts (quality.explainer_logits; measure both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-top", type=int, default=3)
    parser.add_argument("--calibration-random", type=int, default=3)
    parser.add_argument("--cache-dir", default=None, help="keep the extraction here and reuse it")
    parser.add_argument("--out", default=None, help="write the per-neuron results as Parquet here")
    args = parser.parse_args()

    layers = [int(x) for x in args.layers.split(",")]
    t0 = time.perf_counter()
    records, table = prepare(layers, args.pool, args.seed, args.model, args.corpus, cache_dir=args.cache_dir)
    if args.neurons is not None:
        keep = (records.select("layer", "neuron").unique().sort(["layer", "neuron"])
                .group_by("layer", maintain_order=True).head(args.neurons))
        records = records.join(keep, on=["layer", "neuron"])
        table = table.join(keep, on=["layer", "neuron"])
    output_tokens = None
    if args.explainer_logits == "on":
        by_layer = stages.output_tokens({layer: records.filter(pl.col("layer") == layer) for layer in layers},
                                        args.model, log=log)
        output_tokens = contract.concat_layers(list(by_layer.values()))
    # a cache always (a temporary one without --cache-dir): the k1 and best-of-k views share most requests
    with tempfile.TemporaryDirectory(prefix="ndx-quality-") as tmp:
        backend = LocalTransformersBackend(args.llm, cache=Path(args.cache_dir or tmp) / "llm_cache")
        result = evaluate(records, table, backend, args.k, args.seed, args.calibration_top, args.calibration_random,
                          digest=args.digest == "on", output_tokens=output_tokens)
    if args.out:
        result["scores"].write_parquet(args.out)
    title = (f"quality benchmark: {len(result['scores'])} neurons (layers {layers}, the first "
             f"{args.neurons or args.pool} of {args.pool} seeded neurons each), "
             f"k={args.k}, seed {args.seed}, digest {args.digest}, explainer logits {args.explainer_logits}, "
             f"explainer and simulator {backend.name}")
    report(result, args.k, title, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
