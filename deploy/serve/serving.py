"""The endpoints' logic over one engine: completions and chat completions.

`OpenAIServing` turns a validated request into a `Prepared` (prompt ids, `Sampling`, stop ids and
strings, log-prob and echo options; every bad request becomes a 400 here, before anything is
queued), then runs it on the engine, either as a stream of server-sent-event payloads or collected
into one response. Tokenizing a prompt runs on a worker thread, so a long prompt never stalls the
event loop that streams everybody else's tokens. `ServingCompletion` and `ServingChat` differ
only in how the prompt is built (raw text vs the tokenizer's chat template) and how a chunk and a
response look. api_server.py wires them to routes.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import AsyncIterator

from tokenskip.errors import UserError

from ..runtime.generation import Sampling
from .engine import AsyncEngine
from .logprob_shapes import TokenText, check_scoring
from .logprobs import score_prompt
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, CompletionChoice, CompletionRequest, CompletionResponse, DeltaMessage,
                       SamplingFields, ServeError, Usage, bad_request)
from .scheduler import QueueFull, random_seed
from ..runtime.stop_ids import model_eos_ids
from .textstream import TextStream

DISCONNECT_POLL_S = 0.1
PROBE_CHARS = 16  # characters per context token past which only a prefix of a prompt is tokenized first


class ClientGone(Exception):
    """The client closed the connection of a non-streaming request (its work was cancelled)."""


@dataclass
class Prepared:
    ids: list[int]
    sampling: Sampling | None  # None: nothing to generate (echo with max_tokens 0)
    eos: frozenset[int]  # token ids that end the sequence (finish "stop"; their text is not shown)
    stops: list[str]
    top_n: int | None  # log-prob alternatives per token; None: no log-probs
    echo: str | None  # the prompt text to put before the completion (completions' echo)


class Output:
    """What a sequence has produced so far: text (through TextStream), log-prob entries."""

    def __init__(self, serving: "OpenAIServing", p: Prepared) -> None:
        self.text = TextStream(serving.tokenizer, p.stops, p.ids)
        self.eos, self.want_lp = p.eos, p.top_n is not None
        self.entries: list = []  # log-prob entries not yet sent

    def push(self, event) -> tuple[str, str | None]:
        """-> (released text, finish reason or None)."""
        final = event.finish is not None
        stop_id = final and event.finish == "stop" and event.token in self.eos
        if self.want_lp and event.token is not None and event.logprob is not None:
            self.entries.append((event.token, event.logprob[0], event.logprob[1]))
        delta = self.text.push(event.token, final=final, count_only=stop_id)
        return delta, "stop" if self.text.stopped else event.finish

    def take_entries(self) -> list | None:
        """The entries not yet sent; None when the request asked for no log-probs."""
        out, self.entries = self.entries, []
        return out if self.want_lp else None


class OpenAIServing:
    id_prefix = "cmpl"

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name
        self.tokenizer = engine.tokenizer
        self.eos_ids = model_eos_ids(engine.tokenizer, engine.backend)
        self.token_text = TokenText(engine.tokenizer)
        self._scoring: asyncio.Lock | None = None  # one prompt-scoring pass at a time (beside the engine)

    # -- request -> Prepared -------------------------------------------------------------------
    def prompt_ids(self, request) -> list[int]:
        raise NotImplementedError

    def token_limit(self, request) -> int | None:
        return request.max_tokens

    def echo_text(self, request, ids: list[int]) -> str | None:
        return None

    async def prepare(self, request: SamplingFields) -> Prepared:
        if request.model not in (None, "", self.model_name):
            raise ServeError(404, f"model '{request.model}' does not exist: this server serves '{self.model_name}'",
                             "invalid_request_error", "model", "model_not_found")
        request.refuse_unsupported()
        stops = request.stop_list()
        top_n = request.top_logprobs_wanted()
        ids = await asyncio.to_thread(self.prompt_ids, request)  # tokenizing is CPU work: off the event loop
        echo = self.echo_text(request, ids)
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
        if max_tokens < (0 if echo is not None else 1):
            raise bad_request(f"max_tokens = {max_tokens}: must be >= 1 (0 only with echo)", "max_tokens")
        if limit and len(ids) + max_tokens > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                              "completion). Reduce the prompt or max_tokens.", "max_tokens")
        if echo is not None and top_n is not None:
            check_scoring(self.engine.backend)
        vocab = len(self.tokenizer)
        stop_ids = [int(t) for t in request.stop_token_ids or []]
        if any(not 0 <= t < vocab for t in stop_ids):
            raise bad_request(f"'stop_token_ids' must be token ids in [0, {vocab})", "stop_token_ids")
        eos = (frozenset() if request.ignore_eos else self.eos_ids) | frozenset(stop_ids)
        sampling = None
        try:
            self.engine.backend.check_length(len(ids), max_tokens)  # backend-specific limits (engine profiles)
            if max_tokens > 0:
                sampling = Sampling(max_new_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                                    seed=request.seed if request.seed is not None else random_seed()).check()
        except UserError as exc:
            raise bad_request(exc.message) from None
        return Prepared(ids, sampling, eos, stops, top_n, echo)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Tokenize; a text far longer than the context is refused after encoding only a prefix
        (PROBE_CHARS per context token): a prefix's token count bounds the whole text's from below."""
        limit = self.engine.info.max_length
        if limit and len(text) > PROBE_CHARS * limit:
            n = len(self.tokenizer(text[:PROBE_CHARS * limit], add_special_tokens=add_special_tokens)["input_ids"])
            if n > limit + 1:
                raise bad_request(f"This model's maximum context length is {limit} tokens, and the prompt has more "
                                  f"than {n - 1} tokens: shorten the prompt", "prompt")
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def _vocab_check(self, ids: list[int]) -> list[int]:
        vocab = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        return ids

    # -- running ------------------------------------------------------------------------------
    def submit(self, rid: str, p: Prepared):
        """Queue the request now, so a full queue or an oversized request is answered before any
        response byte is sent. None when there is nothing to generate."""
        if p.sampling is None:
            return None
        kv = self.engine.info.kv_bytes(len(p.ids), p.sampling.max_new_tokens) or 0
        try:
            return self.engine.submit(rid, p.ids, p.sampling, p.eos, kv, logprobs=p.top_n)
        except QueueFull as exc:
            raise ServeError(429, str(exc), "rate_limit_exceeded", code="queue_full") from None
        except ValueError as exc:
            raise bad_request(str(exc), "max_tokens") from None

    async def prompt_entries(self, p: Prepared) -> list | None:
        """echo + logprobs: the prompt's log-probs (a scoring pass beside the engine, one at a time)."""
        if p.echo is None or p.top_n is None:
            return None
        if self._scoring is None:
            self._scoring = asyncio.Lock()
        async with self._scoring:
            return await self.engine.call(score_prompt, self.engine.backend, p.ids, p.top_n)  # the engine thread

    async def stream(self, request, rid: str, handle, p: Prepared, prompt_lp) -> AsyncIterator[str]:
        """Server-sent-event payloads; closing this generator (client gone) aborts the sequence."""
        out = Output(self, p)
        offset = len(p.echo or "")
        events = handle.events() if handle is not None else None
        try:
            head, _ = self.chunk(rid, p.echo, None, role=True, entries=prompt_lp, offset=0)
            if head:
                yield head
            if events is None:  # echo alone: the prompt was the whole answer
                yield self.chunk(rid, "", "length")[0]
            else:
                async for event in events:
                    if event.error:
                        yield json.dumps(ServeError(event.status, event.error, "server_error", code=event.code).body())
                        return
                    delta, finish = out.push(event)
                    if delta or finish:
                        payload, offset = self.chunk(rid, delta, finish, entries=out.take_entries(), offset=offset)
                        yield payload
                    if out.text.stopped:
                        handle.abort("stop")
                    if finish:
                        break
            if request.wants_usage_in_stream():
                yield self.chunk(rid, None, None, usage=_usage(p.ids, out.text.tokens))[0]
            yield "[DONE]"
        finally:
            if events is not None:
                await events.aclose()  # a stop string or a disconnect: abort the sequence

    async def collect(self, raw_request, rid: str, handle, p: Prepared, prompt_lp):
        """Run to the end; cancel the work if the client disconnects meanwhile."""
        if handle is None:  # echo alone
            return self.response(rid, p.echo or "", "length", _usage(p.ids, []), prompt_lp)
        task = asyncio.ensure_future(self._collect(handle, p))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    break
                if raw_request is not None and await raw_request.is_disconnected():
                    raise ClientGone(rid)
        finally:
            if not task.done():
                task.cancel()
                handle.abort()
        text, out, finish = task.result()
        entries = (prompt_lp or []) + out.take_entries() if p.top_n is not None else None  # echo: prompt first
        return self.response(rid, (p.echo or "") + text, finish, _usage(p.ids, out.text.tokens), entries)

    async def _collect(self, handle, p: Prepared):
        out, parts = Output(self, p), []
        events = handle.events()
        try:
            async for event in events:
                if event.error:
                    raise ServeError(event.status, event.error, "server_error", code=event.code)
                delta, finish = out.push(event)
                parts.append(delta)
                if out.text.stopped:
                    handle.abort("stop")
                if finish is not None:
                    return "".join(parts), out, finish
            raise ServeError(500, "the engine ended the sequence without a finish event", "server_error")
        finally:
            await events.aclose()

    # -- shapes (per endpoint) ----------------------------------------------------------------
    def chunk(self, rid, delta, finish, role=False, usage=None, entries=None, offset=0) -> tuple[str, int]:
        """-> (SSE payload, text offset after it); ("", offset) for no chunk."""
        raise NotImplementedError

    def response(self, rid, text, finish, usage, entries):
        raise NotImplementedError


