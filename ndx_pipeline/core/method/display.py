"""How excerpts are shown to an LLM: each token on its own line, a tab, and an integer activation 0–10."""

from __future__ import annotations

import math
from collections.abc import Sequence

START, END = "<start>", "<end>"
MAX_SHOWN = 10


def display_scale(values: Sequence[float], max_activation: float) -> list[int]:
    """min(10, floor(10 · max(x, 0) / m)); all 0 when m ≤ 0. m is the max of relu over the excerpts shown."""
    if not max_activation > 0:
        return [0 for _ in values]
    return [min(MAX_SHOWN, math.floor(MAX_SHOWN * max(float(x), 0.0) / max_activation)) for x in values]


def escape_token(token: str) -> str:
    """Keep one token on one line: newlines, tabs and carriage returns are written as escapes."""
    return token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def excerpt_block(tokens: Sequence[str], shown: Sequence[int], skip_zeros: bool = False) -> str:
    """`<start>`, one `token<TAB>value` line per token (zero lines left out when skip_zeros), `<end>`."""
    lines = [START]
    for tok, v in zip(tokens, shown, strict=True):
        if skip_zeros and v == 0:
            continue
        lines.append(f"{escape_token(tok)}\t{v}")
    lines.append(END)
    return "\n".join(lines)
