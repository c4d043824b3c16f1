"""Benchmark of activation extraction (issue: activation_records should cost no more than the forward pass).

Measures in one process, on the same tokens and batches:
  (a) a bare forward of the subject model stopped where extraction stops (at the deepest requested layer's MLP
      output projection), and (a2) one of the block list cut after that layer, for reference,
  (b) the activation_records computation for the same layers (hooks + streaming top-k, random sample, moments for
      every neuron of those layers),
and, in fresh subprocesses, (c) the peak RSS of extraction over a 50k-token and a 200k-token corpus.

Prints a table, then as its last line one JSON object: {"ratio": b/a, "rss_growth": (rss200k - rss50k) / rss50k, …}.
On a shared 2-core machine the forward's own speed drifts by ±15 % between runs, more than the gap being measured, so
it also times the selections' update() inside (b) and reports "ratio_attributed" = (a + that time) / a.

    .venv/bin/python benchmarks/activations.py                  # bundled SmolLM2, layers 0,1,2, all 1536 neurons
    .venv/bin/python benchmarks/activations.py --device cuda --model /path/to/gpt2 --layers 0-11
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def corpus_of(tokenizer, n_tokens: int):
    """The bundled corpus (CPython's reference docs), repeated under new ids until it holds n_tokens tokens."""
    from ndx_pipeline.core.data.corpus import read_corpus

    frame = read_corpus(None)
    ids, texts, total, rep = [], [], 0, 0
    while total < n_tokens:
        for doc_id, text in zip(frame["doc_id"], frame["text"]):
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if total + n > n_tokens:
                text = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][: n_tokens - total])
                n = n_tokens - total
            ids.append(f"{doc_id}#{rep}")
            texts.append(text)
            total += n
            if total >= n_tokens:
                break
        rep += 1
    return ids, texts


def truncated(model, deepest: int):
    """Context manager: the model with its block list cut after `deepest` (nothing above it is computed)."""
    from contextlib import contextmanager

    from ndx_pipeline.core.data.subject_model import transformer_blocks

    @contextmanager
    def cut():
        n = model.config.num_hidden_layers
        name, blocks = transformer_blocks(model, n)
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        attr = name.rsplit(".", 1)[-1]
        setattr(parent, attr, blocks[: deepest + 1])
        model.config.num_hidden_layers = deepest + 1
        try:
            yield
        finally:
            setattr(parent, attr, blocks)
            model.config.num_hidden_layers = n

    return cut()


