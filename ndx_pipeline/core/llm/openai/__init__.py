"""The backend for OpenAI-compatible servers, split by concern: `transport` (request errors, retries, the rate
gate, redaction), `logprobs` (reading the simulator's value distributions from echoed top logprobs) and `backend`
(`OpenAICompatibleBackend`: presets, chat, the echo simulator, JSON-constrained chat)."""

from ndx_pipeline.core.llm.openai.backend import SERVER_PRESETS, OpenAICompatibleBackend
from ndx_pipeline.core.llm.openai.transport import RetryPolicy

__all__ = ["OpenAICompatibleBackend", "RetryPolicy", "SERVER_PRESETS"]
