"""The judge's controls on the real corpus and a real Dagster instance: planted units whose activations are recomputed
here from the stored tokens, a perfect judge that the controls find perfect, and a judge that answers at random,
whose interval the controls find to include chance."""

from __future__ import annotations

import math
import string

import dagster as dg
import numpy as np
import polars as pl
import pytest

from ndx_pipeline.core import stages
from ndx_pipeline.core.contract import BASELINE_EXPLANATIONS, DEAD, EMBEDDING_SCORES, PLANTED_TRUE, SCORES, TOP
from ndx_pipeline.core.data.planted import RULES
from ndx_pipeline.core.method.controls import SIMULATION, separation, verdict
from ndx_pipeline.core.storage import asset_path
from ndx_pipeline.core.variants import control_name, planted_settings, record_variant, variants_file
from ndx_pipeline_tests.judges import registered
from ndx_pipeline_tests.test_variants import SMALL, metadata, run


def independent_rule(name: str, tokens: list[str]) -> list[float]:
    """Each planted rule, written again from its description (not from the module's code)."""
    out = []
    for i, tok in enumerate(tokens):
        word, before = tok.strip(), tokens[i - 1] if i else None
        fires = {
            "word_if": word == "if",
            "digits": word.isdigit(),
            "punctuation": bool(word) and not any(ch not in string.punctuation for ch in word),
            "capitalised_words": word.isalpha() and len(word) > 1 and word[0].isupper() and word[1:].islower(),
            "line_start": before is not None and before.endswith("\n"),
            "name_after_def": before is not None and before.strip() == "def",
            "space_words": tok.startswith(" ") and word.isalpha(),
            "word_yield": word == "yield",
        }[name]
        out.append(1.0 if fires else 0.0)
    return out


def test_planted_units_fire_by_their_rules_on_the_real_corpus():
    extraction = stages.activation_records(stages.corpus(None), None, [3], units="planted", neurons_per_layer=-1,
                                           top_k=10, random_k=10, quantile_k=2, token_table=True)
    assert extraction.stats.batches == 0  # no forward pass of the subject model
    records = extraction.layers[3].records
    assert sorted(records["neuron"].unique()) == list(range(len(RULES)))
    assert set(records["unit_kind"]) == {"planted_rule"} and set(records["layer"]) == {3}
    for row in records.filter(pl.col("kind") != DEAD).iter_rows(named=True):
        name = RULES[row["neuron"]].name
        assert row["unit_source"] == name
        assert row["activations"] == independent_rule(name, row["tokens"]), (name, row["kind"], row["rank"])
    top = records.filter(pl.col("kind") == TOP)
    assert (top["max_activation"] == 1.0).all()  # a binary rule: every top window fires
    # the moments are the rule's rate over the corpus's tokens; the token table counts the same tokens
    table = extraction.layers[3].token_table
    for unit in range(len(RULES)):
        mine = table.filter(pl.col("neuron") == unit)
        mean = records.filter(pl.col("neuron") == unit)["neuron_mean"][0]
        assert mine["activation_sum"].sum() / mine["count"].sum() == pytest.approx(mean)
    assert 0.3 < records.filter(pl.col("neuron") == 6)["neuron_mean"][0]  # the dense rule
    assert records.filter(pl.col("neuron") == 7)["neuron_mean"][0] < 0.01  # the sparse one


def test_separation_and_its_interval():
    found = separation(np.array([0.9, 0.8, 0.7, 0.95]), np.array([0.1, 0.2, 0.0, 0.3]))
    assert found["auc"] == 1.0 and found["auc_lo"] == 1.0 and found["gap"] == pytest.approx(0.6875)
    assert verdict(found) == "tells right from wrong"
    ties = separation(np.array([0.5, 0.1, 0.3]), np.array([0.5, 0.1, 0.3]))
    assert ties["auc"] == 0.5 and ties["gap"] == 0.0 and verdict(ties) == "no better than chance"
    assert separation(np.array([np.nan]), np.array([0.1]))["units"] == 0