def bare_forward(model, tokenizer, windows, deepest: int, batch_size: int, at_projection: bool = True) -> float:
    """Seconds for a forward of every batch through the truncated model, batches built as extraction builds them."""
    from contextlib import nullcontext

    import numpy as np
    import torch

    from ndx_pipeline.core.data.activations import batch_inputs
    from ndx_pipeline.core.data.subject_model import mlp_output_projections
    from ndx_pipeline.core.models import special_token_wrap

    class Stop(Exception):
        pass

    def stop(module, args):
        raise Stop

    prefix, suffix = special_token_wrap(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    # at_projection: stop where extraction stops (at the deepest layer's MLP output projection), with no other work
    handle = (mlp_output_projections(model, [deepest])[deepest].register_forward_pre_hook(stop)
              if at_projection else None)
    started = time.perf_counter()
    with (nullcontext() if at_projection else truncated(model, deepest)), torch.inference_mode():
        for b0 in range(0, len(windows), batch_size):
            idx = np.arange(b0, min(b0 + batch_size, len(windows)))
            ids, attn = batch_inputs(windows, idx, prefix, suffix, pad_id)
            try:
                model(input_ids=torch.as_tensor(ids, device=device),
                      attention_mask=torch.as_tensor(attn, device=device))
            except Stop:
                pass
        if device.type == "cuda":
            torch.cuda.synchronize()
    if handle:
        handle.remove()
    return time.perf_counter() - started


def setup(args, n_tokens):
    from ndx_pipeline.core.data.subject_model import load_subject_model, mlp_width
    from ndx_pipeline.core.data.windows import tokenize_windows

    model, tok = load_subject_model(args.model, args.device, args.dtype)
    ids, texts = corpus_of(tok, n_tokens)
    windows = tokenize_windows(tok, ids, texts, 64)
    width = mlp_width(args.model)
    neurons = list(range(width)) if args.neurons == "all" else list(range(int(args.neurons)))
    layers = {layer: neurons for layer in args.layers}
    return model, tok, windows, layers


SELECTION_SECONDS = [0.0]


def extraction(args, model, tok, windows, layers) -> float:
    """Seconds for extract(); SELECTION_SECONDS[0] gets the part spent in the selections' update() (the work beyond
    the forward: top-k, random sample, quantile reservoirs, moments), timed inside the same run."""
    import torch

    from ndx_pipeline.core.data import activations as act

    update = act.LayerSelection.update
    spent = [0.0]
    cuda = next(model.parameters()).device.type == "cuda"

    def timed_update(self, *a, **kw):
        t = time.perf_counter()
        update(self, *a, **kw)
        if cuda:
            torch.cuda.synchronize()
        spent[0] += time.perf_counter() - t

    act.LayerSelection.update = timed_update
    try:
        started = time.perf_counter()
        act.extract(model, tok, windows, layers, 20, 20, 0, args.batch_size, quantile_k=args.quantile_k)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    finally:
        act.LayerSelection.update = update
    SELECTION_SECONDS[0] = spent[0]
    return elapsed


def rss_child(args) -> None:
    """Run extraction (and building the Parquet rows) on a corpus of --rss-child tokens; print peak RSS in MiB."""
    from ndx_pipeline.core.data import activations as act
    from ndx_pipeline.core.data.windows import TokenTexts

    model, tok, windows, layers = setup(args, args.rss_child)
    selections, _ = act.extract(model, tok, windows, layers, 20, 20, 0, args.batch_size, quantile_k=args.quantile_k)
    texts = TokenTexts(tok)
    for layer in layers:
        act.records_frame(layer, selections[layer], windows, texts)
    print(json.dumps({"tokens": windows.total_tokens,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="subject model (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--layers", default="0,1,2")
    parser.add_argument("--neurons", default="all", help="'all' or a count per layer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quantile-k", type=int, default=4, dest="quantile_k",
                        help="windows per activation-quantile bucket, as the pipeline keeps (0 = none)")
    parser.add_argument("--tokens", type=int, default=20_000, help="corpus size for the speed ratio")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of (a), (b), (a2)")
    parser.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from ndx_pipeline.cli import parse_layers

    args.layers = parse_layers(args.layers)
    if args.rss_child:
        rss_child(args)
        return

    import torch

    model, tok, windows, layers = setup(args, args.tokens)
    deepest = max(layers)
    bare_forward(model, tok, windows, deepest, args.batch_size)  # warm-up
    bare, blocks, extract, selection = [], [], [], []
    for _ in range(args.repeats):  # back to back, so drift in machine load hits a round's measures alike
        bare.append(bare_forward(model, tok, windows, deepest, args.batch_size))
        extract.append(extraction(args, model, tok, windows, layers))
        selection.append(SELECTION_SECONDS[0])
        blocks.append(bare_forward(model, tok, windows, deepest, args.batch_size, at_projection=False))
    a, a_blocks, b = min(bare), min(blocks), min(extract)
    ratios = sorted(e / f for e, f in zip(extract, bare))
    paired = ratios[len(ratios) // 2]  # median of the per-round ratios
    # the same ratio from the work extraction adds, timed inside each run: immune to the forward's run-to-run drift
    sel = sorted(selection)[len(selection) // 2]
    attributed = (a + sel) / a

    rss = {}
    for n in (50_000, 200_000):
        cmd = [sys.executable, __file__, "--rss-child", str(n), "--layers", ",".join(map(str, args.layers)),
               "--neurons", args.neurons, "--device", args.device, "--dtype", args.dtype,
               "--batch-size", str(args.batch_size), "--quantile-k", str(args.quantile_k)] + (["--model", args.model] if args.model else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rss[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]

    n_neurons = sum(len(v) for v in layers.values())
    print(f"model {args.model or 'bundled SmolLM2-135M-Instruct'}, layers {args.layers}, {n_neurons} neurons, "
          f"device {args.device}, dtype {args.dtype}, batch {args.batch_size}, quantile_k {args.quantile_k}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'measure':<44} {'value':>12}")
    print(f"{'(a) bare forward to the deepest projection, s':<44} {a:12.2f}")
    print(f"{'(a2) bare forward of the cut block list, s':<44} {a_blocks:12.2f}")
    print(f"{'(b) activation_records extraction, s':<44} {b:12.2f}")
    print(f"{'tokens':<44} {windows.total_tokens:12d}")
    print(f"{'(a) tokens/s':<44} {windows.total_tokens / a:12.0f}")
    print(f"{'(b) tokens/s':<44} {windows.total_tokens / b:12.0f}")
    print(f"{'ratio b/a of the fastest runs (target ≤ 1.10)':<44} {b / a:12.3f}")
    print(f"{'ratio b/a, median of back-to-back rounds':<44} {paired:12.3f}")
    print(f"{'selection work inside (b), median, s':<44} {sel:12.2f}")
    print(f"{'ratio (a + selection) / a':<44} {attributed:12.3f}")
    print(f"{'peak RSS, 50k tokens, MiB':<44} {rss[50_000]:12.0f}")
    print(f"{'peak RSS, 200k tokens, MiB':<44} {rss[200_000]:12.0f}")
    growth = (rss[200_000] - rss[50_000]) / rss[50_000]
    print(f"{'rss_growth (target ≤ 0.10)':<44} {growth:12.3f}")
    print(json.dumps({"ratio": round(b / a, 4), "ratio_paired_median": round(paired, 4),
                      "ratio_attributed": round(attributed, 4), "selection_s": round(sel, 3),
                      "rounds": args.repeats, "rss_growth": round(growth, 4), "bare_s": round(a, 3),
                      "bare_blocks_s": round(a_blocks, 3),
                      "extract_s": round(b, 3), "tokens": windows.total_tokens,
                      "tokens_per_s": round(windows.total_tokens / b, 1), "rss50k_mib": round(rss[50_000], 1),
                      "rss200k_mib": round(rss[200_000], 1), "neurons": n_neurons, "layers": args.layers,
                      "quantile_k": args.quantile_k,
                      "device": args.device}))


if __name__ == "__main__":
    main()
