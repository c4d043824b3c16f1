"""Cutting the tokenized corpus into fixed-size windows (excerpts) that never cross documents."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from ndx_pipeline.core.errors import NdxInputError


@dataclass
class Windows:
    """All windows of a corpus. Row w is window w; `ids[w, :length[w]]` are its tokens, the rest is padding."""

    window_tokens: int
    doc_ids: list[str]  # per document
    doc_index: np.ndarray  # [W] index into doc_ids
    token_start: np.ndarray  # [W] index of the window's first token in its document's encoding
    length: np.ndarray  # [W] real tokens in the window (≤ window_tokens)
    ids: np.ndarray  # [W, window_tokens] token ids, padded with 0
    char_start: np.ndarray  # [W] character span of the window in its document (-1 if the tokenizer gives none)
    char_end: np.ndarray
    total_tokens: int = field(default=0)

    def __len__(self) -> int:
        return len(self.length)


def tokenize_windows(tokenizer, doc_ids: list[str], texts: list[str], window_tokens: int = 64,
                     min_window_tokens: int = 8) -> Windows:
    """Encode each document without special tokens and cut it into consecutive windows of `window_tokens`.

    A document's last, shorter piece is kept as its own window when it has at least `min_window_tokens` tokens.
    """
    if window_tokens < 2:
        raise NdxInputError(f"window_tokens={window_tokens} is too small; use at least 2.")
    rows_doc, rows_start, rows_len, rows_cs, rows_ce, chunks = [], [], [], [], [], []
    for d, text in enumerate(texts):
        if getattr(tokenizer, "is_fast", False):  # only fast tokenizers give character offsets
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            offsets = enc["offset_mapping"]
        else:  # char_start/char_end stay -1; lineage finds the span from the token texts (resolve_excerpt_text)
            enc = tokenizer(text, add_special_tokens=False, verbose=False)
            offsets = None
        ids = enc["input_ids"]
        for start in range(0, len(ids), window_tokens):
            piece = ids[start : start + window_tokens]
            if len(piece) < window_tokens and len(piece) < min_window_tokens:
                continue
            rows_doc.append(d)
            rows_start.append(start)
            rows_len.append(len(piece))
            chunks.append(piece)
            if offsets:
                rows_cs.append(offsets[start][0])
                rows_ce.append(offsets[start + len(piece) - 1][1])
            else:
                rows_cs.append(-1)
                rows_ce.append(-1)
    if not chunks:
        raise NdxInputError(
            f"the corpus is shorter than one window: no document has {min(min_window_tokens, window_tokens)} tokens."
        )
    ids_arr = np.zeros((len(chunks), window_tokens), dtype=np.int64)
    for i, piece in enumerate(chunks):
        ids_arr[i, : len(piece)] = piece
    length = np.asarray(rows_len, dtype=np.int64)
    return Windows(
        window_tokens=window_tokens,
        doc_ids=list(doc_ids),
        doc_index=np.asarray(rows_doc, dtype=np.int64),
        token_start=np.asarray(rows_start, dtype=np.int64),
        length=length,
        ids=ids_arr,
        char_start=np.asarray(rows_cs, dtype=np.int64),
        char_end=np.asarray(rows_ce, dtype=np.int64),
        total_tokens=int(length.sum()),
    )


class TokenTexts:
    """`tokenizer.decode([id])` for each id, memoized (the contract's `tokens` column); callable from several threads
    (layers' records are built two at a time): the tokenizer is called under a lock."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._lock = threading.Lock()

    def __call__(self, ids) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            s = self._cache.get(i)
            if s is None:
                with self._lock:
                    s = self._cache[i] = self.tokenizer.decode([i])
            out.append(s)
        return out
