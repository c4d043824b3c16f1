"""Two judges of known quality for the controls' tests, as LLM backends the stages use like any other (registered
under a backend name by `registered`):

- `RuleJudge`, a perfect one: as explainer, it reads the excerpts it is shown and answers with the true explanation
  of the planted rule that fits them best; as simulator, it finds the planted rule an explanation states and
  predicts 10 where that rule fires, 0 elsewhere (a faint, fixed ripple on the zeros keeps every prediction from
  being constant, so that a wrong rule's score is defined).
- `CoinJudge`, a useless one: it predicts values drawn at random (seeded by the prompt), whatever the explanation.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager

import numpy as np

from ndx_pipeline.core.data.planted import RULES, rule_activations
from ndx_pipeline.core.llm import registry
from ndx_pipeline.core.llm.backend import Completion, LLMBackend
from ndx_pipeline.core.llm.cache import LLMStats
from ndx_pipeline.core.method.display import END, START

_ESCAPES = {"\\\\": "\\", "\\n": "\n", "\\t": "\t", "\\r": "\r"}


def unescape(token: str) -> str:
    return re.sub(r"\\\\|\\n|\\t|\\r", lambda m: _ESCAPES[m.group(0)], token)


def _normal(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def rule_of(explanation: str):
    """The planted rule whose true explanation `explanation` is (None: no rule's)."""
    return next((r for r in RULES if _normal(r.explanation) == _normal(explanation)), None)


def shown_blocks(text: str) -> list[tuple[list[str], list[int]]]:
    """The excerpts of an explainer prompt shown in full (a block with a 0 value: the digest lists fires only)."""
    blocks = []
    for block in re.findall(re.escape(START) + r"\n(.*?)\n" + re.escape(END), text, flags=re.S):
        pairs = [line.rsplit("\t", 1) for line in block.split("\n") if "\t" in line]
        tokens, values = [unescape(t) for t, _ in pairs], [int(v) for _, v in pairs]
        if 0 in values:
            blocks.append((tokens, values))
    return blocks


class RuleJudge(LLMBackend):
    def __init__(self):
        self.stats = LLMStats()

    @property
    def name(self) -> str:
        return "rule-judge"

    def chat(self, messages, assistant_prefix, max_tokens, temperature, seed) -> Completion:
        blocks = shown_blocks(messages[-1]["content"])

        def fit(rule) -> tuple[float, float]:  # agreement with what was shown; on a tie, the narrower rule
            fired = [rule_activations([rule], tokens)[0] for tokens, _ in blocks]
            return (sum(float(np.mean(f == (np.asarray(v) > 0))) for f, (_, v) in zip(fired, blocks, strict=True)),
                    -sum(float(f.sum()) for f in fired))

        best = max(RULES, key=fit) if blocks else RULES[0]
        return Completion(f" {best.explanation}.", 10, 10)

    def value_probabilities(self, prompt) -> np.ndarray:
        explanation = prompt.segments[0].rsplit("Neuron description: ", 1)[1].split("\n", 1)[0]
        tokens = [unescape(prompt.segments[slot][:-1]) for slot in prompt.slots]
        rule = rule_of(explanation)
        fires = rule_activations([rule], tokens)[0] > 0 if rule else np.zeros(len(tokens), bool)
        out = np.zeros((len(tokens), 11))
        out[:, 0] = 1.0
        out[np.arange(len(tokens)), 1] = 0.001 * (np.arange(len(tokens)) % 3)  # the ripple
        out[fires] = 0.0
        out[fires, 10] = 1.0
        return out


class CoinJudge(RuleJudge):
    @property
    def name(self) -> str:
        return "coin-judge"

    def value_probabilities(self, prompt) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(prompt.text.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).random((len(prompt.slots), 11))


@contextmanager
def registered(monkeypatch):
    """The two judges as backends `rule-judge` and `coin-judge` of the registry (what a resource's `backend` names)."""
    monkeypatch.setitem(registry.BACKENDS, "rule-judge", lambda spec, cache, stats: RuleJudge())
    monkeypatch.setitem(registry.BACKENDS, "coin-judge", lambda spec, cache, stats: CoinJudge())
    yield
