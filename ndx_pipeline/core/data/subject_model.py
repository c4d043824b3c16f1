"""The subject model: where it comes from, its layers, and the neurons we read from it.

A neuron of layer L is one coordinate of the input to that layer's MLP output projection (the post-activation
hidden unit). A forward pre-hook on the projection reads it on every architecture without model surgery.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.models import ModelSource, gguf_metadata, load_config, loadable, resolve_model, torch_dtype

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


class Shape(NamedTuple):
    layers: int
    mlp_width: int | None
    hidden: int | None  # the residual stream's width


@lru_cache(maxsize=16)
def _shape(source: ModelSource) -> Shape:
    """Layers, MLP width and hidden size of a model, from the GGUF header or the config."""
    if source.gguf_file:
        meta = gguf_metadata(Path(source.path) / source.gguf_file)
        arch = meta.get("general.architecture", "")
        layers, width = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.feed_forward_length")
        hidden = meta.get(f"{arch}.embedding_length")
        if layers:
            return Shape(int(layers), int(width) if width else None, int(hidden) if hidden else None)
    config = load_config(source)
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not n:
        raise NdxInputError(f"model {source.name!r} has a config without num_hidden_layers.")
    hidden = next((int(getattr(config, a)) for a in ("hidden_size", "n_embd", "d_model") if getattr(config, a, None)),
                  None)
    width = next((int(getattr(config, a)) for a in ("intermediate_size", "n_inner", "ffn_dim", "d_ff")
                  if getattr(config, a, None)), None)
    if width is None and hidden:
        width = 4 * hidden  # GPT-2 leaves n_inner unset: 4 × hidden
    return Shape(int(n), width, hidden)


def num_layers(name: str | None) -> int:
    return _shape(resolve_model(name)).layers


def mlp_width(name: str | None) -> int:
    width = _shape(resolve_model(name)).mlp_width
    if not width:
        raise NdxInputError(f"model {name!r} has a config that gives no MLP width.")
    return width


def hidden_width(name: str | None) -> int:
    """The residual stream's width (hidden size) of a model."""
    hidden = _shape(resolve_model(name)).hidden
    if not hidden:
        raise NdxInputError(f"model {name!r} has a config that gives no hidden size.")
    return hidden


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


def load_tokenizer(name: str | None):
    """The subject model's tokenizer alone (no weights)."""
    from transformers import AutoTokenizer

    path, kwargs = loadable(resolve_model(name))
    return AutoTokenizer.from_pretrained(path, **kwargs)


TRAINED, RANDOM_WEIGHTS = "trained", "random"
WEIGHTS = (TRAINED, RANDOM_WEIGHTS)  # the subject model's weights: its own, or re-initialized (the control)


def check_weights(weights: str) -> str:
    if weights not in WEIGHTS:
        raise NdxInputError(f"subject_weights={weights!r} is not known: use {' or '.join(WEIGHTS)}.")
    return weights


def load_subject_model(name: str | None, device: str = "cpu", dtype: str = "float32", weights: str = TRAINED,
                       seed: int = 0, head: bool = False):
    """Load the model body (no LM head is needed to read activations) and its tokenizer, in eval mode; head=True:
    with its LM head (the unembedding, for the units' output tokens). weights="random": the same architecture and
    tokenizer with every weight re-initialized by the model's own initializer, seeded with `seed` (the random-weight
    control: no trained weight is read); the body's weights are the same with or without the head."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    loader = AutoModelForCausalLM if head else AutoModel

    num_layers(name)  # clear error for an unknown model before any weights are touched
    dtype = torch_dtype(dtype, "subject_model.dtype")
    tokenizer = load_tokenizer(name)
    path, kwargs = loadable(resolve_model(name))
    if check_weights(weights) == RANDOM_WEIGHTS:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, **kwargs)
        with torch.random.fork_rng(devices=[]):  # seeded here, the caller's random state untouched
            torch.manual_seed(int(seed))
            model = loader.from_config(config)
        model.to(dtype)
    else:
        model = loader.from_pretrained(path, dtype=dtype, **kwargs)
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


# Where in a block a unit set reads its activations (dictionaries name theirs; MLP neurons read `mlp_hidden`):
# hook → (which module, its input or its output)
HOOK_POINTS = {
    "resid_pre": ("block", "input"),  # the residual stream entering the block
    "resid_post": ("block", "output"),  # the residual stream leaving the block
    "mlp_in": ("mlp", "input"),  # what the MLP reads (after the block's pre-MLP norm); transcoders read this
    "mlp_out": ("mlp", "output"),  # what the MLP adds to the residual stream
    "mlp_hidden": ("down_proj", "input"),  # the MLP's hidden units: the neurons
}


def hook_width(name: str | None, hook: str) -> int:
    """How wide the activations at `hook` are: the MLP width for its hidden units, else the hidden size."""
    return mlp_width(name) if hook == "mlp_hidden" else hidden_width(name)


def hook_point(model, layer: int, hook: str):
    """(module, "input" | "output"): where a forward (pre-)hook reads the activations at `hook` of `layer`."""
    if hook not in HOOK_POINTS:
        raise NdxInputError(f"hook {hook!r} is not known: use one of {', '.join(HOOK_POINTS)}.")
    where, side = HOOK_POINTS[hook]
    n_layers = int(getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layer"))
    block = transformer_blocks(model, n_layers)[1][layer]
    if where == "block":
        return block, side
    projection = mlp_output_projections(model, [layer])[layer]
    if where == "down_proj":
        return projection, side
    for name, module in block.named_modules():
        if name and any(m is projection for m in module.children()):
            return module, side
    raise NdxInputError(f"layer {layer} has no MLP module around its output projection: hook {hook!r} cannot be read "
                        "on this architecture (use resid_pre, resid_post or mlp_hidden).")


def attach_hook(module, side: str, consume):
    """Call consume(tensor) with the module's first input ("input") or its output ("output") on every forward;
    returns the removable handle."""
    if side == "input":
        def pre_hook(_module, args, kwargs):
            consume(args[0] if args else kwargs["hidden_states"])

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(_module, _args, output):
        consume(output[0] if isinstance(output, tuple) else output)

    return module.register_forward_hook(hook)
