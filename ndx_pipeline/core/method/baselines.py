"""Baselines scored beside every explanation, on exactly the excerpts the explanation is scored on.

- **Lookup table** (`lookup_simulations`): predict each scored token's mean activation for that neuron over the
  corpus, from the per-token table extraction keeps (`extract(..., token_table=True)`, `token_table_frame`). A token
  the table lacks gets the neuron's mean over all tokens. By default the table is *held out*: before predicting, the
  scored excerpts' own tokens and activations are subtracted from it (counts and sums), so the baseline never sees
  the activations it is scored against — the same footing as an explanation, which never sees its scoring excerpts.
  Without that, a token that occurs only in a scored excerpt would predict its own activation exactly and inflate the
  baseline. `held_out=False` gives the plain whole-corpus table (the paper's construction).
- **Random explanation** (`random_explanations`): each neuron gets, by a seeded choice, the explanation of another
  neuron of the same layer, which is then simulated and scored like its own.

Every baseline yields explanation-shaped and simulation-shaped frames, so `scoring.score_layer` scores it the same
way (pooled Pearson over score_top + score_random); `with_baselines` puts the scores beside the real ones as
`baseline_<name>` columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from ndx_pipeline.core import contract
from ndx_pipeline.core.contract import (
    BASELINE_EXPLANATION_SCHEMA,
    EXPLANATION_SCHEMA,
    RANDOM_BASELINE,
    SCORED_SPLITS,
    SIMULATED_BASELINES,
    SIMULATION_SCHEMA,
    STATUS_FAILED,
    STATUS_OK,
    TOKEN_LIST_BASELINE,
    frame,
    lookup_explanation_id,
    random_explanation_id,
    seed_key,
)
from ndx_pipeline.core.method.scoring import score_layer
from ndx_pipeline.core.method.token_list import explain_token_lists

LOOKUP_EXPLANATION = "token lookup table (each token's mean activation over the corpus)"
LOOKUP_SIMULATOR = "lookup-table"
LOOKUP_SIMULATOR_IN_SAMPLE = "lookup-table-in-sample"


def explanation_frame(rows: Sequence[dict], extra: Mapping[str, pl.DataType] | None = None) -> pl.DataFrame:
    """Rows in the explanations schema (missing fields null), plus `extra` columns."""
    return frame(rows, EXPLANATION_SCHEMA, extra)


def simulation_frame(rows: Sequence[dict]) -> pl.DataFrame:
    """Rows in the simulations schema; `status`/`error` default to ok/null."""
    return frame(rows, SIMULATION_SCHEMA, defaults={"status": STATUS_OK})


# ---------------------------------------------------------------------------------------------------------------
# Lookup table


def lookup_predictions(table: Mapping[str, tuple[int, float]],
                       excerpts: Sequence[tuple[Sequence[str], Sequence[float]]],
                       held_out: bool = True) -> list[np.ndarray]:
    """Predicted activations of one neuron on each excerpt: the token's mean activation in `table`
    (token text → (count, activation sum)); a token absent from the table (or whose every occurrence was held out)
    gets the neuron's mean over the whole table. held_out: first subtract the excerpts' own tokens and activations."""
    counts = {t: int(c) for t, (c, _) in table.items()}
    sums = {t: float(s) for t, (_, s) in table.items()}
    if held_out:
        for tokens, acts in excerpts:
            for t, a in zip(tokens, acts, strict=True):
                if t in counts:
                    counts[t] -= 1
                    sums[t] -= float(a)
    total = sum(counts.values())
    neuron_mean = sum(s for t, s in sums.items() if counts[t] > 0) / total if total > 0 else 0.0
    out = []
    for tokens, _ in excerpts:
        out.append(np.array([sums[t] / counts[t] if counts.get(t, 0) > 0 else neuron_mean for t in tokens],
                            dtype=np.float64))
    return out


def lookup_simulations(table: pl.DataFrame, excerpts: pl.DataFrame, held_out: bool = True,
                       splits: Sequence[str] = SCORED_SPLITS) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(explanations, simulations) of the lookup-table baseline for every neuron of `excerpts` on `splits`.

    table: `token_table_frame` rows (layer, neuron, token, count, activation_sum) of the same layer(s)."""
    chosen = excerpts.filter(pl.col("split").is_in(list(splits))).sort(["layer", "neuron", "split", "rank"])
    by_neuron = {
        (int(k[0]), int(k[1])): dict(zip(g["token"].to_list(), zip(g["count"].to_list(),
                                                                    g["activation_sum"].to_list())))
        for k, g in table.partition_by(["layer", "neuron"], as_dict=True).items()
    }
    expl_rows, sim_rows = [], []
    simulator = LOOKUP_SIMULATOR if held_out else LOOKUP_SIMULATOR_IN_SAMPLE
    for (layer, neuron), group in chosen.group_by(["layer", "neuron"], maintain_order=True):
        layer, neuron = int(layer), int(neuron)
        eid = lookup_explanation_id(layer, neuron, held_out)
        mine = by_neuron.get((layer, neuron))
        row = {"layer": layer, "neuron": neuron, "explanation_id": eid, "explanation": LOOKUP_EXPLANATION,
               "explainer": simulator, "status": STATUS_OK}
        if mine is None:
            row.update(status=STATUS_FAILED, error=f"the token table has no rows for layer {layer} neuron {neuron}")
            expl_rows.append(row)
            continue
        expl_rows.append(row)
        shown = list(zip(group["tokens"].to_list(), group["activations"].to_list()))
        predicted = lookup_predictions(mine, shown, held_out)
        for ex, pred in zip(group.iter_rows(named=True), predicted):
            sim_rows.append({
                "layer": layer, "neuron": neuron, "explanation_id": eid, "excerpt_id": ex["excerpt_id"],
                "split": ex["split"], "tokens": ex["tokens"], "true_activations": ex["activations"],
                "simulated_activations": pred.tolist(), "simulator": simulator,
            })
    return explanation_frame(expl_rows), simulation_frame(sim_rows)


