"""The subject model: where it comes from, its layers, and the neurons we read from it.

A neuron of layer L is one coordinate of the input to that layer's MLP output projection (the post-activation
hidden unit). A forward pre-hook on the projection reads it on every architecture without model surgery.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.models import ModelSource, gguf_metadata, load_config, loadable, resolve_model

# Relative names, inside one transformer block, of the MLP output projection, by architecture family.
MLP_OUTPUT_PROJECTIONS = (
    "mlp.down_proj",  # Llama, Mistral, Qwen, SmolLM, Gemma
    "mlp.c_proj",  # GPT-2, GPT-J style
    "mlp.dense_4h_to_h",  # GPT-NeoX / Pythia
    "output.dense",  # BERT-style encoders (BertLayer.output.dense)
    "fc2",  # OPT
    "mlp.fc2",  # Phi, CLIP-style
    "mlp.fc_out",  # GPT-J
    "feed_forward.w2",  # InternLM-style
)


@lru_cache(maxsize=16)
def _shape(source: ModelSource) -> tuple[int, int | None]:
    """(layers, MLP width) of a model, from the GGUF header or the config."""
    if source.gguf_file:
        meta = gguf_metadata(Path(source.path) / source.gguf_file)
        arch = meta.get("general.architecture", "")
        layers, width = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.feed_forward_length")
        if layers:
            return int(layers), (int(width) if width else None)
    config = load_config(source)
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not n:
        raise NdxInputError(f"model {source.name!r} has a config without num_hidden_layers.")
    width = None
    for attr in ("intermediate_size", "n_inner", "ffn_dim", "d_ff"):
        if getattr(config, attr, None):
            width = int(getattr(config, attr))
            break
    else:
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        if hidden:
            width = 4 * int(hidden)  # GPT-2 leaves n_inner unset: 4 × hidden
    return int(n), width


def num_layers(name: str | None) -> int:
    return _shape(resolve_model(name))[0]


def mlp_width(name: str | None) -> int:
    width = _shape(resolve_model(name))[1]
    if not width:
        raise NdxInputError(f"model {name!r} has a config that gives no MLP width.")
    return width


def check_layers(name: str | None, layers) -> list[int]:
    n = num_layers(name)
    name = resolve_model(name).name
    out = []
    for layer in layers:
        try:
            i = int(layer)
        except (TypeError, ValueError):
            raise NdxInputError(f"layer {layer!r} is not an integer.") from None
        if not 0 <= i < n:
            raise NdxInputError(f"layer {i} is outside the model {name!r}, which has layers 0..{n - 1}.")
        out.append(i)
    return sorted(set(out))


def load_subject_model(name: str | None, device: str = "cpu", dtype: str = "float32"):
    """Load the model body (no LM head is needed) and its tokenizer, in eval mode."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    source = resolve_model(name)
    num_layers(name)  # clear error for an unknown model before any weights are touched
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    path, kwargs = loadable(source)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModel.from_pretrained(path, dtype=torch_dtype, **kwargs)
    model.to(device).eval()
    return model, tokenizer


def transformer_blocks(model, n_layers: int):
    """The ModuleList holding the model's transformer blocks (the largest list with one entry per layer)."""
    import torch

    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers
    ]
    if not candidates:
        raise NdxInputError(f"model has no list of {n_layers} transformer blocks.")
    return max(candidates, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def mlp_output_projections(model, layers) -> dict[int, object]:
    """Layer index → the module whose input is that layer's neurons."""
    n_layers = int(getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layer"))
    blocks_name, blocks = transformer_blocks(model, n_layers)
    out = {}
    for layer in layers:
        block = blocks[layer]
        for rel in MLP_OUTPUT_PROJECTIONS:
            try:
                out[layer] = block.get_submodule(rel)
                break
            except AttributeError:
                continue
        else:
            seen = sorted(n for n, _ in block.named_modules() if n)
            raise NdxInputError(
                f"no MLP output projection recognized in {blocks_name}.{layer} (looked for "
                f"{', '.join(MLP_OUTPUT_PROJECTIONS)}; the block has modules: {', '.join(seen)})."
            )
    return out


