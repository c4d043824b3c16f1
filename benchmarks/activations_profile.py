"""Where extraction's time beyond the bare forward goes: cProfile of extract() in benchmarks/activations.py's setup
(bundled SmolLM2, layers 0-2, all 1536 neurons, batch 16, quantile_k 4), per selection step.

    .venv/bin/python benchmarks/activations_profile.py 20000     # corpus size in tokens
"""
import argparse
import cProfile
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import activations as B  # noqa: E402

from ndx_pipeline.core.data.forward_pass import extract  # noqa: E402

n_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
args = argparse.Namespace(model=None, device="cpu", dtype="float32", neurons="all", batch_size=16, quantile_k=4,
                          layers=[0, 1, 2])
model, tok, windows, layers = B.setup(args, n_tokens)
B.bare_forward(model, tok, windows, 2, 16)
bare = min(B.bare_forward(model, tok, windows, 2, 16) for _ in range(2))
pr = cProfile.Profile()
pr.enable()
extract(model, tok, windows, layers, 20, 20, 0, 16, quantile_k=4)
pr.disable()
st = pstats.Stats(pr)
rows = {}
for (fn, line, name), (cc, nc, tt, ct, callers) in st.stats.items():
    if fn.endswith(("core/data/forward_pass.py", "core/data/selection.py", "core/heap.py")) and name in (
            "extract", "update", "_update_compiled", "_top_k_update", "_quantile_update", "end_pilot",
            "release_freed_heap", "batch_inputs", "finalize"):
        rows[name] = (nc, ct)
print(f"tokens {windows.total_tokens}, batches {-(-len(windows) // 16)}, bare forward {bare:.2f} s")
for name, (nc, ct) in rows.items():
    print(f"{name:<20} calls {nc:>6}  {ct:7.3f} s  per call {ct / nc * 1e3:7.2f} ms")
