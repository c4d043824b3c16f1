"""Corpus reading: every supported source, stable ids, and one clear error per kind of bad input."""

import json

import polars as pl
import pytest

from ndx_pipeline.core.data.corpus import read_corpus
from ndx_pipeline.core.errors import NdxInputError


def test_default_corpus_is_pydoc_topics():
    frame = read_corpus(None)
    from pydoc_data.topics import topics

    assert frame.columns == ["doc_id", "source", "text"]
    assert len(frame) == len([t for t in topics.values() if t.strip()])
    row = frame.filter(pl.col("doc_id") == "pydoc:assert").row(0, named=True)
    assert row["text"] == topics["assert"]


def test_folder_of_text_and_markdown(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub" / "b.md").write_text("# beta")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    frame = read_corpus(str(tmp_path))
    assert frame["doc_id"].to_list() == ["a.txt", "sub/b.md"]
    assert frame["text"].to_list() == ["alpha text", "# beta"]
    # ids do not depend on what else is in the folder
    (tmp_path / "0.txt").write_text("zero")
    assert read_corpus(str(tmp_path)).filter(pl.col("doc_id") == "sub/b.md")["text"][0] == "# beta"


def test_jsonl_and_parquet(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"id": "x7", "text": "two"}) + "\n")
    frame = read_corpus(str(p))
    assert frame["doc_id"].to_list() == ["c.jsonl:1", "x7"]
    q = tmp_path / "c.parquet"
    pl.DataFrame({"text": ["uno", "dos"]}).write_parquet(q)
    assert read_corpus(str(q))["doc_id"].to_list() == ["c.parquet:0", "c.parquet:1"]


@pytest.mark.parametrize("setup, message", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no .txt or .md files"),
    (lambda d: (d / "blank.txt").write_text("  \n") and d / "blank.txt", "is empty"),
    (lambda d: (d / "latin.txt").write_bytes("caf\xe9".encode("latin-1")) and d / "latin.txt", "is not UTF-8"),
    (lambda d: (d / "bad.jsonl").write_text('{"text": 1}\n') and d / "bad.jsonl", "no string field 'text'"),
    (lambda d: (d / "broken.jsonl").write_text('{"text": \n') and d / "broken.jsonl", "line 1 is not valid JSON"),
    (lambda d: pl.DataFrame({"body": ["x"]}).write_parquet(d / "p.parquet") or d / "p.parquet",
     "no string column 'text'"),
    (lambda d: (d / "data.csv").write_text("text\nx\n") and d / "data.csv", "is not a folder"),
])
def test_bad_corpus_input_names_the_input(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(NdxInputError, match=message) as err:
        read_corpus(str(path))
    assert str(path) in str(err.value)
