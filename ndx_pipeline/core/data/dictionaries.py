"""Sparse dictionaries brought by the user: sparse autoencoders and transcoders read from disk.

A dictionary turns the activations at one place of a transformer block into many sparse latents; with
`units=dictionary` those latents, not the MLP neurons, are what gets explained. Two on-disk formats are read:

SAELens — a folder with `cfg.json` and `sae_weights.safetensors` (`W_enc` [d_in, d_sae], `b_enc`, `W_dec`
[d_sae, d_out], `b_dec`, and `threshold` for JumpReLU). Configs from before v6 keep `hook_name` (or the older
`hook_point`), `hook_layer`, `activation_fn_str` and `activation_fn_kwargs` at the top level; v6 configs put the
hook under `metadata` and the TopK `k` at the top level. Encoding (what `SAE.encode` computes):
    x' = norm(x) − b_dec·apply_b_dec_to_input,  pre = x' @ W_enc + b_enc
    standard  relu(pre)
    jumprelu  relu(pre) · (pre > threshold)
    topk      the k largest pre-activations, passed through relu; every other latent is 0
              (with `rescale_acts_by_decoder_norm`, pre is first multiplied by each decoder row's norm)
Transcoders (`transcoder`, `skip_transcoder`, `jumprelu_transcoder`, `jumprelu_skip_transcoder`) never subtract
`b_dec`, which lives in the output space.

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ndx_pipeline.core.data.selection import SparseActivations
from ndx_pipeline.core.data.subject_model import HOOK_POINTS
from ndx_pipeline.core.errors import NdxInputError

HOOKS = tuple(HOOK_POINTS)  # where in a block the dictionary reads (subject_model.HOOK_POINTS)

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"
SAELENS_SCALER = "activation_scaler.json"  # the input scaling factor of an unfolded SAELens training checkpoint

# SAELens hook names, after `blocks.<L>.`, mapped onto HOOKS.
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


# Largest pre-activation block (rows × latents) encoded at once; bounds memory for wide dictionaries.
_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True, eq=False)
class Dictionary:
    """A sparse dictionary ready to encode activations: float32 encoder weights plus what the file says about it.

    `b_dec_in` is what is subtracted from the (normalized) input before the encoder: the decoder bias of an SAE that
    applies it, zeros otherwise. `input_norm` is a per-token normalization SAELens applies before that subtraction
    ("none", "layer_norm" or "constant_norm_rescale"); a constant input scale is folded into `W_enc` and `b_dec_in`.
    """

    path: str
    format: str  # "saelens" | "sparsify"
    architecture: str  # "relu" | "jumprelu" | "topk"
    d_in: int
    n_latents: int
    layer: int | None  # the block it reads, when the file says (or the caller overrode it)
    hook: str | None  # one of HOOKS, when known
    k: int | None
    transcoder: bool
    W_enc: torch.Tensor = field(repr=False)  # [d_in, n_latents]
    b_enc: torch.Tensor = field(repr=False)  # [n_latents]
    b_dec_in: torch.Tensor = field(repr=False)  # [d_in]
    threshold: torch.Tensor | None = field(repr=False)  # [n_latents], JumpReLU only
    input_norm: str = "none"
    model: str | None = None  # the model the file says it was trained on, if it says
    _on_device: dict = field(default_factory=dict, init=False, repr=False)
    _scratch: dict = field(default_factory=dict, init=False, repr=False)  # device → reused block (`_buffer`)

    def _weights(self, device: torch.device):
        """The encoder tensors on `device`, moved there once and kept."""
        key = str(device)
        if key not in self._on_device:
            moved = (self.W_enc, self.b_enc, self.b_dec_in, self.threshold)
            self._on_device[key] = tuple(None if t is None else t.to(device) for t in moved)
        return self._on_device[key]

    def _columns(self, latents, device: torch.device) -> torch.Tensor | None:
        if latents is None:
            return None
        idx = torch.as_tensor(latents).reshape(-1)
        if idx.numel() == 0:  # an empty list reads as float
            return idx.to(dtype=torch.long, device=device)
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise NdxInputError(f"dictionary {self.path} takes latents as integer indices, not {idx.dtype}.")
        idx = idx.to(torch.long)
        bad = idx[(idx < 0) | (idx >= self.n_latents)]
        if bad.numel():
            raise NdxInputError(f"dictionary {self.path} has latents 0..{self.n_latents - 1}, so latent "
                                f"{int(bad[0])} does not exist.")
        return idx.to(device)

    def encode(self, h: torch.Tensor, latents=None) -> torch.Tensor:
        """Latent activations of `h` [..., d_in] as float32 [..., n_latents], or only the columns `latents`, in
        that order. TopK selects among all latents before the columns are taken."""
        self._check_width(h)
        cols = self._columns(latents, h.device)
        lead = h.shape[:-1]
        width = self.n_latents if cols is None else len(cols)
        out = torch.empty((math.prod(lead), width), dtype=torch.float32, device=h.device)
        for start, pre, top in self._fired(h.reshape(-1, self.d_in), cols):
            target = out[start:start + len(pre)]
            if top is None:  # ReLU / JumpReLU: `pre` holds the requested columns' activations
                target.copy_(pre)
            elif cols is None:
                target.zero_().scatter_(-1, top[1], top[0])
            else:
                target.copy_(torch.zeros_like(pre).scatter_(-1, top[1], top[0])[:, cols])
        return out.reshape(*lead, width)

    def encode_sparse(self, h: torch.Tensor, latents=None) -> SparseActivations:
        """The nonzero latent activations of `h` [batch, positions, d_in], as entries (see `SparseActivations`):
        what `encode` returns, without its zeros. A TopK dictionary never makes the dense [tokens, latents] block
        of its output; a ReLU / JumpReLU one computes its pre-activations in a reused buffer and keeps what fired."""
        self._check_width(h)
        cols = self._columns(latents, h.device)
        batch, positions = h.shape[0], h.shape[1]
        width = self.n_latents if cols is None else len(cols)
        position_of = None  # latent → its column among `latents` (-1: not requested), for TopK over a subset
        if cols is not None and self.architecture == "topk":
            position_of = torch.full((self.n_latents,), -1, dtype=torch.long, device=h.device)
            position_of[cols] = torch.arange(len(cols), device=h.device)
        tokens, units, values = [], [], []
        for start, pre, top in self._fired(h.reshape(-1, self.d_in), cols, reuse=True):
            if top is None:
                row, unit = pre.nonzero(as_tuple=True)
                value = pre[row, unit]
            else:
                row = torch.arange(len(pre), device=h.device)[:, None].expand_as(top[1]).reshape(-1)
                unit, value = top[1].reshape(-1), top[0].reshape(-1)
                keep = value > 0
                if position_of is not None:
                    unit = position_of[unit]
                    keep &= unit >= 0
                row, unit, value = row[keep], unit[keep], value[keep]
            tokens.append(row + start)
            units.append(unit)
            values.append(value)
        token = torch.cat(tokens)
        return SparseActivations(token // positions, token % positions, torch.cat(units), torch.cat(values),
                                 batch, positions, width)

    def _check_width(self, h: torch.Tensor) -> None:
        if h.shape[-1] != self.d_in:
            raise NdxInputError(f"dictionary {self.path} reads {self.d_in}-wide activations but was given "
                                f"{h.shape[-1]}-wide ones.")

    def _fired(self, x: torch.Tensor, cols, reuse: bool = False):
        """Chunks of rows of `x` [tokens, d_in]: (first row, activations, None) for ReLU / JumpReLU (the columns
        `cols`, or all), or (first row, pre-activations, their k largest passed through relu) for TopK (which selects
        among every latent), as (values, indices). `reuse`: the chunk's block is a buffer kept for the next call
        (read it before then)."""
        W_enc, b_enc, b_dec_in, threshold = self._weights(x.device)
        if cols is not None and self.architecture != "topk":  # ReLU and JumpReLU need only the requested columns
            W_enc, b_enc = W_enc[:, cols], b_enc[cols]
            threshold = None if threshold is None else threshold[cols]
        rows = max(1, _CHUNK_ELEMENTS // max(1, W_enc.shape[1]))
        with torch.no_grad():
            for start in range(0, x.shape[0], rows):
                chunk = self._normalize(x[start:start + rows].to(torch.float32)) - b_dec_in
                shape = (len(chunk), W_enc.shape[1])
                pre = torch.addmm(b_enc, chunk, W_enc, out=self._buffer(shape, x.device) if reuse else None)
                if self.architecture == "topk":
                    top = pre.topk(self.k, dim=-1, sorted=False)
                    yield start, pre, (top.values.relu_(), top.indices)
                    continue
                above = pre > threshold if self.architecture == "jumprelu" else None
                pre.relu_()
                if above is not None:
                    pre.mul_(above)
                yield start, pre, None

    def _buffer(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        """A float32 block of `shape`, the same memory on every call (the largest asked for so far): a fresh block of
        pre-activations per batch would be fresh pages for the allocator to map and zero each time."""
        key = str(device)
        held = self._scratch.get(key)
        if held is None or held.numel() < shape[0] * shape[1]:
            held = self._scratch[key] = torch.empty(shape[0] * shape[1], dtype=torch.float32, device=device)
        return held[: shape[0] * shape[1]].view(shape)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            return x / (x.std(dim=-1, keepdim=True) + 1e-5)
        if self.input_norm == "constant_norm_rescale":
            return x * (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return x

    def describe(self) -> str:
        """One line: format, architecture (k), latents, hook, layer, path."""
        kind = f"{self.architecture} (k={self.k})" if self.k is not None else self.architecture
        role = "transcoder" if self.transcoder else "SAE"
        where = self.hook or "unknown hook"
        layer = "unknown layer" if self.layer is None else f"layer {self.layer}"
        return (f"{self.format} {kind} {role}, {self.n_latents} latents over {self.d_in}-wide {where} of {layer}, "
                f"from {self.path}")

    def check_fits(self, width: int, what: str) -> None:
        """Raise unless the activations this dictionary will read (`what`, e.g. "the residual stream of model M")
        are `d_in` wide."""
        if int(width) != self.d_in:
            raise NdxInputError(f"dictionary {self.path} reads {self.d_in}-wide activations but {what} is "
                                f"{int(width)} wide.")


def load_dictionary(path, hook: str | None = None, layer: int | None = None) -> Dictionary:
    """Read a SAELens or sparsify dictionary from its folder, its cfg.json or its safetensors file.

    `hook` and `layer` replace what the file says (a hook must be one of HOOKS)."""
    if hook is not None and hook not in HOOKS:
        raise NdxInputError(f"dictionary hook {hook!r} is not known: use one of {', '.join(HOOKS)}.")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise NdxInputError(f"dictionary layer must be a non-negative integer, not {layer!r}.")
    folder, weights = _locate(Path(path).expanduser())
    cfg = _read_config(folder / CONFIG)
    if weights.name == SAELENS_WEIGHTS:
        fmt = "saelens"
    elif weights.name == SPARSIFY_WEIGHTS:
        fmt = "sparsify"
    else:  # a safetensors file under another name: tell the format by the config
        fmt = "saelens" if ("d_sae" in cfg or "architecture" in cfg) else "sparsify"
    read = _read_saelens if fmt == "saelens" else _read_sparsify
    found = read(folder, weights, cfg)
    if hook is not None:
        found["hook"] = hook
    if layer is not None:
        found["layer"] = layer
    return Dictionary(path=str(folder), format=fmt, **found)


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


def _read_saelens(folder: Path, weights: Path, cfg: dict) -> dict:
    file = folder / CONFIG
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    meta = meta if isinstance(meta, dict) else {}

    def pick(*keys):
        for key in keys:
            for source in (cfg, meta):
                if source.get(key) is not None:
                    return source[key]
        return None

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

    t = _Tensors(weights)
    for key in ("W_enc", "b_enc", "b_dec"):
        t.require(key)
    enc = t.shape("W_enc")
    if len(enc) != 2:
        raise NdxInputError(f"dictionary weights {weights} hold 'W_enc' of shape {list(enc)}, not a matrix.")
    d_in, n = enc
    cfg_d_in, cfg_n = _config_int(cfg, "d_in", file), _config_int(cfg, "d_sae", file)
    if cfg_d_in is not None and cfg_d_in != d_in:
        raise NdxInputError(f"dictionary weights {weights} hold 'W_enc' of shape {list(enc)}, but {CONFIG} "
                            f"says d_in={cfg_d_in}.")
    if cfg_n is not None and cfg_n != n:
        raise NdxInputError(f"dictionary weights {weights} hold 'W_enc' of shape {list(enc)}, but {CONFIG} "
                            f"says d_sae={cfg_n}.")
    t.expect("b_enc", (n,), f"W_enc of shape {list(enc)}")
    d_out = d_in
    if transcoder:
        d_out = _config_int(cfg, "d_out", file) or (t.shape("b_dec") or (d_in,))[0]
    t.expect("b_dec", (d_out,), f"a {'transcoder' if transcoder else 'SAE'} with d_out={d_out}")
    if "W_dec" in t.keys:
        t.expect("W_dec", (n, d_out), f"a decoder from {n} latents to {d_out} dimensions")

    threshold = None
    if architecture == "jumprelu":
        if "threshold" in t.keys:
            t.expect("threshold", (n,), f"a JumpReLU with {n} latents")
            threshold = t.load("threshold")
        elif "log_threshold" in t.keys:  # older training checkpoints keep the logarithm
            t.expect("log_threshold", (n,), f"a JumpReLU with {n} latents")
            threshold = torch.exp(t.load("log_threshold"))
        else:
            t.require("threshold", " (a JumpReLU needs its thresholds)")

    k = None
    if architecture == "topk":
        kwargs = cfg.get("activation_fn_kwargs") or {}
        k = _check_k(cfg.get("k") if cfg.get("k") is not None else kwargs.get("k"), n, file, "topk")

    W_enc, b_enc = t.load("W_enc"), t.load("b_enc")
    b_dec = t.load("b_dec")
    apply = cfg.get("apply_b_dec_to_input", True)
    b_dec_in = b_dec if (apply and not transcoder) else torch.zeros(d_in)

    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # pre · ‖W_dec row‖ is the same as scaling each encoder column and bias by that norm.
        t.require("W_dec", " (rescale_acts_by_decoder_norm needs the decoder norms)")
        norms = t.load("W_dec").norm(dim=-1)
        W_enc, b_enc = W_enc * norms, b_enc * norms

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
    model = pick("model_name")
    return dict(architecture=architecture, d_in=d_in, n_latents=n, layer=found_layer, hook=found_hook, k=k,
                transcoder=transcoder, W_enc=W_enc.contiguous(), b_enc=b_enc, b_dec_in=b_dec_in,
                threshold=threshold, input_norm=input_norm, model=model if isinstance(model, str) else None)


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


def _read_sparsify(folder: Path, weights: Path, cfg: dict) -> dict:
    file = folder / CONFIG
    activation = str(cfg.get("activation") or "topk")
    if activation != "topk":
        raise NdxInputError(f"dictionary config {file} has sparsify activation {activation!r}, which is not "
                            f"supported (only topk).")
    for flag in ("signed", "gram_lookup"):
        if cfg.get(flag):
            raise NdxInputError(f"dictionary config {file} sets {flag}, which changes the encoder input in a way "
                                f"that is not supported.")
    transcoder = bool(cfg.get("transcode", False))

    t = _Tensors(weights)
    for key in ("encoder.weight", "encoder.bias"):
        t.require(key)
    if not transcoder:
        t.require("b_dec", " (an autoencoder subtracts it from its input)")
    enc = t.shape("encoder.weight")
    if len(enc) != 2:
        raise NdxInputError(f"dictionary weights {weights} hold 'encoder.weight' of shape {list(enc)}, not a matrix.")
    n, d_in = enc
    cfg_d_in = _config_int(cfg, "d_in", file)
    if cfg_d_in is not None and cfg_d_in != d_in:
        raise NdxInputError(f"dictionary weights {weights} hold 'encoder.weight' of shape {list(enc)}, but "
                            f"{CONFIG} says d_in={cfg_d_in}.")
    cfg_n = _config_int(cfg, "num_latents", file) or None
    if cfg_n is None:  # 0 or absent: the width is d_in × expansion_factor
        factor = _config_int(cfg, "expansion_factor", file)
        cfg_n = d_in * factor if factor else None
    if cfg_n is not None and cfg_n != n:
        raise NdxInputError(f"dictionary weights {weights} hold 'encoder.weight' of shape {list(enc)}, but "
                            f"{CONFIG} implies {cfg_n} latents (num_latents, or d_in × expansion_factor).")
    t.expect("encoder.bias", (n,), f"encoder.weight of shape {list(enc)}")
    dec = t.shape("W_dec")
    if dec is not None and (len(dec) != 2 or dec[0] != n or (not transcoder and dec[1] != d_in)):
        want = f"[{n}, {d_in}]" if not transcoder else f"[{n}, d_out]"
        raise NdxInputError(f"dictionary weights {weights} hold 'W_dec' of shape {list(dec)}, but a "
                            f"{'transcoder' if transcoder else 'SAE'} with {n} latents needs {want}.")
    if "b_dec" in t.keys:
        d_out = dec[1] if dec is not None else (d_in if not transcoder else (t.shape("b_dec") or [0])[0])
        t.expect("b_dec", (d_out,), f"a decoder into {d_out} dimensions")
    k = _check_k(cfg.get("k"), n, file, "sparsify topk")

    W_enc = t.load("encoder.weight").T.contiguous()
    b_enc = t.load("encoder.bias")
    b_dec_in = torch.zeros(d_in) if transcoder else t.load("b_dec")

    found_layer = found_hook = None
    name = folder.name
    block = _SPARSIFY_BLOCK.search(name)
    if block:
        found_layer = int(block.group(1))
        if block.group(2):  # the MLP module: an SAE reads its output, a transcoder its input
            found_hook = "mlp_in" if transcoder else "mlp_out"
        else:  # the whole block: an SAE reads its output, a transcoder its input
            found_hook = "resid_pre" if transcoder else "resid_post"
    else:
        layer_match = _SPARSIFY_LAYER.search(name)
        found_layer = int(layer_match.group(1)) if layer_match else None
    return dict(architecture="topk", d_in=d_in, n_latents=n, layer=found_layer, hook=found_hook, k=k,
                transcoder=transcoder, W_enc=W_enc, b_enc=b_enc, b_dec_in=b_dec_in, threshold=None)


def decoder_rows(path, latents) -> torch.Tensor:
    """[latents, d_out]: the decoder rows (`W_dec`) of `latents` of the dictionary at `path` (its folder, cfg.json or
    safetensors file), float32: what each latent writes (its output direction)."""
    _, weights = _locate(Path(path).expanduser())
    tensors = _Tensors(weights)
    tensors.require("W_dec", " (a latent's output direction is its decoder row)")
    rows = tensors.load("W_dec")
    return rows[torch.as_tensor(list(latents), dtype=torch.long)]
