"""The OpenAI-compatible wire format: every request and response body as a pydantic model.

Kept apart from the code that serves them (serving.py) and from the batching engine (engine.py),
as vLLM's entrypoints/openai/protocol.py is. Field names, defaults and the error body follow the
OpenAI API reference, so the official `openai` client works unchanged.

One rule for fields (docs/serving.md "Request parameters"): a field this module does not know is
ignored (as OpenAI's and vLLM's servers tolerate extra fields); a field it knows but tokenskip does
not implement (`UNSUPPORTED`: penalties, logit_bias, tools, response_format, vLLM's top_k, ...) is
accepted at its no-op value and refused with a 400 naming it otherwise, never silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 4  # OpenAI's limit on `stop` sequences
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI chat's top_logprobs limit; vLLM's default max_logprobs)
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1  # a 64-bit signed seed, as OpenAI and vLLM accept


def _noop(*values) -> Callable[[Any], bool]:
    return lambda v: v is None or (not isinstance(v, bool) and v in values)


def _falsy(v) -> bool:
    return not v


# known fields tokenskip does not implement: name -> (is the value a no-op?, the no-op value to name)
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "best_of": (_noop(1), "1"),
    "suffix": (_falsy, "null"),
    "presence_penalty": (_noop(0), "0"),
    "frequency_penalty": (_noop(0), "0"),
    "repetition_penalty": (_noop(1), "1"),
    "logit_bias": (_falsy, "null"),
    "top_k": (_noop(0, -1), "-1"),
    "min_p": (_noop(0), "0"),
    "min_tokens": (_noop(0), "0"),
    "use_beam_search": (_falsy, "false"),
    "skip_special_tokens": (lambda v: v is None or v is True, "true"),
    "include_stop_str_in_output": (_falsy, "false"),
    "prompt_logprobs": (lambda v: v is None, "null (use echo with logprobs)"),
    "guided_json": (lambda v: v is None, "null"),
    "guided_regex": (lambda v: v is None, "null"),
    "guided_choice": (lambda v: v is None, "null"),
    "guided_grammar": (lambda v: v is None, "null"),
    "response_format": (lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
                        '{"type": "text"}'),
    "tools": (_falsy, "null"),
    "tool_choice": (lambda v: v in (None, "none"), '"none"'),
    "functions": (_falsy, "null"),
    "function_call": (lambda v: v in (None, "none"), '"none"'),
}


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
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Optional[Union[str, list[str]]] = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # extensions (vLLM's names): generate max_tokens tokens whatever EOS says (benchmarks); more stop ids
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    # the UNSUPPORTED fields, each accepted only at its no-op value
    best_of: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    repetition_penalty: Any = None
    logit_bias: Any = None
    top_k: Any = None
    min_p: Any = None
    min_tokens: Any = None
    use_beam_search: Any = None
    skip_special_tokens: Any = None
    include_stop_str_in_output: Any = None
    prompt_logprobs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    response_format: Any = None

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
        for name in type(self).model_fields:
            rule = UNSUPPORTED.get(name)
            if rule is not None and not rule[0](getattr(self, name)):
                raise bad_request(f"'{name}' = {getattr(self, name)!r} is not supported by this server (it accepts "
                                  f"only the default, {rule[1]})", name)

    def wants_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16  # OpenAI's default for completions; 0 only with echo (score the prompt)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: Any = None

    def top_logprobs_wanted(self) -> Optional[int]:
        """Alternatives per token when log-probs are asked for (0: the chosen token only), else None."""
        return self.logprobs


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
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_logprobs_wanted(self) -> Optional[int]:
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


# --------------------------------------------------------------------------------- responses
class Usage(OpenAIModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(OpenAIModel):
    """/v1/completions' (legacy) log-prob shape: one entry per token; the first prompt token of an
    echo has no log-prob (null). top_logprobs holds the top alternatives and the chosen token."""
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIModel):
    content: Optional[list[ChatTokenLogprob]] = None


class Choice(OpenAIModel):
    """What every choice carries; the subclasses add its content (text, message or delta)."""
    index: int = 0
    logprobs: Optional[Union[CompletionLogprobs, ChatLogprobs]] = None
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
