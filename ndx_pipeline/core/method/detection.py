"""Detection: does the neuron fire on this excerpt at all? The scorer LLM reads the explanation and a numbered
batch of held-out excerpts — activating ones drawn across the neuron's activation quantiles and non-activating
ones, shuffled — and answers 1 or 0 for each (`judging.parse_verdicts`). Scored by balanced accuracy, so a scorer
that always says yes (or no) gets 0.5 whatever the mix.
"""

from __future__ import annotations

from collections.abc import Sequence

from ndx_pipeline.core.contract import ACTIVATING
from ndx_pipeline.core.method.judging import VERDICT_FORM, VERDICT_PREFACE, Shown, verdict_messages

DETECTION_SYSTEM = (
    f"{VERDICT_PREFACE}Some of the excerpts contain what the description names and make the neuron fire; the others "
    "do not. For each excerpt, answer 1 if the neuron fires on it, going by the description, or 0 if it does not. "
    f"{VERDICT_FORM}"
)

# A made-up neuron and excerpts of our own, with the truth for each. The worked example shows as many of them as
# the batch has excerpts (up to all eight), so that even a small model that copies the example's form answers
# every excerpt; the truths follow no simple pattern.
DETECTION_DESCRIPTION = 'the word "and"'
DETECTION_EXAMPLES = (
    ("The train leaves at noon on Monday.", False),
    ("Salt, pepper, bread and butter are on the table.", True),
    ("We met in early March and again in June.", True),
    ("print(len(items)) + max(a)", False),
    ("Cats and dogs can share a house.", True),
    ("The results were better than expected.", False),
    ("She opened the window to let in some air.", False),
    ("Read the file, then close it and return.", True),
)


def detection_messages(explanation: str, batch: Sequence[Shown]) -> list[dict]:
    """The chat for one batch: instructions, the worked example, then the explanation and the excerpts."""
    return verdict_messages(DETECTION_SYSTEM, DETECTION_DESCRIPTION, DETECTION_EXAMPLES, explanation,
                            [s.text() for s in batch])


def detection_shown(excerpts: list[dict], layer: int, neuron: int) -> list[Shown]:
    """Every held-out excerpt of the neuron, unmarked; the truth is whether it is an activating one."""
    return [Shown(ex, ex["split"] == ACTIVATING) for ex in excerpts]
