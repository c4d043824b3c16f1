"""Every script in benchmarks/ runs for real at tiny sizes on the bundled model, so none breaks unnoticed (two once
stopped after their extraction for weeks). Each test checks the script's last line, the JSON object its figures
are read from; what the figures are is the scripts' business, measured at their own sizes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.slow


def run(script: str, *args: str, timeout: int = 900) -> tuple[str, dict | None]:
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    env.pop("NDX_SUBJECT_MODEL", None)
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=BENCHMARKS.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    try:
        return done.stdout, json.loads(last)
    except json.JSONDecodeError:
        return done.stdout, None


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_activations_benchmark_small():
    _, found = run("activations.py", "--layers", "0", "--neurons", "16", "--tokens", "3000", "--repeats", "1",
                   "--rss-tokens", "3000,6000", "--no-materialize")
    assert finite(found["ratio"]) and found["ratio"] > 0 and found["tokens"] > 2000
    assert found["rss_tokens"] == [3000, 6000] and finite(found["rss_growth"]) and found["neurons"] == 16


def test_activations_profile_small():
    out, _ = run("activations_profile.py", "3000")
    assert out.startswith("tokens ") and "extract" in out and "update" in out


def test_llm_stages_benchmark_small():
    _, found = run("llm_stages.py", "--neurons", "1", "--excerpts", "8")
    assert finite(found["sim_speedup"]) and finite(found["explain_speedup"]) and finite(found["max_abs_dp"])
    assert found["max_abs_dp"] < 1e-3  # batched and one at a time in float32: the same probabilities
    assert found["simulated_excerpts"] == 8


def test_llm_stages_cpu_class_benchmark_small():
    """One CPU class (AMX off) in its own process: its limit reached it, both precisions were timed, auto's
    calibration ran there, and the default run is projected."""
    out, found = run("llm_stages.py", "--isa", "avx512_bf16", "--neurons", "1", "--excerpts", "8",
                                "--profile")
    assert found["limits"] == {"avx512_bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}}
    rates = found["sim_per_s"]["avx512_bf16"]
    assert set(rates) == {"float32", "bfloat16"} and all(finite(r) and r > 0 for r in rates.values())
    assert found["auto_dtype"]["avx512_bf16"] in rates and finite(found["default_run_s"]["avx512_bf16"])
    profile = found["profile"]["avx512_bf16"]["float32"]
    assert abs(profile["matmul"] + profile["attention"] + profile["other"] - 1) < 0.01 and profile["matmul"] > 0
    assert "avx512_bf16  " in out


def test_prompts_benchmark_small():
    _, found = run("prompts.py", "--layers", "0", "--neurons", "1", "--pool", "2", "--samples", "1")
    assert found and all(isinstance(k, str) for k in found)


def test_scorers_benchmark_small(tmp_path):
    _, found = run("scorers.py", "--layers", "0", "--pool", "2", "--neurons", "1", "--scorer-excerpts", "2",
                   "--scorer-batch", "2", "--cache-dir", str(tmp_path))
    assert {"simulation", "detection", "fuzzing", "embedding"} <= set(found)
