"""The scorer seam: how well an explanation predicts its unit, in two steps.

`judge` is the costly part — an LLM (or an embedding model) looks at the explanation and held-out excerpts and
says something per excerpt — and becomes an asset of its own, so that changing one scorer's prompt or model makes
only its judgements (and its scores) stale. `score` turns the judgements into one row per explanation (`score`,
`status`, and whatever the scorer adds) with no model at all.

Implemented: `SimulationScorer`, the paper's — the simulator predicts every token's activation from the explanation
alone (judgements: the `simulations` asset), scored by the pooled Pearson correlation with the true activations
(`scores`). A new scorer (detection, fuzzing, embedding) implements the same two methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import polars as pl

from ndx_pipeline.core.contract import CALIBRATION, SCORED_SPLITS
from ndx_pipeline.core.method.scoring import score_layer
from ndx_pipeline.core.method.simulator import SIMULATOR_MODES, simulation_work
from ndx_pipeline.core.method.work import Work, run_together
from ndx_pipeline.core.progress import Progress


class Scorer(ABC):
    """Judges explanations on held-out excerpts, then scores each explanation from its judgements."""

    name: str  # the scorer's name in settings, assets and columns

    @abstractmethod
    def judgements(self, explanations: pl.DataFrame, excerpts: pl.DataFrame, backend) -> Work:
        """The work of judging every kept, usable explanation on its neuron's scored excerpts (one row per pair,
        failures recorded in the row), for a stage to run with other work in one wave."""

    def judge(self, explanations: pl.DataFrame, excerpts: pl.DataFrame, backend,
              progress: Progress | None = None) -> pl.DataFrame:
        """`judgements` run at the backend's concurrency."""
        return run_together(backend, [self.judgements(explanations, excerpts, backend)], progress)[0]

    @abstractmethod
    def score(self, judgements: pl.DataFrame, explanations: pl.DataFrame) -> pl.DataFrame:
        """One row per kept explanation: `layer`, `neuron`, `explanation_id`, `explanation`, `score`, `status`, …"""


class SimulationScorer(Scorer):
    """Simulate, then correlate (Bills et al. 2023): `mode` all_at_once (prompt logprobs) or json (chat models).
    `calibrated`: also simulate the calibration excerpts, from which `score` fits the line that maps simulated
    values onto true activations (the calibrated explained variance beside the correlation)."""

    name = "simulation"

    def __init__(self, mode: str = "all_at_once", calibrated: bool = False):
        if mode not in SIMULATOR_MODES:
            raise ValueError(f"simulator mode must be one of {SIMULATOR_MODES}, not {mode!r}")
        self.mode, self.calibrated = mode, calibrated

    def judgements(self, explanations, excerpts, backend):
        splits = (*SCORED_SPLITS, CALIBRATION) if self.calibrated else SCORED_SPLITS
        return simulation_work(explanations, excerpts, backend, self.mode, splits)

    def score(self, judgements, explanations):
        return score_layer(judgements, explanations)
