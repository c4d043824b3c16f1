"""Benchmark of activation extraction (issue: activation_records should cost no more than the forward pass).

Measures in one process, on the same tokens and batches:
  (a) a bare forward of the subject model stopped where extraction stops (at the deepest requested layer's MLP
      output projection), and (a2) one of the block list cut after that layer, for reference,
  (b) the activation_records computation for the same layers (hooks + streaming top-k, random sample, moments for
      every neuron of those layers),
and, in fresh subprocesses, (c) the peak RSS of extraction over a 50k-token and a 200k-token corpus.

Then the materializations a user runs, files written (`--materialize`, on by default): the extraction job
(corpus → activation_records + token_table → top_excerpts) through Dagster, in process, on the same corpus:
  (d) every neuron of every layer, both signs (lookup baseline off: its token table would be distinct tokens × units),
      against (d0) a bare forward of the whole model (the mean of one run before and one after d; every forward
      under the allocator limits extraction sets, `reuse_freed_heap`, so that none is slowed by page faults):
      `whole_model_ratio` = d / d0;
  (e) a 16384-latent TopK dictionary (SAELens files written here, chosen directions) on one layer, against (e0) a bare
      forward to that layer (the mean of one before and one after e): `dict_ratio` = e / e0; and in fresh subprocesses
      the peak RSS of that materialization on a 50k- and a 200k-token corpus: `dict_rss_growth`.

Prints a table, then as its last line one JSON object: {"ratio": b/a, "rss_growth": (rss200k - rss50k) / rss50k,
"whole_model_ratio": …, "dict_ratio": …, "dict_rss_growth": …, and beside each ratio the seconds of the pass
and of the work after it: "whole_pass_s", "whole_after_pass_s", "dict_pass_s", "dict_after_pass_s"}.
On a shared 2-core machine the forward's own speed drifts by ±15 % between runs, more than the gap being measured, so
it also times the selections' update() inside (b) and reports "ratio_attributed" = (a + that time) / a.

    .venv/bin/python benchmarks/activations.py                  # bundled SmolLM2, layers 0,1,2, all 1536 neurons
    .venv/bin/python benchmarks/activations.py --only-materialize --materialize-tokens 0   # (d), (e) on the bundled
                                                                # corpus as it is (113k tokens), as a new user runs it
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
    """The bundled corpus (CPython's reference docs), cut or repeated under new ids until it holds n_tokens tokens;
    n_tokens 0: the bundled corpus as it is."""
    from ndx_pipeline.core.data.corpus import read_corpus

    frame = read_corpus(None)
    if n_tokens <= 0:
        return frame["doc_id"].to_list(), frame["text"].to_list()
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

    from ndx_pipeline.core.data.forward_pass import batch_inputs
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

    from ndx_pipeline.core.data.forward_pass import extract
    from ndx_pipeline.core.data.selection import LayerSelection

    update = LayerSelection.update
    spent = [0.0]
    cuda = next(model.parameters()).device.type == "cuda"

    def timed_update(self, *a, **kw):
        t = time.perf_counter()
        update(self, *a, **kw)
        if cuda:
            torch.cuda.synchronize()
        spent[0] += time.perf_counter() - t

    LayerSelection.update = timed_update
    try:
        started = time.perf_counter()
        extract(model, tok, windows, layers, 20, 20, 0, args.batch_size, quantile_k=args.quantile_k)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    finally:
        LayerSelection.update = update
    SELECTION_SECONDS[0] = spent[0]
    return elapsed


def rss_child(args) -> None:
    """Run extraction (and building the Parquet rows) on a corpus of --rss-child tokens; print peak RSS in MiB."""
    from ndx_pipeline.core.data.forward_pass import extract
    from ndx_pipeline.core.data.record_frames import records_frame
    from ndx_pipeline.core.data.windows import TokenTexts

    model, tok, windows, layers = setup(args, args.rss_child)
    selections, _ = extract(model, tok, windows, layers, 20, 20, 0, args.batch_size, quantile_k=args.quantile_k)
    texts = TokenTexts(tok)
    for layer in layers:
        records_frame(layer, selections[layer], windows, texts)
    print(json.dumps({"tokens": windows.total_tokens, "peak_rss_mib": peak_rss_mib()}))


DICT_LATENTS, DICT_K = 16_384, 32


def write_dictionary(root, model, tokenizer, windows, layer: int, hook: str = "resid_post"):
    """A SAELens TopK dictionary of DICT_LATENTS latents on `layer`'s residual stream: directions of the model's own
    activations at seeded tokens of the first windows, a zero input offset. Returns its folder."""
    from pathlib import Path

    import numpy as np
    import torch
    from safetensors.torch import save_file

    from ndx_pipeline.core.data.forward_pass import batch_inputs
    from ndx_pipeline.core.data.subject_model import attach_hook, hook_point
    from ndx_pipeline.core.models import special_token_wrap

    seen = []
    module, side = hook_point(model, layer, hook)
    handle = attach_hook(module, side, lambda x: seen.append(x.reshape(-1, x.shape[-1]).float()))
    prefix, suffix = special_token_wrap(tokenizer)
    try:
        with torch.inference_mode():
            ids, attn = batch_inputs(windows, np.arange(min(64, len(windows))), prefix, suffix, 0)
            model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(attn))
    finally:
        handle.remove()
    h = torch.cat(seen)
    rng = np.random.default_rng(0)
    picks = h[torch.as_tensor(rng.choice(len(h), DICT_LATENTS, replace=True))]
    W = (picks + 0.1 * torch.randn(picks.shape, generator=torch.Generator().manual_seed(0)) * picks.std())
    W = (W / W.norm(dim=1, keepdim=True)).T.contiguous()
    folder = Path(root) / f"layer{layer}-topk-{DICT_LATENTS}"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": W, "b_enc": torch.zeros(DICT_LATENTS), "b_dec": torch.zeros(W.shape[0]),
               "W_dec": W.T.contiguous()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "k": DICT_K, "d_in": int(W.shape[0]), "d_sae": DICT_LATENTS,
        "hook_name": f"blocks.{layer}.hook_{hook}", "apply_b_dec_to_input": True, "normalize_activations": "none"}))
    return folder


def write_corpus(path, ids, texts):
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, text in zip(ids, texts):
            f.write(json.dumps({"doc_id": doc_id, "text": text}) + "\n")
    return path


SMALL_CORPUS_TOKENS = 64_000


def materialize(args, corpus_path, storage, layers, selection: dict, tokens: int) -> dict:
    """Seconds for the extraction job (corpus, activation_records + token_table, top_excerpts) through Dagster in
    process, over the layer range; and the bytes it wrote. The pipeline's default selection, except on a corpus of
    under SMALL_CORPUS_TOKENS tokens: there random_k is 34, so that every one of 92k units keeps the 14 random
    windows outside its 20 top ones that score_random needs (with 20 of ~300 windows, a few units would not)."""
    import dagster as dg

    from ndx_pipeline.core.variants import DEFAULT_VARIANT
    from ndx_pipeline.definitions import build_definitions
    from ndx_pipeline.defs.automation import EXTRACTION_JOB
    from ndx_pipeline.defs.partitions import add_variant, range_tags

    resources = {
        "storage": {"config": {"storage_dir": str(storage)}},
        "corpus_source": {"config": {"path": str(corpus_path)}},
        "subject_model": {"config": {"batch_size": args.batch_size, "device": args.device}},
        "selection": {"config": {"neurons_per_layer": -1, "quantile_k": args.quantile_k, **selection,
                                 **({"random_k": 34} if tokens < SMALL_CORPUS_TOKENS else {})}},
        "quality": {"config": {"baselines": ["random", "token_list"], "scorers": []}},
    }
    job = build_definitions().resolve_job_def(EXTRACTION_JOB)
    instance = dg.DagsterInstance.ephemeral()
    add_variant(instance, DEFAULT_VARIANT)
    started = time.perf_counter()
    # the extraction's own assets: the job also holds output_tokens (the units' output side, read off the weights:
    # no forward pass, ~1.6k units/s here), which is no part of what the ratio compares with a forward
    extraction = [dg.AssetKey(a) for a in ("corpus", "activation_records", "token_table", "top_excerpts")]
    result = job.execute_in_process(run_config={"resources": resources}, instance=instance,
                                    tags=range_tags(DEFAULT_VARIANT, min(layers), max(layers)), raise_on_error=True,
                                    asset_selection=extraction)
    seconds = time.perf_counter() - started
    assert result.success
    written = sum(p.stat().st_size for p in storage.rglob("*.parquet"))
    # the pass's own seconds (the forward with the selection), as the step recorded them; the rest of the job
    # (model load, corpus, building and writing the records and their excerpts) is the after-pass work
    records = instance.get_latest_materialization_event(dg.AssetKey("activation_records")).asset_materialization
    return {"seconds": seconds, "bytes": written, "pass_s": float(records.metadata["wall_seconds"].value)}


def peak_rss_mib() -> float:
    """This process's peak resident set since it started (VmHWM; getrusage's ru_maxrss would carry the parent's
    peak over fork and exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dict_rss_child(args) -> None:
    """Materialize the dictionary's layer on a corpus of --dict-rss-child tokens; print peak RSS in MiB."""
    import tempfile
    from pathlib import Path

    from ndx_pipeline.core.data.subject_model import load_tokenizer

    # the tokenizer alone: the materialization loads the model itself, and a second copy here would be measured too
    ids, texts = corpus_of(load_tokenizer(args.model), args.dict_rss_child)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "corpus.jsonl", ids, texts)
        baseline = peak_rss_mib()
        materialize(args, corpus, Path(tmp) / "storage", [args.dict_layer],
                    {"units": "dictionary", "dictionary": args.dictionary}, args.dict_rss_child)
    print(json.dumps({"tokens": args.dict_rss_child, "before_mib": baseline, "peak_rss_mib": peak_rss_mib()}))


