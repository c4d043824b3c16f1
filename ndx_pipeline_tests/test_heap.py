"""The process heap settings the package makes: polars' allocator keeps freed pages (`keep_polars_freed_pages`)."""

import os
import subprocess
import sys

import pytest

from ndx_pipeline.core.heap import POLARS_ALLOCATOR_SETTINGS

# polars' jemalloc prints its options at exit when stats_print is on; the script adds it to what the package set
SCRIPT = f"""
import os
import ndx_pipeline
os.environ["{POLARS_ALLOCATOR_SETTINGS}"] = os.environ.get("{POLARS_ALLOCATOR_SETTINGS}", "") + ",stats_print:true"
import polars
polars.DataFrame({{"a": [1, 2]}}).sum()
"""


def _polars_allocator_options(env: dict) -> dict:
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    options = {}
    for line in (run.stdout + run.stderr).splitlines():
        line = line.strip()
        if line.startswith("opt.") and ":" in line:
            name, value = line.split(":", 1)
            options[name] = value.split("(")[0].strip()
    return options


@pytest.mark.skipif(sys.platform != "linux", reason="polars' wheels use jemalloc on Linux only")
def test_polars_keeps_freed_pages_unless_the_user_set_its_allocator():
    env = {k: v for k, v in os.environ.items() if k != POLARS_ALLOCATOR_SETTINGS}
    ours = _polars_allocator_options(env)
    assert ours["opt.dirty_decay_ms"] == "5000" and ours["opt.muzzy_decay_ms"] == "5000"
    theirs = _polars_allocator_options({**env, POLARS_ALLOCATOR_SETTINGS: "dirty_decay_ms:700"})
    assert theirs["opt.dirty_decay_ms"] == "700"
    assert theirs["opt.muzzy_decay_ms"] != "5000"  # polars' own default: nothing of ours added
