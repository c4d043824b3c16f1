"""Issue 7 core without a model: lookup-table baseline (held out and in sample), random-explanation baseline,
calibration split disjoint from every other split, best-of-k choice, token-list explanations, baseline columns."""

import math

import numpy as np
import polars as pl
import pytest

from ndx_pipeline.core import contract
from ndx_pipeline.core.contract import CALIBRATION as CALIBRATION_SPLIT
from ndx_pipeline.core.data.excerpts import calibration_excerpts, split_excerpts
from ndx_pipeline.core.llm.backend import Completion, LLMBackend
from ndx_pipeline.core.method import baselines as bl
from ndx_pipeline.core.method import best_of_k as bk
from ndx_pipeline.core.method import token_list as tl
from ndx_pipeline.core.method.explainer import LEAD_IN, neuron_seed
from ndx_pipeline.core.method.scoring import pooled_correlation, score_layer, with_baselines
from ndx_pipeline_tests.test_excerpts import records

# ---------------------------------------------------------------------------------------------------------------
# lookup table

def test_lookup_predictions_by_hand():
    table = {"a": (4, 8.0), "b": (2, 1.0), "c": (1, 5.0)}  # means a 2, b 0.5, c 5; neuron mean 14 / 7 = 2
    shown = [(["a", "b", "z"], [3.0, 0.0, 1.0])]
    (in_sample,) = bl.lookup_predictions(table, shown, held_out=False)
    np.testing.assert_allclose(in_sample, [2.0, 0.5, 2.0])  # z is unseen: the neuron's mean
    # Held out: a → (3, 5.0), b → (1, 1.0), z not in the table; neuron mean (5 + 1 + 5) / 5 = 2.2
    (held,) = bl.lookup_predictions(table, shown, held_out=True)
    np.testing.assert_allclose(held, [5 / 3, 1.0, 2.2])


def test_lookup_held_out_never_predicts_a_token_from_its_own_activation():
    # "rare" occurs only inside the scored excerpt: in sample it predicts its own activation, held out the mean.
    table = {"the": (10, 0.0), "rare": (1, 7.0)}
    shown = [(["the", "rare"], [0.0, 7.0])]
    (in_sample,) = bl.lookup_predictions(table, shown, held_out=False)
    (held,) = bl.lookup_predictions(table, shown, held_out=True)
    assert in_sample[1] == 7.0
    assert held.tolist() == [0.0, 0.0]  # the 9 remaining "the" average 0; "rare" falls back to that mean


def excerpt_frame():
    rows = []
    for split, rank, toks, acts in (("score_top", 2, ["a", "b", "a"], [4.0, 0.0, 2.0]),
                                    ("score_random", 1, ["b", "c"], [0.0, 1.0]),
                                    ("explain", 0, ["a", "c"], [5.0, 1.0])):
        rows.append({"layer": 1, "neuron": 7, "excerpt_id": f"1/7/x/{rank}", "split": split, "kind": "top",
                     "rank": rank, "doc_id": "d", "token_start": 0, "tokens": toks, "activations": acts,
                     "max_activation": max(acts), "window_index": rank, "char_start": 0, "char_end": 1})
    from ndx_pipeline.core.contract import EXCERPT_SCHEMA

    return pl.DataFrame(rows, schema=EXCERPT_SCHEMA)


def table_frame():
    return pl.DataFrame({"layer": [1, 1, 1], "neuron": [7, 7, 7], "token": ["a", "b", "c"], "count": [5, 3, 2],
                         "activation_sum": [14.0, 0.0, 2.0], "mean_activation": [2.8, 0.0, 1.0]})


def test_lookup_simulations_are_scored_like_any_explanation():
    expl, sims = bl.lookup_simulations(table_frame(), excerpt_frame(), held_out=False)
    assert expl["status"].to_list() == ["ok"] and expl["explanation_id"].to_list() == ["1/7/lookup-in-sample"]
    assert sorted(sims["split"].to_list()) == ["score_random", "score_top"]  # never the explain excerpt
    top = sims.filter(pl.col("split") == "score_top")
    assert top["simulated_activations"][0].to_list() == pytest.approx([2.8, 0.0, 2.8])
    scores = score_layer(sims, expl)
    expected = pooled_correlation([[4.0, 0.0, 2.0], [0.0, 1.0]], [[2.8, 0.0, 2.8], [0.0, 1.0]]).value
    assert scores["score"][0] == pytest.approx(expected)
    # held out: a → (3, 8.0), b → (1, 0.0), c → (1, 1.0)
    expl, sims = bl.lookup_simulations(table_frame(), excerpt_frame(), held_out=True)
    assert expl["explanation_id"].to_list() == ["1/7/lookup"]
    top = sims.filter(pl.col("split") == "score_top")
    assert top["simulated_activations"][0].to_list() == pytest.approx([8 / 3, 0.0, 8 / 3])


