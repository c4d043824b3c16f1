"""Shared fixtures: the real bundled model (loaded once per session) and small real corpora."""

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
