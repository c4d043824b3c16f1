"""What simulating an excerpt costs on an OpenAI-compatible server, and how far its answers are from the in-process
model's (issue 36).

A real llama-cpp-python server on 127.0.0.1 serves the bundled SmolLM2 GGUF (which writes "10" as "1" then "0").
On a fixed, seeded set of excerpts (windows of the bundled corpus, each with one of a few fixed explanations), the
all-at-once simulator runs through the OpenAI-compatible backend with the chosen `ten_probe`, as the pipeline runs
it (the backend's `map`, no cache), and the same excerpts through the in-process model in float32 on the 0–10 scale
(the exact answers). It prints:

  requests_per_excerpt       requests the server logged (its own access log; the one-time tokenization probe of
                             "auto" included) per excerpt
  prompt_tokens_per_excerpt  prompt tokens the server counted (its `usage`) per excerpt, and that as a multiple of
                             the 0–10 simulation prompt's own length (`prompt_tokens_ratio`)
  excerpts_per_s             excerpts simulated per second, the whole wave
  max_abs_dev, mean_abs_dev  |Δ expected value| (0–10 scale) per token against the in-process float32 answers
                             (on the excerpts the server answered: one whose slot falls inside a token of the
                             server's tokenization fails, as in the pipeline, and is counted in `failed_excerpts`);
                             with a 0–9 scale also `in_process_scale_max_abs_dev` / `…_mean_abs_dev`: the in-process
                             model itself on the 0–9 prompt against its 0–10 answers (the scale's part, without the
                             server's quantized weights)

and as its LAST line one JSON object {"requests_per_excerpt", "prompt_tokens_per_excerpt", "excerpts_per_s",
"max_abs_dev", …}.

    .venv/bin/python benchmarks/server_requests.py                          # 8 excerpts of 64 tokens, auto
    .venv/bin/python benchmarks/server_requests.py --ten-probe per_slot     # the exact P("0" | "1") probes
    .venv/bin/python benchmarks/server_requests.py --top-logprobs 20        # fewer candidates per position
    .venv/bin/python benchmarks/server_requests.py --excerpts 2 --tokens 8  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ndx_pipeline.core.data.corpus import read_corpus  # noqa: E402
from ndx_pipeline.core.llm.local import LocalTransformersBackend  # noqa: E402
from ndx_pipeline.core.llm.openai import OpenAICompatibleBackend  # noqa: E402
from ndx_pipeline.core.llm.openai.backend import TEN_PROBES  # noqa: E402
from ndx_pipeline.core.llm.sent_prompts import load_tokenizer  # noqa: E402
from ndx_pipeline.core.method.display import MAX_SHOWN  # noqa: E402
from ndx_pipeline.core.method.simulator import expected_values, simulate_excerpt, simulation_prompt  # noqa: E402
from ndx_pipeline_tests.llm_server import run_llama_server, server_available  # noqa: E402

EXPLANATIONS = ("the word 'the'", "Python keywords such as if, while and return", "punctuation marks",
                "numbers and digits", "the end of a sentence", "words about errors and exceptions")
SERVER_CONTEXT = 2048


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def fixed_excerpts(count: int, tokens: int, seed: int) -> list[tuple[str, list[str]]]:
    """`count` windows of `tokens` tokens of the bundled corpus, drawn with `seed`, each with an explanation."""
    tok = load_tokenizer(None)
    texts = read_corpus(None)["text"].to_list()
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        ids = tok(rng.choice(texts), add_special_tokens=False)["input_ids"]
        if len(ids) < tokens:
            continue
        start = rng.randrange(0, len(ids) - tokens + 1)
        out.append((EXPLANATIONS[len(out) % len(EXPLANATIONS)], [tok.decode([i]) for i in ids[start:start + tokens]]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--excerpts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per excerpt (the pipeline's windows: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ten-probe", dest="ten_probe", choices=TEN_PROBES, default="auto")
    parser.add_argument("--top-logprobs", dest="top_logprobs", type=int, default=None,
                        help="candidates per position (default: the llama_cpp preset's)")
    parser.add_argument("--threads", type=int, default=None, help="the server's threads (default: half the cores)")
    args = parser.parse_args()
    why = server_available()
    if why:
        sys.exit(f"error: {why}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the server it started is stopped too

    excerpts = fixed_excerpts(args.excerpts, args.tokens, args.seed)
    local = LocalTransformersBackend(dtype="float32")
    own = [local.count_tokens({"prompt": simulation_prompt(e, t).text}) for e, t in excerpts]
    log(f"in process (float32, 0–10): {len(excerpts)} excerpts of {args.tokens} tokens")
    exact = [expected_values(local.value_probabilities_unbatched(simulation_prompt(e, t))) for e, t in excerpts]

    with tempfile.TemporaryDirectory() as logs, \
            run_llama_server(Path(logs), threads=args.threads, n_ctx=SERVER_CONTEXT) as server:
        backend = OpenAICompatibleBackend(server.base_url, server.model, server.api_key, server="llama_cpp",
                                          ten_probe=args.ten_probe, context_tokens=SERVER_CONTEXT,
                                          top_logprobs=args.top_logprobs)
        before = server.logged_requests()
        log(f"server (llama-cpp-python, ten_probe={args.ten_probe}): {len(excerpts)} excerpts")
        started = time.perf_counter()
        outcomes = backend.map(lambda x: simulate_excerpt(backend, *x), excerpts)
        seconds = time.perf_counter() - started
        requests = sum((server.logged_requests() - before).values())
        top, candidates = backend.simulation_top_value(), backend.top_logprobs
        backend.close()
    failed = [o for o in outcomes if not o.ok]  # recorded as the pipeline records them; they cost requests too
    for o in failed:
        log(f"excerpt {o.index} failed on the server: {o.error}")
    if len(failed) == len(outcomes):
        sys.exit(f"error: every excerpt failed on the server, e.g.: {failed[0].error}")
    stats = backend.stats.snapshot()
    served = [o.value for o in outcomes if o.ok]
    exact = [e for o, e in zip(outcomes, exact) if o.ok]
    dev = np.concatenate([np.abs(s - e) for s, e in zip(served, exact)])
    n = len(excerpts)
    summary = {
        "requests_per_excerpt": round(requests / n, 3),
        "prompt_tokens_per_excerpt": round(stats["prompt_tokens"] / n, 1),
        "excerpts_per_s": round(n / seconds, 4),
        "max_abs_dev": round(float(dev.max()), 3),
        "mean_abs_dev": round(float(dev.mean()), 3),
        "corr": round(float(np.corrcoef(np.concatenate(served), np.concatenate(exact))[0, 1]), 4),
        "prompt_tokens_ratio": round(stats["prompt_tokens"] / sum(own), 3),
        "ten_probe": args.ten_probe, "scale": f"0-{top}", "top_logprobs": candidates, "excerpts": n,
        "failed_excerpts": len(failed),
        "tokens": args.tokens,
        "requests_logged": requests, "requests_counted_by_backend": int(stats["requests"]), "cpu": cpu_model(),
    }
    print(f"server: {requests} requests ({summary['requests_per_excerpt']} per excerpt), "
          f"{stats['prompt_tokens']} prompt tokens ({summary['prompt_tokens_per_excerpt']} per excerpt, "
          f"{summary['prompt_tokens_ratio']}× the 0–10 prompt's own {sum(own) / n:.0f}), {seconds:.1f} s "
          f"({summary['excerpts_per_s']} excerpts/s), scale {summary['scale']}")
    print(f"against the in-process float32 0–10 answers ({n - len(failed)} excerpts the server answered): max "
          f"|Δ expected value| {summary['max_abs_dev']}, mean {summary['mean_abs_dev']}, r {summary['corr']}")
    if top < MAX_SHOWN:  # the scale's own part: the in-process model on the same 0–9 prompts
        scaled = []
        for (explanation, tokens), e in zip([x for o, x in zip(outcomes, excerpts) if o.ok], exact):
            probs = local.value_probabilities_unbatched(simulation_prompt(explanation, tokens, top))
            scaled.append(np.abs(expected_values(probs[:, : top + 1]) * MAX_SHOWN / top - e))
        scaled = np.concatenate(scaled)
        summary["in_process_scale_max_abs_dev"] = round(float(scaled.max()), 3)
        summary["in_process_scale_mean_abs_dev"] = round(float(scaled.mean()), 3)
        print(f"in process, 0–{top} prompt against 0–10: max |Δ expected value| "
              f"{summary['in_process_scale_max_abs_dev']}, mean {summary['in_process_scale_mean_abs_dev']}")
    print(f"CPU: {summary['cpu']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
