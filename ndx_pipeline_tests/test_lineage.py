"""Lineage: from a score back to the explainer prompt, the simulations, the excerpts and the documents' text.

`build_store` writes a small but complete data-contract store (corpus → … → scores, two layers of one variant) whose
corpus holds HTML (`<script>`, `&amp;`), and `copy_variant` a second variant beside the first; the viewer and interop
tests load them from here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ndx_pipeline.core.contract import (
    EXPLANATION_SCHEMA,
    LOOKUP_BASELINE,
    RECORD_SCHEMA,
    SIMULATION_SCHEMA,
    baseline_column,
    describe_ids,
    explanation_id,
    scoped,
)
from ndx_pipeline.core.data.excerpts import split_excerpts
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.llm.openai import OpenAICompatibleBackend
from ndx_pipeline.core.llm.sent_prompts import sent_prompt_sha256
from ndx_pipeline.core.method.explainer import LEAD_IN, PromptFit, explainer_messages, prompt_sha256
from ndx_pipeline.core.method.scoring import score_layer
from ndx_pipeline.core.storage import asset_path, variant_layers, write_parquet_atomic
from ndx_pipeline.core.variants import DEFAULT_VARIANT
from ndx_pipeline.reports.lineage import available_layers, format_lineage, lineage, lineage_json

V = DEFAULT_VARIANT  # the variant build_store writes

WINDOW = 8
TOP_K, RANDOM_K = 8, 10
SPLITS = dict(explain_n=2, score_top_n=2, score_random_n=2)

SENTENCES = [
    "Use <script>alert(1)</script> only in tests & never in pages.",
    "The entity &amp; stands for an ampersand; &lt;b&gt; is not bold.",
    "def load(path):\n    return open(path).read()",
    "If the value is missing, return None and log it.",
    "A <div class=\"x\"> holds text & the </div> closes it.",
    "An <img src=x onerror=\"window.__pwned=1\"> tag must stay text.",
    "for item in items:\n    total += item\nreturn total",
    "Plain prose without markup keeps the neuron quiet today.",
]

# What each synthetic neuron fires on (layer → neuron → token predicate and strength).
NEURONS = {
    0: {3: (lambda t: "<" in t or "script" in t, 2.5), 7: (lambda t: t.strip() == "return", 3.0)},
    1: {5: (lambda t: "&" in t, 1.5), 9: (lambda t: t.strip() in {"(", ")"}, 2.0)},
}
EXPLANATIONS = {
    (0, 3): 'HTML tags such as <script> & "quoted" markup',
    (0, 7): "the keyword return in code",
    (1, 5): None,  # this explanation failed: the neuron has a NaN score and no simulations
    (1, 9): "parentheses",
}


# The store's explanations come from an OpenAI-compatible server: their prompt hash is of the messages it was sent.
FIXTURE_EXPLAINER = "openai-compatible:fixture-model"


def sent_sha(messages: list[dict]) -> str:
    """The prompt hash an OpenAI-compatible explainer stores for `messages` (as its backend sends them)."""
    backend = OpenAICompatibleBackend("http://127.0.0.1:9/v1", "fixture-model", context_tokens=4096)
    try:
        return sent_prompt_sha256(backend.sent_prompt(messages, LEAD_IN))
    finally:
        backend.close()


def tokenize(text: str) -> list[tuple[str, int, int]]:
    """Whitespace-prefixed HTML tags, words and single punctuation marks, with their character spans.

    A whole tag is one token, so a viewer that forgot to escape would turn a token into an element."""
    return [(m.group(0), m.start(), m.end()) for m in re.finditer(r"\s*(?:<[^<>]*>|\w+|[^\w\s])", text)]


def _corpus() -> pl.DataFrame:
    docs = []
    for i in range(6):
        text = " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(4))
        docs.append({"doc_id": f"doc-{i}", "source": f"fixtures/doc-{i}.txt", "text": text})
    return pl.DataFrame(docs, schema={"doc_id": pl.String, "source": pl.String, "text": pl.String})


def _windows(corpus: pl.DataFrame) -> list[dict]:
    windows = []
    for doc_id, text in zip(corpus["doc_id"], corpus["text"]):
        toks = tokenize(text)
        for start in range(0, len(toks) - WINDOW + 1, WINDOW):
            piece = toks[start:start + WINDOW]
            windows.append({"doc_id": doc_id, "token_start": start, "tokens": [t for t, _, _ in piece],
                            "char_start": piece[0][1], "char_end": piece[-1][2]})
    return windows


def _records(layer: int, windows: list[dict]) -> pl.DataFrame:
    rows = []
    sample = np.random.default_rng(layer).permutation(len(windows))[:RANDOM_K]
    for neuron, (fires, strength) in NEURONS[layer].items():
        rng = np.random.default_rng([layer, neuron])
        acts = [np.asarray([strength * (0.6 + 0.4 * rng.random()) if fires(t) else rng.normal(0, 0.03)
                            for t in w["tokens"]], dtype=np.float32) for w in windows]
        flat = np.concatenate(acts).astype(np.float64)
        stats = dict(neuron_mean=float(flat.mean()), neuron_variance=float(flat.var()),
                     neuron_max=float(flat.max()), neuron_token_count=int(flat.size))
        order = sorted(range(len(windows)), key=lambda w: (-float(acts[w].max()), w))[:TOP_K]
        for kind, picks in (("top", order), ("random", [int(w) for w in sample])):
            for rank, w in enumerate(picks):
                rows.append({"layer": layer, "neuron": neuron, "kind": kind, "rank": rank, **windows[w],
                             "activations": acts[w].tolist(), "window_index": w,
                             "max_activation": float(acts[w].max()), **stats,
                             **{k: v[0] for k, v in describe_ids([neuron]).items()}})
    return pl.DataFrame(rows, schema=RECORD_SCHEMA)


def build_store(root: Path, baseline: bool = True, variant: str = V) -> Path:
    """A complete store under `root/storage`: corpus, and layers 0 and 1 of `variant` through scores (ids prefixed
    with the variant, as the stages write them)."""
    storage = Path(root) / "storage"
    corpus = _corpus()
    write_parquet_atomic(corpus, asset_path(storage, "corpus"))
    windows = _windows(corpus)
    for layer in NEURONS:
        records = _records(layer, windows)
        write_parquet_atomic(records, asset_path(storage, "activation_records", layer, variant))
        excerpts = scoped(split_excerpts(records, **SPLITS), "excerpt_id", variant)
        write_parquet_atomic(excerpts, asset_path(storage, "top_excerpts", layer, variant))
        expl_rows, sim_rows = [], []
        for neuron in NEURONS[layer]:
            mine = excerpts.filter(pl.col("neuron") == neuron)
            explain = mine.filter(pl.col("split") == "explain").sort("rank")
            messages = explainer_messages(list(zip(explain["tokens"].to_list(), explain["activations"].to_list())))
            text = EXPLANATIONS[(layer, neuron)]
            eid = f"{variant}/{explanation_id(layer, neuron)}"
            expl_rows.append({"layer": layer, "neuron": neuron, "explanation_id": eid, "explanation": text,
                              "explainer": FIXTURE_EXPLAINER, "prompt_sha256": sent_sha(messages),
                              "status": "ok" if text else "failed",
                              "error": None if text else "the explainer returned no text after the lead-in",
                              "prompt_tokens": 100, "completion_tokens": 8, "seconds": 0.1})
            if not text:
                continue
            peak = float(mine["max_activation"].max())
            for ex in mine.filter(pl.col("split") != "explain").iter_rows(named=True):
                sim = [min(10.0, max(0.0, 10 * a / peak)) * 0.8 + 0.3 * (i % 3) for i, a in enumerate(ex["activations"])]
                sim_rows.append({"layer": layer, "neuron": neuron, "explanation_id": eid,
                                 "excerpt_id": ex["excerpt_id"], "split": ex["split"], "tokens": ex["tokens"],
                                 "true_activations": ex["activations"], "simulated_activations": sim,
                                 "simulator": "fixture-simulator"})
        expl = pl.DataFrame(expl_rows, schema=EXPLANATION_SCHEMA)
        sims = pl.DataFrame(sim_rows, schema=SIMULATION_SCHEMA)
        scores = score_layer(sims, expl)
        if baseline:
            scores = scores.with_columns((pl.col("score") * 0.5).alias(baseline_column(LOOKUP_BASELINE)))
        write_parquet_atomic(expl, asset_path(storage, "explanations", layer, variant))
        write_parquet_atomic(sims, asset_path(storage, "simulations", layer, variant))
        write_parquet_atomic(scores, asset_path(storage, "scores", layer, variant))
    return storage


def copy_variant(storage: Path, source: str, target: str, layers=None, score_shift: float = 0.0) -> None:
    """Variant `target` beside `source`: a copy of its files (of `layers`, default all), ids re-prefixed with the new
    variant's name and every score moved by `score_shift` (so the two variants' scores differ by exactly that)."""
    for folder in sorted(p for p in Path(storage).iterdir() if (p / source).is_dir()):
        asset = folder.name
        for layer in variant_layers(storage, asset, source):
            if layers is not None and layer not in layers:
                continue
            frame = pl.read_parquet(asset_path(storage, asset, layer, source))
            frame = frame.with_columns(pl.col(c).str.replace(f"^{re.escape(source)}/", f"{target}/")
                                       for c in ("excerpt_id", "explanation_id") if c in frame.columns)
            if asset == "scores":
                frame = frame.with_columns(pl.col("score") + score_shift)
            write_parquet_atomic(frame, asset_path(storage, asset, layer, target))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("lineage"))


def test_lineage_resolves_every_link_to_document_text(store):
    result = lineage(store, 0, 3, variant=V)
    assert result["variant"] == V and result["layer"] == 0 and result["neuron"] == 3
    assert result["checks"]["all_links_resolved"], result["checks"]
    scores = pl.read_parquet(asset_path(store, "scores", 0, V)).filter(pl.col("neuron") == 3).row(0, named=True)
    assert result["score"]["score"] == pytest.approx(scores["score"])
    assert result["score"]["explanation_id"] == f"{V}/0/3/explanation/0"
    # the files of the variant, and the corpus every variant shares
    assert result["files"]["scores"] == str(store / "scores" / V / "0.parquet")
    assert result["files"]["corpus"] == str(store / "corpus.parquet")

    # The explanation, its explainer, and the exact prompt as sent: rebuilt, hashed, equal to the stored hash.
    e = result["explanation"]
    assert e["explanation"] == EXPLANATIONS[(0, 3)] and e["explainer"] == FIXTURE_EXPLAINER
    assert e["prompt_verified"] and e["prompt_sha256"] == e["rebuilt_prompt_sha256"] and e["prompt_note"] is None
    assert sent_prompt_sha256(e["prompt"]["sent"]) == e["prompt_sha256"]
    sent = e["prompt"]["sent"]["messages"]  # the system message as rewritten for a chat API, no prefill
    assert sent[0]["content"].endswith("Write nothing else.") and sent[-1]["role"] == "user"
    assert prompt_sha256(e["prompt"]["messages"], e["prompt"]["assistant_prefix"]) != e["prompt_sha256"]
    assert e["prompt"]["messages"][-1]["role"] == "user" and e["prompt"]["excerpts_shown"] == SPLITS["explain_n"]

    # Every scored excerpt, with true and simulated activations and its document.
    sims = pl.read_parquet(asset_path(store, "simulations", 0, V)).filter(pl.col("neuron") == 3)
    assert sorted(x["excerpt_id"] for x in result["excerpts"]) == sorted(sims["excerpt_id"].to_list())
    assert all(x["excerpt_id"].startswith(f"{V}/0/3/") for x in result["excerpts"])
    corpus = dict(zip(*pl.read_parquet(asset_path(store, "corpus")).select("doc_id", "text").to_dict().values()))
    for x in result["excerpts"]:
        assert x["split"] in ("score_top", "score_random")
        assert len(x["true_activations"]) == len(x["simulated_activations"]) == len(x["tokens"])
        assert x["text"] == corpus[x["doc_id"]][x["char_start"]:x["char_end"]] == "".join(x["tokens"])
        assert x["source"] == f"fixtures/{x['doc_id']}.txt" and x["text_matches_tokens"] is True
    assert any(re.search(r"<\w+", x["text"]) for x in result["excerpts"] + e["excerpts"])

    # Strict JSON with the top-level excerpts list the CLI promises.
    doc = json.loads(lineage_json(result))
    assert {"doc_id", "char_start", "char_end", "text"} <= set(doc["excerpts"][0])


def test_runs_are_carried_and_completed(store):
    runs = {"activation_records": {"run_id": "r-1", "code_version": "c1", "data_version": "d1",
                                   "subject_model": "bundled:SmolLM2-135M-Instruct"},
            "scores": "r-2"}
    result = lineage(store, 0, 7, runs=runs, variant=V)
    assert result["runs"]["activation_records"] == {"run_id": "r-1", "code_version": "c1", "data_version": "d1",
                                                    "subject_model": "bundled:SmolLM2-135M-Instruct",
                                                    "partition": f"0|{V}"}
    assert result["runs"]["scores"]["run_id"] == "r-2" and result["runs"]["scores"]["partition"] == f"0|{V}"
    assert result["runs"]["corpus"] is None
    assert result["subject_model"] == "bundled:SmolLM2-135M-Instruct"
    text = format_lineage(result)
    assert "every link resolves" in text and "r-1" in text and f"{V}/0/7/explanation/0" in text
    assert text.startswith(f"layer 0 neuron 7  (unit id 7; variant {V}; subject model: ")
    assert f"partition 0|{V}" in text


def test_failed_explanation_is_reported_not_hidden(store):
    result = lineage(store, 1, 5, variant=V)
    assert result["score"]["score"] is None and result["score"]["status"].startswith("failed")
    assert result["excerpts"] == [] and not result["checks"]["all_links_resolved"]
    json.loads(lineage_json(result))  # NaN became null


def test_tampered_prompt_hash_and_text_are_caught(store, tmp_path):
    copy = tmp_path / "storage"
    shutil.copytree(store, copy)
    path = asset_path(copy, "explanations", 0, V)
    expl = pl.read_parquet(path).with_columns(pl.lit("0" * 64).alias("prompt_sha256"))
    write_parquet_atomic(expl, path)
    corpus_path = asset_path(copy, "corpus")
    corpus = pl.read_parquet(corpus_path).with_columns(pl.col("text").str.replace_all("return", "RETURN"))
    write_parquet_atomic(corpus, corpus_path)
    result = lineage(copy, 0, 7, variant=V)
    assert not result["explanation"]["prompt_verified"]
    assert result["checks"]["text_mismatches"] and not result["checks"]["all_links_resolved"]


def _with_explanation(store, tmp_path, **changes) -> Path:
    """A copy of the store whose explanation of layer 0 neuron 3 has `changes`."""
    copy = tmp_path / "storage"
    shutil.copytree(store, copy)
    path = asset_path(copy, "explanations", 0, V)
    expl = pl.read_parquet(path)
    mine = pl.col("neuron") == 3
    expl = expl.with_columns([pl.when(mine).then(pl.lit(v, dtype=expl.schema[k])).otherwise(pl.col(k)).alias(k)
                              for k, v in changes.items()])
    write_parquet_atomic(expl, path)
    return copy


def _explain_excerpts(store) -> list:
    excerpts = pl.read_parquet(asset_path(store, "top_excerpts", 0, V))
    explain = excerpts.filter((pl.col("neuron") == 3) & (pl.col("split") == "explain")).sort("rank")
    return list(zip(explain["tokens"].to_list(), explain["activations"].to_list()))


def test_local_explainer_prompt_is_rebuilt_as_sent_with_its_fit(store, tmp_path):
    """An in-process explainer's row: the chat-template text with the prefill, fitted (one excerpt, no repeat) and
    without the digest, as the row says; lineage rebuilds exactly that and verifies it."""
    from ndx_pipeline.core.llm.local import LocalTransformersBackend

    backend = LocalTransformersBackend()
    shown = _explain_excerpts(store)
    fit = PromptFit(1, len(shown), repeat=False)
    sent = backend.sent_prompt(fit.messages(shown, digest=False), LEAD_IN)
    copy = _with_explanation(store, tmp_path, explainer=backend.name, prompt_sha256=sent_prompt_sha256(sent),
                             excerpts_shown=1, prompt_fitted=fit.describe(shown, 2048))
    e = lineage(copy, 0, 3, variant=V)["explanation"]
    assert e["prompt_verified"], e["prompt_note"]
    assert e["prompt"]["sent"] == sent and e["prompt"]["sent"]["text"].endswith(LEAD_IN)
    assert e["prompt"]["digest"] is False and e["prompt"]["excerpts_shown"] == 1
    assert "excerpt 2 of 2 left out" in e["prompt"]["prompt_fitted"]


def test_prompt_that_cannot_be_rebuilt_is_not_claimed_verified(store, tmp_path):
    shown = _explain_excerpts(store)
    copy = _with_explanation(store, tmp_path, explainer="someones-backend:m",
                             prompt_sha256=prompt_sha256(explainer_messages(shown)))
    result = lineage(copy, 0, 3, variant=V)
    e = result["explanation"]
    assert not e["prompt_verified"] and e["rebuilt_prompt_sha256"] is None
    assert "not a known backend" in e["prompt_note"] and not result["checks"]["all_links_resolved"]
    assert "cannot be checked" in format_lineage(result)


def test_template_hash_of_an_openai_row_is_not_taken_for_the_sent_prompt(store, tmp_path):
    """Rows written before the fix hashed the template, not what the server was sent: shown, not verified."""
    shown = _explain_excerpts(store)
    copy = _with_explanation(store, tmp_path, prompt_sha256=prompt_sha256(explainer_messages(shown)))
    e = lineage(copy, 0, 3, variant=V)["explanation"]
    assert not e["prompt_verified"] and "template" in e["prompt_note"]
    assert "DOES NOT match" in format_lineage(lineage(copy, 0, 3, variant=V))


def test_missing_variant_layer_or_neuron_is_a_clear_error(store, tmp_path):
    with pytest.raises(NdxInputError, match=rf"layer 4 of variant {V} has no scores .*scored layers: 0, 1"):
        lineage(store, 4, 3, variant=V)
    with pytest.raises(NdxInputError,
                       match=rf"layer 0 of variant {V} has no score for neuron 99; scored neurons: 3, 7"):
        lineage(store, 0, 99, variant=V)
    with pytest.raises(NdxInputError, match=rf"variant other has no scores .*variants with scores: {V}\)"):
        lineage(store, 0, 3, variant="other")
    with pytest.raises(NdxInputError, match="does not exist"):
        lineage(tmp_path / "nowhere", 0, 3, variant=V)


def test_each_variant_has_its_own_lineage(store, tmp_path):
    """Two variants holding the same layer and unit: each lineage reads its own variant's files and ids only."""
    copy = tmp_path / "storage"
    shutil.copytree(store, copy)
    copy_variant(copy, V, "other", layers=[0], score_shift=-0.25)
    assert available_layers(copy, variant=V) == [0, 1] and available_layers(copy, variant="other") == [0]
    assert available_layers(copy, "activation_records", variant="other") == [0]
    mine, theirs = lineage(copy, 0, 3, variant=V), lineage(copy, 0, 3, variant="other")
    assert theirs["variant"] == "other" and theirs["checks"]["all_links_resolved"]
    assert theirs["score"]["score"] == pytest.approx(mine["score"]["score"] - 0.25)
    assert theirs["explanation"]["explanation_id"] == "other/0/3/explanation/0"
    assert all(x["excerpt_id"].startswith("other/") for x in theirs["excerpts"])
    assert all(f"{os.sep}other{os.sep}" in path for stage, path in theirs["files"].items() if stage != "corpus")
    with pytest.raises(NdxInputError, match=r"layer 1 of variant other has no scores .*scored layers: 0\)"):
        lineage(copy, 1, 9, variant="other")


