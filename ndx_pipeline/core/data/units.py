"""The unit seam: what gets explained in one layer, and how its activations are read off the subject model.

A `UnitSet` says where in a layer it reads (`hook`: the MLP's hidden units, the residual stream, …), turns what it
reads into one activation per unit and token (`encode`), and names its units (`ids`, stored in the contract's `neuron`
column, and `describe`, the contract's unit columns). The streaming selection (`selection`, fed by
`forward_pass.extract`) works on whatever `encode` returns, so a new kind of unit is a new `UnitSet` and nothing else:
one forward pass still serves every layer's units.

Implemented here:
- `MlpNeurons`: the paper's units, coordinates of the input to the layer's MLP output projection (the post-activation
  hidden units), on their positive side, their negative side, or both. A unit's id is the neuron's index for the
  positive side and `-1 - index` for the negative side (neuron 0's negative side is -1), so both sides of a neuron are
  two units with their own records, explanations and scores. The negative side's activations are stored negated:
  for every unit, larger means "fires more", and the simulator's 0–10 scale reads the same way.
- `DictionaryLatents`: the latents of a sparse autoencoder or transcoder the user points at (`dictionaries`),
  encoded on the fly from the activations at the dictionary's hook. A latent's id is its index in the dictionary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from ndx_pipeline.core.contract import DICTIONARY_LATENT, MLP_NEURON, describe_ids, negative_id
from ndx_pipeline.core.data.dictionaries import Dictionary, load_dictionary
from ndx_pipeline.core.data.subject_model import attach_hook, hook_point
from ndx_pipeline.core.errors import NdxInputError

POSITIVE, NEGATIVE, BOTH = "positive", "negative", "both"
POLARITIES = (POSITIVE, NEGATIVE, BOTH)
DICTIONARY = "dictionary"
PLANTED = "planted"  # the judge's control: units whose activation is a known token rule (`planted`), no model
UNIT_CHOICES = (*POLARITIES, DICTIONARY, PLANTED)  # a run's `units`: a neuron side, a dictionary's latents, planted
ALL_UNITS = -1  # neurons_per_layer that takes every neuron (or latent) of a layer


class UnitSet(ABC):
    """The units of one layer that one extraction pass keeps records for."""

    kind: str  # what the units are, stored with every record (`unit_kind`)
    hook: str  # where in the layer they are read (subject_model.HOOK_POINTS)
    # True when the second half of `ids` is the first half negated: `read` then gives the first half alone and the
    # selection derives the other (one pass over the activations serves both signs)
    mirrored = False
    # True when no unit is ever below 0 (dictionary latents): the selection then knows a window where a unit's max is
    # 0 holds only zeros for it
    nonnegative = False

    def __init__(self, layer: int, ids: Sequence[int]):
        self.layer = int(layer)
        self.ids = [int(u) for u in ids]

    def attach(self, model, consume):
        """Have consume(activations at this set's hook) called on every forward; returns the removable handle."""
        module, side = hook_point(model, self.layer, self.hook)
        return attach_hook(module, side, consume)

    @abstractmethod
    def encode(self, hooked):
        """[..., width] activations at the hook → [..., len(ids)] activations of the units, in `ids` order."""

    def read(self, hooked):
        """What the streaming selection is given ([batch, positions, width] hooked activations): `encode`, or for a
        mirrored set the first half of it, or the nonzero entries of a sparse set (`SparseActivations`)."""
        return self.encode(hooked)

    def describe(self) -> dict:
        """The contract's unit columns, one list per column, in `ids` order."""
        return describe_ids(self.ids, self.kind, self.source())

    def describe_set(self) -> str:
        """The set in words, for run metadata and logs."""
        return f"{len(self.ids)} {self.kind} units" + (f" from {self.source()}" if self.source() else "")

    def source(self) -> str | None:
        """Where the units come from beyond the subject model (a dictionary file and its hook); None for neurons."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer}, units={len(self.ids)})"


class MlpNeurons(UnitSet):
    """MLP neurons: the input of the layer's MLP output projection (GPT-2 `mlp.c_proj`, Llama `mlp.down_proj`, …),
    on one side or both (`polarity`)."""

    kind = MLP_NEURON
    hook = "mlp_hidden"

    def __init__(self, layer: int, neurons: Sequence[int], polarity: str = POSITIVE):
        if polarity not in POLARITIES:
            raise NdxInputError(f"polarity {polarity!r} is not known: use one of {', '.join(POLARITIES)}.")
        self.neurons = sorted(set(int(n) for n in neurons))
        self.polarity = polarity
        ids = (self.neurons if polarity != NEGATIVE else []) + (
            [negative_id(n) for n in self.neurons] if polarity != POSITIVE else [])
        super().__init__(layer, ids)
        self.mirrored = polarity == BOTH
        self._index = None  # the chosen neurons as a tensor on the hooked activations' device
        self._every: dict[int, bool] = {}  # layer width → whether the chosen neurons are all of them, in order

    def describe_set(self) -> str:
        return f"{len(self.neurons)} MLP neurons, {self.polarity} side" + ("s" if self.polarity == BOTH else "")

    def encode(self, hooked):
        import torch

        chosen = self.read(hooked)
        return torch.cat([chosen, -chosen], dim=-1) if self.mirrored else chosen

    def read(self, hooked):
        """The chosen neurons' activations (negated for the negative side; for both sides, the positive half)."""
        import torch

        width = hooked.shape[-1]
        if width not in self._every:
            self._every[width] = self.neurons == list(range(width))
        if self._every[width]:
            chosen = hooked  # every neuron, in order: no gather (a strided gather costs as much as a layer's MLP)
        else:
            if self._index is None or self._index.device != hooked.device:
                self._index = torch.as_tensor(self.neurons, dtype=torch.long, device=hooked.device)
            chosen = hooked.index_select(-1, self._index)
        return -chosen if self.polarity == NEGATIVE else chosen


class DictionaryLatents(UnitSet):
    """Latents of a sparse autoencoder or transcoder, encoded from the activations at the dictionary's hook."""

    kind = DICTIONARY_LATENT
    nonnegative = True  # every architecture read here ends in a ReLU (TopK keeps the ReLU of its k largest)

    def __init__(self, layer: int, dictionary: Dictionary, latents: Sequence[int]):
        if dictionary.hook is None:
            raise NdxInputError(f"dictionary {dictionary.path} does not say where it reads: give its hook "
                                "(resid_pre, resid_post, mlp_in, mlp_out or mlp_hidden).")
        self.dictionary = dictionary
        self.hook = dictionary.hook
        super().__init__(layer, sorted(set(int(i) for i in latents)))
        self._all = self.ids == list(range(dictionary.n_latents))

    def encode(self, hooked):
        return self.dictionary.encode(hooked, None if self._all else self.ids)

    def read(self, hooked):
        """The latents' nonzero activations (`SparseActivations`; `hooked` is [batch, positions, width]): a latent
        fires at few tokens, so the selection works on those entries, never on a dense [.., latents] block."""
        return self.dictionary.encode_sparse(hooked, None if self._all else self.ids)

    def source(self) -> str:
        return self.dictionary.describe()


def dictionary_folders(path: str | Path) -> list[Path]:
    """The dictionaries at `path`: the folder itself when it holds a cfg.json (or `path` is one of a dictionary's
    files), else every folder below it that does, sorted."""
    root = Path(path).expanduser()
    if not root.exists():
        raise NdxInputError(f"dictionary path {root} does not exist.")
    if root.is_file() or (root / "cfg.json").is_file():
        return [root]
    return sorted(p.parent for p in root.rglob("cfg.json"))


def dictionaries_by_layer(path: str | Path, hook: str | None, layers: Sequence[int]) -> dict[int, Dictionary]:
    """{layer: dictionary} for the requested layers, from one dictionary or a folder of them (one per layer). A
    dictionary whose files name no layer serves the one requested layer."""
    found: dict[int, Dictionary] = {}
    folders = dictionary_folders(path)
    if not folders:
        raise NdxInputError(f"dictionary path {path} holds no dictionary (no cfg.json in it or below it).")
    for folder in folders:
        d = load_dictionary(folder, hook=hook)
        if d.layer is None:
            if len(folders) > 1 or len(layers) != 1:
                raise NdxInputError(f"dictionary {folder} does not say which layer it reads: run it alone with one "
                                    "layer.")
            d = replace(d, layer=layers[0])
        if d.layer in found:
            raise NdxInputError(f"dictionaries {found[d.layer].path} and {folder} both read layer {d.layer}.")
        found[d.layer] = d
    missing = [layer for layer in layers if layer not in found]
    if missing:
        raise NdxInputError(f"no dictionary at {path} reads layer(s) {missing}; it has layers {sorted(found)}.")
    return {layer: found[layer] for layer in layers}


def choose_neurons(width: int, per_layer: int, seed: int, layer: int) -> list[int]:
    """A seeded choice of `per_layer` distinct neurons (or latents) of one layer (different layers get different
    choices)."""
    if per_layer <= 0:
        raise NdxInputError(f"neurons_per_layer={per_layer}: at least one neuron must be selected.")
    rng = np.random.default_rng([seed, layer])
    return sorted(int(i) for i in rng.choice(width, size=min(per_layer, width), replace=False))


def neurons_of_layer(layer: int, width: int, neurons: Sequence[int] | None, per_layer: int, seed: int,
                     what: str = "neurons") -> list[int]:
    """The neurons (or latents) a run explains in one layer: the explicit list when given (checked against the
    layer's width), else a seeded choice of `per_layer` (ALL_UNITS, -1: every one of them)."""
    if neurons is None:
        return list(range(width)) if per_layer == ALL_UNITS else choose_neurons(width, per_layer, seed, layer)
    bad = [n for n in neurons if not 0 <= n < width]
    if bad or not neurons:
        raise NdxInputError(f"{what} {bad or '[]'} are not valid: layer {layer} has {what} 0..{width - 1}.")
    return sorted(set(int(n) for n in neurons))


def as_unit_sets(layer_units: dict) -> dict:
    """{key: UnitSet}: the UnitSets as given (keyed by layer, or by the caller's keys), and a plain list of indices
    under a layer key made those MLP neurons' positive side."""
    return {key: units if isinstance(units, UnitSet) else MlpNeurons(int(key), units)
            for key, units in layer_units.items()}
