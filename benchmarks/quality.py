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
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl  # noqa: E402

METHODS = ("k1", "best_of_k", "lookup", "lookup_in_sample", "random", "token_list", "token_template")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare(layers: list[int], neurons: int, seed: int = 0, model: str | None = None, corpus: str | None = None,
            top_k: int = 20, random_k: int = 20, cache_dir: str | None = None):
    """(activation_records, token table) of the chosen neurons of `layers`, from one extraction pass (cached as
    Parquet under cache_dir when given)."""
    from ndx_pipeline.core.data import activations as act
    from ndx_pipeline.core.data.corpus import read_corpus
    from ndx_pipeline.core.data.subject_model import load_subject_model, mlp_width
    from ndx_pipeline.core.data.windows import TokenTexts, tokenize_windows

    tag = (f"{model or 'bundled'}-{corpus or 'default'}-L{'_'.join(map(str, layers))}-n{neurons}-s{seed}-k{top_k}"
           f"-r{random_k}")
    tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
    if cache_dir:
        rec_path, tab_path = Path(cache_dir) / f"{tag}.records.parquet", Path(cache_dir) / f"{tag}.table.parquet"
        if rec_path.exists() and tab_path.exists():
            log(f"extraction: cached {rec_path}")
            return pl.read_parquet(rec_path), pl.read_parquet(tab_path)
    width = mlp_width(model)
    layer_neurons = {layer: act.choose_neurons(width, neurons, seed, layer) for layer in layers}
    docs = read_corpus(corpus)
    subject, tok = load_subject_model(model)
    windows = tokenize_windows(tok, docs["doc_id"].to_list(), docs["text"].to_list(), 64)
    started = time.perf_counter()
    selections, stats = act.extract(subject, tok, windows, layer_neurons, top_k, random_k, seed, token_table=True)
    log(f"extraction: {stats.tokens} tokens, layers {layers}, {time.perf_counter() - started:.0f} s")
    texts = TokenTexts(tok)
    records = pl.concat([act.records_frame(layer, selections[layer], windows, texts) for layer in layers])
    table = pl.concat([act.token_table_frame(layer, selections[layer], texts) for layer in layers])
    del subject
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
             calibration_top: int = 3, calibration_random: int = 3) -> dict:
    """Every method on every neuron of `records` with one LLM `backend` as explainer and simulator.

    Returns {"scores": one row per neuron with a score column per method (and `<method>_text`), "candidates": the
    best-of-k candidates with calibration scores, "token_list": the token-list explanations, "timings": seconds}."""
    from ndx_pipeline.core.method import baselines as bl
    from ndx_pipeline.core.method import best_of_k as bk
    from ndx_pipeline.core.method import token_list as tl
    from ndx_pipeline.core.data.excerpts import calibration_excerpts, split_excerpts
    from ndx_pipeline.core.method.scoring import score_layer
    from ndx_pipeline.core.method.simulator import simulate_layer

    excerpts = split_excerpts(records)
    calibration = calibration_excerpts(records, calibration_top, calibration_random)
    timings = {}

    def progress(label):
        count = [0]

        def on(_row):
            count[0] += 1
            if count[0] % 8 == 0:
                log(f"{label}: {count[0]}")
        return on

    t = time.perf_counter()
    candidates = bk.explain_candidates(excerpts, backend, k, seed=seed, on_neuron=progress("explained"))
    timings["explain"] = time.perf_counter() - t
    log(f"explanations: {len(candidates)} candidates in {timings['explain']:.0f} s")
    t = time.perf_counter()
    if k > 1:
        chosen, _ = bk.select_best(candidates, calibration, backend)
    else:
        chosen = bk.choose(candidates, pl.DataFrame(schema={"explanation_id": pl.String, "score": pl.Float64,
                                                            "status": pl.String}))
    timings["calibration"] = time.perf_counter() - t
    log(f"calibration: {timings['calibration']:.0f} s")
    t = time.perf_counter()
    token_llm = tl.explain_token_lists(excerpts, backend, seed=seed)
    # the pipeline runs one token-list explainer or the other under one id; here both run side by side
    token_tpl = tl.explain_token_lists(excerpts, None).with_columns(
        pl.col("explanation_id").str.replace("/token_list$", "/token_template"))
    timings["token_list"] = time.perf_counter() - t
    random_expl = bl.random_explanations(chosen, seed)

    # candidate 0 of every neuron, whether or not best-of-k kept it (score_layer scores only `selected` rows)
    k1 = chosen.filter(pl.col("candidate") == 0).drop("selected")
    best = bk.selected(chosen)
    common = list(bl.explanation_frame([]).columns)
    to_simulate = pl.concat([
        f.select(common) for f in (k1, best.filter(pl.col("candidate") != 0), random_expl, token_llm, token_tpl)
    ]).filter(pl.col("status") == "ok")
    # simulations are matched to explanations by id: two methods sharing one id would be scored on each other's
    assert to_simulate["explanation_id"].is_unique().all(), "two methods share an explanation_id"
    t = time.perf_counter()
    sims = simulate_layer(to_simulate, excerpts, backend, on_neuron=progress("simulated"))
    timings["simulate"] = time.perf_counter() - t
    log(f"simulations: {len(sims)} excerpts in {timings['simulate']:.0f} s")
    lookup_expl, lookup_sims = bl.lookup_simulations(table, excerpts, held_out=True)
    insample_expl, insample_sims = bl.lookup_simulations(table, excerpts, held_out=False)

    def scores_of(expl, simulations):
        return score_layer(simulations, expl).select("layer", "neuron", "explanation", "score", "status")

    per_method = {
        "k1": scores_of(k1, sims),
        "best_of_k": scores_of(best, sims),
        "lookup": scores_of(lookup_expl, lookup_sims),
        "lookup_in_sample": scores_of(insample_expl, insample_sims),
        "random": scores_of(random_expl, sims),
        "token_list": scores_of(token_llm, sims),
        "token_template": scores_of(token_tpl, sims),
    }
    joined = None
    for name, frame in per_method.items():
        part = frame.select("layer", "neuron", pl.col("score").alias(name), pl.col("explanation").alias(f"{name}_text"))
        joined = part if joined is None else joined.join(part, on=["layer", "neuron"], how="left")
    return {"scores": joined.sort(["layer", "neuron"]), "candidates": chosen, "token_list": token_llm,
            "timings": timings}


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
        "neurons": len(joined), "layers": layers, "k": k,
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-top", type=int, default=3)
    parser.add_argument("--calibration-random", type=int, default=3)
    parser.add_argument("--cache-dir", default=None, help="keep the extraction here and reuse it")
    parser.add_argument("--out", default=None, help="write the per-neuron results as Parquet here")
    args = parser.parse_args()

    from ndx_pipeline.core.llm.local import LocalTransformersBackend

    layers = [int(x) for x in args.layers.split(",")]
    t0 = time.perf_counter()
    records, table = prepare(layers, args.pool, args.seed, args.model, args.corpus, cache_dir=args.cache_dir)
    if args.neurons is not None:
        keep = (records.select("layer", "neuron").unique().sort(["layer", "neuron"])
                .group_by("layer", maintain_order=True).head(args.neurons))
        records = records.join(keep, on=["layer", "neuron"])
        table = table.join(keep, on=["layer", "neuron"])
    backend = LocalTransformersBackend(args.llm, cache=Path(args.cache_dir) / "llm_cache" if args.cache_dir else None)
    result = evaluate(records, table, backend, args.k, args.seed, args.calibration_top, args.calibration_random)
    if args.out:
        result["scores"].write_parquet(args.out)
    title = (f"quality benchmark: {len(result['scores'])} neurons (layers {layers}, the first "
             f"{args.neurons or args.pool} of {args.pool} seeded neurons each), "
             f"k={args.k}, seed {args.seed}, explainer and simulator {backend.name}")
    report(result, args.k, title, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