@pytest.fixture(scope="module")
def judged_controls(tmp_path_factory):
    """The planted control of a variant, run through every asset twice on one instance: once judged by the perfect
    judge (explainer and simulator), once by the coin."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("controls")
    storage, corpus = root / "storage", root / "corpus"
    corpus.mkdir()  # the whole bundled corpus: every rule, the sparse ones too, fills its splits
    for name, text in topics.items():
        (corpus / f"{name}.txt").write_text(text)
    instance = dg.DagsterInstance.ephemeral()
    out = {"instance": instance, "storage": storage, "runs": {}}
    with pytest.MonkeyPatch.context() as monkeypatch, registered(monkeypatch):
        for judge in ("rule-judge", "coin-judge"):
            variant = control_name(judge)
            settings = planted_settings({"explainer_llm": {"backend": "rule-judge"},
                                         "simulator_llm": {"backend": judge},
                                         "quality": {"scorers": ["embedding"]}})
            record_variant(variants_file(storage), variant, settings)
            out["runs"][judge] = run(instance, storage, corpus, variant, [1], selection={**SMALL["selection"],
                                                                                        "neurons": None})
    return out


def test_a_perfect_judge_is_found_perfect(judged_controls):
    from ndx_pipeline.reports.controls import control_lines, read_controls

    assert judged_controls["runs"]["rule-judge"].success
    storage = judged_controls["storage"]
    found = read_controls(storage, "rule-judge")
    assert found["control"] == "rule-judge.planted"
    sim = found["judges"][SIMULATION]
    assert sim["units"] == len(RULES) and sim["auc"] == 1.0 and sim["auc_lo"] == 1.0 and sim["gap"] > 0.5
    rec = found["recovery"]
    assert rec["share"] == pytest.approx(1.0) and rec["names_rule"] == rec["explained"] == len(RULES)
    # what the stored rows say: each planted unit judged with its true explanation, another's, and its own
    base = pl.read_parquet(asset_path(storage, BASELINE_EXPLANATIONS, 1, "rule-judge.planted"))
    true = base.filter(pl.col("baseline") == PLANTED_TRUE).sort("neuron")
    assert true["explanation"].to_list() == [r.explanation for r in RULES]
    assert true["explanation_id"][0] == "rule-judge.planted/1/0/planted_true"
    scores = pl.read_parquet(asset_path(storage, SCORES, 1, "rule-judge.planted"))
    assert (scores["baseline_planted_true"] > 0.99).all()
    assert "embedding" in found["judges"]  # the scorer's own separation, from its scores file
    embedding = pl.read_parquet(asset_path(storage, EMBEDDING_SCORES, 1, "rule-judge.planted"))
    assert {"baseline_planted_true", "baseline_planted_wrong"} <= set(embedding.columns)
    lines = control_lines(found)
    assert lines[1].startswith("  simulation: right vs wrong explanations AUC 1.00 [1.00, 1.00]")
    assert lines[1].endswith("tells right from wrong")
    about = metadata(judged_controls["instance"], SCORES, 1, "rule-judge.planted")
    assert about["judge_auc"] == 1.0 and about["controls"] == "rule-judge.planted"


def test_a_coin_judge_is_found_no_better_than_chance(judged_controls):
    from ndx_pipeline.reports.controls import read_controls

    result = judged_controls["runs"]["coin-judge"]
    assert result.success  # a warning, not a stop
    sim = read_controls(judged_controls["storage"], "coin-judge")["judges"][SIMULATION]
    assert sim["auc_lo"] <= 0.5 <= sim["auc_hi"] and verdict(sim) == "no better than chance"
    checks = [e.asset_check_evaluation_data for e in result.all_events
              if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION]
    judge = [x for x in checks if x.check_name == "judge_separates" and x.asset_key == dg.AssetKey(SCORES)]
    assert judge and not judge[0].passed and judge[0].severity == dg.AssetCheckSeverity.WARN
    assert "no better than chance" in judge[0].description
    assert math.isfinite(sim["auc"])


def test_random_weights_are_other_weights_on_the_same_architecture_and_tokenizer():
    import torch

    from ndx_pipeline.core.data.subject_model import load_subject_model

    trained, tok = load_subject_model(None)
    random, tok_random = load_subject_model(None, weights="random", seed=0)
    again, _ = load_subject_model(None, weights="random", seed=0)
    other, _ = load_subject_model(None, weights="random", seed=1)
    def architecture(model) -> dict:
        return {k: v for k, v in model.config.to_dict().items() if k not in ("dtype", "torch_dtype")}

    assert type(random) is type(trained) and architecture(random) == architecture(trained)
    assert tok_random.get_vocab() == tok.get_vocab()
    shapes = {k: v.shape for k, v in trained.state_dict().items()}
    assert {k: v.shape for k, v in random.state_dict().items()} == shapes
    name = next(k for k in shapes if k.endswith("mlp.down_proj.weight"))
    assert not torch.equal(trained.state_dict()[name], random.state_dict()[name])
    assert torch.equal(random.state_dict()[name], again.state_dict()[name])  # seeded
    assert not torch.equal(random.state_dict()[name], other.state_dict()[name])
    with pytest.raises(Exception, match="subject_weights='pretrained' is not known"):
        load_subject_model(None, weights="pretrained")


@pytest.mark.slow
def test_the_controls_benchmark_runs_small():
    """benchmarks/controls.py on two planted units and two neurons: its last line is the JSON the issue asks for."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "controls.py"
    done = subprocess.run([sys.executable, str(script), "--rules", "0,2", "--neurons", "2", "--scorers", "embedding",
                           "--excerpts", "2,1,1", "--scorer-excerpts", "2"], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(found) >= {"simulation_auc", "detection_auc", "fuzzing_auc", "embedding_auc", "explainer_recovery",
                          "trained_minus_random"}
    assert 0.0 <= found["simulation_auc"] <= 1.0 and len(found["simulation_auc_interval"]) == 2
    assert found["detection_auc"] is None  # not asked for
    assert set(found["trained_minus_random"]) == {"simulation", "simulation_interval", "embedding",
                                                  "embedding_interval"}
