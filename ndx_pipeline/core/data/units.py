"""The unit seam: what gets explained in one layer, and how its activations are read off the subject model.

A `UnitSet` names the module of a layer to hook (a forward pre-hook reads that module's input), turns what the
hook sees into one activation per unit and token (`encode`), and says which of those columns are explained
(`units`, stored in the contract's `neuron` column). The streaming selection (`activations.extract`) works on
whatever `encode` returns, so a new kind of unit — the other sign of a neuron, a sparse autoencoder's latents
encoded on the fly — is a new `UnitSet` and nothing else: one forward pass still serves every layer's units.

Implemented here: `MlpNeurons`, the paper's units — coordinates of the input to the layer's MLP output
projection (the post-activation hidden units), ranked by their most positive activation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from ndx_pipeline.core.data.subject_model import mlp_output_projections
from ndx_pipeline.core.errors import NdxInputError


class UnitSet(ABC):
    """The units of one layer that one extraction pass keeps records for."""

    kind: str  # what the units are, in words stored with the run ("mlp_neuron", …)

    def __init__(self, layer: int, units: Sequence[int]):
        self.layer = int(layer)
        self.units = [int(u) for u in units]

    @abstractmethod
    def hook_module(self, model):
        """The module whose input (a forward pre-hook's first argument) carries this layer's activations."""

    def encode(self, hooked):
        """[batch, tokens, width] activations whose columns `units` are explained; the identity by default."""
        return hooked

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer}, units={len(self.units)})"


class MlpNeurons(UnitSet):
    """MLP neurons: the input of the layer's MLP output projection (GPT-2 `mlp.c_proj`, Llama `mlp.down_proj`, …)."""

    kind = "mlp_neuron"

    def hook_module(self, model):
        return mlp_output_projections(model, [self.layer])[self.layer]


def choose_neurons(width: int, per_layer: int, seed: int, layer: int) -> list[int]:
    """A seeded choice of `per_layer` distinct neurons of one layer (different layers get different choices)."""
    if per_layer <= 0:
        raise NdxInputError(f"neurons_per_layer={per_layer}: at least one neuron must be selected.")
    rng = np.random.default_rng([seed, layer])
    return sorted(int(i) for i in rng.choice(width, size=min(per_layer, width), replace=False))


def neurons_of_layer(layer: int, width: int, neurons: Sequence[int] | None, per_layer: int, seed: int) -> list[int]:
    """The neurons a run explains in one layer: the explicit list when given (checked against the layer's width),
    else a seeded choice of `per_layer`."""
    if neurons is None:
        return choose_neurons(width, per_layer, seed, layer)
    bad = [n for n in neurons if not 0 <= n < width]
    if bad or not neurons:
        raise NdxInputError(f"neurons {bad or '[]'} are not valid: layer {layer} has neurons 0..{width - 1}.")
    return sorted(set(int(n) for n in neurons))


def as_unit_sets(layer_units: dict) -> dict[int, UnitSet]:
    """{layer: UnitSet}; a plain list of indices stands for those MLP neurons."""
    return {int(layer): units if isinstance(units, UnitSet) else MlpNeurons(layer, units)
            for layer, units in layer_units.items()}
