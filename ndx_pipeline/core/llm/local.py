"""An in-process transformers causal LM as an LLM backend (CPU or CUDA; default: the bundled SmolLM2).

With a cache, every answer is stored under the content address of its request, so a rerun (or a run resumed after
a crash) recomputes nothing it has already answered.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from functools import lru_cache

import numpy as np

from ndx_pipeline.core.llm.backend import VALUES, Completion, LLMBackend, PromptTooLongError, SimulationPrompt
from ndx_pipeline.core.llm.cache import LLMCache, LLMStats, cached_call
from ndx_pipeline.core.models import loadable, resolve_model, special_token_wrap

_LOAD_LOCK = threading.Lock()


@lru_cache(maxsize=4)
def _causal_lm(model_name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kwargs = loadable(resolve_model(model_name))
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    model.eval()
    return model, tokenizer


def load_causal_lm(model_name: str):
    with _LOAD_LOCK:
        return _causal_lm(model_name)


@lru_cache(maxsize=8)
def _tokenizer(model_name: str):
    from transformers import AutoTokenizer

    path, kwargs = loadable(resolve_model(model_name))
    return AutoTokenizer.from_pretrained(path, **kwargs)


def load_tokenizer(model_name: str):
    """The model's tokenizer alone (enough to render and count prompts, e.g. for lineage, without the weights)."""
    with _LOAD_LOCK:
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


