"""Fuzzing: are the marked tokens the ones the explanation is about? Each held-out activating excerpt is shown twice
among the batches: once with the tokens where the neuron fires most strongly marked << like this >>, once with as
many other tokens of the same excerpt marked instead (chosen by a seeded generator). The scorer LLM answers 1 (the
marking fits the explanation) or 0 for each. Scored by balanced accuracy: the two versions of an excerpt differ
only in where the marks are, so the text alone cannot give the answer away.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ndx_pipeline.core.contract import ACTIVATING
from ndx_pipeline.core.method.judging import VERDICT_FORM, VERDICT_PREFACE, Shown, neuron_rng, verdict_messages

MARK_FRACTION = 0.5  # a token is one of the excerpt's strongest when it reaches this share of the excerpt's max
MAX_MARKS = 3  # at most this many of them are marked (the strongest)
FUZZ_STREAM = 1  # the generator stream of the arbitrary markings (0 shuffles the batches)

FUZZING_SYSTEM = (
    f"{VERDICT_PREFACE}In each excerpt some tokens are marked with << and >>. In some excerpts the marks are on the "
    "tokens where the neuron fires most strongly; in the others they were put on other tokens. For each excerpt, "
    f"answer 1 if the marked tokens are what the description names, or 0 if they are not. {VERDICT_FORM}"
)

# As for detection: a made-up neuron, our own excerpts, as many shown as the batch has (up to eight). The wrongly
# marked ones contain month names too, with the marks elsewhere, as the scored ones do.
FUZZING_DESCRIPTION = 'month names such as "March" and "June"'
FUZZING_EXAMPLES = (
    ("We met in <<early>> March and again in June.", False),
    ("Exams start in <<June>>, after the holidays.", True),
    ("The shop is <<closed>> for all of August.", False),
    ("Her birthday is in late <<March>>.", True),
    ("The shop is closed for all of <<August>>.", True),
    ("We <<met>> in early March and again in June.", False),
    ("Prices rose in <<January>> and fell in May.", True),
    ("It <<rained>> every day in April.", False),
)


def fuzzing_messages(explanation: str, batch: Sequence[Shown]) -> list[dict]:
    """The chat for one batch: instructions, the worked example, then the explanation and the marked excerpts."""
    return verdict_messages(FUZZING_SYSTEM, FUZZING_DESCRIPTION, FUZZING_EXAMPLES, explanation,
                            [s.text() for s in batch])


def strongest_positions(activations: Sequence[float], fraction: float = MARK_FRACTION,
                        limit: int = MAX_MARKS) -> list[int]:
    """The positions of the excerpt's strongest tokens, in text order: those reaching `fraction` of its max
    activation (positive values only), at most `limit` of them, the strongest first when there are more."""
    acts = np.asarray(activations, dtype=np.float64)
    if not acts.size or not acts.max() > 0:
        return []
    chosen = [int(i) for i in np.argsort(-acts, kind="stable") if acts[i] > 0 and acts[i] >= fraction * acts.max()]
    return sorted(chosen[:limit])


def arbitrary_positions(n_tokens: int, avoid: Sequence[int], count: int, rng: np.random.Generator) -> list[int]:
    """`count` positions of an excerpt of n_tokens drawn without replacement from those not in `avoid`."""
    free = [i for i in range(n_tokens) if i not in set(avoid)]
    if not free:
        return []
    return sorted(int(i) for i in rng.choice(free, size=min(count, len(free)), replace=False))


def fuzzing_shown(excerpts: list[dict], layer: int, neuron: int, seed: int = 0) -> list[Shown]:
    """Each activating excerpt twice: its strongest tokens marked (truth 1), and as many other tokens (truth 0)."""
    rng = neuron_rng(seed, layer, neuron, FUZZ_STREAM)
    out = []
    for ex in (e for e in excerpts if e["split"] == ACTIVATING):
        real = strongest_positions(ex["activations"])
        if not real:  # nothing fires in it: nothing to mark
            continue
        out.append(Shown(ex, True, tuple(real)))
        out.append(Shown(ex, False, tuple(arbitrary_positions(len(ex["tokens"]), real, len(real), rng))))
    return out
