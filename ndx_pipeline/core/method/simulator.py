"""The simulator, "all at once": a prompt holding only the explanation and the excerpt's tokens, each written as
`token<TAB>unknown`; the predicted activation at each token is the expected value over the values 0..10 of the
model's next-token distribution at the slot right after the tab. One forward pass per excerpt.

The scale's top is the backend's choice (`LLMBackend.simulation_top_value`): 10, the method's own; or 9 where the
backend can read every value of a 0–9 scale from one request but the value 10 only at great extra cost (a server
whose tokenizer writes "10" as "1" + "0"). On the 0–9 scale the prompt says "0 to 9", its worked examples write 10
as 9, and the expected value is multiplied by 10/9, so stored values stay on the 0–10 scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from ndx_pipeline.core.contract import SCORED_SPLITS, SIMULATION_SCHEMA, STATUS_FAILED, STATUS_OK, frame, usable
from ndx_pipeline.core.llm.backend import RecordableLLMError, SimulationPrompt
from ndx_pipeline.core.method.display import END, MAX_SHOWN, START, escape_token
from ndx_pipeline.core.method.explainer import FEW_SHOTS
from ndx_pipeline.core.method.simulator_json import simulate_excerpt_json
from ndx_pipeline.core.method.work import Work, run_together
from ndx_pipeline.core.progress import Progress

# Measured on the bundled 135M model (issue 7, benchmarks/prompts.py): after "token<TAB>" only ~7 % of the slot's
# probability is on the values 0..10 (the model mostly predicts the placeholder again). Writing "0" as the
# placeholder lifts that to ~79 % but not the correlations (18 real neurons, token-list explanations: 0.058 with
# "unknown", 0.041 with "0"; 10 synthetic one-token neurons with hand-written explanations: 0.037 vs 0.026), and it
# tells a capable model that every earlier token scored 0. The renormalized expected value keeps the paper's format.
PLACEHOLDER = "unknown"



def intro(top: int = MAX_SHOWN) -> str:
    """The simulator prompt's first paragraph, for values 0..`top`."""
    return (
        "Below, a description of one neuron in a language model is followed by text, one token per line. After each "
        f"token comes a tab and how strongly the neuron fires on it, an integer from 0 (not at all) to {top} (as "
        "strongly as it ever fires). Most tokens get 0; the tokens that match the description get high values. Where "
        f"the value is written as {PLACEHOLDER}, it is the one to predict.\n"
    )


INTRO = intro()


def _example_text(explanation: str, tokens, values) -> str:
    lines = [f"Neuron description: {explanation}", START]
    lines += [f"{escape_token(t)}\t{int(v)}" for t, v in zip(tokens, values)]
    lines.append(END)
    return "\n".join(lines) + "\n\n"


def simulation_prompt(explanation: str, tokens: Sequence[str], top: int = MAX_SHOWN) -> SimulationPrompt:
    """The prompt asking for the values 0..`top` (10, or 9: see the module docstring) of `tokens`."""
    if not 1 <= top <= MAX_SHOWN:
        raise ValueError(f"the simulator's top value must be 1..{MAX_SHOWN}, not {top}")
    head = intro(top) + "\n"
    for shot in FEW_SHOTS[:2]:
        toks, vals = shot.excerpts[0]
        head += _example_text(shot.explanation, toks, [min(v, top) for v in vals])
    head += f"Neuron description: {explanation}\n{START}\n"
    segments, slots = [head], []
    for tok in tokens:
        segments.append(f"{escape_token(tok)}\t")
        slots.append(len(segments) - 1)
        segments.append(f"{PLACEHOLDER}\n")
    segments.append(END)
    return SimulationPrompt(tuple(segments), tuple(slots))


def expected_values(value_probs: np.ndarray) -> np.ndarray:
    """[tokens, 11] probabilities of the values 0..10 (unnormalized) → expected value, renormalized over 0..10.

    A slot where none of the values has any probability predicts 0.
    """
    p = np.asarray(value_probs, dtype=np.float64)
    total = p.sum(axis=1)
    ev = (p * np.arange(p.shape[1])).sum(axis=1)
    return np.where(total > 0, ev / np.where(total > 0, total, 1.0), 0.0)


SIMULATOR_MODES = ("all_at_once", "json")


def simulate_excerpt(backend, explanation: str, tokens, mode: str = "all_at_once") -> np.ndarray:
    """Predicted activations (0–10) of one excerpt from the explanation alone."""
    if mode == "all_at_once":
        top = backend.simulation_top_value()
        probs = backend.value_probabilities(simulation_prompt(explanation, tokens, top))
        return expected_values(probs[:, : top + 1]) * (MAX_SHOWN / top)
    if mode == "json":
        return simulate_excerpt_json(backend, explanation, tokens)
    raise ValueError(f"simulator mode must be one of {SIMULATOR_MODES}, not {mode!r}")


def simulation_work(explanations, excerpts, backend, mode: str = "all_at_once",
                    splits: Sequence[str] = SCORED_SPLITS) -> Work:
    """Every excerpt of `splits` (the scored ones by default; calibration too when the score is to be calibrated)
    of every neuron whose kept explanation is `ok`, simulated from the explanation alone: one forward pass or
    request per excerpt. An excerpt whose call or answer fails gets status `failed`, an empty prediction and the
    reason; the others go on. The items come explanation by explanation, so that a batch shares its prompt head."""
    if mode not in SIMULATOR_MODES:
        raise ValueError(f"simulator mode must be one of {SIMULATOR_MODES}, not {mode!r}")
    ok = usable(explanations)  # best-of-k candidates: only the kept one is scored
    scored = excerpts.filter(pl.col("split").is_in(list(splits)))
    items = []
    for expl in ok.sort(["layer", "neuron"]).iter_rows(named=True):
        mine = scored.filter((pl.col("layer") == expl["layer"]) & (pl.col("neuron") == expl["neuron"]))
        items += [(expl, ex) for ex in mine.iter_rows(named=True)]

    def run(item) -> dict:
        expl, ex = item
        row = {"layer": ex["layer"], "neuron": ex["neuron"], "explanation_id": expl["explanation_id"],
               "excerpt_id": ex["excerpt_id"], "split": ex["split"], "tokens": ex["tokens"],
               "true_activations": ex["activations"], "simulated_activations": [], "simulator": backend.name,
               "status": STATUS_OK, "error": None}
        try:
            simulated = simulate_excerpt(backend, expl["explanation"], ex["tokens"], mode)
            if len(simulated) != len(ex["tokens"]):
                raise RecordableLLMError(f"the simulator gave {len(simulated)} values for {len(ex['tokens'])} tokens")
            row["simulated_activations"] = simulated.astype(float).tolist()
        except RecordableLLMError as exc:
            row["status"], row["error"] = STATUS_FAILED, str(exc)
        return row

    return Work(items, run, lambda rows: frame(rows, SIMULATION_SCHEMA))


def simulate_layer(explanations, excerpts, backend, mode: str = "all_at_once", progress: Progress | None = None,
                   splits: Sequence[str] = SCORED_SPLITS):
    """`simulation_work` run at the backend's concurrency; `progress` counts excerpts."""
    return run_together(backend, [simulation_work(explanations, excerpts, backend, mode, splits)], progress)[0]