def test_lookup_without_table_rows_fails_that_neuron_only():
    expl, sims = bl.lookup_simulations(table_frame().with_columns(pl.lit(8).alias("neuron")), excerpt_frame())
    assert expl["status"].to_list() == ["failed"] and "no rows" in expl["error"][0]
    assert sims.is_empty()
    assert math.isnan(score_layer(sims, expl)["score"][0])


# ---------------------------------------------------------------------------------------------------------------
# random explanation

def explanations(neurons, layer=0, failed=()):
    return bl.explanation_frame([
        {"layer": layer, "neuron": n, "explanation_id": f"{layer}/{n}/explanation/0",
         "explanation": None if n in failed else f"thing {n}", "explainer": "x",
         "status": "failed" if n in failed else "ok"} for n in neurons])


def test_random_explanations_are_seeded_and_never_the_neurons_own():
    frame = pl.concat([explanations([1, 2, 3, 4, 5]), explanations([9], layer=1)])
    a, b = bl.random_explanations(frame, seed=3), bl.random_explanations(frame, seed=3)
    assert a.equals(b)
    layer0 = a.filter(pl.col("layer") == 0)
    assert layer0["status"].to_list() == ["ok"] * 5
    for row in layer0.iter_rows(named=True):
        assert row["donor_neuron"] != row["neuron"]
        assert row["explanation"] == f"thing {row['donor_neuron']}"
        assert row["explanation_id"] == f"0/{row['neuron']}/random/{row['donor_neuron']}"
    # layer 1 has one neuron: nobody to borrow from
    lone = a.filter(pl.col("layer") == 1).row(0, named=True)
    assert lone["status"] == "failed" and "no other neuron of layer 1" in lone["error"]
    seeds = {tuple(bl.random_explanations(frame, seed=s)["donor_neuron"].to_list()) for s in range(6)}
    assert len(seeds) > 1


def test_random_explanations_use_only_usable_donors():
    frame = explanations([1, 2, 3], failed=(2,))
    out = bl.random_explanations(frame, seed=0)
    assert set(out["donor_neuron"].drop_nulls().to_list()) <= {1, 3}
    assert out.filter(pl.col("neuron") == 2)["status"][0] == "ok"  # its own failure doesn't matter
    # with best-of-k candidates only the selected row of a neuron is a donor
    cands = pl.concat([explanations([1, 2]), explanations([1, 2]).with_columns(
        pl.col("explanation") + " (other)", pl.col("explanation_id").str.replace("/0$", "/1"))])
    cands = cands.with_columns(pl.Series("selected", [True, False, False, True]))
    out = bl.random_explanations(cands, seed=0).sort("neuron")
    assert out["explanation"].to_list() == ["thing 2 (other)", "thing 1"]


def test_with_baselines_adds_columns_and_nan_where_missing():
    scores = pl.DataFrame({"layer": [0, 0], "neuron": [1, 2], "score": [0.5, 0.1]},
                          schema={"layer": pl.Int32, "neuron": pl.Int32, "score": pl.Float64})
    out = with_baselines(scores, {"lookup": pl.DataFrame({"layer": [0], "neuron": [2], "score": [0.3]}),
                                     "random": pl.DataFrame({"layer": [0, 0], "neuron": [1, 2],
                                                             "score": [0.0, -0.2]})})
    assert out.columns == ["layer", "neuron", "score", "baseline_lookup", "baseline_random"]
    assert math.isnan(out["baseline_lookup"][0]) and out["baseline_lookup"][1] == 0.3
    assert out["baseline_random"].to_list() == [0.0, -0.2]


# ---------------------------------------------------------------------------------------------------------------
# calibration split

