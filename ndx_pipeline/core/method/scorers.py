"""The scorer seam: how well an explanation predicts its unit, in two steps.

`judge` is the costly part — an LLM (or an embedding model) looks at the explanation and held-out excerpts and
says something per excerpt — and becomes an asset of its own, so that changing one scorer's prompt or model makes
only its judgements (and its scores) stale. `score` turns the judgements into one row per explanation (`score`,
`status`, and whatever the scorer adds) with no model at all.

Implemented:
- `SimulationScorer`, the paper's — the simulator predicts every token's activation from the explanation alone
  (judgements: the `simulations` asset), scored by the pooled Pearson correlation with the true activations
  (`scores`). Needs a model that gives prompt logprobs (or the slower JSON simulator).
- `DetectionScorer` and `FuzzingScorer` — any chat model says, per held-out excerpt, whether the neuron fires on
  it / whether its marked tokens fit the explanation (`detection_judgements`, `fuzzing_judgements`); balanced
  accuracy (`detection_scores`, `fuzzing_scores`).
- `EmbeddingScorer` — a sentence-embedding model ranks the excerpts by similarity to the explanation, no generation
  (`embedding_judgements`); ROC AUC (`embedding_scores`).
The three judge `scorer_excerpts` (`judging.held_out_excerpts`), never an excerpt the explainer saw. `SCORERS` names
them for the settings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import polars as pl

from ndx_pipeline.core.contract import CALIBRATION, DETECTION, EMBEDDING, FUZZING, SCORED_SPLITS
from ndx_pipeline.core.method.detection import detection_messages, detection_shown
from ndx_pipeline.core.method.embedding import similarity_work
from ndx_pipeline.core.method.fuzzing import fuzzing_messages, fuzzing_shown
from ndx_pipeline.core.method.judging import BALANCED_ACCURACY, ROC_AUC, score_judgements, verdict_work
from ndx_pipeline.core.method.scoring import score_layer
from ndx_pipeline.core.method.simulator import SIMULATOR_MODES, simulation_work
from ndx_pipeline.core.method.work import Work, run_together
from ndx_pipeline.core.progress import Progress


class Scorer(ABC):
    """Judges explanations on held-out excerpts, then scores each explanation from its judgements."""

    name: str  # the scorer's name in settings, assets and columns
    unit = "items"  # what one item of its judgement work is, in progress lines

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
    unit = "excerpts"

    def __init__(self, mode: str = "all_at_once", calibrated: bool = False):
        if mode not in SIMULATOR_MODES:
            raise ValueError(f"simulator mode must be one of {SIMULATOR_MODES}, not {mode!r}")
        self.mode, self.calibrated = mode, calibrated

    def judgements(self, explanations, excerpts, backend):
        splits = (*SCORED_SPLITS, CALIBRATION) if self.calibrated else SCORED_SPLITS
        return simulation_work(explanations, excerpts, backend, self.mode, splits)

    def score(self, judgements, explanations):
        return score_layer(judgements, explanations)


class HeldOutScorer(Scorer):
    """A scorer of the held-out `scorer_excerpts`, scored by its `metric` over each explanation's judgements."""

    metric: str

    def score(self, judgements, explanations):
        return score_judgements(judgements, explanations, self.name, self.metric)


class VerdictScorer(HeldOutScorer):
    """A scorer LLM answers 0/1 per held-out excerpt, `batch_size` excerpts per prompt; balanced accuracy."""

    metric = BALANCED_ACCURACY
    unit = "prompts"

    def __init__(self, batch_size: int = 5, seed: int = 0):
        self.batch_size, self.seed = batch_size, seed

    @abstractmethod
    def shown(self, excerpts: list[dict], layer: int, neuron: int) -> list:
        """What the scorer sees of one neuron (`judging.Shown` items), before the batches are shuffled."""

    @abstractmethod
    def messages(self, explanation: str, batch) -> list[dict]:
        """The chat asking for the verdicts of one batch."""

    def judgements(self, explanations, excerpts, backend):
        return verdict_work(explanations, excerpts, backend, shown=self.shown, messages=self.messages,
                            batch_size=self.batch_size, seed=self.seed)


class DetectionScorer(VerdictScorer):
    """Which excerpts does the neuron fire on? Activating and non-activating held-out excerpts, shuffled."""

    name = DETECTION

    def shown(self, excerpts, layer, neuron):
        return detection_shown(excerpts, layer, neuron)

    def messages(self, explanation, batch):
        return detection_messages(explanation, batch)


class FuzzingScorer(VerdictScorer):
    """Are the marked tokens what the explanation names? Each activating excerpt with its strongest tokens marked,
    and again with as many other tokens marked."""

    name = FUZZING

    def shown(self, excerpts, layer, neuron):
        return fuzzing_shown(excerpts, layer, neuron, self.seed)

    def messages(self, explanation, batch):
        return fuzzing_messages(explanation, batch)


class EmbeddingScorer(HeldOutScorer):
    """Excerpts ranked by the cosine similarity of their embedding to the explanation's; ROC AUC. The "backend" is
    an embedder (`core/llm/embeddings.py`)."""

    name = EMBEDDING
    metric = ROC_AUC
    unit = "neurons"

    def judgements(self, explanations, excerpts, backend):
        return similarity_work(explanations, excerpts, backend)


SCORERS: dict[str, type[Scorer]] = {DETECTION: DetectionScorer, FUZZING: FuzzingScorer, EMBEDDING: EmbeddingScorer}
LLM_SCORERS = (DETECTION, FUZZING)  # judged by the scorer LLM (the embedding scorer by an embedding model)


def make_scorer(name: str, batch_size: int = 5, seed: int = 0) -> Scorer:
    """The scorer `name` of `SCORERS`; the LLM scorers ask `batch_size` excerpts per prompt."""
    if name not in SCORERS:
        raise ValueError(f"scorer must be one of {sorted(SCORERS)}, not {name!r}")
    return SCORERS[name](batch_size, seed) if name in LLM_SCORERS else SCORERS[name]()
