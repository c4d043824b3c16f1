"""The errors an LLM call records in its row instead of stopping the layer (shared by the interface, the cache and
every backend)."""

from __future__ import annotations


class RecordableLLMError(Exception):
    """An LLM call or answer that failed for one neuron or excerpt: recorded in its row, the layer goes on."""


class NonFiniteAnswerError(RecordableLLMError, ValueError):
    """The answer holds a number JSON cannot represent (NaN or ±Infinity): it is neither used nor cached."""


class PromptTooLongError(RecordableLLMError):
    """A prompt (with room for the answer) does not fit the model's context window. `context` is the window in
    tokens where it is known."""

    def __init__(self, reason: str, context: int | None = None):
        super().__init__(reason)
        self.context = context


class LLMStopped(Exception):
    """In-process work ended early because its caller was interrupted (SIGTERM, Ctrl-C): nothing of it is recorded
    or cached."""
