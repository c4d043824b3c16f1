"""The output side of a unit: the tokens whose logits its output direction raises most and lowers most — the
"promotes / suppresses" lists of a feature page (Neuronpedia's `pos_str` / `neg_str`), read off the weights alone.

A unit's output direction is what one unit of its activation adds to the residual stream:
- an MLP neuron: its column of the layer's MLP output projection (down_proj, c_proj, …); a neuron's negative side:
  that column negated (the side's activations are the neuron's, negated);
- a dictionary latent: its decoder row (`W_dec`). A decoder that writes the MLP's hidden units (its width is the MLP
  width) is taken on through the output projection.
The direction is scaled by the final norm's gain (its per-dimension weight; the per-token scale and the centring are
left out, as is usual for this lens) and read through the unembedding: logit[v] = Σ_d W_U[v, d] · g[d] · w[d]. The
k largest are the promoted tokens, the k smallest the suppressed ones (lowest first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import torch

from ndx_pipeline.core.contract import DICTIONARY_LATENT, OUTPUT_TOKENS_SCHEMA, describe_ids, unit_index
from ndx_pipeline.core.data.subject_model import mlp_output_projections
from ndx_pipeline.core.errors import NdxInputError

OUTPUT_TOKENS_K = 10  # tokens per list (what a feature page shows)
# where a model keeps the norm before its unembedding, by architecture family
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")
NEURON_DIRECTION = "mlp output projection column"
LATENT_DIRECTION = "dictionary decoder row"
UNITS_AT_ONCE = 256  # units per [units, vocab] block of logits


@dataclass(frozen=True)
class Unembedding:
    """What turns a residual-stream direction into logits: W_U [vocab, hidden] and the final norm's gain."""

    weight: torch.Tensor
    gain: torch.Tensor | None
    norm: str  # the norm module's name, or "" when none was found

    @classmethod
    def of(cls, model) -> Unembedding:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or getattr(head, "weight", None) is None:
            raise NdxInputError(f"model {type(model).__name__} has no unembedding (output embeddings): its output "
                                "tokens cannot be read.")
        body = getattr(model, "base_model", model)
        gain, found = None, ""
        for name in FINAL_NORMS:
            module = getattr(body, name, None)
            if module is not None and getattr(module, "weight", None) is not None:
                gain, found = module.weight.detach().float(), name
                if "gemma" in type(module).__name__.lower():  # Gemma's RMSNorm scales by (1 + weight)
                    gain = gain + 1.0
                break
        return cls(head.weight.detach().float(), gain, found)

    def logits(self, directions: torch.Tensor) -> torch.Tensor:
        """[units, vocab] logits of `directions` [units, hidden]."""
        if directions.shape[-1] != self.weight.shape[1]:
            raise NdxInputError(f"output directions of width {directions.shape[-1]} do not fit the unembedding of "
                                f"width {self.weight.shape[1]}.")
        scaled = directions.float() * self.gain if self.gain is not None else directions.float()
        return scaled @ self.weight.T


def output_projection(model, layer: int) -> torch.Tensor:
    """The layer's MLP output projection as a [hidden, mlp] matrix (a Linear holds [out, in]; GPT-2's Conv1D holds
    [in, out])."""
    module = mlp_output_projections(model, [layer])[layer]
    weight = module.weight.detach().float()
    return weight.T if type(module).__name__ == "Conv1D" else weight


def neuron_directions(model, layer: int, unit_ids: Sequence[int]) -> torch.Tensor:
    """[units, hidden]: each neuron side's output direction (a negative side's is its neuron's, negated)."""
    projection = output_projection(model, layer)
    index = torch.tensor([unit_index(u)[0] for u in unit_ids], dtype=torch.long)
    sign = torch.tensor([float(unit_index(u)[1]) for u in unit_ids])
    return projection[:, index].T * sign[:, None]


def latent_directions(model, layer: int, decoder_rows: torch.Tensor) -> torch.Tensor:
    """[units, hidden]: the latents' decoder rows, taken through the MLP output projection when they write the MLP's
    hidden units."""
    projection = output_projection(model, layer)
    hidden, width = projection.shape
    rows = decoder_rows.float()
    if rows.shape[-1] == hidden:
        return rows
    if rows.shape[-1] == width:
        return rows @ projection.T
    raise NdxInputError(f"decoder rows of width {rows.shape[-1]} write neither the residual stream ({hidden}) nor "
                        f"the MLP's hidden units ({width}) of layer {layer}.")


def top_tokens(logits: torch.Tensor, tokenizer, k: int = OUTPUT_TOKENS_K) -> list[dict]:
    """Per row of `logits` [units, vocab]: the k promoted and k suppressed tokens (as text) with their logits."""
    k = min(k, logits.shape[-1])
    high, low = torch.topk(logits, k, dim=-1), torch.topk(logits, k, dim=-1, largest=False)
    out = []
    for values_up, ids_up, values_down, ids_down in zip(high.values, high.indices, low.values, low.indices):
        out.append({"promoted_tokens": [tokenizer.decode([int(i)]) for i in ids_up],
                    "promoted_logits": [float(v) for v in values_up],
                    "suppressed_tokens": [tokenizer.decode([int(i)]) for i in ids_down],
                    "suppressed_logits": [float(v) for v in values_down]})
    return out


def output_tokens_frame(layer: int, unit_ids: Sequence[int], directions: torch.Tensor, unembedding: Unembedding,
                        tokenizer, *, kind: str, source: str | None = None, k: int = OUTPUT_TOKENS_K) -> pl.DataFrame:
    """The `output_tokens` rows of one layer's units (`OUTPUT_TOKENS_SCHEMA`), computed in blocks of units."""
    rows: list[dict] = []
    for start in range(0, len(unit_ids), UNITS_AT_ONCE):
        rows.extend(top_tokens(unembedding.logits(directions[start:start + UNITS_AT_ONCE]), tokenizer, k))
    if not rows:
        return pl.DataFrame(schema=OUTPUT_TOKENS_SCHEMA)
    direction = LATENT_DIRECTION if kind == DICTIONARY_LATENT else NEURON_DIRECTION
    lens = f"{direction} × final norm gain ({unembedding.norm or 'none found'}) × unembedding"
    columns = {"layer": [layer] * len(rows), "neuron": list(unit_ids),
               **{key: [r[key] for r in rows] for key in rows[0]},
               "direction": [lens] * len(rows), **describe_ids(unit_ids, kind, source)}
    return pl.DataFrame(columns, schema=OUTPUT_TOKENS_SCHEMA)