def between_forwards(out: dict, name: str, forward, work):
    """work() between two timings of its bare forward; their mean goes to out[name + "_forward_s"] (each to
    `_before_s`, `_after_s`): on a shared machine the forward's own speed drifts by 5-10 % within minutes, and a
    drift then falls on both sides of the ratio alike. (Before `main` set the allocator's limits, the forward before
    was 14 % slower than the one after for that reason alone, and their mean flattered the ratio.)"""
    before = forward()
    done = work()
    after = forward()
    out[f"{name}_forward_s"] = (before + after) / 2
    out[f"{name}_forward_before_s"], out[f"{name}_forward_after_s"] = before, after
    return done


def materializations(args, model, tok) -> dict:
    """(d) whole model, both signs, and (e) the dictionary, each against its bare forward; (e) RSS growth."""
    import tempfile
    from pathlib import Path

    from ndx_pipeline.core.data.subject_model import num_layers
    from ndx_pipeline.core.data.windows import tokenize_windows

    out = {}
    ids, texts = corpus_of(tok, args.materialize_tokens)
    windows = tokenize_windows(tok, ids, texts, 64)
    out["materialize_tokens"] = windows.total_tokens
    every_layer = list(range(num_layers(args.model)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = write_corpus(tmp / "corpus.jsonl", ids, texts)
        whole = between_forwards(out, "whole", lambda: bare_forward(model, tok, windows, max(every_layer),
                                                                     args.batch_size),
                                 lambda: materialize(args, corpus, tmp / "whole", every_layer, {"units": "both"},
                                                     windows.total_tokens))
        out["whole_materialize_s"], out["whole_parquet_mib"] = whole["seconds"], whole["bytes"] / 2**20
        out["whole_model_ratio"] = whole["seconds"] / out["whole_forward_s"]
        out["whole_pass_s"], out["whole_after_pass_s"] = whole["pass_s"], whole["seconds"] - whole["pass_s"]
        out["whole_pass_ratio"] = whole["pass_s"] / out["whole_forward_s"]
        out["whole_peak_rss_mib"] = peak_rss_mib()  # this process so far: the model, (a)-(c) and (d)
        del whole
        folder = write_dictionary(tmp / "dictionaries", model, tok, windows, args.dict_layer)
        args.dictionary = str(folder)
        d = between_forwards(out, "dict", lambda: bare_forward(model, tok, windows, args.dict_layer,
                                                               args.batch_size, at_projection=False),
                             lambda: materialize(args, corpus, tmp / "dict", [args.dict_layer],
                                                 {"units": "dictionary", "dictionary": str(folder)},
                                                 windows.total_tokens))
        out["dict_materialize_s"], out["dict_parquet_mib"] = d["seconds"], d["bytes"] / 2**20
        out["dict_ratio"] = d["seconds"] / out["dict_forward_s"]
        out["dict_pass_s"], out["dict_after_pass_s"] = d["pass_s"], d["seconds"] - d["pass_s"]
        rss = {}
        for n in (50_000, 200_000):
            cmd = [sys.executable, __file__, "--dict-rss-child", str(n), "--dict-layer", str(args.dict_layer),
                   "--dictionary", str(folder), "--device", args.device, "--dtype", args.dtype,
                   "--batch-size", str(args.batch_size), "--quantile-k", str(args.quantile_k)] + (
                       ["--model", args.model] if args.model else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            rss[n] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]
        out["dict_rss50k_mib"], out["dict_rss200k_mib"] = rss[50_000], rss[200_000]
        out["dict_rss_growth"] = (rss[200_000] - rss[50_000]) / rss[50_000]
    return out


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
    parser.add_argument("--materialize-tokens", type=int, default=20_000, dest="materialize_tokens",
                        help="corpus size for the materializations (d), (e); 0: the bundled corpus as it is "
                             "(113k tokens, as a new user runs it)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of (a), (b), (a2)")
    parser.add_argument("--materialize", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the whole-model and dictionary materializations (d), (e)")
    parser.add_argument("--only-materialize", action="store_true", help="skip (a)-(c)")
    parser.add_argument("--rss-tokens", default="50000,200000", dest="rss_tokens",
                        help="(c): the two corpus sizes whose peak RSS is compared (the tests use tiny ones)")
    parser.add_argument("--dict-layer", type=int, default=15, dest="dict_layer")
    parser.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--dict-rss-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--dictionary", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from ndx_pipeline.cli import parse_layers
    from ndx_pipeline.core.heap import reuse_freed_heap

    # every forward here, bare or in the pipeline, under the allocator limits extraction sets: under glibc's defaults
    # a bare forward in a fresh process pays page faults the pass does not (`reuse_freed_heap`), and a ratio to it
    # would flatter the pipeline
    reuse_freed_heap()

    args.layers = parse_layers(args.layers)
    if args.rss_child:
        rss_child(args)
        return
    if args.dict_rss_child:
        dict_rss_child(args)
        return
    if args.only_materialize:
        import torch

        from ndx_pipeline.core.data.subject_model import load_subject_model

        model, tok = load_subject_model(args.model, args.device, args.dtype)
        found = materializations(args, model, tok)
        print_materializations(found, torch.get_num_threads())
        print(json.dumps({k: round(v, 4) for k, v in found.items()}))
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
    small, large = (int(x) for x in args.rss_tokens.split(","))
    for n in (small, large):
        cmd = [sys.executable, __file__, "--rss-child", str(n), "--layers", ",".join(map(str, args.layers)),
               "--neurons", args.neurons, "--device", args.device, "--dtype", args.dtype,
               "--batch-size", str(args.batch_size), "--quantile-k", str(args.quantile_k)] + (
                   ["--model", args.model] if args.model else [])
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
    print(f"{f'peak RSS, {small} tokens, MiB':<44} {rss[small]:12.0f}")
    print(f"{f'peak RSS, {large} tokens, MiB':<44} {rss[large]:12.0f}")
    growth = (rss[large] - rss[small]) / rss[small]
    print(f"{'rss_growth (target ≤ 0.10)':<44} {growth:12.3f}")
    found = materializations(args, model, tok) if args.materialize else {}
    if found:
        print_materializations(found, torch.get_num_threads())
    print(json.dumps({**{k: round(v, 4) for k, v in found.items()}, "ratio": round(b / a, 4),
                      "ratio_paired_median": round(paired, 4),
                      "ratio_attributed": round(attributed, 4), "selection_s": round(sel, 3),
                      "rounds": args.repeats, "rss_growth": round(growth, 4), "bare_s": round(a, 3),
                      "bare_blocks_s": round(a_blocks, 3),
                      "extract_s": round(b, 3), "tokens": windows.total_tokens,
                      "tokens_per_s": round(windows.total_tokens / b, 1), "rss_small_mib": round(rss[small], 1),
                      "rss_large_mib": round(rss[large], 1), "rss_tokens": [small, large], "neurons": n_neurons,
                      "layers": args.layers,
                      "quantile_k": args.quantile_k,
                      "device": args.device}))


def print_materializations(found: dict, threads: int) -> None:
    print(f"materializations through Dagster (extraction job: files written), torch threads {threads}")
    rows = [("corpus tokens", "materialize_tokens"),
            ("(d0) bare forward, whole model, s (mean)", "whole_forward_s"),
            ("    before (d), s", "whole_forward_before_s"),
            ("    after (d), s", "whole_forward_after_s"),
            ("(d) every neuron, both signs, all layers, s", "whole_materialize_s"),
            ("    Parquet written, MiB", "whole_parquet_mib"),
            ("    of which the pass (forward + selection), s", "whole_pass_s"),
            ("    after the pass (load, records, Parquet), s", "whole_after_pass_s"),
            ("whole_model_ratio d/d0 (target ≤ 1.3)", "whole_model_ratio"),
            ("    the pass alone / d0", "whole_pass_ratio"),
            ("    peak RSS of this process after (d), MiB", "whole_peak_rss_mib"),
            ("(e0) bare forward to the dictionary's layer, s", "dict_forward_s"),
            ("    before (e), s", "dict_forward_before_s"),
            ("    after (e), s", "dict_forward_after_s"),
            (f"(e) {DICT_LATENTS}-latent dictionary, s", "dict_materialize_s"),
            ("    Parquet written, MiB", "dict_parquet_mib"),
            ("    of which the pass (forward + encoder + selection), s", "dict_pass_s"),
            ("    after the pass (load, records, Parquet), s", "dict_after_pass_s"),
            ("dict_ratio e/e0 (target ≤ 1.3)", "dict_ratio"),
            ("peak RSS, dictionary, 50k tokens, MiB", "dict_rss50k_mib"),
            ("peak RSS, dictionary, 200k tokens, MiB", "dict_rss200k_mib"),
            ("dict_rss_growth (target ≤ 0.10)", "dict_rss_growth")]
    for label, key in rows:
        print(f"{label:<44} {found[key]:12.3f}")


if __name__ == "__main__":
    main()
