"""The endpoints' logic over one engine: completions and chat completions.

`OpenAIServing` turns a validated request into prompt token ids and a `Sampling` (every bad
request becomes a 400 here, before anything is queued), then runs it on the engine, either as a
stream of server-sent-event payloads or collected into one response. `ServingCompletion` and
`ServingChat` differ only in how the prompt is built (raw text vs the tokenizer's chat template)
and how a chunk and a response look. api_server.py wires them to routes.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from tokenskip.errors import UserError

from ..runtime.generation import Sampling
from .engine import AsyncEngine
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, CompletionChoice, CompletionRequest, CompletionResponse, DeltaMessage,
                       SamplingFields, ServeError, Usage, bad_request, new_id)
from .scheduler import QueueFull, random_seed
from .textstream import TextStream

DISCONNECT_POLL_S = 0.1


class ClientGone(Exception):
    """The client closed the connection of a non-streaming request (its work was cancelled)."""


class OpenAIServing:
    id_prefix = "cmpl"

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name
        self.tokenizer = engine.tokenizer

    # -- request -> (prompt ids, sampling) ----------------------------------------------------
    def prompt_ids(self, request) -> list[int]:
        raise NotImplementedError

    def token_limit(self, request) -> int | None:
        return request.max_tokens

    def prepare(self, request: SamplingFields) -> tuple[list[int], Sampling, frozenset[int], list[str]]:
        if request.model not in (None, "", self.model_name):
            raise ServeError(404, f"model '{request.model}' does not exist: this server serves '{self.model_name}'",
                             "invalid_request_error", "model", "model_not_found")
        request.refuse_unsupported()
        stops = request.stop_list()
        ids = self.prompt_ids(request)
        if not ids:
            raise bad_request("the prompt is empty (0 tokens): give at least one token", "prompt")
        limit = self.engine.info.max_length
        if limit and len(ids) >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens, and the prompt has "
                              f"{len(ids)} tokens: shorten the prompt", "prompt")
        max_tokens = self.token_limit(request)
        if max_tokens is None:
            max_tokens = self.engine.settings.max_tokens_default
            if limit:
                max_tokens = min(max_tokens, limit - len(ids))
        if max_tokens < 1:
            raise bad_request(f"max_tokens = {max_tokens}: must be >= 1", "max_tokens")
        if limit and len(ids) + max_tokens > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                              "completion). Reduce the prompt or max_tokens.", "max_tokens")
        try:
            self.engine.backend.check_length(len(ids), max_tokens)  # backend-specific limits (engine profiles)
            sampling = Sampling(max_new_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                                seed=request.seed if request.seed is not None else random_seed()).check()
        except UserError as exc:
            raise bad_request(exc.message) from None
        eos = self.tokenizer.eos_token_id
        eos_ids = frozenset() if request.ignore_eos or eos is None else frozenset([int(eos)])
        return ids, sampling, eos_ids, stops

    def _vocab_check(self, ids: list[int]) -> list[int]:
        vocab = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        return ids

    # -- running ------------------------------------------------------------------------------
    def submit(self, rid, ids, sampling, eos):
        """Queue the request now, so a full queue or an oversized request is answered before any
        response byte is sent."""
        kv = self.engine.info.kv_bytes(len(ids), sampling.max_new_tokens) or 0
        try:
            return self.engine.submit(rid, ids, sampling, eos, kv)
        except QueueFull as exc:
            raise ServeError(429, str(exc), "rate_limit_exceeded", code="queue_full") from None
        except ValueError as exc:
            raise bad_request(str(exc), "max_tokens") from None

    async def stream(self, request, handle, ids, stops) -> AsyncIterator[str]:
        """Server-sent-event payloads; closing this generator (client gone) aborts the sequence."""
        text, rid = TextStream(self.tokenizer, stops), handle.seq.rid
        events = handle.events()
        try:
            head = self.chunk(rid, None, None, role=True)
            if head:
                yield head
            async for event in events:
                if event.error:
                    yield json.dumps(ServeError(500, event.error, "server_error").body())
                    return
                delta = text.push(event.token, final=event.finish is not None)
                finish = "stop" if text.stopped else event.finish
                if delta or finish:
                    yield self.chunk(rid, delta, finish)
                if text.stopped:
                    handle.abort("stop")
                if finish:
                    break
            if request.wants_usage_in_stream():
                yield self.chunk(rid, None, None, usage=_usage(ids, text.tokens))
            yield "[DONE]"
        finally:
            await events.aclose()  # a stop string or a disconnect: abort the sequence

    async def collect(self, raw_request, handle, ids, stops):
        """Run to the end; cancel the work if the client disconnects meanwhile."""
        task = asyncio.ensure_future(self._collect(handle, stops))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    break
                if raw_request is not None and await raw_request.is_disconnected():
                    raise ClientGone(handle.seq.rid)
        finally:
            if not task.done():
                task.cancel()
                handle.abort()
        text, tokens, finish = task.result()
        return self.response(handle.seq.rid, text, finish, _usage(ids, tokens))

    async def _collect(self, handle, stops):
        text, parts = TextStream(self.tokenizer, stops), []
        events = handle.events()
        try:
            async for event in events:
                if event.error:
                    raise ServeError(500, event.error, "server_error")
                parts.append(text.push(event.token, final=event.finish is not None))
                if text.stopped:
                    handle.abort("stop")
                if text.stopped or event.finish is not None:
                    return "".join(parts), text.tokens, "stop" if text.stopped else event.finish
            raise ServeError(500, "the engine ended the sequence without a finish event", "server_error")
        finally:
            await events.aclose()

    # -- shapes (per endpoint) ----------------------------------------------------------------
    def chunk(self, rid, delta, finish, role=False, usage=None) -> str:
        raise NotImplementedError

    def response(self, rid, text, finish, usage):
        raise NotImplementedError


def _usage(ids, tokens) -> Usage:
    return Usage(prompt_tokens=len(ids), completion_tokens=len(tokens), total_tokens=len(ids) + len(tokens))


class ServingCompletion(OpenAIServing):
    id_prefix = "cmpl"

    def prompt_ids(self, request: CompletionRequest) -> list[int]:
        prompt = request.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return self._vocab_check(list(prompt))
        raise bad_request("one prompt per request: give a string or a list of token ids (batch by sending "
                          "concurrent requests; the server batches them)", "prompt")

    def chunk(self, rid, delta, finish, role=False, usage=None) -> str:
        if role:
            return ""  # completions have no role chunk
        body = CompletionResponse(id=rid, model=self.model_name,
                                  choices=[] if usage else [CompletionChoice(text=delta or "", finish_reason=finish)],
                                  usage=usage)
        return body.model_dump_json(exclude_none=usage is None)

    def response(self, rid, text, finish, usage):
        return CompletionResponse(id=rid, model=self.model_name,
                                  choices=[CompletionChoice(text=text, finish_reason=finish)], usage=usage)


class ServingChat(OpenAIServing):
    id_prefix = "chatcmpl"

    def token_limit(self, request: ChatCompletionRequest) -> int | None:
        return request.token_limit()

    def prompt_ids(self, request: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model's tokenizer has no chat template, so /v1/chat/completions cannot build a "
                              "prompt: use /v1/completions, or serve a tokenizer that has a chat_template",
                              "messages")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - jinja raises its own errors (e.g. role order)
            raise bad_request(f"the chat template rejected the messages: {str(exc).splitlines()[0]}",
                              "messages") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chunk(self, rid, delta, finish, role=False, usage=None) -> str:
        if usage is not None:
            return ChatCompletionChunk(id=rid, model=self.model_name, choices=[], usage=usage).model_dump_json()
        message = DeltaMessage(role="assistant", content="") if role else DeltaMessage(content=delta)
        body = ChatCompletionChunk(id=rid, model=self.model_name,
                                   choices=[ChatChunkChoice(delta=message, finish_reason=finish)])
        return body.model_dump_json(exclude_none=True)

    def response(self, rid, text, finish, usage):
        return ChatCompletionResponse(id=rid, model=self.model_name, usage=usage,
                                      choices=[ChatChoice(message=AssistantMessage(content=text),
                                                          finish_reason=finish)])