def test_calibration_excerpts_are_disjoint_from_every_other_split():
    top = list(range(100, 120))
    rand = [105, 200, 110, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216, 217]
    recs = records(top, rand)
    used = split_excerpts(recs)
    cal = calibration_excerpts(recs, top_n=10, random_n=12)
    assert set(cal["split"]) == {CALIBRATION_SPLIT}
    assert cal.filter(pl.col("kind") == "top")["rank"].to_list() == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
    # the random list without top windows is [200, 201, ...]; score_random takes positions 1, 4, 7, 10, 13
    assert cal.filter(pl.col("kind") == "random")["window_index"].to_list() == [
        200, 202, 203, 205, 206, 208, 209, 211, 212, 214, 215, 217]
    assert not set(cal["window_index"]) & set(used["window_index"])
    assert not set(cal["excerpt_id"]) & set(used["excerpt_id"])
    assert cal.columns == used.columns
    small = calibration_excerpts(recs)
    assert small["window_index"].to_list() == [101, 103, 105, 200, 202, 203]  # 3 top + 3 random by default


# ---------------------------------------------------------------------------------------------------------------
# best-of-k

def candidates(scores):
    """One neuron, candidates 0..len-1; a None score means that candidate failed to parse."""
    rows = []
    for c, s in enumerate(scores):
        rows.append({"layer": 0, "neuron": 5, "explanation_id": f"0/5/explanation/{c}",
                     "explanation": None if s is None else f"cand {c}", "explainer": "x",
                     "status": "failed" if s is None else "ok"})
    frame = bl.explanation_frame(rows).with_columns(pl.Series("candidate", range(len(scores)), dtype=pl.Int32))
    cal = pl.DataFrame({"explanation_id": [f"0/5/explanation/{c}" for c, s in enumerate(scores) if s is not None],
                        "score": [s for s in scores if s is not None],
                        "status": ["ok" for s in scores if s is not None]},
                       schema={"explanation_id": pl.String, "score": pl.Float64, "status": pl.String})
    return frame, cal


@pytest.mark.parametrize("scores, picked", [
    ([0.1, 0.3, 0.2], 1),
    ([0.2, 0.2, 0.1], 0),  # ties: the lowest candidate
    ([None, float("nan"), 0.05], 2),  # failed and undefined candidates never beat a defined score
    ([None, float("nan"), float("nan")], 1),  # nothing defined: the first ok candidate
    ([None, None], 0),  # nothing ok: candidate 0, still failed
])
def test_choose_keeps_the_best_calibration_score(scores, picked):
    frame, cal = candidates(scores)
    out = bk.choose(frame, cal)
    assert out["selected"].to_list() == [c == picked for c in range(len(scores))]
    assert len(contract.kept(out)) == 1
    assert out.columns[-3:] == ["calibration_score", "calibration_status", "selected"]


def test_candidate_zero_uses_the_single_explanation_seed():
    assert bk.candidate_seed(11, 0) == 11
    assert len({bk.candidate_seed(11, c) for c in range(20)}) == 20


class ScriptedBackend(LLMBackend):
    """Records chat seeds and answers with the seed, so each candidate differs; simulates a ramp 0, 1, 2, …"""

    def __init__(self):
        self.seeds = []
        self.messages = []

    @property
    def name(self):
        return "scripted"

    def value_probabilities(self, prompt):
        out = np.zeros((len(prompt.slots), 11))
        out[np.arange(len(prompt.slots)), np.arange(len(prompt.slots)) % 11] = 1.0
        return out

    def chat(self, messages, assistant_prefix, max_tokens, temperature, seed):
        assert assistant_prefix == LEAD_IN and temperature == 1.0
        self.seeds.append(seed)
        self.messages.append(messages)
        return Completion(f" tokens of kind {seed}.", 10, 5)


def test_explain_candidates_seeds_and_ids():
    recs = records(list(range(100, 120)), list(range(200, 220)))
    backend = ScriptedBackend()
    out = bk.explain_candidates(split_excerpts(recs), backend, k=3, seed=4)
    assert out["candidate"].to_list() == [0, 1, 2]
    assert out["explanation_id"].to_list() == ["0/3/explanation/0", "0/3/explanation/1", "0/3/explanation/2"]
    assert backend.seeds == [neuron_seed(bk.candidate_seed(4, c), 0, 3) for c in range(3)]
    assert out["explanation"][0] == f"tokens of kind {neuron_seed(4, 0, 3)}"


# ---------------------------------------------------------------------------------------------------------------
# token list

def test_strongest_tokens_rank_by_max_activation():
    shown = [(["a", " b", "c", " b"], [1.0, 5.0, -2.0, 6.0]), (["d", "a", "\n"], [3.0, 0.5, 3.0])]
    assert tl.strongest_tokens(shown, 3) == [" b", "d", "\n"]  # ties: first appearance; c is negative
    assert tl.strongest_tokens(shown) == [" b", "d", "\n", "a"]
    assert tl.strongest_tokens([(["x"], [0.0])]) == []


