"""A chat as each kind of backend sends it, made from the template messages without building a backend: what the
backends send (`local` renders the model's chat template; `openai` asks for the lead-in in the system message), the
hash rows store of it (`sent_prompt_sha256`), and the rebuild lineage checks a stored explanation with
(`rebuild_sent_prompt`, by the kind its `explainer` name starts with).

Pure text, and the local model's tokenizer alone (transformers is imported when a tokenizer is first loaded): the
reports import this module, and never an LLM backend.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from ndx_pipeline.core.models import loadable, resolve_model

LOCAL_KIND = "local"  # a backend's `name` is "<kind>:<model>"
OPENAI_KIND = "openai-compatible"
MODEL_FILES_LOCK = threading.Lock()  # one load of a model's files at a time: its tokenizer here, its weights in `local`

LEAD_IN_INSTRUCTION = (
    'Write your answer as a single sentence that begins with the words "{prefix}" and ends with a short phrase '
    "naming the pattern. Write nothing else."
)


def sent_prompt_sha256(sent: Mapping[str, Any]) -> str:
    """The hash of a prompt as a backend sends it (`LLMBackend.sent_prompt`): what rows store as prompt_sha256."""
    payload = json.dumps(sent, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@lru_cache(maxsize=8)
def _tokenizer(model_name: str):
    from transformers import AutoTokenizer

    path, kwargs = loadable(resolve_model(model_name))
    return AutoTokenizer.from_pretrained(path, **kwargs)


def load_tokenizer(model_name: str):
    """The model's tokenizer alone (enough to render and count prompts, e.g. for lineage, without the weights)."""
    with MODEL_FILES_LOCK:
        return _tokenizer(model_name)


def chat_prompt_text(tokenizer, messages: list[dict], assistant_prefix: str) -> str:
    """The text the model reads for a chat: its chat template (a plain transcript for a base model), the
    generation prompt, then the prefilled start of the answer."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # a base model: a plain transcript
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
    return text + assistant_prefix


def sent_chat_prompt(model_name: str, messages: list[dict], assistant_prefix: str) -> dict:
    """What the in-process backend for `model_name` puts before the model for a chat (see
    `LLMBackend.sent_prompt`); needs only the tokenizer."""
    return {"text": chat_prompt_text(load_tokenizer(resolve_model(model_name).name), messages, assistant_prefix)}


def chat_messages_for_api(messages: list[dict], assistant_prefix: str) -> list[dict]:
    """The messages with an instruction to start the answer with `assistant_prefix` (which a chat API cannot
    prefill), as the OpenAI-compatible backend sends them."""
    messages = [dict(m) for m in messages]
    if not assistant_prefix:
        return messages
    instruction = LEAD_IN_INSTRUCTION.format(prefix=assistant_prefix.strip())
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{instruction}"
    else:
        messages.insert(0, {"role": "system", "content": instruction})
    return messages


# How each kind of backend sends a chat, by the kind its `name` starts with ("local:…", "openai-compatible:…").
SENT_PROMPTS: dict[str, Callable[[str, list[dict], str], dict]] = {
    LOCAL_KIND: sent_chat_prompt,
    OPENAI_KIND: lambda model, messages, prefix: {"messages": chat_messages_for_api(messages, prefix)},
}


def rebuild_sent_prompt(backend_name: str | None, messages: list[dict],
                        assistant_prefix: str) -> tuple[dict | None, str | None]:
    """(the prompt as the backend named `backend_name` sent it, None) — or (None, why it cannot be rebuilt)."""
    kind, _, model = (backend_name or "").partition(":")
    build = SENT_PROMPTS.get(kind)
    if build is None or not model:
        return None, (f"the explainer {backend_name!r} is not a known backend, so the prompt it was sent cannot be "
                      "rebuilt" if backend_name else "the explanation names no explainer")
    try:
        return build(model, messages, assistant_prefix), None
    except Exception as exc:  # e.g. the tokenizer of a local model is not on this machine
        return None, f"the prompt {backend_name} was sent cannot be rebuilt here: {str(exc).splitlines()[0][:200]}"