def test_span_is_found_from_tokens_when_the_tokenizer_gave_none(store, tmp_path):
    copy = tmp_path / "storage"
    shutil.copytree(store, copy)
    path = asset_path(copy, "top_excerpts", 0, V)
    write_parquet_atomic(pl.read_parquet(path).with_columns(pl.lit(-1, pl.Int32).alias("char_start"),
                                                            pl.lit(-1, pl.Int32).alias("char_end")), path)
    result = lineage(copy, 0, 3, variant=V)
    assert result["checks"]["all_links_resolved"]
    assert {x["span_from"] for x in result["excerpts"]} == {"token_search"}


@pytest.mark.slow
def test_lineage_of_every_neuron_of_a_real_run(tmp_path):
    """The default pipeline on the bundled model: every neuron's lineage resolves to document text."""
    home = tmp_path / ".dagster_home"
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    env.pop("NDX_SUBJECT_MODEL", None)
    run = subprocess.run([sys.executable, "-m", "ndx_pipeline.cli", "run", "--layers", "0",
                          "--neurons-per-layer", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    storage = home / "storage"
    neurons = pl.read_parquet(asset_path(storage, "scores", 0, V))["neuron"].to_list()
    assert neurons
    for n in neurons:
        result = lineage(storage, 0, n, variant=V)
        assert result["checks"]["prompt_sha256_matches"]
        assert result["excerpts"], f"neuron {n} has no scored excerpts"
        for x in result["excerpts"]:
            assert x["document_found"] and x["text"] is not None and x["text_matches_tokens"] is not False
        assert result["checks"]["all_links_resolved"] or result["checks"]["texts_unverifiable"]
        # the default embedding scorer: its score and the held-out excerpts it judged, each back to its document
        embedding = result["scorers"]["embedding"]
        assert embedding["score"]["metric"] == "roc_auc" and len(embedding["judged"]) == 10
        assert {x["split"] for x in embedding["judged"]} == {"activating", "non_activating"}
        assert result["checks"]["scorer_excerpts_resolved"]
    assert "Scorers beside simulation" in run.stdout and "embedding" in run.stdout
    # the default run's controls: printed at the end, and a planted unit's score traced like any other
    assert "Controls of neurons (variant neurons.planted" in run.stdout
    assert "  simulation: right vs wrong explanations AUC " in run.stdout
    planted = pl.read_parquet(asset_path(storage, "scores", 0, "neurons.planted"))
    assert {"baseline_planted_true", "baseline_planted_wrong"} <= set(planted.columns) and len(planted) >= 6
    result = lineage(storage, 0, int(planted["neuron"][0]), variant="neurons.planted")
    assert result["excerpts"] and all(x["document_found"] for x in result["excerpts"])
    # the run published in Neuronpedia's shape: rows valid, scores traced to this run, an exact round trip
    from ndx_pipeline_tests.test_neuronpedia import check_export

    export = subprocess.run([sys.executable, "-m", "ndx_pipeline.cli", "export", "--format", "neuronpedia",
                             str(tmp_path / "np"), "--model-id", "smollm2-135m"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    rows = check_export(tmp_path / "np" / "smollm2-135m", storage, V)
    features = rows[f"0-{V}"]["features"]
    assert len(features) == len(neurons) and all(len(f["pos_str"]) == 10 and len(f["neg_str"]) == 10 for f in features)
    assert all(f["hookName"] == "blocks.0.mlp.hook_post" for f in features)
    scores = rows[f"0-{V}"]["scores"]
    types = {s["explanationScoreTypeName"] for s in scores}
    assert {"ndx_simulation", "ndx_calibrated_ev", "ndx_embedding", "ndx_baseline_random"} <= types, types
    simulation = next(s for s in scores if s["explanationScoreTypeName"] == "ndx_simulation")
    lineage_of = simulation["jsonDetails"]["lineage"]
    assert lineage_of["scores"]["run_id"] and lineage_of["scores"]["data_version"]
    assert 0 <= simulation["jsonDetails"]["judge_control"]["auc"] <= 1  # the planted control's verdict on the judge


def test_real_tokenizer_windows_resolve_to_their_document_text(subject, small_docs, small_windows):
    """With the bundled model's tokenizer, every window's char span cuts out exactly its decoded tokens."""
    from ndx_pipeline.core.data.windows import TokenTexts
    from ndx_pipeline.reports.lineage import Documents, resolve_excerpt_text

    _, tokenizer = subject
    docs = Documents("unused", frame=small_docs)
    texts = TokenTexts(tokenizer)
    w = small_windows
    verified = 0
    for i in range(len(w)):
        tokens = texts(w.ids[i, : w.length[i]])
        doc_id = w.doc_ids[w.doc_index[i]]
        found = resolve_excerpt_text(docs, doc_id, int(w.char_start[i]), int(w.char_end[i]), tokens)
        assert found["document_found"] and found["text_matches_tokens"] is not False, (doc_id, i)
        verified += found["text_matches_tokens"] is True
    assert verified >= 0.9 * len(w)