def test_template_explanation_text():
    assert tl.template_explanation([" March", "June", "\n", " June"]) == 'the tokens "March", "June", "\\n"'
    assert tl.template_explanation([]) == "no token in particular"


def test_token_list_explanations_template_and_llm():
    recs = records(list(range(100, 120)), list(range(200, 220)))
    excerpts = split_excerpts(recs)
    tpl = tl.explain_token_lists(excerpts)
    row = tpl.row(0, named=True)
    # explain excerpts are ranks 0, 4, …: windows 100, 104, …, activations [w, 0] on tokens ["a", "b"]
    assert row["strongest_tokens"] == ["a"] and row["explanation"] == 'the tokens "a"'
    assert row["explanation_id"] == "0/3/token_list" and row["explainer"] == tl.TEMPLATE_EXPLAINER
    backend = ScriptedBackend()
    llm = tl.explain_token_lists(excerpts, backend, seed=2)
    assert llm["status"].to_list() == ["ok"] and llm["explainer"][0] == "token-list:scripted"
    shown = backend.messages[0][-1]["content"]
    assert shown == 'Strongest tokens: "a"'  # nothing but the list reaches the LLM
    assert len(llm["prompt_sha256"][0]) == 64


# ---------------------------------------------------------------------------------------------------------------
# the stage functions with best-of-k candidates and baselines

def test_stages_use_only_the_selected_candidate_and_carry_baseline_columns():
    from ndx_pipeline.core.method.simulator import simulate_layer

    excerpts = split_excerpts(records(list(range(100, 120)), list(range(200, 220))))
    backend = ScriptedBackend()
    cands = bk.explain_candidates(excerpts, backend, 2, seed=4)
    assert cands["explanation_id"].to_list() == ["0/3/explanation/0", "0/3/explanation/1"]
    assert cands.drop("seconds").equals(bk.explain_candidates(excerpts, ScriptedBackend(), 2, seed=4).drop("seconds"))
    chosen = cands.with_columns(pl.Series("selected", [False, True]))
    sims = simulate_layer(chosen, excerpts, backend)
    assert set(sims["explanation_id"]) == {"0/3/explanation/1"} and len(sims) == 10
    lookup = pl.DataFrame({"layer": [0], "neuron": [3], "score": [0.25]})
    scores = score_layer(sims, chosen, baselines={"lookup": lookup})
    assert scores["explanation_id"].to_list() == ["0/3/explanation/1"]
    assert scores["baseline_lookup"].to_list() == [0.25]
    assert "baseline_lookup" not in score_layer(sims, chosen).columns


def test_all_baselines_of_a_layer_end_in_score_columns():
    from ndx_pipeline.core.method.simulator import simulate_layer

    recs = records(list(range(100, 120)), list(range(200, 220)), neuron=3)
    recs = pl.concat([recs, records(list(range(100, 120)), list(range(200, 220)), neuron=4)])
    recs = recs.with_columns(pl.col("window_index").map_elements(lambda w: [f"t{w % 3}", "b"],
                                                                  return_dtype=pl.List(pl.String)).alias("tokens"))
    excerpts = split_excerpts(recs)
    expl = explanations([3, 4])
    base = bl.baseline_explanations(expl, excerpts, seed=0)
    assert base.select("neuron", "baseline").rows() == [(3, "random"), (3, "token_list"), (4, "random"),
                                                         (4, "token_list")]
    assert base.filter(pl.col("baseline") == "random")["explanation"].to_list() == ["thing 4", "thing 3"]
    backend = ScriptedBackend()
    sims = simulate_layer(base, excerpts, backend)
    table = pl.DataFrame({"layer": [0] * 8, "neuron": [3] * 4 + [4] * 4, "token": ["t0", "t1", "t2", "b"] * 2,
                          "count": [9] * 8, "activation_sum": [900.0, 909.0, 918.0, 0.0] * 2,
                          "mean_activation": [100.0, 101.0, 102.0, 0.0] * 2})
    found = bl.baseline_scores(sims, base, table, excerpts)
    assert sorted(found) == ["lookup", "random", "token_list"]
    own = simulate_layer(expl, excerpts, backend)
    scores = score_layer(own, expl, baselines=found)
    assert [c for c in scores.columns if c.startswith("baseline_")] == [
        "baseline_random", "baseline_token_list", "baseline_lookup"]
    assert scores["baseline_lookup"].to_list() == pytest.approx(found["lookup"]["score"].to_list())
    assert all(math.isfinite(v) for v in scores["baseline_lookup"])
