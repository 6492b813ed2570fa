"""The OpenAI-compatible wire format: every request and response body as a pydantic model.

Kept apart from the code that serves them (serving.py) and from the batching engine (engine.py),
as vLLM's entrypoints/openai/protocol.py is. Field names, defaults and the error body follow the
OpenAI API reference, so the official `openai` client works unchanged. Unknown fields are ignored;
known fields tokenskip does not implement (n > 1, logprobs, echo, best_of, suffix, penalties,
logit_bias, tools) are refused with a 400 that names them rather than silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 4  # OpenAI's limit on `stop` sequences


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------------------------ errors
class ErrorInfo(OpenAIModel):
    message: str
    type: str = "invalid_request_error"
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


class ServeError(Exception):
    """An error with its HTTP status and OpenAI error type (400 invalid_request_error, 429 ...)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


def bad_request(message: str, param: str | None = None) -> ServeError:
    return ServeError(400, message, "invalid_request_error", param)


# ---------------------------------------------------------------------------------- requests
class StreamOptions(OpenAIModel):
    include_usage: bool = False


class SamplingFields(OpenAIModel):
    """What completions and chat share: sampling, stopping, streaming."""

    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # known OpenAI fields tokenskip does not implement: refused (unless at their no-op value)
    logprobs: Optional[Union[bool, int]] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    # extension (vLLM's name): generate max_tokens tokens whatever EOS says (benchmarks)
    ignore_eos: bool = False

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise bad_request(f"'stop' has {len(stops)} sequences; at most {MAX_STOP} are allowed", "stop")
        if any(s == "" for s in stops):
            raise bad_request("'stop' sequences must be non-empty strings", "stop")
        return stops

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise bad_request(f"n = {self.n}: this server returns one choice per request (n must be 1)", "n")
        checks = {"logprobs": self.logprobs not in (None, False, 0), "logit_bias": bool(self.logit_bias),
                  "presence_penalty": self.presence_penalty not in (None, 0.0),
                  "frequency_penalty": self.frequency_penalty not in (None, 0.0)}
        for name, used in checks.items():
            if used:
                raise bad_request(f"'{name}' is not supported by this server", name)

    def wants_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16  # OpenAI's default for completions
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise bad_request("'echo' is not supported by this server", "echo")
        if self.best_of not in (None, 1):
            raise bad_request("'best_of' is not supported by this server (must be 1)", "best_of")
        if self.suffix:
            raise bad_request("'suffix' is not supported by this server", "suffix")


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: str
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None  # default: as many as the context allows (up to the server's cap)
    max_completion_tokens: Optional[int] = None
    tools: Optional[list] = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise bad_request("'tools' are not supported by this server", "tools")

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --------------------------------------------------------------------------------- responses
class Usage(OpenAIModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(OpenAIModel):
    """What every choice carries; the subclasses add its content (text, message or delta)."""
    index: int = 0
    logprobs: None = None
    finish_reason: Optional[str] = None


class Response(OpenAIModel):
    """What every response and stream chunk carries; the subclasses fix `object` and the choices."""
    id: str
    created: int = Field(default_factory=now)
    model: str


class CompletionChoice(Choice):
    text: str


class CompletionResponse(Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Choice):
    message: AssistantMessage


class ChatCompletionResponse(Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(OpenAIModel):
    role: Optional[str] = None
    content: Optional[str] = None


class ChatChunkChoice(Choice):
    delta: DeltaMessage


class ChatCompletionChunk(Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "tokenskip"
    max_model_len: Optional[int] = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