class LocalTransformersBackend(LLMBackend):
    """An in-process transformers causal LM (CPU or CUDA).

    With a cache, every answer is stored under the content address of its request, so a rerun (or a run resumed
    after a crash) recomputes nothing it has already answered.
    """

    KIND = "local-transformers"

    def __init__(self, model_name: str | None = None, cache: LLMCache | str | None = None,
                 stats: LLMStats | None = None, context_tokens: int | None = None):
        self.model_name = resolve_model(model_name).name
        self.cache = LLMCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.stats = stats if stats is not None else LLMStats()
        self.context_tokens = int(context_tokens) if context_tokens else None

    def _cached(self, endpoint: str, request: dict, compute: Callable[[], dict]) -> dict:
        def timed() -> dict:
            started = time.monotonic()
            response = compute()
            self.stats.add(calls=1, requests=1, seconds=time.monotonic() - started,
                           prompt_tokens=response.get("prompt_tokens", 0),
                           completion_tokens=response.get("completion_tokens", 0))
            return response

        return cached_call(self.cache, self.stats, self.KIND, self.model_name, endpoint, request, timed)

    @property
    def name(self) -> str:
        return f"local:{self.model_name}"

    def _lm(self):
        return load_causal_lm(self.model_name)

    def chat_prompt_text(self, messages: list[dict], assistant_prefix: str) -> str:
        return chat_prompt_text(load_tokenizer(self.model_name), messages, assistant_prefix)

    def sent_prompt(self, messages: list[dict], assistant_prefix: str) -> dict:
        """The chat-template text the model reads, ending in the prefilled `assistant_prefix`."""
        return {"text": self.chat_prompt_text(messages, assistant_prefix)}

    def context_window(self) -> int | None:
        """The `context_tokens` setting, else the model's own limit (max_position_embeddings or the like)."""
        if self.context_tokens:
            return self.context_tokens
        config = self._lm()[0].config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        limit = getattr(load_tokenizer(self.model_name), "model_max_length", None)
        return limit if isinstance(limit, int) and 0 < limit < 10**7 else None

    def count_tokens(self, sent: Mapping, limit: int | None = None) -> int:
        """Exact, by the model's tokenizer (a sent chat prompt, or {"prompt": text})."""
        text = sent["text"] if "text" in sent else sent.get("prompt")
        if not isinstance(text, str):
            return super().count_tokens(sent, limit)
        return len(load_tokenizer(self.model_name).encode(text, add_special_tokens=False))

    def _check_length(self, tokens: int, max_tokens: int, what: str) -> None:
        context = self.context_window()
        if context is not None and tokens + max_tokens > context:
            self.stats.add(failures=1)
            raise PromptTooLongError(f"the {what} has {tokens} tokens plus {max_tokens} for the answer, more than "
                                     f"the model's context of {context} tokens", context)

    def chat(self, messages, assistant_prefix, max_tokens, temperature, seed) -> Completion:
        request = {"messages": messages, "assistant_prefix": assistant_prefix, "max_tokens": int(max_tokens),
                   "temperature": float(temperature), "seed": int(seed)}
        out = self._cached("chat", request, lambda: self._chat(messages, assistant_prefix, max_tokens,
                                                                temperature, seed))
        return Completion(out["text"], out["prompt_tokens"], out["completion_tokens"])

    def _chat(self, messages, assistant_prefix, max_tokens, temperature, seed) -> dict:
        import torch

        model, tok = self._lm()
        text = self.chat_prompt_text(messages, assistant_prefix)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        self._check_length(int(ids.shape[1]), int(max_tokens), "explainer prompt")
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            with torch.inference_mode():
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                    do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                    top_p=None, top_k=None, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                )
        finally:
            torch.random.set_rng_state(generator_state)
        new = out[0, ids.shape[1]:]
        return {"text": tok.decode(new, skip_special_tokens=True), "prompt_tokens": int(ids.shape[1]),
                "completion_tokens": int(new.shape[0])}

    def value_token_ids(self) -> tuple[list[int], int | None]:
        """Token ids of "0".."9", and of "10" when it is a single token (else None)."""
        _, tok = self._lm()
        ids = []
        for v in range(10):
            enc = tok.encode(str(v), add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(f"the simulator's tokenizer splits the digit {v} into {len(enc)} tokens.")
            ids.append(enc[0])
        ten = tok.encode("10", add_special_tokens=False)
        return ids, (ten[0] if len(ten) == 1 else None)

    def encode_prompt(self, prompt: SimulationPrompt) -> tuple[list[int], list[int]]:
        """Token ids of the prompt (segment by segment, so every slot ends a token) and each slot's position."""
        _, tok = self._lm()
        ids, _ = special_token_wrap(tok)
        ids = list(ids)
        ends = []
        for seg in prompt.segments:
            ids += tok.encode(seg, add_special_tokens=False)
            ends.append(len(ids) - 1)
        return ids, [ends[i] for i in prompt.slots]

    def value_probabilities(self, prompt: SimulationPrompt) -> np.ndarray:
        request = {"segments": list(prompt.segments), "slots": list(prompt.slots)}
        out = self._cached("value_probabilities", request, lambda: self._value_probabilities(prompt))
        return np.asarray(out["probabilities"], dtype=np.float64).reshape(len(prompt.slots), len(VALUES))

    def _value_probabilities(self, prompt: SimulationPrompt) -> dict:
        """One forward pass: the prompt, plus (when "10" is two tokens) one extra "1" token per slot that attends
        only to the prompt up to its slot, so P(10) = P("1") · P("0" | "1") is read honestly in the same pass."""
        import torch

        model, _ = self._lm()
        digit_ids, ten_id = self.value_token_ids()
        ids, slots = self.encode_prompt(prompt)
        n, s = len(ids), len(slots)
        extra = ten_id is None and s > 0
        self._check_length(n + (s if extra else 0), 0, "simulation prompt of this excerpt")
        with torch.inference_mode():
            if extra:
                total = n + s
                allowed = torch.ones(total, total, dtype=torch.bool).tril()
                allowed[n:, :] = False
                for j, pos in enumerate(slots):
                    allowed[n + j, : pos + 1] = True
                    allowed[n + j, n + j] = True
                mask = torch.zeros(total, total).masked_fill(~allowed, torch.finfo(torch.float32).min)
                input_ids = torch.tensor([ids + [digit_ids[1]] * s])
                positions = torch.tensor([list(range(n)) + [p + 1 for p in slots]])
                keep = torch.tensor(list(slots) + list(range(n, total)))
                logits = model(input_ids=input_ids.to(model.device), attention_mask=mask[None, None].to(model.device),
                               position_ids=positions.to(model.device), logits_to_keep=keep.to(model.device)).logits
            else:
                keep = torch.tensor(list(slots))
                logits = model(input_ids=torch.tensor([ids], device=model.device),
                               logits_to_keep=keep.to(model.device)).logits
            # Only the rows we read go through the LM head: the slots, then the extra "1" positions.
            probs = torch.softmax(logits[0].float(), dim=-1)
            at_slot = probs[:s]  # [s, vocab]
            out = torch.zeros(s, len(VALUES), dtype=torch.float64)
            out[:, :10] = at_slot[:, digit_ids].double()
            if ten_id is not None:
                out[:, 10] = at_slot[:, ten_id].double()
            elif s:
                after_one = probs[s:]  # distribution after "<slot>1"
                p_zero = after_one[:, digit_ids[0]].double()
                p_digit = after_one[:, digit_ids].sum(dim=-1).double()
                p_one = out[:, 1].clone()
                out[:, 10] = p_one * p_zero
                out[:, 1] = p_one * (1 - p_digit)  # "1" followed by no further digit; "11".."19" are not values
        return {"probabilities": out.numpy().tolist(), "prompt_tokens": len(ids) + (s if extra else 0)}