# ---------------------------------------------------------------------------------------------------------------
# Random explanation


def random_explanations(explanations: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    """For every neuron of `explanations`, the kept explanation of another neuron of the same layer, chosen with
    numpy's generator seeded by (seed, layer, neuron). Status failed when the layer has no other usable one.
    Extra column `donor_neuron`."""
    usable = contract.usable(explanations).sort(["layer", "neuron"])
    donors: dict[int, list[dict]] = {}
    for r in usable.iter_rows(named=True):
        donors.setdefault(int(r["layer"]), []).append(r)
    rows = []
    for layer, neuron in explanations.select("layer", "neuron").unique().sort(["layer", "neuron"]).iter_rows():
        layer, neuron = int(layer), int(neuron)
        others = [r for r in donors.get(layer, []) if int(r["neuron"]) != neuron]
        if not others:
            rows.append({"layer": layer, "neuron": neuron, "explanation_id": random_explanation_id(layer, neuron, -1),
                         "explainer": "random", "status": STATUS_FAILED,
                         "error": f"no other neuron of layer {layer} has a usable explanation"})
            continue
        pick = others[int(np.random.default_rng([seed, layer, seed_key(neuron)]).integers(len(others)))]
        rows.append({"layer": layer, "neuron": neuron,
                     "explanation_id": random_explanation_id(layer, neuron, int(pick["neuron"])),
                     "explanation": pick["explanation"], "explainer": f"random:{pick['explanation_id']}",
                     "prompt_sha256": pick.get("prompt_sha256"), "status": STATUS_OK,
                     "donor_neuron": int(pick["neuron"])})
    return explanation_frame(rows, {"donor_neuron": pl.Int32})




# ---------------------------------------------------------------------------------------------------------------
# All baselines of a layer, for the stages


def as_baselines(random: pl.DataFrame | None = None, token_list: pl.DataFrame | None = None) -> pl.DataFrame:
    """The baseline_explanations table: the random and token-list explanations (either may be absent), in the
    explanations schema plus `baseline` ("random" / "token_list")."""
    common = list(EXPLANATION_SCHEMA)
    parts = [f.select(common).with_columns(pl.lit(name).alias("baseline"))
             for name, f in ((RANDOM_BASELINE, random), (TOKEN_LIST_BASELINE, token_list)) if f is not None]
    if not parts:
        return pl.DataFrame(schema=BASELINE_EXPLANATION_SCHEMA)
    return pl.concat(parts).sort(["layer", "neuron", "baseline"])


def baseline_explanations(explanations: pl.DataFrame, excerpts: pl.DataFrame, seed: int = 0, token_list_backend=None,
                          names: Sequence[str] = SIMULATED_BASELINES, **token_list_kwargs) -> pl.DataFrame:
    """The explanations the random and token-list baselines simulate (those of `names`), one of each per neuron
    (`as_baselines`). The token-list one is written by `token_list_backend` (the explainer LLM) reading only the
    strongest tokens, or by the fixed template when None. Simulate them like any explanation."""
    return as_baselines(
        random_explanations(explanations, seed) if RANDOM_BASELINE in names else None,
        explain_token_lists(excerpts, token_list_backend, seed=seed, **token_list_kwargs)
        if TOKEN_LIST_BASELINE in names else None)


def baseline_scores(simulations: pl.DataFrame, baseline_expl: pl.DataFrame | None = None,
                    table: pl.DataFrame | None = None, excerpts: pl.DataFrame | None = None,
                    held_out: bool = True) -> dict[str, pl.DataFrame]:
    """{name: score_layer rows} for `score_layer(..., baselines=)`: random and token_list from `simulations` of
    `baseline_explanations` rows, lookup from the token `table` on the scored `excerpts` (no LLM)."""
    out = {}
    if baseline_expl is not None:
        for name in baseline_expl["baseline"].unique(maintain_order=True).to_list():
            out[name] = score_layer(simulations, baseline_expl.filter(pl.col("baseline") == name))
    if table is not None:
        if excerpts is None:
            raise ValueError("the lookup baseline needs the scored excerpts beside the token table")
        expl, sims = lookup_simulations(table, excerpts, held_out)
        out["lookup"] = score_layer(sims, expl)
    return out
