"""The in-process LLM stages, batched vs one at a time, measured in one run (issue 15).

On a fixed, seeded set of neurons of the bundled model (layer 0, `--neurons` of them, chosen as the pipeline
chooses them, over the bundled corpus), with the bundled SmolLM2 as explainer and simulator and no cache:

  explanations  one at a time: `model.generate` per neuron (the plain path); batched: the backend's `chat` from
                `map` threads, computed together (shared prompt prefix once, each neuron's part, steps together)
  simulations   one at a time: one forward pass over each whole prompt; batched: the backend's
                `value_probabilities` from `map` threads (the explanation's prompt head once, excerpts together)

Both paths compute in float32 (the exact path) for `sim_speedup`, `explain_speedup` and `max_abs_dp`. Where the
pipeline's default precision (`dtype: auto`) is another on this machine (bfloat16 on a CPU with native bfloat16),
the batched paths run again in it, and `*_auto` compares them with the float32 one-at-a-time paths: what a default
run gains, and how far its value probabilities and expected activations move.

It prints rates and speed-ups, whether the batched explanations equal the one-at-a-time ones, the largest
|Δp| between the two simulators' value probabilities, and as its LAST line one JSON object
{"sim_speedup", "explain_speedup", "max_abs_dp", …, "auto_dtype", "sim_speedup_auto", …}.

    .venv/bin/python benchmarks/llm_stages.py                 # 6 neurons: 6 explanations, 96 simulated excerpts
    .venv/bin/python benchmarks/llm_stages.py --neurons 3     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from ndx_pipeline.core import stages  # noqa: E402
from ndx_pipeline.core.contract import CALIBRATION, EXPLAIN, SCORED_SPLITS  # noqa: E402
from ndx_pipeline.core.llm.local import LocalTransformersBackend  # noqa: E402
from ndx_pipeline.core.method.explainer import (  # noqa: E402
    LEAD_IN,
    MAX_EXPLANATION_TOKENS,
    TEMPERATURE,
    explainer_messages,
    neuron_seed,
    parse_explanation,
)
from ndx_pipeline.core.method.simulator import expected_values, simulation_prompt  # noqa: E402
from ndx_pipeline.core.models import AUTO_DTYPE, llm_dtype  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def excerpts_of(neurons: int, seed: int) -> pl.DataFrame:
    extraction = stages.activation_records(stages.corpus(None), None, [0], neurons_per_layer=neurons, seed=seed,
                                           quantile_k=0, token_table=False, log=log)
    return stages.top_excerpts(extraction.layers[0].records, calibration_top=3, calibration_random=3)


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--neurons", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=None, help="batch size of the in-process backend")
    args = parser.parse_args()

    excerpts = excerpts_of(args.neurons, args.seed)
    batch = {"batch_size": args.batch} if args.batch else {}
    backend = LocalTransformersBackend(dtype="float32", **batch)
    backend._lm()  # load once, outside the timings
    jobs = []
    for (neuron,), group in excerpts.filter(pl.col("split") == EXPLAIN).sort(["neuron", "rank"]).group_by(
            ["neuron"], maintain_order=True):
        shown = list(zip(group["tokens"].to_list(), group["activations"].to_list()))
        jobs.append((int(neuron), explainer_messages(shown), neuron_seed(args.seed, 0, int(neuron))))

    def one_at_a_time_explanations():
        return [backend.chat_unbatched(m, LEAD_IN, MAX_EXPLANATION_TOKENS, TEMPERATURE, s).text for _, m, s in jobs]

    def batched_explanations(backend=backend):
        out = backend.map(lambda j: backend.chat(j[1], LEAD_IN, MAX_EXPLANATION_TOKENS, TEMPERATURE, j[2]), jobs)
        return [o.value.text for o in out]

    log(f"explanations: {len(jobs)} neurons, one at a time")
    alone, t_explain_alone = timed(one_at_a_time_explanations)
    log(f"explanations: batched ({backend.max_concurrency} at a time)")
    together, t_explain_batched = timed(batched_explanations)
    same_text = sum(a == b for a, b in zip(alone, together))

    prompts = []
    simulated_splits = (*SCORED_SPLITS, CALIBRATION)
    for (neuron, _, _), text in zip(jobs, together):
        try:
            explanation = parse_explanation(text)
        except ValueError:
            explanation = "no particular pattern"
        mine = excerpts.filter((pl.col("neuron") == neuron) & pl.col("split").is_in(list(simulated_splits)))
        prompts += [simulation_prompt(explanation, tokens) for tokens in mine["tokens"].to_list()]
    log(f"simulations: {len(prompts)} excerpts, one at a time")
    probs_alone, t_sim_alone = timed(lambda: [backend.value_probabilities_unbatched(p) for p in prompts])
    log("simulations: batched")
    outcomes, t_sim_batched = timed(lambda: backend.map(backend.value_probabilities, prompts))
    max_dp = max(float(np.abs(a - o.value).max()) for a, o in zip(probs_alone, outcomes))

    rates = {
        "explanations_per_s_alone": len(jobs) / t_explain_alone,
        "explanations_per_s_batched": len(jobs) / t_explain_batched,
        "simulations_per_s_alone": len(prompts) / t_sim_alone,
        "simulations_per_s_batched": len(prompts) / t_sim_batched,
    }
    print(f"explanations: {len(jobs)} in {t_explain_alone:.1f} s one at a time, {t_explain_batched:.1f} s batched "
          f"(batches {backend._chats.batches}); {same_text} of {len(jobs)} texts identical")
    print(f"simulations:  {len(prompts)} in {t_sim_alone:.1f} s one at a time, {t_sim_batched:.1f} s batched "
          f"(batches {backend._simulations.batches}); max |Δp| {max_dp:.2e}")
    summary = {
        "sim_speedup": round(t_sim_alone / t_sim_batched, 3),
        "explain_speedup": round(t_explain_alone / t_explain_batched, 3),
        "max_abs_dp": max_dp,
        "identical_explanations": f"{same_text}/{len(jobs)}",
        "neurons": len(jobs), "simulated_excerpts": len(prompts), "batch": backend.max_concurrency,
        **{k: round(v, 4) for k, v in rates.items()},
    }
    auto = summary["auto_dtype"] = llm_dtype(AUTO_DTYPE)
    if auto != "float32":  # the pipeline's default precision here: its batched paths against float32 alone
        fast = LocalTransformersBackend(dtype=auto, **batch)
        fast._lm()
        log(f"explanations: batched in {auto}")
        _, t_explain_fast = timed(lambda: batched_explanations(fast))
        log(f"simulations: batched in {auto}")
        fast_out, t_sim_fast = timed(lambda: fast.map(fast.value_probabilities, prompts))
        dp_fast = max(float(np.abs(a - o.value).max()) for a, o in zip(probs_alone, fast_out))
        ev_alone = np.concatenate([expected_values(a) for a in probs_alone])
        ev_fast = np.concatenate([expected_values(o.value) for o in fast_out])
        print(f"{auto}: explanations {t_explain_fast:.1f} s batched, simulations {t_sim_fast:.1f} s batched; max |Δp| "
              f"against float32 one at a time {dp_fast:.3f}")
        summary.update({
            "sim_speedup_auto": round(t_sim_alone / t_sim_fast, 3),
            "explain_speedup_auto": round(t_explain_alone / t_explain_fast, 3),
            "max_abs_dp_auto": round(dp_fast, 4),
            "expected_value_corr_auto": round(float(np.corrcoef(ev_alone, ev_fast)[0, 1]), 4),
            "max_abs_expected_value_diff_auto": round(float(np.abs(ev_alone - ev_fast).max()), 3),
            "simulations_per_s_batched_auto": round(len(prompts) / t_sim_fast, 4),
            "explanations_per_s_batched_auto": round(len(jobs) / t_explain_fast, 4),
        })
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
