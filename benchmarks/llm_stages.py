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

CPU classes (issue 35), `--isa amx,avx512_bf16,avx2_fp32` (or `all`): each class runs in a fresh process whose
environment limits the instruction sets torch, oneDNN and MKL may use (ISA_CLASSES; they read it once, at load):
`avx512_bf16` is a CPU with AVX512-BF16 and no AMX (oneDNN's bfloat16 matmuls on AVX512-BF16), `avx2_fp32` a
laptop-class CPU (AVX2 kernels everywhere; bfloat16 falls back to torch's own kernels). A class needs a CPU that has
at least its instructions. In each: the batched explanations and simulations in bfloat16 and in float32 (rates),
what `dtype: auto`'s calibration picks there (measured afresh, its cache file in a temporary folder), and the
projected default run: DEFAULT_RUN_OTHER_S (the run's stages without an LLM) plus the default run's explanations and
simulated excerpts (the planted control's included) at the class's rates in the precision auto picks. It prints one
row per class and precision, and as its LAST line {"default_run_s": {class: s}, "sim_per_s": {class: {precision: rate}},
"explain_per_s": {…}, "auto_dtype": {class: precision}, …}.

    .venv/bin/python benchmarks/llm_stages.py --isa all --neurons 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from ndx_pipeline.core import stages  # noqa: E402
from ndx_pipeline.core.contract import CALIBRATION, EXPLAIN, SCORED_SPLITS  # noqa: E402
from ndx_pipeline.core.llm.local import (  # noqa: E402
    DEFAULT_RUN_EXPLANATIONS,
    DEFAULT_RUN_SIMULATED_EXCERPTS,
    LocalTransformersBackend,
)
from ndx_pipeline.core.llm.precision import CACHE_ENV, ISA_LIMITS, cpu_flags, cpu_model  # noqa: E402
from ndx_pipeline.core.method.explainer import (  # noqa: E402
    LEAD_IN,
    MAX_EXPLANATION_TOKENS,
    TEMPERATURE,
    explainer_messages,
    neuron_seed,
    parse_explanation,
)
from ndx_pipeline.core.method.simulator import expected_values, simulation_prompt  # noqa: E402
from ndx_pipeline.core.models import AUTO_DTYPE  # noqa: E402

# the environment that makes a process compute as a CPU of each class would (read by torch, oneDNN and MKL at load)
ISA_CLASSES = {
    "amx": {},
    "avx512_bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "avx2_fp32": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
NEEDS = {"amx": "amx_bf16", "avx512_bf16": "avx512_bf16", "avx2_fp32": "avx2"}  # the CPU flag each class needs
# The default run's LLM work besides the variant's own (DEFAULT_RUN_*, README "What you get"): the planted control's
# (README "Controls"); and its stages without an LLM (corpus, activation records, scorer excerpts, detection,
# fuzzing, embedding, scores, viewer: 25 s of "Done in 485 s" on the AMX CPU, 2026-12-07).
PLANTED_CONTROL_EXPLANATIONS = 8
PLANTED_CONTROL_SIMULATED_EXCERPTS = 288
DEFAULT_RUN_OTHER_S = 25.0


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
    parser.add_argument("--excerpts", type=int, default=None, help="simulated excerpts per neuron (default: all its "
                                                                   "scored and calibration excerpts, 16)")
    parser.add_argument("--batch", type=int, default=None, help="batch size of the in-process backend")
    parser.add_argument("--isa", default=None, help="CPU classes to measure, comma-separated, or all: "
                                                    + ", ".join(ISA_CLASSES))
    parser.add_argument("--profile", action="store_true", help="with --isa: where a simulation batch spends its "
                                                               "time in each class and precision")
    parser.add_argument("--class-child", default=None, help=argparse.SUPPRESS)  # one class, in its environment
    args = parser.parse_args()
    if args.isa:
        return cpu_classes(args)
    if args.class_child:
        return one_class(args)

    excerpts = excerpts_of(args.neurons, args.seed)
    batch = {"batch_size": args.batch} if args.batch else {}
    backend = LocalTransformersBackend(dtype="float32", **batch)
    backend._lm()  # load once, outside the timings
    jobs = explanation_jobs(excerpts, args.seed)

    def one_at_a_time_explanations():
        return [backend.chat_unbatched(m, LEAD_IN, MAX_EXPLANATION_TOKENS, TEMPERATURE, s).text for _, m, s in jobs]

    log(f"explanations: {len(jobs)} neurons, one at a time")
    alone, t_explain_alone = timed(one_at_a_time_explanations)
    log(f"explanations: batched ({backend.max_concurrency} at a time)")
    together, t_explain_batched = timed(lambda: batched_explanations(backend, jobs))
    same_text = sum(a == b for a, b in zip(alone, together))
    prompts = simulation_prompts(excerpts, jobs, together, args.excerpts)
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
    auto = summary["auto_dtype"] = LocalTransformersBackend(dtype=AUTO_DTYPE).dtype
    if auto != "float32":  # the pipeline's default precision here: its batched paths against float32 alone
        fast = LocalTransformersBackend(dtype=auto, **batch)
        fast._lm()
        log(f"explanations: batched in {auto}")
        _, t_explain_fast = timed(lambda: batched_explanations(fast, jobs))
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


def explanation_jobs(excerpts: pl.DataFrame, seed: int) -> list[tuple]:
    """(neuron, explainer messages, seed) for each neuron, from its explain excerpts."""
    jobs = []
    for (neuron,), group in excerpts.filter(pl.col("split") == EXPLAIN).sort(["neuron", "rank"]).group_by(
            ["neuron"], maintain_order=True):
        shown = list(zip(group["tokens"].to_list(), group["activations"].to_list()))
        jobs.append((int(neuron), explainer_messages(shown), neuron_seed(seed, 0, int(neuron))))
    return jobs


def batched_explanations(backend, jobs) -> list[str]:
    out = backend.map(lambda j: backend.chat(j[1], LEAD_IN, MAX_EXPLANATION_TOKENS, TEMPERATURE, j[2]), jobs)
    return [o.value.text for o in out]


def simulation_prompts(excerpts: pl.DataFrame, jobs, texts: list[str], per_neuron: int | None = None) -> list:
    """Each neuron's scored and calibration excerpts (the first `per_neuron` of them, when given), with the
    explanation `texts` gave for it."""
    prompts = []
    for (neuron, _, _), text in zip(jobs, texts):
        try:
            explanation = parse_explanation(text)
        except ValueError:
            explanation = "no particular pattern"
        mine = excerpts.filter((pl.col("neuron") == neuron)
                               & pl.col("split").is_in(list((*SCORED_SPLITS, CALIBRATION))))
        prompts += [simulation_prompt(explanation, tokens) for tokens in mine["tokens"].to_list()[:per_neuron]]
    return prompts


def one_class(args) -> None:
    """In a process started with a class's environment: rates at each precision, and what auto picks here."""
    import torch

    batch = {"batch_size": args.batch} if args.batch else {}
    excerpts = excerpts_of(args.neurons, args.seed)
    jobs = explanation_jobs(excerpts, args.seed)
    out = {"class": args.class_child, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "limits": {k: os.environ[k] for k in ISA_LIMITS if k in os.environ},
           "neurons": len(jobs), "explain_per_s": {}, "sim_per_s": {}}
    prompts = None  # from float32's explanations, the same for both precisions
    for dtype in ("float32", "bfloat16"):
        backend = LocalTransformersBackend(dtype=dtype, **batch)
        backend._lm()
        log(f"{args.class_child}: {dtype}: {len(jobs)} explanations, batched")
        texts, t_explain = timed(lambda: batched_explanations(backend, jobs))
        prompts = prompts or simulation_prompts(excerpts, jobs, texts, args.excerpts)
        log(f"{args.class_child}: {dtype}: {len(prompts)} simulated excerpts, batched")
        _, t_sim = timed(lambda: backend.map(backend.value_probabilities, prompts))
        out["explain_per_s"][dtype] = round(len(jobs) / t_explain, 4)
        out["sim_per_s"][dtype] = round(len(prompts) / t_sim, 4)
    out["simulated_excerpts"] = len(prompts)
    if args.profile:
        out["profile"] = {dtype: simulation_profile(dtype, prompts, batch) for dtype in ("float32", "bfloat16")}
    with tempfile.TemporaryDirectory() as folder:  # auto's calibration, measured afresh in this environment
        os.environ[CACHE_ENV] = os.path.join(folder, "precision.json")
        auto = LocalTransformersBackend(dtype=AUTO_DTYPE, **batch)
        auto.log = log
        out["auto_dtype"], calibration_s = timed(lambda: auto.dtype)
        out["auto_calibration"] = {d: round(s, 1) for d, s in auto.precision.seconds.items()}
        out["auto_calibration_wall_s"] = round(calibration_s, 1)
    print(json.dumps(out))


def simulation_profile(dtype: str, prompts, batch: dict) -> dict:
    """Where one batch of simulated excerpts spends its time in `dtype` (torch's profiler, one thread computing):
    shares of matrix products, attention and the rest, and the matrix products' rate in GFLOP/s."""
    import torch

    backend = LocalTransformersBackend(dtype=dtype, **batch)
    requests = [backend.simulation_request(p)[0] for p in prompts[:backend.max_concurrency]]
    backend._simulation_batch(requests)  # the kernels for these shapes, made before the profile
    backend._heads.clear()
    backend._first_head = None
    started = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
        backend._simulation_batch(requests)
    wall = time.perf_counter() - started
    groups = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    flops = 0.0
    for event in prof.key_averages():
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear_pointwise", "mkldnn::_linear_pointwise"):
            groups["matmul"] += event.self_cpu_time_total
            flops += event.flops or 0
        elif "attention" in event.key:
            groups["attention"] += event.self_cpu_time_total
        else:
            groups["other"] += event.self_cpu_time_total
    total = sum(groups.values()) or 1.0
    return {"batch_s": round(wall, 2), "excerpts": len(requests),
            **{k: round(v / total, 3) for k, v in groups.items()},
            "matmul_gflop_per_s": round(flops / max(groups["matmul"], 1.0) / 1e3, 1)}


def projected_default_run(explain_per_s: float, sim_per_s: float) -> float:
    return (DEFAULT_RUN_OTHER_S + (DEFAULT_RUN_EXPLANATIONS + PLANTED_CONTROL_EXPLANATIONS) / explain_per_s
            + (DEFAULT_RUN_SIMULATED_EXCERPTS + PLANTED_CONTROL_SIMULATED_EXCERPTS) / sim_per_s)


def cpu_classes(args) -> None:
    """Each asked class in a fresh process with its environment; one table, then the JSON line."""
    wanted = list(ISA_CLASSES) if args.isa == "all" else [c.strip() for c in args.isa.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in ISA_CLASSES]
    if unknown:
        raise SystemExit(f"--isa: unknown class {', '.join(unknown)} (known: {', '.join(ISA_CLASSES)}, all)")
    flags = cpu_flags()
    results = {}
    for name in wanted:
        if flags and NEEDS[name] not in flags:
            log(f"{name}: skipped, this CPU has no {NEEDS[name]}")
            continue
        env = {k: v for k, v in os.environ.items() if k not in ISA_LIMITS}
        env.update(ISA_CLASSES[name])
        command = [sys.executable, __file__, "--class-child", name, "--neurons", str(args.neurons),
                   "--seed", str(args.seed), *(["--batch", str(args.batch)] if args.batch else []),
                   *(["--excerpts", str(args.excerpts)] if args.excerpts else []),
                   *(["--profile"] if args.profile else [])]
        log(f"{name}: {' '.join(f'{k}={v}' for k, v in ISA_CLASSES[name].items()) or '(no limit)'}")
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"CPU: {cpu_model()}; {results[next(iter(results))]['neurons'] if results else 0} explanations and "
          f"{results[next(iter(results))]['simulated_excerpts'] if results else 0} simulated excerpts per precision")
    print(f"{'class':<13}{'capability':<12}{'precision':<11}{'explanations/s':>15}{'excerpts/s':>12}"
          f"{'default run s':>15}  auto")
    summary = {"default_run_s": {}, "sim_per_s": {}, "explain_per_s": {}, "auto_dtype": {},
               "default_run_s_by_precision": {}, "auto_calibration": {}, "cpu": cpu_model()}
    for name, found in results.items():
        by_precision = {d: round(projected_default_run(found["explain_per_s"][d], found["sim_per_s"][d]), 1)
                        for d in found["sim_per_s"]}
        for d in found["sim_per_s"]:
            print(f"{name:<13}{found['cpu_capability']:<12}{d:<11}{found['explain_per_s'][d]:>15.3f}"
                  f"{found['sim_per_s'][d]:>12.3f}{by_precision[d]:>15.0f}  {'←' if d == found['auto_dtype'] else ''}")
        summary["default_run_s"][name] = by_precision[found["auto_dtype"]]
        summary["default_run_s_by_precision"][name] = by_precision
        summary["sim_per_s"][name] = found["sim_per_s"]
        summary["explain_per_s"][name] = found["explain_per_s"]
        summary["auto_dtype"][name] = found["auto_dtype"]
        summary.setdefault("limits", {})[name] = found["limits"]
        summary["auto_calibration"][name] = {**found["auto_calibration"], "wall_s": found["auto_calibration_wall_s"]}
        if "profile" in found:
            summary.setdefault("profile", {})[name] = found["profile"]
    if "profile" in summary:
        print("one simulation batch: seconds; shares of matrix products, attention, the rest; matrix GFLOP/s")
        for name, by_dtype in summary["profile"].items():
            for d, f in by_dtype.items():
                print(f"  {name:<13}{d:<10}{f['batch_s']:>6.2f} s  matmul {f['matmul']:.0%}  attention "
                      f"{f['attention']:.0%}  other {f['other']:.0%}  {f['matmul_gflop_per_s']:.0f} GFLOP/s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
