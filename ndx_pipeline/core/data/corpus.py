"""Reading the text corpus: a folder of .txt/.md files, a .jsonl with a `text` field, a .parquet with a `text`
column, or (default) CPython's own reference documentation, `pydoc_data.topics`.

Every document gets a stable `doc_id` derived from where it came from (never from its position in a run), and a
`source` saying where a reader can find it.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from ndx_pipeline.core.errors import NdxInputError

TEXT_SUFFIXES = (".txt", ".md")
DEFAULT_CORPUS = "pydoc_data.topics"


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NdxInputError(f"corpus file {where} is not UTF-8 text (byte {exc.start} cannot be decoded).") from None


def _default_corpus() -> list[dict]:
    from pydoc_data.topics import topics

    return [
        {"doc_id": f"pydoc:{name}", "source": f"pydoc_data.topics[{name!r}]", "text": text}
        for name, text in sorted(topics.items())
    ]


def _folder(root: Path) -> list[dict]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise NdxInputError(f"corpus folder {root} holds no .txt or .md files.")
    docs = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        docs.append({"doc_id": rel, "source": str(p), "text": _decode(p.read_bytes(), str(p))})
    return docs


def _jsonl(path: Path) -> list[dict]:
    text = _decode(path.read_bytes(), str(path))
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise NdxInputError(f"corpus file {path} line {lineno} is not valid JSON ({exc.msg}).") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise NdxInputError(f"corpus file {path} line {lineno} has no string field 'text'.")
        doc_id = record.get("doc_id", record.get("id"))
        doc_id = str(doc_id) if doc_id is not None else f"{path.name}:{lineno}"
        docs.append({"doc_id": doc_id, "source": f"{path}:{lineno}", "text": record["text"]})
    return docs


def _parquet(path: Path) -> list[dict]:
    try:
        frame = pl.read_parquet(path)
    except Exception as exc:  # polars raises several types for a file that is not Parquet
        raise NdxInputError(f"corpus file {path} is not a readable Parquet file ({type(exc).__name__}).") from None
    if "text" not in frame.columns or frame.schema["text"] != pl.String:
        raise NdxInputError(f"corpus file {path} has no string column 'text' (columns: {frame.columns}).")
    id_col = next((c for c in ("doc_id", "id") if c in frame.columns), None)
    docs = []
    for row, record in enumerate(frame.iter_rows(named=True)):
        if record["text"] is None:
            continue
        doc_id = str(record[id_col]) if id_col and record[id_col] is not None else f"{path.name}:{row}"
        docs.append({"doc_id": doc_id, "source": f"{path}#row={row}", "text": record["text"]})
    return docs


def read_corpus(path: str | None = None) -> pl.DataFrame:
    """Return the corpus as a frame with columns `doc_id`, `source`, `text` (one row per non-empty document)."""
    if not path or path == DEFAULT_CORPUS:
        docs = _default_corpus()
        where = DEFAULT_CORPUS
    else:
        p = Path(path).expanduser()
        where = str(p)
        if not p.exists():
            raise NdxInputError(f"corpus path {p} does not exist.")
        if p.is_dir():
            docs = _folder(p)
        elif p.suffix.lower() == ".jsonl":
            docs = _jsonl(p)
        elif p.suffix.lower() == ".parquet":
            docs = _parquet(p)
        elif p.suffix.lower() in TEXT_SUFFIXES:
            docs = [{"doc_id": p.name, "source": str(p), "text": _decode(p.read_bytes(), str(p))}]
        else:
            raise NdxInputError(
                f"corpus path {p} is not a folder, .txt, .md, .jsonl or .parquet file."
            )
    docs = [d for d in docs if d["text"].strip()]
    if not docs:
        raise NdxInputError(f"corpus {where} is empty: no document has any text.")
    ids = [d["doc_id"] for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise NdxInputError(f"corpus {where} has two documents with doc_id {dup!r}; ids must be unique.")
    return pl.DataFrame(docs, schema={"doc_id": pl.String, "source": pl.String, "text": pl.String})
