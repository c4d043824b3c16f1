"""An in-process transformers causal LM as an LLM backend (on the CPU; default: the bundled SmolLM2).

With a cache, every answer is stored under the content address of its request, so a rerun (or a run resumed after
a crash) recomputes nothing it has already answered.

Batched: the stages call `chat` and `value_probabilities` from `max_concurrency` threads at once (`map`); a
`Batcher` computes what is waiting together.
- Simulations: the excerpts of one explanation share their prompt's head (instructions, examples, explanation). Its
  keys and values are computed once and kept for the explanation's next batch (and the instructions and examples,
  the same in every head, only once); the excerpts follow in one forward pass over the batch, each with its own
  mask (and the extra "1" tokens that read P("0" | "1") for the value 10).
  Probabilities equal the one-excerpt-at-a-time pass's within float32 rounding (≤ 1e-5 measured; tested ≤ 1e-4)
  when the model computes in float32; see the class for bfloat16.
- Explanations: the prompts of all neurons share the instructions and worked examples; that common prefix is
  computed once per batch, then every neuron's own part, then the answers are sampled step by step together, each
  row from its own random generator seeded with its request's seed, as a lone request would draw them. What can
  depend on the batch: float32 rounding of the logits differs in the last bits between a padded batch and a lone
  prompt, which can flip a draw where two tokens are within that rounding of each other; every answer is then
  cached under its request, so a rerun returns the same text whatever the batches.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ndx_pipeline.core.heap import release_freed_heap
from ndx_pipeline.core.llm.backend import VALUES, Completion, LLMBackend, PromptTooLongError, SimulationPrompt
from ndx_pipeline.core.llm.batching import Batcher
from ndx_pipeline.core.llm.cache import LLMCache, LLMStats, cached_call
from ndx_pipeline.core.llm.errors import LLMStopped
from ndx_pipeline.core.llm.precision import choose_precision
from ndx_pipeline.core.llm.sent_prompts import LOCAL_KIND, MODEL_FILES_LOCK, chat_prompt_text, load_tokenizer
from ndx_pipeline.core.models import (
    AUTO_DTYPE,
    llm_dtype,
    loadable,
    model_identity,
    resolve_model,
    special_token_wrap,
    torch_dtype,
)

BATCH_SIZE = 8  # requests computed together (measured on 2 CPU cores: benchmarks/llm_stages.py)
HEADS_KEPT = 4  # simulation prompt heads whose keys and values are kept for the next batch
MIN_SHARED_HEAD = 16  # tokens a head must share with the first one for its keys and values to be reused
TRIM_EVERY_SIMULATION_BATCHES = 4  # the heap is trimmed after every explanation batch and every 4th simulation one
# `dtype: auto`'s calibration (LocalTransformersBackend.calibration_seconds): what a default run asks of the LLM
# (README: 1728 simulated excerpts, 96 explanations), its answers' length, and the text its token ids come from
DEFAULT_RUN_SIMULATED_EXCERPTS = 1728
DEFAULT_RUN_EXPLANATIONS = 96
CALIBRATION_ROWS = 4
CALIBRATION_ANSWER_TOKENS = 12
CALIBRATION_TEXT = (
    "A neuron of a language model is explained by a sentence that says which tokens make it fire, and that sentence "
    "is judged by how well another model, reading only the sentence, predicts the neuron's activations on excerpts "
    "of text it has not seen. Each excerpt is shown as its tokens, one per line, with a number from 0 to 10 after "
    "each: the activation scaled so that the neuron's largest activation is 10. "
)


@dataclass(frozen=True)
class _ChatRequest:
    ids: tuple[int, ...]
    max_tokens: int
    temperature: float
    seed: int


@dataclass(frozen=True)
class _SimulationRequest:
    head: tuple[int, ...]  # the shared head's token ids (special tokens included)
    rest: tuple[int, ...]  # the excerpt's lines
    slots: tuple[int, ...]  # positions in `rest` after which a value is read


@lru_cache(maxsize=4)
def _causal_lm(model_name: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kwargs = loadable(resolve_model(model_name))
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), **kwargs)
    model.eval()
    return model, tokenizer


def load_causal_lm(model_name: str, dtype: str = "float32"):
    with MODEL_FILES_LOCK:
        return _causal_lm(model_name, dtype)


class LocalTransformersBackend(LLMBackend):
    """An in-process transformers causal LM, on the CPU.

    With a cache, every answer is stored under the content address of its request (and the precision), so a rerun
    (or a run resumed after a crash) recomputes nothing it has already answered.

    dtype: the precision it computes in. `auto` (the default) is whichever of bfloat16 and float32 computes a small
    share of the pipeline's work faster on this machine, measured once per machine and model (`dtype`,
    core/llm/precision.py). float32 is the exact path: batched answers equal the one-at-a-time
    ones within float32 rounding. In bfloat16 the rounding of a padded batch depends on what else is in it, so an
    excerpt's value probabilities can move by a few hundredths with the batch's composition, and a sampled
    explanation can change its wording (see benchmarks/llm_stages.py for the measured differences).
    """

    KIND = "local-transformers"

    def __init__(self, model_name: str | None = None, cache: LLMCache | str | None = None,
                 stats: LLMStats | None = None, context_tokens: int | None = None, batch_size: int = BATCH_SIZE,
                 dtype: str = AUTO_DTYPE):
        source = resolve_model(model_name)
        self.model_name = source.name
        self.identity = model_identity(source)  # the weights' files: part of every cache key
        self.dtype_setting = llm_dtype(dtype)
        self.precision = None  # with `auto`: what the calibration chose (resolved on first use, see `dtype`)
        self._precision_lock = threading.Lock()
        self.cache = LLMCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.stats = stats if stats is not None else LLMStats()
        self.context_tokens = int(context_tokens) if context_tokens else None
        self.max_concurrency = max(1, int(batch_size))  # `map` threads: as many requests as one batch holds
        self._chats = Batcher(self._chat_batch, self.max_concurrency)
        self._simulations = Batcher(self._simulation_batch, self.max_concurrency)
        self._heads: OrderedDict = OrderedDict()  # head ids → their keys and values (most recent last)
        self._first_head = None  # (ids, keys and values) of the first simulation head, whose start every head shares

    @property
    def dtype(self) -> str:
        """The precision the model computes in: the setting, or with `auto` the faster one on this machine as
        measured once per machine and model (core/llm/precision.py), said once in the backend's log."""
        if self.dtype_setting != AUTO_DTYPE:
            return self.dtype_setting
        if self.precision is not None:  # (every request asks: no lock once chosen)
            return self.precision.dtype
        with self._precision_lock:
            if self.precision is None:
                self.precision = choose_precision(self.model_name, self.calibration_seconds, self.log,
                                                  identity=str(self.identity) if self.identity else None)
                if self.precision.just_measured:
                    _causal_lm.cache_clear()  # the copy in the other precision: the chosen one loads again on use
                if self.log:
                    self.log(self.precision.line(self.model_name))
        return self.precision.dtype

    def calibration_seconds(self, dtype: str) -> float:
        """Seconds this model takes in `dtype` for a small share of the pipeline's LLM work, shaped as the pipeline
        shapes it: a batch of simulated excerpts after a shared head (every fifth token a slot) and a batch of
        explanations (a shared prompt head, each request's own part, a few tokens sampled together), the two
        weighted as a default run has them (DEFAULT_RUN_*). Timed on a second pass: the first makes the kernels for
        these shapes."""
        probe = LocalTransformersBackend(self.model_name, dtype=dtype)
        _, tok = probe._lm()
        text = tok.encode(CALIBRATION_TEXT, add_special_tokens=False)
        ids = (text * (1 + 1000 // max(1, len(text))))[:1000]
        rows = CALIBRATION_ROWS
        head, rest = tuple(ids[:240]), tuple(ids[240:400])
        simulations = [_SimulationRequest(head, rest, tuple(range(4, len(rest), 5)))] * rows
        chats = [_ChatRequest(tuple(ids[:300] + ids[300 + 13 * i: 500 + 13 * i]), CALIBRATION_ANSWER_TOKENS, 1.0, i)
                 for i in range(rows)]

        def work() -> tuple[float, float]:
            started = time.perf_counter()
            probe._values_after_head(head, simulations)
            middle = time.perf_counter()
            probe._generate(chats, CALIBRATION_ANSWER_TOKENS, 1.0)
            return middle - started, time.perf_counter() - middle

        work()
        simulation_s, explanation_s = work()
        return (simulation_s * DEFAULT_RUN_SIMULATED_EXCERPTS + explanation_s * DEFAULT_RUN_EXPLANATIONS) / rows

    def _cached(self, endpoint: str, request: dict, compute: Callable[[], dict]) -> dict:
        def timed() -> dict:
            started = time.monotonic()
            response = compute()
            self.stats.add(calls=1, requests=1, seconds=time.monotonic() - started,
                           prompt_tokens=response.get("prompt_tokens", 0),
                           completion_tokens=response.get("completion_tokens", 0))
            return response

        # the precision (float32 answers keep the keys they had before other precisions were offered) and the
        # weights' identity: new weights under the same name are never answered from the old ones' cache
        origin = {**({} if self.dtype == "float32" else {"dtype": self.dtype}),
                  **({"model": self.identity} if self.identity else {})} or None
        return cached_call(self.cache, self.stats, self.KIND, self.model_name, endpoint, request, timed,
                           origin=origin)

    @property
    def name(self) -> str:
        return f"{LOCAL_KIND}:{self.model_name}"

    def _lm(self):
        return load_causal_lm(self.model_name, self.dtype)

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
        _, tok = self._lm()
        text = self.chat_prompt_text(messages, assistant_prefix)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        self._check_length(len(ids), int(max_tokens), "explainer prompt")
        new = self._chats.submit(_ChatRequest(tuple(ids), int(max_tokens), float(temperature), int(seed)))
        return {"text": tok.decode(new, skip_special_tokens=True), "prompt_tokens": len(ids),
                "completion_tokens": len(new)}

    def _chat_batch(self, requests: Sequence[_ChatRequest]) -> list:
        """New token ids for each request; requests with the same answer length and temperature go together."""
        out: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.max_tokens, r.temperature), []).append(i)
        for (max_tokens, temperature), members in groups.items():
            for i, new in zip(members, self._generate([requests[i] for i in members], max_tokens, temperature)):
                out[i] = new
        release_freed_heap()  # see core/heap.py: without it the LLM stages' peak RSS doubles
        return out

    def _generate(self, requests: Sequence[_ChatRequest], max_tokens: int, temperature: float) -> list[list[int]]:
        """Sample up to `max_tokens` new tokens for every request: the prompts' common prefix once; each prompt's
        own part after it, one prompt at a time (on a CPU a padded batch saves no arithmetic here and its masked
        attention costs more); then one step per new token for all rows together, where batching pays (each step
        reads every weight once for the whole batch). Row i draws from its own generator seeded with its request's
        seed. A row ends at the end-of-sequence token (kept), and leaves the batch."""
        import torch
        from transformers import DynamicCache

        model, tok = self._lm()
        device = model.device
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id])
        pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos))
        rows = [list(r.ids) for r in requests]
        shared = min(_common_prefix(rows), min(len(r) for r in rows) - 1)  # each row keeps a token of its own
        generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in requests]
        new: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)

        def draw(i: int, scores) -> int:
            if temperature > 0:
                probs = torch.softmax(scores.float().cpu()[None] / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generators[i])[0, 0])
            else:
                token = int(scores.argmax())
            new[i].append(token)
            done[i] = token in eos or len(new[i]) >= max_tokens
            return token

        with torch.inference_mode():
            prefix = None
            if shared > 0:
                head = torch.tensor([rows[0][:shared]], device=device)
                prefix = kv_cache(model(input_ids=head, use_cache=True))
            caches, first = [], []
            for i, row in enumerate(rows):
                self._unless_stopping()
                own = row[shared:]
                out = model(input_ids=torch.tensor([own], device=device),
                            position_ids=torch.arange(shared, shared + len(own), device=device)[None],
                            **kv_input(model, copy.deepcopy(prefix) if prefix is not None else None),
                            use_cache=True, logits_to_keep=1)
                caches.append(kv_cache(out))
                first.append(draw(i, out.logits[0, -1]) if max_tokens > 0 else pad)
            if max_tokens <= 0 or all(done):
                return new
            # one cache for the batch: [shared prefix | padding | own part], the padding masked out
            lengths = [len(r) - shared for r in rows]
            width = max(lengths)
            layers = []
            for layer in range(len(caches[0].layers)):
                keys, values = [], []
                for cache, n in zip(caches, lengths):
                    k, v = cache.layers[layer].keys, cache.layers[layer].values
                    gap = torch.zeros(k.shape[:2] + (width - n,) + k.shape[3:], dtype=k.dtype, device=k.device)
                    keys.append(torch.cat([k[:, :, :shared], gap, k[:, :, shared:]], dim=2))
                    values.append(torch.cat([v[:, :, :shared], gap, v[:, :, shared:]], dim=2))
                    cache.layers[layer].keys = cache.layers[layer].values = None  # each row's copy, freed as we go
                layers.append((torch.cat(keys), torch.cat(values)))
                del keys, values
            caches = prefix = None
            cache = DynamicCache(ddp_cache_data=layers)
            del layers
            mask = torch.ones((len(rows), shared + width), dtype=torch.long)
            for i, n in enumerate(lengths):
                mask[i, shared : shared + width - n] = 0
            position = torch.tensor([shared + n for n in lengths])  # the position of each row's next token
            step = torch.tensor(first)
            live = list(range(len(rows)))  # the request of each row still in the batch
            while True:
                keep = [j for j, i in enumerate(live) if not done[i]]
                if not keep:
                    break
                self._unless_stopping()
                if len(keep) < len(live):  # a finished row leaves the batch: no more steps spent on it
                    index = torch.tensor(keep)
                    cache.batch_select_indices(index.to(device))
                    mask, position, step = mask[index], position[index], step[index]
                    live = [live[j] for j in keep]
                mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.long)], dim=1)
                out = model(input_ids=step[:, None].to(device), attention_mask=mask.to(device),
                            position_ids=position[:, None].to(device), **kv_input(model, cache), use_cache=True)
                cache, position = kv_cache(out), position + 1
                step = torch.tensor([draw(i, out.logits[j, -1]) for j, i in enumerate(live)])
        return new

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
        """The prompt split into its head and its excerpt lines, computed in a batch with whatever else waits."""
        request, tokens = self.simulation_request(prompt)
        self._check_length(tokens, 0, "simulation prompt of this excerpt")
        probabilities = self._simulations.submit(request)
        return {"probabilities": probabilities.tolist(), "prompt_tokens": tokens}

    def simulation_request(self, prompt: SimulationPrompt) -> tuple[_SimulationRequest, int]:
        """The prompt as the batched simulator computes it: its head (the first segment: instructions, examples,
        explanation — shared by the explanation's excerpts), its excerpt lines and the slots in them; and the
        tokens the model reads (with the extra "1" per slot when "10" is two tokens)."""
        _, tok = self._lm()
        _, ten_id = self.value_token_ids()
        head, _ = special_token_wrap(tok)
        head = list(head) + tok.encode(prompt.segments[0], add_special_tokens=False)
        rest, ends = [], []
        for seg in prompt.segments[1:]:
            rest += tok.encode(seg, add_special_tokens=False)
            ends.append(len(rest) - 1)
        slots = [ends[i - 1] for i in prompt.slots]  # slots after the head: segment i ends at rest[ends[i - 1]]
        extra = len(slots) if ten_id is None else 0
        return _SimulationRequest(tuple(head), tuple(rest), tuple(slots)), len(head) + len(rest) + extra

    # The plain paths: one request alone, no shared prefix, no batch (`model.generate`; one forward pass over the
    # whole simulation prompt). The batched paths are checked against them (tests, benchmarks/llm_stages.py).

    def chat_unbatched(self, messages, assistant_prefix, max_tokens, temperature, seed) -> Completion:
        import torch

        model, tok = self._lm()
        text = self.chat_prompt_text(messages, assistant_prefix)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
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
        return Completion(tok.decode(new, skip_special_tokens=True), int(ids.shape[1]), int(new.shape[0]))

    def value_probabilities_unbatched(self, prompt: SimulationPrompt) -> np.ndarray:
        import torch

        model, _ = self._lm()
        digit_ids, ten_id = self.value_token_ids()
        ids, slots = self.encode_prompt(prompt)
        n, s = len(ids), len(slots)
        extra = ten_id is None and s > 0
        with torch.inference_mode():
            if extra:
                total = n + s
                allowed = torch.ones(total, total, dtype=torch.bool).tril()
                allowed[n:, :] = False
                for j, pos in enumerate(slots):
                    allowed[n + j, : pos + 1] = True
                    allowed[n + j, n + j] = True
                mask = torch.zeros(total, total).masked_fill(~allowed, torch.finfo(torch.float32).min)
                positions = torch.tensor([list(range(n)) + [q + 1 for q in slots]])
                keep = torch.tensor(list(slots) + list(range(n, total)))
                logits = model(input_ids=torch.tensor([ids + [digit_ids[1]] * s], device=model.device),
                               attention_mask=mask[None, None].to(model.device),
                               position_ids=positions.to(model.device), logits_to_keep=keep.to(model.device)).logits
            else:
                logits = model(input_ids=torch.tensor([ids], device=model.device),
                               logits_to_keep=torch.tensor(list(slots), device=model.device)).logits
            return _values(torch.softmax(logits[0].float(), dim=-1).cpu(), s, digit_ids, ten_id)

    def _head_cache(self, head: tuple[int, ...]):
        """The keys and values of a prompt head, computed once and kept for the next few batches. Heads differ only
        after the instructions and worked examples (in the explanation): the part a head shares with the first head
        ever computed is taken from that one's keys and values, and only the rest is computed."""
        import torch

        if head in self._heads:
            self._heads.move_to_end(head)
            return self._heads[head]
        model, _ = self._lm()
        with torch.inference_mode():
            shared = 0
            if self._first_head is not None:
                shared = min(_common_prefix([self._first_head[0], head]), len(head) - 1)
            if shared >= MIN_SHARED_HEAD:
                cache = copy.deepcopy(self._first_head[1])
                if shared < len(self._first_head[0]):
                    cache.crop(shared - len(self._first_head[0]))  # (a negative count: tokens taken off the end)
                out = model(input_ids=torch.tensor([head[shared:]], device=model.device),
                            position_ids=torch.arange(shared, len(head), device=model.device)[None],
                            **kv_input(model, cache), use_cache=True, logits_to_keep=1)
                cache = kv_cache(out)
            else:
                cache = kv_cache(model(input_ids=torch.tensor([head], device=model.device), use_cache=True,
                                       logits_to_keep=1))
            if self._first_head is None:  # kept as computed: a batch works on a copy of a head's cache
                self._first_head = (head, cache)
        self._heads[head] = cache
        while len(self._heads) > HEADS_KEPT:
            self._heads.popitem(last=False)
        return cache

    def _unless_stopping(self) -> None:
        """Between two steps of a batch: end it (LLMStopped) when the caller of `map` was interrupted."""
        if self.stopping.is_set():
            raise LLMStopped("the run was interrupted; this batch was not finished")

    def _simulation_batch(self, requests: Sequence[_SimulationRequest]) -> list:
        self._unless_stopping()
        out: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.head, []).append(i)
        for head, members in groups.items():
            for i, probs in zip(members, self._values_after_head(head, [requests[i] for i in members])):
                out[i] = probs
        if len(self._simulations.batches) % TRIM_EVERY_SIMULATION_BATCHES == 0:
            release_freed_heap()
        return out

    def _values_after_head(self, head: tuple[int, ...], requests: Sequence[_SimulationRequest]) -> list[np.ndarray]:
        """[slots, 11] value probabilities for each excerpt after one shared head, in one forward pass: each row
        holds its excerpt's tokens (causal, after the head) and, when "10" is two tokens, one extra "1" per slot
        that sees the head and its excerpt up to the slot, at the position right after it, so that
        P(10) = P("1") · P("0" | "1") is read in the same pass. Right padding is masked out."""
        import torch

        model, _ = self._lm()
        device = model.device
        digit_ids, ten_id = self.value_token_ids()
        split_ten = ten_id is None
        p, b = len(head), len(requests)
        lengths = [len(r.rest) + (len(r.slots) if split_ten else 0) for r in requests]
        width = max(lengths)
        ids = torch.zeros((b, width), dtype=torch.long)
        positions = torch.full((b, width), p, dtype=torch.long)
        allowed = torch.zeros((b, width, p + width), dtype=torch.bool)
        allowed[:, :, :p] = True  # everything sees the head (padding too, so no row of the mask is empty)
        for i, r in enumerate(requests):
            n, s = len(r.rest), len(r.slots)
            ids[i, :n] = torch.tensor(r.rest)
            positions[i, :n] = torch.arange(p, p + n)
            allowed[i, :n, p : p + n] = torch.ones((n, n), dtype=torch.bool).tril()
            if split_ten and s:
                ids[i, n : n + s] = digit_ids[1]
                positions[i, n : n + s] = torch.tensor(r.slots) + p + 1
                for j, slot in enumerate(r.slots):
                    allowed[i, n + j, p : p + slot + 1] = True
                    allowed[i, n + j, p + n + j] = True
        mask = torch.zeros((b, 1, width, p + width)).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        with torch.inference_mode():
            cache = copy.deepcopy(self._head_cache(head))
            cache.batch_repeat_interleave(b)
            hidden = model.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 position_ids=positions.to(device), **kv_input(model.model, cache),
                                 use_cache=True).last_hidden_state
            out = []
            for i, r in enumerate(requests):
                n, s = len(r.rest), len(r.slots)
                rows = list(r.slots) + (list(range(n, n + s)) if split_ten else [])
                # only the rows we read go through the LM head: the slots, then the extra "1" positions
                probs = torch.softmax(model.lm_head(hidden[i, rows]).float(), dim=-1).cpu()
                out.append(_values(probs, s, digit_ids, ten_id))
        return out


def kv_input(model, cache) -> dict:
    """The keyword that hands a key/value cache to `model.forward`: `cache` in newer transformers 5 releases,
    `past_key_values` before (which newer releases still take, with a deprecation warning)."""
    return {"cache": cache} if "cache" in _forward_parameters(type(model)) else {"past_key_values": cache}


@lru_cache(maxsize=None)
def _forward_parameters(cls) -> frozenset:
    import inspect

    return frozenset(inspect.signature(cls.forward).parameters)


def kv_cache(out):
    """The key/value cache of a forward's output, under either name (see `kv_input`)."""
    return out["cache"] if "cache" in out else out.past_key_values


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """The length of the longest prefix every row starts with."""
    n = min(len(r) for r in rows)
    for i in range(n):
        token = rows[0][i]
        if any(r[i] != token for r in rows):
            return i
    return n


def _values(probs, s: int, digit_ids: list[int], ten_id: int | None) -> np.ndarray:
    """[s, 11] probabilities of the values 0..10 from the next-token distributions at the slots (`probs[:s]`) and,
    when "10" is two tokens, after an extra "1" at each slot (`probs[s:]`)."""
    import torch

    at_slot = probs[:s]
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
    return out.numpy()
