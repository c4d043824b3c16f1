"""Planted units: synthetic units whose activation is a known rule over the corpus's tokens, each with the explanation
that is true of it (written from its rule) and a wrong one (the next planted unit's). They are the judge's control:
a simulator or scorer that cannot rank a planted unit's true explanation above the wrong one cannot tell a good
explanation of a real unit from a bad one either.

A planted unit's activation on a token is 1 where its rule holds and 0 elsewhere. The rules read a window's token
texts (the contract's `tokens`, `tokenizer.decode([id])` each) and nothing else, so anyone can recompute them from
the stored records. Their records come from the same windows and the same streaming selection as the subject model's
units (top, random and quantile windows, moments), and go through the same splits, explainer, simulator and scorers;
no forward pass of the subject model is run (only its tokenizer). The `neuron` id of a planted unit is its rule's
index in `RULES`; its `unit_source` is the rule's name.
"""

from __future__ import annotations

import re
import string
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ndx_pipeline.core.data.selection import ExtractionStats, LayerSelection, random_windows, window_order
from ndx_pipeline.core.data.windows import TokenTexts, Windows
from ndx_pipeline.core.errors import NdxInputError

PLANTED_UNIT = "planted_rule"  # the records' unit_kind


def _word(text: str) -> str:
    return text.strip()


def _punctuation(text: str) -> bool:
    word = _word(text)
    return bool(word) and all(ch in string.punctuation for ch in word)


def _capitalised(text: str) -> bool:
    word = _word(text)
    return len(word) > 1 and word[0].isupper() and word[1:].islower() and word.isalpha()


@dataclass(frozen=True)
class PlantedRule:
    """A token fires when `token` holds of its text and (when given) `after` of the text of the token before it in
    the window (the first token of a window has none: it never fires for such a rule)."""

    name: str
    kind: str  # what sort of rule: token identity, token class, position, bigram, dense, sparse
    explanation: str  # the true explanation, written from the rule
    names_rule: str  # an explanation that contains one of these words (comma-separated, case-insensitive) names it
    token: Callable[[str], bool] = lambda text: True
    after: Callable[[str], bool] | None = None

    def named_in(self, explanation: str | None) -> bool:
        """Whether `explanation` names this rule (one of `names_rule`'s words, as a word)."""
        text = (explanation or "").lower()
        return any(re.search(rf"(?<![a-z]){re.escape(word.strip())}", text) for word in self.names_rule.split(","))


RULES: tuple[PlantedRule, ...] = (
    PlantedRule("word_if", "token identity", 'the word "if"', "if", token=lambda t: _word(t) == "if"),
    PlantedRule("digits", "token class", "digits", "digit,number,numeral", token=lambda t: _word(t).isdigit()),
    PlantedRule("punctuation", "token class", "punctuation marks and symbols", "punctuation,symbol",
                token=_punctuation),
    PlantedRule("capitalised_words", "token class", "capitalised words (a capital letter, then lower case)",
                "capital,upper", token=_capitalised),
    PlantedRule("line_start", "position", "the first token of each line, right after a line break",
                "line,newline,beginning", after=lambda t: t.endswith("\n")),
    PlantedRule("name_after_def", "bigram", 'the name that follows "def" (a function being defined)',
                "def,function name,defin", after=lambda t: _word(t) == "def"),
    PlantedRule("space_words", "dense", "words that follow a space (most words of running text)",
                "space", token=lambda t: t.startswith(" ") and _word(t).isalpha()),
    PlantedRule("word_yield", "sparse", 'the keyword "yield"', "yield,generator", token=lambda t: _word(t) == "yield"),
)


def wrong_rule(index: int, rules: tuple[PlantedRule, ...] = RULES) -> PlantedRule:
    """The rule whose explanation is the wrong one for planted unit `index`: the next one (the last takes the
    first's)."""
    return rules[(index + 1) % len(rules)]