def _usage(ids, tokens) -> Usage:
    return Usage(prompt_tokens=len(ids), completion_tokens=len(tokens), total_tokens=len(ids) + len(tokens))


def dump_chunk(body) -> str:
    """A stream chunk as OpenAI sends it: `finish_reason` and `logprobs` present (null until set),
    a delta with only its set fields, no `usage` key unless it is the usage chunk."""
    data = body.model_dump(mode="json")
    if data.get("usage") is None:
        data.pop("usage", None)
    for choice in data["choices"]:
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return json.dumps(data, separators=(",", ":"))


class ServingCompletion(OpenAIServing):
    id_prefix = "cmpl"

    def prompt_ids(self, request: CompletionRequest) -> list[int]:
        prompt = request.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self._encode(prompt, add_special_tokens=True)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return self._vocab_check(list(prompt))
        raise bad_request("one prompt per request: give a string or a list of token ids (batch by sending "
                          "concurrent requests; the server batches them)", "prompt")

    def echo_text(self, request: CompletionRequest, ids: list[int]) -> str | None:
        if not request.echo:
            return None
        prompt = request.prompt[0] if isinstance(request.prompt, list) and len(request.prompt) == 1 and \
            isinstance(request.prompt[0], (str, list)) else request.prompt
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _logprobs(self, entries, offset):
        if entries is None:
            return None, offset
        return self.token_text.completion(entries, offset)

    def chunk(self, rid, delta, finish, role=False, usage=None, entries=None, offset=0) -> tuple[str, int]:
        if role and delta is None:
            return "", offset  # completions have no role chunk (a role chunk with text: the echo)
        if usage is not None:
            return dump_chunk(CompletionResponse(id=rid, model=self.model_name, choices=[], usage=usage)), offset
        logprobs, offset = self._logprobs(entries, offset)
        body = CompletionResponse(id=rid, model=self.model_name,
                                  choices=[CompletionChoice(text=delta or "", finish_reason=finish, logprobs=logprobs)])
        return dump_chunk(body), offset

    def response(self, rid, text, finish, usage, entries):
        logprobs, _ = self._logprobs(entries, 0)
        return CompletionResponse(id=rid, model=self.model_name, usage=usage,
                                  choices=[CompletionChoice(text=text, finish_reason=finish, logprobs=logprobs)])


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
        return self._encode(text, add_special_tokens=False)

    def chunk(self, rid, delta, finish, role=False, usage=None, entries=None, offset=0) -> tuple[str, int]:
        if usage is not None:
            return dump_chunk(ChatCompletionChunk(id=rid, model=self.model_name, choices=[], usage=usage)), offset
        message = DeltaMessage(role="assistant", content="") if role else DeltaMessage(content=delta)
        logprobs = self.token_text.chat(entries) if entries else None
        body = ChatCompletionChunk(id=rid, model=self.model_name,
                                   choices=[ChatChunkChoice(delta=message, finish_reason=finish, logprobs=logprobs)])
        return dump_chunk(body), offset

    def response(self, rid, text, finish, usage, entries):
        logprobs = self.token_text.chat(entries) if entries is not None else None
        return ChatCompletionResponse(id=rid, model=self.model_name, usage=usage,
                                      choices=[ChatChoice(message=AssistantMessage(content=text),
                                                          finish_reason=finish, logprobs=logprobs)])
