"""Embedding: no generation at all. A sentence-embedding model embeds the explanation and every held-out excerpt of
its neuron; the cosine similarity of each excerpt to the explanation ranks them, and the score is the ROC AUC of
that ranking, activating vs non-activating (0.5: no better than chance; 1: every activating excerpt is closer to the
explanation than every non-activating one).
"""

from __future__ import annotations

import polars as pl

from ndx_pipeline.core.contract import ACTIVATING, JUDGEMENT_SCHEMA, STATUS_FAILED, frame
from ndx_pipeline.core.llm.backend import RecordableLLMError
from ndx_pipeline.core.method.judging import Shown, base_row, by_neuron, judged_explanations
from ndx_pipeline.core.method.work import Work


def plain_text(tokens) -> str:
    """An excerpt as the embedding model reads it: its tokens joined, as the text stands in the document."""
    return "".join(tokens)


def similarity_work(explanations: pl.DataFrame, excerpts: pl.DataFrame, embedder) -> Work:
    """One item per neuron: its judged explanations (ours, or the baselines') and its held-out excerpts embedded
    together; a row per explanation × excerpt with the cosine `similarity`. An embedding call that fails fails the
    neuron's rows with the reason."""
    pools = by_neuron(excerpts)
    targets: dict[tuple[int, int], list[dict]] = {}
    for expl in judged_explanations(explanations):
        targets.setdefault((int(expl["layer"]), int(expl["neuron"])), []).append(expl)
    items = [(expls, pools[key]) for key, expls in sorted(targets.items()) if key in pools]

    def run(item) -> list[dict]:
        expls, pool = item
        shown = [Shown(ex, ex["split"] == ACTIVATING) for ex in pool]
        rows = [[base_row(expl, s, embedder.name) for s in shown] for expl in expls]
        try:
            vectors = embedder.embed([e["explanation"] for e in expls] + [plain_text(s.excerpt["tokens"])
                                                                         for s in shown])
            similarity = vectors[:len(expls)] @ vectors[len(expls):].T
            for i, mine in enumerate(rows):
                for j, row in enumerate(mine):
                    row["similarity"] = float(similarity[i, j])
        except RecordableLLMError as exc:
            for row in (r for mine in rows for r in mine):
                row.update(status=STATUS_FAILED, error=str(exc))
        return [r for mine in rows for r in mine]

    return Work(items, run, lambda outs: frame([r for rows in outs for r in rows], JUDGEMENT_SCHEMA))
