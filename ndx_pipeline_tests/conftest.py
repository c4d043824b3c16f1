"""Shared fixtures: the real bundled model (loaded once per session), small real corpora, and a real stored run of
two variants (`two_variants`)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def subject():
    """The bundled SmolLM2-135M-Instruct as subject model: (model, tokenizer)."""
    from ndx_pipeline.core.data.subject_model import load_subject_model

    return load_subject_model(None)


@pytest.fixture(scope="session")
def small_docs():
    """A few real documents of the default corpus (CPython's reference text)."""
    from ndx_pipeline.core.data.corpus import read_corpus

    frame = read_corpus(None)
    keep = ["pydoc:assert", "pydoc:break", "pydoc:continue", "pydoc:del", "pydoc:pass", "pydoc:global",
            "pydoc:return", "pydoc:if", "pydoc:while", "pydoc:import"]
    return frame.filter(frame["doc_id"].is_in(keep))


@pytest.fixture(scope="session")
def small_windows(subject, small_docs):
    from ndx_pipeline.core.data.windows import tokenize_windows

    _, tok = subject
    return tokenize_windows(tok, small_docs["doc_id"].to_list(), small_docs["text"].to_list(), window_tokens=64)


@pytest.fixture(scope="session")
def two_variants(tmp_path_factory):
    """A real stored run, shared by the tests that read one: layers 0-2 of the default variant `neurons` on the bundled
    model through every asset (explanations, simulations, scores with the lookup and random baselines, the embedding
    scorer, the viewer) on a small real corpus, then a second variant `sim-f32` that differs only in its simulator's
    precision (same units, same extraction), with the subject model's extraction counted. Its tests (test_variants)
    add variants to it; a test that must not change it works on a copy."""
    import dagster as dg

    from ndx_pipeline.core.data import forward_pass
    from ndx_pipeline.core.variants import record_variant, variants_file
    from ndx_pipeline_tests.test_variants import digests, run, small_corpus

    root = tmp_path_factory.mktemp("variants")
    storage, corpus = root / "storage", small_corpus(root / "corpus")
    instance = dg.DagsterInstance.ephemeral()
    first = run(instance, storage, corpus, "neurons", [0, 2])
    assert first.success
    before = digests(storage, "neurons")
    record_variant(variants_file(storage), "sim-f32", {"simulator_llm": {"dtype": "float32"}})
    calls, real = [], forward_pass.extract
    forward_pass.extract = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        second = run(instance, storage, corpus, "sim-f32", [0, 2])
    finally:
        forward_pass.extract = real
    assert second.success
    return {"instance": instance, "storage": storage, "corpus": corpus, "before": before, "extract_calls": calls}