class PlantedUnits:
    """The planted units of a run (rule indices of `RULES`), as the records describe them (the contract's unit
    columns)."""

    kind = PLANTED_UNIT

    def __init__(self, layer: int, ids):
        self.layer = int(layer)
        self.ids = [int(i) for i in ids]
        bad = [i for i in self.ids if not 0 <= i < len(RULES)]
        if bad:
            raise NdxInputError(f"planted units {bad} do not exist: there are {len(RULES)} (0..{len(RULES) - 1}).")

    def describe(self) -> dict:
        return {"unit_kind": [PLANTED_UNIT] * len(self.ids), "polarity": [1] * len(self.ids),
                "unit_index": list(self.ids), "unit_source": [RULES[i].name for i in self.ids]}

    def describe_set(self) -> str:
        return f"{len(self.ids)} planted units (known token rules)"


def rule_activations(rules: list[PlantedRule], token_texts: list[str]) -> np.ndarray:
    """[len(rules), len(token_texts)] 0/1 activations of one window's tokens (the reference the selection's input is
    built to equal)."""
    out = np.zeros((len(rules), len(token_texts)), dtype=np.float32)
    for r, rule in enumerate(rules):
        for t, text in enumerate(token_texts):
            before = rule.after is None or (t > 0 and rule.after(token_texts[t - 1]))
            out[r, t] = float(before and rule.token(text))
    return out


def planted_selection(windows: Windows, token_texts: TokenTexts, units: PlantedUnits, top_k: int, random_k: int,
                      quantile_k: int, seed: int, token_table: bool = False, batch_size: int = 256, progress=None):
    """The streaming selection of the planted units over every window, in the order a pass of the subject model
    takes them (same top, random and quantile windows as a model's units would get; with token_table, the lookup
    baseline's per-token table too). Returns (selection, stats)."""
    import torch

    rules = [RULES[i] for i in units.ids]
    vocab = np.unique(windows.ids)
    texts = token_texts(vocab)
    fires = np.array([[rule.token(t) for t in texts] for rule in rules], dtype=bool)  # [rules, vocab]
    follows = np.array([[True] * len(texts) if rule.after is None else [rule.after(t) for t in texts]
                        for rule in rules], dtype=bool)
    positions = np.searchsorted(vocab, windows.ids)  # [W, T] index of each token id in vocab
    real = np.arange(windows.window_tokens)[None, :] < windows.length[:, None]
    selection = LayerSelection(units.ids, windows.window_tokens, top_k, random_windows(len(windows), random_k, seed),
                               "cpu", quantile_k=quantile_k, seed=seed,
                               token_vocab=np.unique(windows.ids[real]) if token_table else None)
    order, pilot_batches = window_order(len(windows), quantile_k, seed, batch_size)
    started, done = time.perf_counter(), 0
    t = windows.window_tokens
    for number, b0 in enumerate(range(0, len(order), batch_size)):
        if quantile_k and number == pilot_batches:
            selection.end_pilot()
        idx = order[b0: b0 + batch_size]
        idx = idx[idx >= 0]
        mask = np.arange(t)[None, :] < windows.length[idx][:, None]  # [B, T]
        pos = positions[idx]
        after = np.zeros((len(rules), len(idx), t), dtype=bool)
        after[:, :, 1:] = follows[:, pos[:, :-1]]
        if any(rule.after is None for rule in rules):
            after[[r for r, rule in enumerate(rules) if rule.after is None]] = True
        acts = (fires[:, pos] & after & mask[None]).astype(np.float32).transpose(1, 2, 0)  # [B, T, rules]
        selection.update(torch.from_numpy(np.ascontiguousarray(acts)), torch.from_numpy(mask),
                         torch.from_numpy(idx.astype(np.int64)),
                         torch.from_numpy(windows.ids[idx].astype(np.int64)) if token_table else None)
        done += int(windows.length[idx].sum())
        if progress:
            progress(done, windows.total_tokens, time.perf_counter() - started)
    selection.end_pilot()
    selection.finalize()
    return selection, ExtractionStats(done, len(windows), time.perf_counter() - started, 0)
