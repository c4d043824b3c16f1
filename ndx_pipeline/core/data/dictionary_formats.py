"""The on-disk formats of sparse dictionaries, read into the encoder's fields (`dictionaries.Dictionary`): SAELens
and EleutherAI sparsify, checked as they are read (shapes against the config, floating-point and finite tensors).

SAELens — a folder with `cfg.json` and `sae_weights.safetensors` (`W_enc` [d_in, d_sae], `b_enc`, `W_dec`
[d_sae, d_out], `b_dec`, and `threshold` for JumpReLU). Configs from before v6 keep `hook_name` (or the older
`hook_point`), `hook_layer`, `activation_fn_str` and `activation_fn_kwargs` at the top level; v6 configs put the
hook under `metadata` and the TopK `k` at the top level. Transcoders (`transcoder`, `skip_transcoder`,
`jumprelu_transcoder`, `jumprelu_skip_transcoder`) never subtract `b_dec`, which lives in the output space.

EleutherAI sparsify — a folder named after its hookpoint (`layers.6`, `model.layers.6.mlp`, …) with `cfg.json`
and `sae.safetensors` (`encoder.weight` [n, d_in], `encoder.bias`, `W_dec` [n, d_out], `b_dec`, optional
`W_skip`). Encoding: the k largest of relu(encoder(x − b_dec)), where b_dec is subtracted only for an autoencoder
(`transcode` false). Sparsify hooks a module's output for an autoencoder and its input for a transcoder, so a
`layers.L.mlp` folder reads the MLP output (SAE) or the MLP input (transcoder).

Not supported, with an error that says so: gated, BatchTopK/Matryoshka training checkpoints (SAELens saves their
inference form as JumpReLU), matching-pursuit, temporal and other SAELens architectures, `tanh-relu`, sparsify's
`groupmax` activation and n-gram lookup coders.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ndx_pipeline.core.errors import NdxInputError

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"
SAELENS_SCALER = "activation_scaler.json"  # the input scaling factor of an unfolded SAELens training checkpoint

# SAELens hook names, after `blocks.<L>.`, mapped onto the hook points (`subject_model.HOOK_POINTS`).
_SAELENS_HOOKS = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "hook_mlp_out": "mlp_out",
    "mlp.hook_post": "mlp_hidden",
    "ln2.hook_normalized": "mlp_in",
}

# SAELens architecture → (how latents fire, whether it is a transcoder).
_SAELENS_ARCHITECTURES = {
    "standard": ("relu", False),
    "jumprelu": ("jumprelu", False),
    "topk": ("topk", False),
    "transcoder": ("relu", True),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", True),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
_SAELENS_TRAINING_ONLY = ("batchtopk", "matryoshka_batchtopk")

# A transformer block in a sparsify hookpoint: `layers.6`, `model.layers.6`, `transformer.h.6`, `gpt_neox.layers.6`.
_SPARSIFY_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(\.mlp)?$")
_SPARSIFY_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")


def read_dictionary_file(path: Path) -> tuple[Path, str, dict]:
    """(folder, format, the encoder's fields) of the dictionary at `path`: its folder, its cfg.json or its
    safetensors file; the format ("saelens" | "sparsify") from the weights file's name, or else from the config."""
    folder, weights = _locate(path)
    cfg = _read_config(folder / CONFIG)
    if weights.name == SAELENS_WEIGHTS:
        fmt = "saelens"
    elif weights.name == SPARSIFY_WEIGHTS:
        fmt = "sparsify"
    else:  # a safetensors file under another name: tell the format by the config
        fmt = "saelens" if ("d_sae" in cfg or "architecture" in cfg) else "sparsify"
    read = read_saelens if fmt == "saelens" else read_sparsify
    return folder, fmt, read(folder, weights, cfg)


def _locate(path: Path) -> tuple[Path, Path]:
    """(folder, weights file) for a folder, a cfg.json or a safetensors file."""
    if not path.exists():
        raise NdxInputError(f"dictionary path {path} does not exist.")
    if path.is_file():
        if path.name == CONFIG:
            folder = path.parent
        elif path.suffix == ".safetensors":
            if not (path.parent / CONFIG).is_file():
                raise NdxInputError(f"dictionary folder {path.parent} has no {CONFIG} next to {path.name}.")
            return path.parent, path
        else:
            raise NdxInputError(f"dictionary path {path} is neither a folder, a {CONFIG} nor a .safetensors file.")
    else:
        folder = path
    if not (folder / CONFIG).is_file():
        inner = sorted(p.name for p in folder.iterdir() if (p / CONFIG).is_file()) if folder.is_dir() else []
        hint = f"; it holds one folder per hookpoint ({', '.join(inner[:6])}{', …' if len(inner) > 6 else ''}), " \
               f"so give one of them" if inner else ""
        raise NdxInputError(f"dictionary folder {folder} has no {CONFIG}{hint}.")
    have = [name for name in (SAELENS_WEIGHTS, SPARSIFY_WEIGHTS) if (folder / name).is_file()]
    if not have:
        raise NdxInputError(f"dictionary folder {folder} has neither {SAELENS_WEIGHTS} (SAELens) nor "
                            f"{SPARSIFY_WEIGHTS} (sparsify).")
    if len(have) == 2:  # both present: the config decides
        cfg = _read_config(folder / CONFIG)
        return folder, folder / (SAELENS_WEIGHTS if ("d_sae" in cfg or "architecture" in cfg) else SPARSIFY_WEIGHTS)
    return folder, folder / have[0]


def _read_config(file: Path) -> dict:
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NdxInputError(f"dictionary config {file} is not readable JSON ({exc}).") from None
    if not isinstance(cfg, dict):
        raise NdxInputError(f"dictionary config {file} is not a JSON object.")
    return cfg


class _Tensors:
    """The tensors of one safetensors file, read on demand and checked as they are read."""

    def __init__(self, file: Path):
        self.file = file
        try:
            self._handle = safe_open(str(file), framework="pt", device="cpu")
            self.keys = set(self._handle.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
            raise NdxInputError(f"dictionary weights {file} could not be read as safetensors ({exc}).") from None

    def shape(self, key: str) -> tuple[int, ...] | None:
        return tuple(self._handle.get_slice(key).get_shape()) if key in self.keys else None

    def require(self, key: str, why: str = "") -> None:
        if key not in self.keys:
            raise NdxInputError(f"dictionary weights {self.file} have no tensor {key!r}{why} "
                                f"(found: {', '.join(sorted(self.keys)) or 'none'}).")

    def load(self, key: str) -> torch.Tensor:
        self.require(key)
        t = self._handle.get_tensor(key)
        if not t.is_floating_point():
            raise NdxInputError(f"dictionary weights {self.file} hold {key!r} as {t.dtype}, not floating point.")
        t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise NdxInputError(f"dictionary weights {self.file} hold non-finite values (inf or NaN) in {key!r}.")
        return t

    def expect(self, key: str, shape: tuple[int, ...], meaning: str) -> None:
        got = self.shape(key)
        if got != shape:
            raise NdxInputError(f"dictionary weights {self.file} hold {key!r} of shape {list(got)}, but {meaning} "
                                f"needs {list(shape)}.")


def _config_int(cfg: dict, key: str, file: Path) -> int | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise NdxInputError(f"dictionary config {file} gives {key}={value!r}, not a non-negative integer.")
    return int(value)


def _check_k(k, n: int, file: Path, architecture: str) -> int:
    if k is None:
        raise NdxInputError(f"dictionary config {file} describes a {architecture} dictionary but gives no k.")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k != int(k) or not 1 <= k <= n:
        raise NdxInputError(f"dictionary config {file} gives k={k!r}, not a whole number from 1 to {n} latents.")
    return int(k)


def read_saelens(folder: Path, weights: Path, cfg: dict) -> dict:
    """The encoder of a SAELens dictionary (`Dictionary`'s fields but its path and format), checked against its
    config: how it fires, the tensors' shapes, the tensors (with the decoder-norm rescale folded in), the input
    normalisation and the hook it reads."""
    file = folder / CONFIG
    pick = _saelens_lookup(cfg)
    architecture, transcoder = _saelens_architecture(cfg, pick, file)
    t = _Tensors(weights)
    d_in, n = _saelens_shapes(t, cfg, file, transcoder)
    threshold = _saelens_threshold(t, n) if architecture == "jumprelu" else None
    k = None
    if architecture == "topk":
        kwargs = cfg.get("activation_fn_kwargs") or {}
        k = _check_k(cfg.get("k") if cfg.get("k") is not None else kwargs.get("k"), n, file, "topk")
    W_enc, b_enc, b_dec_in = _saelens_encoder(t, cfg, d_in, architecture, transcoder)
    W_enc, b_dec_in, input_norm = _saelens_normalisation(cfg, folder, file, W_enc, b_dec_in)
    layer, hook = _saelens_hook(pick, file)
    model = pick("model_name")
    return dict(architecture=architecture, d_in=d_in, n_latents=n, layer=layer, hook=hook, k=k,
                transcoder=transcoder, W_enc=W_enc.contiguous(), b_enc=b_enc, b_dec_in=b_dec_in,
                threshold=threshold, input_norm=input_norm, model=model if isinstance(model, str) else None)


def _saelens_lookup(cfg: dict) -> Callable[..., Any]:
    """pick(*keys): the first of `keys` the config gives, at its top level or under its metadata (v6 configs keep
    the hook there), else None."""
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    meta = meta if isinstance(meta, dict) else {}

    def pick(*keys):
        for key in keys:
            for source in (cfg, meta):
                if source.get(key) is not None:
                    return source[key]
        return None

    return pick


def _saelens_architecture(cfg: dict, pick, file: Path) -> tuple[str, bool]:
    """(how the latents fire: relu, jumprelu or topk; whether it is a transcoder), from the architecture and the
    activation function; an unsupported one is refused."""
    arch_name = str(cfg.get("architecture") or "standard")
    if arch_name in _SAELENS_TRAINING_ONLY:
        raise NdxInputError(f"dictionary config {file} is a SAELens {arch_name} training checkpoint: save its "
                            f"inference form (a jumprelu SAE) and load that.")
    if arch_name not in _SAELENS_ARCHITECTURES:
        raise NdxInputError(f"dictionary config {file} has SAELens architecture {arch_name!r}, which is not "
                            f"supported (supported: {', '.join(_SAELENS_ARCHITECTURES)}).")
    architecture, transcoder = _SAELENS_ARCHITECTURES[arch_name]
    activation = str(pick("activation_fn_str", "activation_fn") or "relu")
    if activation == "topk" and arch_name in ("standard", "topk"):
        architecture = "topk"  # before v6 a TopK SAE could be a standard one with a topk activation
    elif activation != "relu":
        raise NdxInputError(f"dictionary config {file} has activation {activation!r} for architecture "
                            f"{arch_name!r}, which is not supported (only relu, and topk on a standard SAE).")
    return architecture, transcoder


def _saelens_shapes(t: _Tensors, cfg: dict, file: Path, transcoder: bool) -> tuple[int, int]:
    """(d_in, latents) from `W_enc`, with every tensor's shape checked against them and against the config."""
    for key in ("W_enc", "b_enc", "b_dec"):
        t.require(key)
    enc = t.shape("W_enc")
    if len(enc) != 2:
        raise NdxInputError(f"dictionary weights {t.file} hold 'W_enc' of shape {list(enc)}, not a matrix.")
    d_in, n = enc
    cfg_d_in, cfg_n = _config_int(cfg, "d_in", file), _config_int(cfg, "d_sae", file)
    if cfg_d_in is not None and cfg_d_in != d_in:
        raise NdxInputError(f"dictionary weights {t.file} hold 'W_enc' of shape {list(enc)}, but {CONFIG} "
                            f"says d_in={cfg_d_in}.")
    if cfg_n is not None and cfg_n != n:
        raise NdxInputError(f"dictionary weights {t.file} hold 'W_enc' of shape {list(enc)}, but {CONFIG} "
                            f"says d_sae={cfg_n}.")
    t.expect("b_enc", (n,), f"W_enc of shape {list(enc)}")
    d_out = d_in
    if transcoder:
        d_out = _config_int(cfg, "d_out", file) or (t.shape("b_dec") or (d_in,))[0]
    t.expect("b_dec", (d_out,), f"a {'transcoder' if transcoder else 'SAE'} with d_out={d_out}")
    if "W_dec" in t.keys:
        t.expect("W_dec", (n, d_out), f"a decoder from {n} latents to {d_out} dimensions")
    return d_in, n


def _saelens_threshold(t: _Tensors, n: int) -> torch.Tensor:
    """A JumpReLU's thresholds: `threshold`, or the exponential of an older checkpoint's `log_threshold`."""
    if "threshold" in t.keys:
        t.expect("threshold", (n,), f"a JumpReLU with {n} latents")
        return t.load("threshold")
    if "log_threshold" in t.keys:  # older training checkpoints keep the logarithm
        t.expect("log_threshold", (n,), f"a JumpReLU with {n} latents")
        return torch.exp(t.load("log_threshold"))
    t.require("threshold", " (a JumpReLU needs its thresholds)")


def _saelens_encoder(t: _Tensors, cfg: dict, d_in: int, architecture: str, transcoder: bool):
    """(W_enc, b_enc, the offset subtracted from the input): `b_dec` where the SAE applies it to its input (never for
    a transcoder), zeros otherwise; a TopK SAE that rescales by the decoder norms has them folded into W_enc, b_enc."""
    W_enc, b_enc = t.load("W_enc"), t.load("b_enc")
    b_dec = t.load("b_dec")
    apply = cfg.get("apply_b_dec_to_input", True)
    b_dec_in = b_dec if (apply and not transcoder) else torch.zeros(d_in)
    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # pre · ‖W_dec row‖ is the same as scaling each encoder column and bias by that norm.
        t.require("W_dec", " (rescale_acts_by_decoder_norm needs the decoder norms)")
        norms = t.load("W_dec").norm(dim=-1)
        W_enc, b_enc = W_enc * norms, b_enc * norms
    return W_enc, b_enc, b_dec_in


def _saelens_normalisation(cfg: dict, folder: Path, file: Path, W_enc, b_dec_in):
    """(W_enc, b_dec_in, input_norm) for the config's `normalize_activations`: a constant input scale folded into
    the weights, a per-token one (layer_norm, constant_norm_rescale) left to the encoder as `input_norm`."""
    norm = cfg.get("normalize_activations", "none")
    if norm is None or norm is False:
        norm = "none"
    elif norm is True:
        norm = "expected_average_only_in"
    input_norm = "none"
    if norm == "expected_average_only_in":
        scale = _saelens_scale(folder, file)
        # (s·x − b) @ W = (x − b/s) @ (s·W): fold the constant input scale into the weights.
        W_enc, b_dec_in = W_enc * scale, b_dec_in / scale
    elif norm in ("layer_norm", "constant_norm_rescale"):
        input_norm = norm
    elif norm != "none":
        raise NdxInputError(f"dictionary config {file} has normalize_activations={norm!r}, which is not supported "
                            f"(none, expected_average_only_in, layer_norm, constant_norm_rescale).")
    return W_enc, b_dec_in, input_norm


def _saelens_hook(pick, file: Path) -> tuple[int | None, str | None]:
    """(layer, hook) the config's hook name says (`blocks.<L>.<hook>`), or its hook layer alone; None where unsaid."""
    hook_name = pick("hook_name", "hook_point")
    found_layer = None
    found_hook = None
    if isinstance(hook_name, str):
        match = re.match(r"^blocks\.(\d+)\.(.+)$", hook_name)
        if match:
            found_layer = int(match.group(1))
            found_hook = _SAELENS_HOOKS.get(match.group(2))
    if found_layer is None:
        found_layer = _config_int({"hook_layer": pick("hook_layer", "hook_point_layer")}, "hook_layer", file)
    return found_layer, found_hook


def _saelens_scale(folder: Path, file: Path) -> float:
    """The input scaling factor of an SAE trained with expected_average_only_in and saved before it was folded."""
    scaler = folder / SAELENS_SCALER
    if not scaler.is_file():
        raise NdxInputError(f"dictionary config {file} has normalize_activations='expected_average_only_in' but "
                            f"the folder has no {SAELENS_SCALER} with its scaling factor: fold the factor into the "
                            f"weights (SAELens does this for a finished run) or add that file.")
    value = _read_config(scaler).get("scaling_factor")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise NdxInputError(f"dictionary scaler {scaler} gives scaling_factor={value!r}, not a positive number.")
    return float(value)


def read_sparsify(folder: Path, weights: Path, cfg: dict) -> dict:
    """The encoder of a sparsify dictionary (`Dictionary`'s fields but its path and format), checked against its
    config: what it is (a TopK autoencoder or transcoder), the tensors' shapes, the tensors, and the hook it reads
    (from its folder's name, the hookpoint)."""
    file = folder / CONFIG
    transcoder = _sparsify_transcoder(cfg, file)
    t = _Tensors(weights)
    d_in, n = _sparsify_shapes(t, cfg, file, transcoder)
    k = _check_k(cfg.get("k"), n, file, "sparsify topk")
    W_enc = t.load("encoder.weight").T.contiguous()
    b_enc = t.load("encoder.bias")
    b_dec_in = torch.zeros(d_in) if transcoder else t.load("b_dec")
    layer, hook = _sparsify_hook(folder.name, transcoder)
    return dict(architecture="topk", d_in=d_in, n_latents=n, layer=layer, hook=hook, k=k,
                transcoder=transcoder, W_enc=W_enc, b_enc=b_enc, b_dec_in=b_dec_in, threshold=None)


def _sparsify_transcoder(cfg: dict, file: Path) -> bool:
    """Whether it is a transcoder (`transcode`); an activation or input change that is not supported is refused."""
    activation = str(cfg.get("activation") or "topk")
    if activation != "topk":
        raise NdxInputError(f"dictionary config {file} has sparsify activation {activation!r}, which is not "
                            f"supported (only topk).")
    for flag in ("signed", "gram_lookup"):
        if cfg.get(flag):
            raise NdxInputError(f"dictionary config {file} sets {flag}, which changes the encoder input in a way "
                                f"that is not supported.")
    return bool(cfg.get("transcode", False))


def _sparsify_shapes(t: _Tensors, cfg: dict, file: Path, transcoder: bool) -> tuple[int, int]:
    """(d_in, latents) from `encoder.weight`, with every tensor's shape checked against them and against the config
    (num_latents, or d_in × expansion_factor)."""
    for key in ("encoder.weight", "encoder.bias"):
        t.require(key)
    if not transcoder:
        t.require("b_dec", " (an autoencoder subtracts it from its input)")
    enc = t.shape("encoder.weight")
    if len(enc) != 2:
        raise NdxInputError(f"dictionary weights {t.file} hold 'encoder.weight' of shape {list(enc)}, not a matrix.")
    n, d_in = enc
    cfg_d_in = _config_int(cfg, "d_in", file)
    if cfg_d_in is not None and cfg_d_in != d_in:
        raise NdxInputError(f"dictionary weights {t.file} hold 'encoder.weight' of shape {list(enc)}, but "
                            f"{CONFIG} says d_in={cfg_d_in}.")
    cfg_n = _config_int(cfg, "num_latents", file) or None
    if cfg_n is None:  # 0 or absent: the width is d_in × expansion_factor
        factor = _config_int(cfg, "expansion_factor", file)
        cfg_n = d_in * factor if factor else None
    if cfg_n is not None and cfg_n != n:
        raise NdxInputError(f"dictionary weights {t.file} hold 'encoder.weight' of shape {list(enc)}, but "
                            f"{CONFIG} implies {cfg_n} latents (num_latents, or d_in × expansion_factor).")
    t.expect("encoder.bias", (n,), f"encoder.weight of shape {list(enc)}")
    dec = t.shape("W_dec")
    if dec is not None and (len(dec) != 2 or dec[0] != n or (not transcoder and dec[1] != d_in)):
        want = f"[{n}, {d_in}]" if not transcoder else f"[{n}, d_out]"
        raise NdxInputError(f"dictionary weights {t.file} hold 'W_dec' of shape {list(dec)}, but a "
                            f"{'transcoder' if transcoder else 'SAE'} with {n} latents needs {want}.")
    if "b_dec" in t.keys:
        d_out = dec[1] if dec is not None else (d_in if not transcoder else (t.shape("b_dec") or [0])[0])
        t.expect("b_dec", (d_out,), f"a decoder into {d_out} dimensions")
    return d_in, n


def _sparsify_hook(name: str, transcoder: bool) -> tuple[int | None, str | None]:
    """(layer, hook) a hookpoint folder's name says: a whole block (`layers.6`) is read at its output by an SAE and
    at its input by a transcoder, its MLP (`layers.6.mlp`) likewise; a layer alone, or None, where it says less."""
    block = _SPARSIFY_BLOCK.search(name)
    if block:
        if block.group(2):  # the MLP module: an SAE reads its output, a transcoder its input
            return int(block.group(1)), "mlp_in" if transcoder else "mlp_out"
        # the whole block: an SAE reads its output, a transcoder its input
        return int(block.group(1)), "resid_pre" if transcoder else "resid_post"
    layer_match = _SPARSIFY_LAYER.search(name)
    return (int(layer_match.group(1)) if layer_match else None), None


def decoder_rows(path, latents) -> torch.Tensor:
    """[latents, d_out]: the decoder rows (`W_dec`) of `latents` of the dictionary at `path` (its folder, cfg.json or
    safetensors file), float32: what each latent writes (its output direction)."""
    _, weights = _locate(Path(path).expanduser())
    tensors = _Tensors(weights)
    tensors.require("W_dec", " (a latent's output direction is its decoder row)")
    rows = tensors.load("W_dec")
    return rows[torch.as_tensor(list(latents), dtype=torch.long)]
