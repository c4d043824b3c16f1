"""Sparse dictionaries brought by the user: sparse autoencoders and transcoders, as encoders of activations.

A dictionary turns the activations at one place of a transformer block into many sparse latents; with
`units=dictionary` those latents, not the MLP neurons, are what gets explained. `load_dictionary` reads one from disk
(the formats: `dictionary_formats`, SAELens and sparsify) into a `Dictionary`, which encodes as the format's own code
does. What SAELens's `SAE.encode` computes:
    x' = norm(x) − b_dec·apply_b_dec_to_input,  pre = x' @ W_enc + b_enc
    standard  relu(pre)
    jumprelu  relu(pre) · (pre > threshold)
    topk      the k largest pre-activations, passed through relu; every other latent is 0
              (with `rescale_acts_by_decoder_norm`, pre is first multiplied by each decoder row's norm)
and sparsify's the k largest of relu(encoder(x − b_dec)) (b_dec subtracted only by an autoencoder). A transcoder never
subtracts b_dec, which lives in its output space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ndx_pipeline.core.data.dictionary_formats import read_dictionary_file
from ndx_pipeline.core.data.selection import SparseActivations
from ndx_pipeline.core.data.subject_model import HOOK_POINTS
from ndx_pipeline.core.errors import NdxInputError

HOOKS = tuple(HOOK_POINTS)  # where in a block the dictionary reads (subject_model.HOOK_POINTS)


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
    folder, fmt, found = read_dictionary_file(Path(path).expanduser())
    if hook is not None:
        found["hook"] = hook
    if layer is not None:
        found["layer"] = layer
    return Dictionary(path=str(folder), format=fmt, **found)
