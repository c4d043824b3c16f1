"""The simulator, JSON: for chat models without logprobs. The model gets the explanation and the excerpt's tokens
and answers `{"activations": [{"token", "activation"}, …]}`, one entry per token, through the backend's
JSON-constrained chat (`LLMBackend.chat_json`); an answer of the wrong length, with invalid values or naming other
tokens raises a `JSONSimulationError` (the excerpt is recorded as failed, and counted in `backend.stats`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

import numpy as np

from ndx_pipeline.core.llm.backend import VALUES, ExcerptSimulationError, LLMBackend, short_text
from ndx_pipeline.core.method.display import escape_token
from ndx_pipeline.core.method.explainer import FEW_SHOTS


class JSONSimulationError(ExcerptSimulationError):
    """The JSON simulator's answer is not JSON of the expected shape."""


class JSONSimulationLengthError(JSONSimulationError):
    """The JSON simulator returned a different number of entries than there are tokens."""


class JSONSimulationValueError(JSONSimulationError):
    """An activation is missing, not a number, or outside 0..10."""


class JSONSimulationTokenError(JSONSimulationError):
    """An entry names a different token than the one at its position."""


# ---------------------------------------------------------------------------------------------------------------
# The request

JSON_SYSTEM = (
    "You estimate how strongly one neuron of a language model fires on each token of a short text. You get a "
    "one-line description of what the neuron responds to, and the text as a JSON list of tokens. Answer with JSON "
    'only: {"activations": [{"token": ..., "activation": ...}, ...]} with exactly one entry per token, in the '
    "given order, each token copied exactly as given, each activation an integer from 0 (the neuron stays "
    "silent) to 10 (it fires as strongly as it ever does). Most tokens get 0; tokens that fit the description "
    "get high values."
)


def _json_user(explanation: str, tokens: Sequence[str]) -> str:
    return f"Neuron description: {explanation}\nTokens: {json.dumps(list(tokens), ensure_ascii=False)}"


def _json_answer(tokens: Sequence[str], values: Sequence[float]) -> str:
    return json.dumps({"activations": [{"token": t, "activation": int(v)} for t, v in zip(tokens, values)]},
                      ensure_ascii=False)


def json_simulation_messages(explanation: str, tokens: Sequence[str]) -> list[dict]:
    """Chat messages asking for one activation per token as JSON, with two worked examples."""
    messages = [{"role": "system", "content": JSON_SYSTEM}]
    for shot in FEW_SHOTS[:2]:
        toks, vals = shot.excerpts[0]
        messages.append({"role": "user", "content": _json_user(shot.explanation, toks)})
        messages.append({"role": "assistant", "content": _json_answer(toks, vals)})
    messages.append({"role": "user", "content": _json_user(explanation, tokens)})
    return messages


def json_simulation_schema(tokens: Sequence[str], pin=lambda token: True) -> dict:
    """JSON Schema of the expected answer: one entry per token, values 0..10; each entry's token is pinned to the
    excerpt's token where `pin(token)`, else any string (the parser still checks it against the excerpt)."""
    return {
        "type": "object",
        "properties": {
            "activations": {
                "type": "array",
                "prefixItems": [
                    {"type": "object",
                     "properties": {"token": {"const": t} if pin(t) else {"type": "string"},
                                    "activation": {"enum": list(VALUES)}},
                     "required": ["token", "activation"], "additionalProperties": False}
                    for t in tokens
                ],
                "items": False,
                "minItems": len(tokens),
                "maxItems": len(tokens),
            }
        },
        "required": ["activations"],
        "additionalProperties": False,
    }


# The answer's length limit: room for the braces plus one {"token": …, "activation": …} entry per token. Part of
# every cached request body.
MAX_TOKENS_BASE = 32
MAX_TOKENS_PER_TOKEN = 24


def json_simulation_request(backend: LLMBackend, explanation: str, tokens: Sequence[str]) -> dict:
    """The arguments of `backend.chat_json` for one excerpt; tokens the backend cannot pin are left free in the
    schema."""
    return {"messages": json_simulation_messages(explanation, tokens),
            "schema": json_simulation_schema(tokens, pin=backend.can_pin),
            "max_tokens": MAX_TOKENS_BASE + MAX_TOKENS_PER_TOKEN * len(tokens), "seed": 0}


# ---------------------------------------------------------------------------------------------------------------
# The answer


def _same_token(given: str, returned: str) -> bool:
    def norm(s: str) -> str:
        return " ".join(s.split())

    return norm(given) == norm(returned) or norm(escape_token(given)) == norm(returned)


def parse_json_simulation(text: str, tokens: Sequence[str], check_tokens=True) -> np.ndarray:
    """The activations of a JSON simulator answer, one float in [0, 10] per token; raises JSONSimulationError.

    check_tokens: True (every entry's token must be the excerpt's), False, or a predicate on the excerpt's token
    saying which to check (the grammar-safe ones, when the others could not be pinned by the schema)."""
    should_check = check_tokens if callable(check_tokens) else (lambda token: bool(check_tokens))
    body = (text or "").strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    if fenced:
        body = fenced.group(1)
    try:
        data = json.loads(body)
    except ValueError:
        raise JSONSimulationError(f"the simulator's answer is not valid JSON: {short_text(text, 80)!r}") from None
    if not isinstance(data, dict) or not isinstance(data.get("activations"), list):
        raise JSONSimulationError("the simulator's answer has no list under 'activations'")
    entries = data["activations"]
    if len(entries) != len(tokens):
        raise JSONSimulationLengthError(
            f"the simulator returned {len(entries)} activations for {len(tokens)} tokens")
    values = np.zeros(len(tokens))
    for i, (entry, token) in enumerate(zip(entries, tokens)):
        if not isinstance(entry, dict) or "activation" not in entry:
            raise JSONSimulationValueError(f"entry {i} of the simulator's answer has no activation")
        v = entry["activation"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 10:
            raise JSONSimulationValueError(f"entry {i} of the simulator's answer has activation "
                                           f"{short_text(v, 40)!r}, not a number from 0 to 10")
        if should_check(token) and "token" in entry and not _same_token(token, str(entry["token"])):
            raise JSONSimulationTokenError(
                f"entry {i} of the simulator's answer is for token {short_text(entry['token'], 40)!r}, "
                f"not {short_text(token, 40)!r}")
        values[i] = float(v)
    return values


def simulate_excerpt_json(backend: LLMBackend, explanation: str, tokens: Sequence[str]) -> np.ndarray:
    """One activation in [0, 10] per token, from a chat model answering JSON. Raises JSONSimulationError (length,
    value, token or syntax problems; counted as a failure in `backend.stats`) or the backend's request error. The
    tokens the schema could not pin are not checked against the answer."""
    completion = backend.chat_json(**json_simulation_request(backend, explanation, tokens))
    try:
        return parse_json_simulation(completion.text, tokens, backend.can_pin)
    except JSONSimulationError:
        backend.stats.add(failures=1)
        raise
