"""The scorers' metrics on labelled judgements, as plain functions of vectors (no frames, no models).

- Detection and fuzzing: the scorer says yes/no per excerpt. `classification` counts the confusion matrix and gives
  balanced accuracy (the mean of the true-positive and true-negative rates: 0.5 for any constant answer, whatever
  the share of positives), precision, recall and F1. A rate or ratio with nothing to count is NaN, never 0.
- Embedding: the scorer gives a similarity per excerpt. `roc_auc` is the probability that a random activating
  excerpt is more similar to the explanation than a random non-activating one (ties count one half).
- `spearman`: rank correlation of two scorers across units (average ranks for ties), for the benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NAN = float("nan")


@dataclass(frozen=True)
class Classification:
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def recall(self) -> float:
        """True-positive rate: the share of positives the scorer said yes to."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        """True-negative rate: the share of negatives the scorer said no to."""
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def balanced_accuracy(self) -> float:
        return (self.recall + self.specificity) / 2  # NaN when either class is missing

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        if math.isnan(p) or math.isnan(r):
            return NAN
        return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _ratio(num: int, den: int) -> float:
    return num / den if den else NAN


def classification(labels: Sequence[bool], verdicts: Sequence[bool]) -> Classification:
    """The confusion matrix of yes/no `verdicts` against the true `labels`."""
    y, p = np.asarray(labels, dtype=bool), np.asarray(verdicts, dtype=bool)
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels and {p.size} verdicts differ in length")
    return Classification(tp=int((y & p).sum()), fp=int((~y & p).sum()), tn=int((~y & ~p).sum()),
                          fn=int((y & ~p).sum()))


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks of `values`, ties given the mean of the ranks they span."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=np.float64)
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve of `scores` separating true `labels` from false ones (Mann–Whitney U over the
    product of the class sizes); NaN when either class is empty."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels and {s.size} scores differ in length")
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return NAN
    u = average_ranks(s)[y].sum() - pos * (pos + 1) / 2
    return float(u / (pos * neg))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation over the pairs where both are finite; NaN with fewer than 3 such pairs or a
    constant side."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        return NAN
    rx, ry = average_ranks(x[keep]), average_ranks(y[keep])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else NAN
