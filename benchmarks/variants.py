"""Benchmark: several variants' unit sets read in one pass of the subject model, against a pass for each.

`ndx-pipeline run --variant A --variant B` reads B's unit sets in A's extraction pass (B's run then takes them with
no forward pass). This measures what that saves, in one process, on the same corpus and layers:
  (a) each variant's extraction alone (`stages.activation_records`: model load, tokenizing, the pass, the records
      frames built), one after the other;
  (b) all of them in one call (`also=`), the records of every variant built.
The default variants are the positive and the negative side of the same neurons (`neurons`, `neurons-negative`);
`--dictionary` adds one of that many random TopK latents per layer (SAELens files written here).

Prints a table, then as its last line one JSON object: {"separate_seconds", "joint_seconds",
"joint_over_separate": b / a, "joint_over_slowest": b / the slowest single variant, "forward_passes_separate",
"forward_passes_joint"}.

    .venv/bin/python benchmarks/variants.py                       # bundled SmolLM2, layers 0-2, 256 neurons a side
    .venv/bin/python benchmarks/variants.py --dictionary 4096     # and a 4096-latent dictionary per layer
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def corpus(characters: int):
    """The bundled corpus's first documents, up to about `characters` characters (0: all of it)."""
    from ndx_pipeline.core import stages

    frame = stages.corpus(None)
    if characters <= 0:
        return frame
    lengths = frame["text"].str.len_chars().cum_sum()
    return frame.filter(lengths.shift(1, fill_value=0) < characters)


def write_dictionaries(root: Path, layers: list[int], latents: int, width: int) -> str:
    """A random TopK dictionary per layer (SAELens files, reading the residual stream after the layer)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    for layer in layers:
        folder = root / f"layer{layer}"
        folder.mkdir(parents=True)
        w = rng.standard_normal((width, latents)).astype(np.float32) / np.sqrt(width)
        save_file({"W_enc": torch.from_numpy(w), "b_enc": torch.zeros(latents), "W_dec": torch.from_numpy(w.T.copy()),
                   "b_dec": torch.zeros(width)}, str(folder / "sae_weights.safetensors"))
        (folder / "cfg.json").write_text(json.dumps({
            "architecture": "topk", "d_in": width, "d_sae": latents, "k": 32,
            "hook_name": f"blocks.{layer}.hook_resid_post", "apply_b_dec_to_input": True,
            "normalize_activations": "none"}))
    return str(root)


def timed(documents, model, layers, choice, also=None) -> tuple[float, int]:
    """Seconds for one extraction call with every variant's records built, and its forward passes."""
    from ndx_pipeline.core import stages

    started = time.perf_counter()
    extraction = stages.activation_records(
        documents, model, layers, units=choice.units, neurons=choice.neurons, seed=choice.seed,
        neurons_per_layer=choice.neurons_per_layer, dictionary=choice.dictionary, top_k=choice.top_k,
        random_k=choice.random_k, quantile_k=choice.quantile_k, token_table=choice.token_table, also=also)
    for found in [*extraction.layers.values(), *(r for by in extraction.joint.values() for r in by.values())]:
        assert found.records.height > 0
        found.release()
    return time.perf_counter() - started, extraction.stats.batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="subject model (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--layers", default="0-2")
    parser.add_argument("--neurons", type=int, default=256, help="neurons per layer of each side")
    parser.add_argument("--dictionary", type=int, default=0, help="latents of a third variant's dictionary (0: none)")
    parser.add_argument("--characters", type=int, default=200_000, help="corpus size (0: the whole bundled corpus)")
    args = parser.parse_args()

    from ndx_pipeline.cli import parse_layers
    from ndx_pipeline.core import stages
    from ndx_pipeline.core.data.subject_model import hook_width

    layers = parse_layers(args.layers)
    documents = corpus(args.characters)
    choices = {"neurons": stages.UnitChoice(tuple(layers), "positive", neurons_per_layer=args.neurons),
               "neurons-negative": stages.UnitChoice(tuple(layers), "negative", neurons_per_layer=args.neurons)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.dictionary:
            path = write_dictionaries(Path(tmp), layers, args.dictionary, hook_width(args.model, "resid_post"))
            choices["dictionary"] = stages.UnitChoice(tuple(layers), "dictionary", dictionary=path,
                                                      neurons_per_layer=-1, token_table=False)
        timed(documents, args.model, layers[:1], choices["neurons"])  # warm: files in the page cache, kernels built
        alone = {name: timed(documents, args.model, layers, choice) for name, choice in choices.items()}
        first, *rest = choices
        joint, joint_passes = timed(documents, args.model, layers, choices[first],
                                    also={name: choices[name] for name in rest})
    separate = sum(seconds for seconds, _ in alone.values())
    print(f"model {args.model or 'bundled SmolLM2-135M-Instruct'}, layers {layers}, "
          f"{documents.height} documents ({int(documents['text'].str.len_chars().sum())} characters)")
    print(f"{'extraction':<44} {'seconds':>10} {'passes':>8}")
    for name, (seconds, passes) in alone.items():
        print(f"{'(a) ' + name + ' alone':<44} {seconds:10.2f} {passes:8d}")
    print(f"{'(a) sum':<44} {separate:10.2f} {sum(p for _, p in alone.values()):8d}")
    print(f"{'(b) all in one pass':<44} {joint:10.2f} {joint_passes:8d}")
    print(f"{'b / a':<44} {joint / separate:10.3f}")
    print(json.dumps({"separate_seconds": round(separate, 2), "joint_seconds": round(joint, 2),
                      "joint_over_separate": round(joint / separate, 4),
                      "joint_over_slowest": round(joint / max(s for s, _ in alone.values()), 4),
                      "forward_passes_separate": sum(p for _, p in alone.values()),
                      "forward_passes_joint": joint_passes}))


if __name__ == "__main__":
    main()
