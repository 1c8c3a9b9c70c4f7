"""The request bodies of the OpenAI-compatible endpoints, as typed models.

Types are strict (a string where a number belongs is refused, not converted) and unknown
fields are refused, as OpenAI's API does: a misspelt ``temprature`` is an error, not silently
the default. A few OpenAI fields are accepted only at the value that means "off" (``n`` is
supported; ``logprobs``, ``echo``, penalties other than ``repetition_penalty`` are not), so that
clients sending their defaults work. Value ranges (temperature >= 0, top_p in (0, 1], ...) are
checked by the sampling code itself (:class:`~mini_transformer.generation.SamplingParams`),
and ``max_tokens`` against the server's limit, in :mod:`.app`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


def _off(name: str, value: Any, off: tuple[Any, ...]) -> Any:
    if value not in off:
        raise ValueError(f"{name} is not supported by this server; leave it out")
    return value


class SamplingFields(_Strict):
    """The fields completions and chat share. ``None`` means the checkpoint's generation default."""

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Union[str, list[str], None] = Field(default=None)
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    user: Optional[str] = None
    # Our extensions (as vLLM spells them).
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    # OpenAI fields accepted at their "off" value only.
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    logprobs: Optional[Union[bool, int]] = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value, info):
        return _off(info.field_name, value, (None, 0, 0.0))

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value, info):
        return _off(info.field_name, value or None, (None,))

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value, info):
        return _off(info.field_name, value, (None, False))

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(stops)}")
        return stops

    @field_validator("n")
    @classmethod
    def _n_range(cls, value):
        if not 1 <= value <= 16:
            raise ValueError(f"n must be in [1, 16], got {value}")
        return value

    def stop_strings(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    prompt: Union[str, list[str]]
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value, info):
        return _off(info.field_name, value, (False,))

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value, info):
        return _off(info.field_name, value, (None, 1))

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value, info):
        return _off(info.field_name, value, (None, ""))

    @field_validator("prompt")
    @classmethod
    def _some_prompts(cls, value):
        if isinstance(value, list) and not 1 <= len(value) <= 64:
            raise ValueError(f"prompt must be a string or a list of 1 to 64 strings, got {len(value)}")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    top_logprobs: Optional[int] = None

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, value):
        if not value:
            raise ValueError("messages must hold at least one message")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value, info):
        return _off(info.field_name, value, (None, 0))

    def token_limit(self) -> Optional[int]:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
