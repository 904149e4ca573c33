"""The frontend: OpenAI-compatible HTTP API and public NATS subjects in front of the router.

Run: ``python -m tandem.services.frontend --host 127.0.0.1 --port 8000 [--model-dir DIR]``
(plus the common ``--nats-url``, ``--namespace``, ``--log-level``; see ``--help``).

HTTP endpoints
--------------
``POST /v1/chat/completions``, ``POST /v1/completions`` (non-streaming JSON, or SSE with
``"stream": true``: ``data: {chunk}\\n\\n`` … ``data: [DONE]\\n\\n``), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health`` (200 while the process serves) and ``GET /ready`` (200
only when the router and the indexer answer ``HealthRequest`` on ``{ns}.health.router`` /
``{ns}.health.indexer`` and the instances bucket holds at least one prefill-capable (role
``prefill`` or ``both``) and one decode-capable (``decode`` or ``both``) worker; otherwise 503
with an OpenAI error body whose message lists what is missing). Every error, including unknown
routes and oversized bodies, is OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

Life cycle of one request
-------------------------
1. **Validate** the JSON body (:mod:`tandem.protocol.openai`): malformed JSON, missing or
   ill-typed fields, ``n != 1``, out-of-range sampling values → 400; a model other than the
   served one → 404 ``model_not_found``.
2. **Tokenize**: chat messages go through the model's chat template (generation prompt added);
   completion prompts are text or token ids. A prompt that leaves no room in the context
   (``--max-model-len``, 8192) or ``prompt + max_tokens`` beyond it → 400
   ``context_length_exceeded``. Without ``max_tokens`` a chat request may use the rest of the
   context; a completion request defaults to 16 (OpenAI's legacy default).
3. **Hash** the prompt's full blocks once (:func:`tandem.kvbm.hashing.compute_block_hashes`) with
   the block size the registered workers advertise (``InstanceInfo.block_size``, 16 without any).
4. **Route**: subscribe a fresh inbox *first*, then publish ``RouteRequest(reply_to=inbox)`` on
   ``{ns}.router.generate`` with the trace context in the ``traceparent`` header. The message's
   NATS reply subject is the inbox too, so "no router subscribed" (NATS no-responders status)
   and an ``ErrorReply`` from the router's handler arrive there and fail the request at once
   (503 / the reply's code) instead of waiting for the timeout.
5. **Collect** ``TokenChunk``\\ s on the inbox. Chunk 0 may come from the router (first token of
   a disaggregated request) and the rest from the decode worker, so chunks are reordered by
   ``index`` (duplicates and stale indices dropped). Token ids are detokenized incrementally
   (UTF-8 safe); stop strings are matched on the text, the output is truncated before the match
   and ``Cancel(reason="stop_string")`` is published on ``{ns}.cancel``; text that could still
   become a stop string is held back while streaming. The chunk with ``finish_reason`` ends the
   request; its ``RequestMetrics`` fill ``usage.prompt_tokens_details.cached_tokens`` and the
   ``tandem`` extension (workers, KV transfer); ``ttft_ms`` is measured here, from the arrival
   of the request to the first token. A chunk with ``error`` fails the request with that code.
6. **Clean up** (always, in ``finally``): unsubscribe the inbox; if the request did not finish
   (client disconnected, stop string, timeout, error) publish ``Cancel``. No in-order progress
   for ``--chunk-timeout`` seconds (default 120) → 504 and ``Cancel(reason="timeout")``. An HTTP
   client that disconnects cancels the handler (aiohttp ``handler_cancellation``) or makes the
   next write fail; either way the request is cancelled and the inbox released.

Resources and their owners: each request's inbox subscription belongs to its
:class:`Generation` (closed on every exit path); HTTP handler tasks belong to aiohttp; NATS
request tasks belong to the service's :class:`~tandem.services.runtime.TaskTracker` (drained,
then cancelled, at shutdown); the instance registry watcher belongs to :class:`Frontend`.
Tracing: one SERVER span per HTTP request (parent: an incoming ``traceparent`` header) or per
public NATS request; the ``RouteRequest`` carries its context downstream.

Public NATS API (queue group ``frontend``)
------------------------------------------
Subjects ``{ns}.v1.chat.completions``, ``{ns}.v1.completions`` and ``{ns}.v1.models``. Payloads
are JSON (UTF-8), exactly the HTTP bodies; a request without a reply subject is dropped.

* **Request**: the OpenAI request body as the message payload (``{ns}.v1.models``: any payload,
  e.g. empty). Answers go to the message's reply subject.
* **Non-streaming** (``"stream"`` absent or false): exactly one reply message. Success: the same
  JSON bytes HTTP returns (``chat.completion`` / ``text_completion`` / model list). Error:
  OpenAI's error body plus a top-level status, ``{"error": {...}, "status": 400}``, where
  ``status`` is the HTTP status code the same request gets over HTTP. Use plain NATS
  request/reply (``nc.request``).
* **Streaming** (``"stream": true``): several messages on the reply subject, in order: each
  chunk JSON exactly as it follows ``data: `` in the SSE stream, then a final message whose
  payload is exactly ``[DONE]``. An error (before or during the stream) is one error message
  (the shape above) followed by ``[DONE]``; so a client reads until ``[DONE]`` and treats a
  message with a top-level ``"error"`` as the failure. Subscribe to your own inbox and
  publish with ``reply=inbox`` (``nc.request`` would only see the first message). NATS gives the
  frontend no disconnect signal: an abandoned stream runs to its end (or its ``max_tokens``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import nats.errors
from aiohttp import web
from msgspec import UNSET
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from tandem.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from tandem.kvbm.hashing import compute_block_hashes
from tandem.protocol import Subjects
from tandem.protocol.messages import (
    Ack,
    Cancel,
    ErrorReply,
    Health,
    HealthRequest,
    RequestMetrics,
    RouteRequest,
    SamplingParams,
    TokenChunk,
    encode,
)
from tandem.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    KvTransferInfo,
    ModelCard,
    ModelList,
    OpenAIError,
    PromptTokensDetails,
    TandemInfo,
    Usage,
    completion_prompt,
    decode_chat_request,
    decode_completion_request,
    encode_json,
    error_body,
    stop_list,
)
from tandem.services.runtime import (
    InstanceRegistry,
    RemoteError,
    ServiceBase,
    TaskTracker,
    common_parser,
    extract_context,
    get_logger,
    get_tracer,
    inject_headers,
    request,
    run_service,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CHUNK_TIMEOUT_S",
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "DEFAULT_MAX_MODEL_LEN",
    "DONE",
    "Frontend",
    "FrontendConfig",
    "Generation",
    "PreparedRequest",
    "StopStringMatcher",
    "create_app",
    "main",
]

DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_BLOCK_SIZE = 16
DEFAULT_CHUNK_TIMEOUT_S = 120.0
#: OpenAI's default ``max_tokens`` for the legacy completions endpoint.
DEFAULT_COMPLETION_MAX_TOKENS = 16
#: Terminal message of a stream (SSE ``data: [DONE]``; NATS payload ``[DONE]``).
DONE = b"[DONE]"
#: Reordering buffer bound: more out-of-order chunks than this means a broken producer.
MAX_PENDING_CHUNKS = 4096
#: HTTP request bodies larger than this get 413.
MAX_BODY_BYTES = 16 * 1024 * 1024

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}

RequestKind = Literal["chat", "completion"]

_log = get_logger("tandem.frontend")
_chunk_decoder = msgspec.msgpack.Decoder(TokenChunk | ErrorReply | Ack)


class _StreamFlag(msgspec.Struct):
    """Lenient peek at ``"stream"`` of a body that failed validation (NATS error framing)."""

    stream: Any = False


# ---- configuration and prepared requests -------------------------------------------------------------


@dataclass(frozen=True)
class FrontendConfig:
    """Frontend settings. ``chunk_timeout_s``: max seconds without in-order progress."""

    model_name: str
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    chunk_timeout_s: float = DEFAULT_CHUNK_TIMEOUT_S
    health_timeout_s: float = 1.0
    default_block_size: int = DEFAULT_BLOCK_SIZE
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class PreparedRequest:
    """A validated, tokenized request ready to route."""

    kind: RequestKind
    request_id: str
    model: str
    created: int
    token_ids: list[int]
    block_hashes: list[int]
    sampling: SamplingParams
    stops: list[str]
    stream: bool
    include_usage: bool
    return_token_ids: bool
    #: ``time.perf_counter()`` when the request arrived (for ``ttft_ms``).
    arrived: float


# ---- stop strings -------------------------------------------------------------------------------------


class StopStringMatcher:
    """Applies stop strings to text that arrives in pieces.

    :meth:`feed` returns the text that is safe to emit and whether a stop string matched (the
    text is then cut just before the earliest match). Text that might be the start of a stop
    string is held back until it is disambiguated; :meth:`flush` releases it at the end.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return ``(emit, matched)``."""
        if not self.stops:
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Release the held-back text (the stream ended without a match)."""
        held, self._held = self._held, ""
        return held


# ---- one request's token stream -----------------------------------------------------------------------


def _status_of(code: int) -> int:
    return code if 400 <= code < 600 else 500


class Generation:
    """Owns one routed request: its inbox subscription, chunk reordering, detokenizing, stops.

    Use as ``async with Generation(...) as gen:`` then call :meth:`next_text` until it returns
    None. Leaving the block always unsubscribes the inbox and, unless the request finished (a
    chunk with ``finish_reason`` arrived), publishes ``Cancel`` with the reason it ended.
    """

    def __init__(self, frontend: Frontend, prepared: PreparedRequest) -> None:
        self._fe = frontend
        self.prepared = prepared
        self._sub: Subscription | None = None
        self._pending: dict[int, TokenChunk] = {}
        self._next_index = 0
        self._detok = IncrementalDetokenizer(frontend.tokenizer)
        self._stops = StopStringMatcher(prepared.stops)
        #: Set when the request ended for us (stop string, final chunk, error or timeout).
        self.done = False
        #: Set when the pipeline finished the request itself (no Cancel needed).
        self.remote_finished = False
        self.finish_reason: str | None = None
        #: Generated token ids in order (before stop-string truncation of the text).
        self.token_ids: list[int] = []
        self.metrics: RequestMetrics | None = None
        self.ttft_ms: float | None = None
        self.first_worker = ""
        self.last_worker = ""
        self._cancel_reason = "client"
        self._closed = False

    async def __aenter__(self) -> Generation:
        await self.start()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self.close()

    async def start(self) -> None:
        """Subscribe the inbox, then publish the RouteRequest (reply subject = inbox)."""
        nc = self._fe.nc
        inbox = nc.new_inbox()
        self._sub = await nc.subscribe(inbox)
        p = self.prepared
        route = RouteRequest(
            request_id=p.request_id,
            model=p.model,
            token_ids=p.token_ids,
            block_hashes=p.block_hashes,
            sampling=p.sampling,
            reply_to=inbox,
        )
        try:
            await nc.publish(
                self._fe.subjects.router_generate, encode(route), reply=inbox, headers=inject_headers()
            )
        except Exception as e:
            self._cancel_reason = "error"
            raise OpenAIError(503, f"could not reach the router: {e}") from e

    async def close(self) -> None:
        """Unsubscribe the inbox; publish Cancel unless the request finished remotely. Idempotent."""
        if self._closed:
            return
        self._closed = True
        p = self.prepared
        if self._sub is not None and not self.remote_finished:
            try:
                await self._fe.nc.publish(
                    self._fe.subjects.cancel,
                    encode(Cancel(request_id=p.request_id, reason=self._cancel_reason)),
                    headers=inject_headers(),
                )
                _log.info("request_cancelled", request_id=p.request_id, reason=self._cancel_reason)
            except Exception as e:
                _log.warning("cancel_publish_failed", request_id=p.request_id, error=repr(e))
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception as e:
                _log.warning("inbox_unsubscribe_failed", request_id=p.request_id, error=repr(e))

    async def next_text(self) -> str | None:
        """The next non-empty piece of output text, or None once the request has ended.

        Raises :class:`OpenAIError` on an error chunk/reply (its code), no router (503) and
        no in-order progress for ``chunk_timeout_s`` (504).
        """
        while not self.done:
            chunk = await self._next_in_order()
            text = self._consume(chunk)
            if text:
                return text
        return None

    async def _next_in_order(self) -> TokenChunk:
        ready = self._pending.pop(self._next_index, None)
        if ready is not None:
            self._next_index += 1
            return ready
        if self._sub is None:
            raise RuntimeError("Generation not started")
        timeout = self._fe.config.chunk_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail("timeout")
                raise OpenAIError(
                    504,
                    f"No tokens for request {self.prepared.request_id} within {timeout:g} s.",
                    code="timeout",
                )
            try:
                msg = await self._sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                continue
            chunk = self._decode(msg)
            if chunk is None:
                continue
            if chunk.error is not None or chunk.finish_reason == "error":
                return chunk  # errors end the request whatever their index
            if chunk.index == self._next_index:
                self._next_index += 1
                return chunk
            if chunk.index > self._next_index and chunk.index not in self._pending:
                if len(self._pending) >= MAX_PENDING_CHUNKS:
                    self._fail("error")
                    raise OpenAIError(502, "Too many out-of-order token chunks.")
                self._pending[chunk.index] = chunk
            else:
                _log.debug("chunk_dropped", request_id=chunk.request_id, index=chunk.index)

    def _decode(self, msg: NatsMsg) -> TokenChunk | None:
        rid = self.prepared.request_id
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            self._fail("error")
            raise OpenAIError(503, "No router is serving requests (no responders on router.generate).")
        try:
            obj = _chunk_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            _log.warning("bad_inbox_message", request_id=rid, error=str(e))
            return None
        if isinstance(obj, Ack):
            return None
        if isinstance(obj, ErrorReply):
            self._fail("error")
            raise OpenAIError(_status_of(obj.code), obj.message, type=obj.type or None)
        if obj.request_id and obj.request_id != rid:
            _log.warning("foreign_chunk", request_id=rid, chunk_request_id=obj.request_id)
            return None
        return obj

    def _fail(self, reason: str) -> None:
        self.done = True
        self._cancel_reason = reason

    def _consume(self, chunk: TokenChunk) -> str:
        if chunk.worker_id:
            if not self.first_worker:
                self.first_worker = chunk.worker_id
            self.last_worker = chunk.worker_id
        if chunk.error is not None or chunk.finish_reason == "error":
            self.done = True
            self.remote_finished = True
            self.finish_reason = "error"
            err = chunk.error
            if err is None:
                raise OpenAIError(500, "The request failed in the serving pipeline.")
            raise OpenAIError(_status_of(err.code), err.message, type=err.type or None)
        if chunk.token_ids and self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.prepared.arrived) * 1000.0
        self.token_ids.extend(chunk.token_ids)
        # Special tokens (eos, chat markers) are not text: the detokenizer skips them.
        new_text = self._detok.add(chunk.token_ids) if chunk.token_ids else ""
        if chunk.finish_reason is not None:
            new_text += self._detok.flush()
        text, matched = self._stops.feed(new_text)
        if matched:
            self.done = True
            self.finish_reason = "stop"
            self._cancel_reason = "stop_string"
            if chunk.finish_reason is not None:
                self.remote_finished = True
                self.metrics = chunk.metrics
            return text
        if chunk.finish_reason is not None:
            self.done = True
            self.remote_finished = True
            self.finish_reason = chunk.finish_reason
            self.metrics = chunk.metrics
            text += self._stops.flush()
        return text

    def tandem_info(self) -> TandemInfo:
        """The ``tandem`` extension: from the final chunk's metrics, else from chunk senders."""
        m = self.metrics
        kv = None
        if m is not None and m.kv_transfer is not None:
            t = m.kv_transfer
            kv = KvTransferInfo(blocks=t.blocks, bytes=t.bytes, ms=t.ms, reused_blocks=t.reused_blocks)
        ttft = round(self.ttft_ms, 3) if self.ttft_ms is not None else None
        return TandemInfo(
            request_id=self.prepared.request_id,
            prefill_worker=(m.prefill_worker if m and m.prefill_worker else self.first_worker),
            decode_worker=(m.decode_worker if m and m.decode_worker else self.last_worker),
            kv_transfer=kv,
            cached_tokens=m.cached_tokens if m else 0,
            ttft_ms=ttft,
            prefill_ms=round(m.prefill_ms, 3) if m else None,
        )

    def usage(self) -> Usage:
        """Token counts (``cached_tokens`` from the final chunk's metrics)."""
        prompt = len(self.prepared.token_ids)
        cached = self.metrics.cached_tokens if self.metrics else 0
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=len(self.token_ids),
            total_tokens=prompt + len(self.token_ids),
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )


# ---- the shared core -----------------------------------------------------------------------------------


class Frontend:
    """Everything the HTTP app and the NATS subjects share: validation, tokenizing, routing.

    ``start()`` starts the instance registry (unless one is passed in) and subscribes the public
    NATS subjects; ``stop_intake()`` unsubscribes them; ``close()`` also stops the registry.
    """

    def __init__(
        self,
        nc: NatsClient,
        subjects: Subjects,
        tokenizer: Tokenizer,
        config: FrontendConfig,
        *,
        registry: InstanceRegistry | None = None,
        tracker: TaskTracker | None = None,
        instance_id: str = "",
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.tokenizer = tokenizer
        self.config = config
        self.instance_id = instance_id or f"frontend-{uuid.uuid4().hex[:8]}"
        self.tracker = tracker if tracker is not None else TaskTracker()
        self._registry = registry
        self._owns_registry = registry is None
        self._public_subs: list[Subscription] = []
        self._warned_sizes: set[int] = set()
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids: frozenset[int] = frozenset([eos]) if isinstance(eos, int) else frozenset()
        self._tracer = get_tracer("tandem.frontend")

    @property
    def registry(self) -> InstanceRegistry:
        """The instance registry (discovery); available once :meth:`start` ran."""
        if self._registry is None:
            raise RuntimeError("Frontend not started")
        return self._registry

    # -- life cycle
    async def start(self) -> None:
        """Start discovery and serve the public NATS subjects (queue group ``frontend``)."""
        if self._registry is None:
            self._registry = InstanceRegistry(self.nc.jetstream(), self.subjects)
            await self._registry.start()
        s = self.subjects
        for subject, kind in (
            (s.chat_completions, "chat"),
            (s.completions, "completion"),
            (s.models, "models"),
        ):
            self._public_subs.append(
                await self.nc.subscribe(
                    subject, queue=Subjects.FRONTEND_QUEUE, cb=self._public_cb(kind, subject)
                )
            )

    def _public_cb(self, kind: str, subject: str) -> Callable[[NatsMsg], Awaitable[None]]:
        async def cb(msg: NatsMsg) -> None:
            self.tracker.spawn(self.handle_nats(kind, subject, msg), name=f"public:{subject}")

        return cb

    async def stop_intake(self) -> None:
        """Unsubscribe the public NATS subjects (idempotent)."""
        subs, self._public_subs = self._public_subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def close(self) -> None:
        """Stop intake and, if this frontend started it, the registry watcher."""
        await self.stop_intake()
        if self._owns_registry and self._registry is not None:
            await self._registry.stop()

    # -- discovery
    def block_size(self) -> int:
        """Block size for hashing: the most common one the registered workers advertise."""
        sizes = Counter(i.block_size for i in self.registry.instances.values() if i.block_size > 0)
        if not sizes:
            return self.config.default_block_size
        if len(sizes) > 1 and set(sizes) != self._warned_sizes:
            self._warned_sizes = set(sizes)
            _log.warning("mixed_block_sizes", sizes=dict(sizes))
        return sizes.most_common(1)[0][0]

    async def readiness(self) -> tuple[bool, list[str]]:
        """``(ready, problems)``: router and indexer health, prefill/decode-capable workers."""
        problems: list[str] = []

        async def probe(service: str) -> None:
            try:
                h = await request(
                    self.nc,
                    self.subjects.health(service),
                    HealthRequest(),
                    Health,
                    timeout=self.config.health_timeout_s,
                )
            except (RemoteError, TimeoutError) as e:
                problems.append(f"{service} does not answer health ({e})")
                return
            if not h.ready:
                problems.append(f"{service} is not ready ({h.detail or 'no detail'})")

        await asyncio.gather(probe("router"), probe("indexer"))
        roles = [i.role for i in self.registry.instances.values()]
        if not any(r in ("prefill", "both") for r in roles):
            problems.append("no prefill-capable worker is registered")
        if not any(r in ("decode", "both") for r in roles):
            problems.append("no decode-capable worker is registered")
        return not problems, problems

    def models(self) -> ModelList:
        """The served model list."""
        return ModelList(
            data=[
                ModelCard(
                    id=self.config.model_name,
                    created=self.config.created,
                    max_model_len=self.config.max_model_len,
                )
            ]
        )

    # -- validation and tokenizing
    def prepare(self, kind: RequestKind, body: bytes, arrived: float | None = None) -> PreparedRequest:
        """Validate and tokenize a request body; raises :class:`OpenAIError` (400/404)."""
        arrived = time.perf_counter() if arrived is None else arrived
        req: ChatCompletionRequest | CompletionRequest
        if kind == "chat":
            req = decode_chat_request(body)
        else:
            req = decode_completion_request(body)
        if req.model != self.config.model_name:
            raise OpenAIError(
                404,
                f"The model '{req.model}' does not exist; this server serves '{self.config.model_name}'.",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )
        if isinstance(req, ChatCompletionRequest):
            token_ids = self._chat_tokens(req)
            requested = req.effective_max_tokens()
            param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            prefix = "chatcmpl"
        else:
            token_ids = self._completion_tokens(req)
            requested = req.max_tokens
            param = "max_tokens"
            prefix = "cmpl"
        limit = self.config.max_model_len
        room = limit - len(token_ids)
        if room < 1:
            raise OpenAIError(
                400,
                f"The prompt is {len(token_ids)} tokens; this model's context is {limit} tokens "
                "(the prompt must leave room for at least one new token).",
                param="messages" if kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        if requested is None:
            max_tokens = room if kind == "chat" else min(DEFAULT_COMPLETION_MAX_TOKENS, room)
        elif requested > room:
            raise OpenAIError(
                400,
                f"This model's context is {limit} tokens; the prompt is {len(token_ids)} tokens and "
                f"{requested} new tokens were requested ({len(token_ids) + requested} in total). "
                f"Lower '{param}' to at most {room}.",
                param=param,
                code="context_length_exceeded",
            )
        else:
            max_tokens = requested
        top_k = req.top_k or 0
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(top_k, 0),
            seed=req.seed,
            stop_token_ids=[] if req.ignore_eos else sorted(self.eos_ids),
            ignore_eos=req.ignore_eos,
        )
        return PreparedRequest(
            kind=kind,
            request_id=f"{prefix}-{uuid.uuid4().hex}",
            model=req.model,
            created=int(time.time()),
            token_ids=token_ids,
            block_hashes=compute_block_hashes(token_ids, self.block_size()),
            sampling=sampling,
            stops=stop_list(req.stop),
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            return_token_ids=req.return_token_ids,
            arrived=arrived,
        )

    def _chat_tokens(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # a template may reject a conversation (e.g. role order)
            raise OpenAIError(400, f"Could not apply the chat template: {e}", param="messages") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _completion_tokens(self, req: CompletionRequest) -> list[int]:
        prompt = completion_prompt(req)
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        vocab = getattr(self.tokenizer, "vocab_size", None)
        if isinstance(vocab, int) and any(t >= vocab for t in prompt):
            raise OpenAIError(400, f"Token ids must be below the vocabulary size ({vocab}).", param="prompt")
        return prompt

    # -- generation
    def generation(self, prepared: PreparedRequest) -> Generation:
        """A :class:`Generation` for ``prepared`` (use with ``async with``)."""
        return Generation(self, prepared)

    async def complete(self, prepared: PreparedRequest) -> bytes:
        """Run a non-streaming request; returns the response JSON. Raises :class:`OpenAIError`."""
        parts: list[str] = []
        async with self.generation(prepared) as gen:
            while (text := await gen.next_text()) is not None:
                parts.append(text)
        content = "".join(parts)
        p = prepared
        token_ids = list(gen.token_ids) if p.return_token_ids else UNSET
        if p.kind == "chat":
            return encode_json(
                ChatCompletion(
                    id=p.request_id,
                    created=p.created,
                    model=p.model,
                    choices=[
                        ChatChoice(
                            index=0,
                            message=AssistantMessage(content=content),
                            finish_reason=gen.finish_reason,
                            token_ids=token_ids,
                        )
                    ],
                    usage=gen.usage(),
                    tandem=gen.tandem_info(),
                )
            )
        return encode_json(
            Completion(
                id=p.request_id,
                created=p.created,
                model=p.model,
                choices=[
                    CompletionChoice(
                        index=0, text=content, finish_reason=gen.finish_reason, token_ids=token_ids
                    )
                ],
                usage=gen.usage(),
                tandem=gen.tandem_info(),
            )
        )

    async def stream(self, prepared: PreparedRequest) -> AsyncGenerator[bytes, None]:
        """Run a streaming request; yields each chunk's JSON (no SSE framing, no ``[DONE]``).

        Raises :class:`OpenAIError` (possibly after some chunks). Close it (``aclosing``) when
        abandoning it early: that cancels the request.
        """
        p = prepared
        usage_field: Usage | msgspec.UnsetType | None = None if p.include_usage else msgspec.UNSET

        def chunk(
            text: str | None, *, role: bool = False, finish: str | None = None, info: TandemInfo | None = None
        ) -> bytes:
            tandem: TandemInfo | msgspec.UnsetType = info if info is not None else msgspec.UNSET
            if p.kind == "chat":
                delta = ChatDelta(
                    role="assistant" if role else msgspec.UNSET,
                    content=text if text is not None else msgspec.UNSET,
                )
                return encode_json(
                    ChatCompletionChunk(
                        id=p.request_id,
                        created=p.created,
                        model=p.model,
                        choices=[ChatChunkChoice(index=0, delta=delta, finish_reason=finish)],
                        usage=usage_field,
                        tandem=tandem,
                    )
                )
            return encode_json(
                Completion(
                    id=p.request_id,
                    created=p.created,
                    model=p.model,
                    choices=[CompletionChoice(index=0, text=text or "", finish_reason=finish)],
                    usage=usage_field,
                    tandem=tandem,
                )
            )

        async with self.generation(p) as gen:
            sent_role = p.kind != "chat"
            while (text := await gen.next_text()) is not None:
                if not sent_role:
                    sent_role = True
                    yield chunk("", role=True)
                yield chunk(text)
            if not sent_role:
                yield chunk("", role=True)
            yield chunk(None if p.kind == "chat" else "", finish=gen.finish_reason, info=gen.tandem_info())
            if p.include_usage:
                final: ChatCompletionChunk | Completion
                if p.kind == "chat":
                    final = ChatCompletionChunk(
                        id=p.request_id, created=p.created, model=p.model, choices=[], usage=gen.usage()
                    )
                else:
                    final = Completion(
                        id=p.request_id, created=p.created, model=p.model, choices=[], usage=gen.usage()
                    )
                yield encode_json(final)

    # -- public NATS subjects
    async def handle_nats(self, kind: str, subject: str, msg: NatsMsg) -> None:
        """Answer one public NATS request (see the module docstring for the convention)."""
        arrived = time.perf_counter()
        reply = msg.reply
        if not reply:
            _log.warning("public_request_without_reply", subject=subject)
            return
        with self._tracer.start_as_current_span(
            subject,
            context=extract_context(msg.headers),
            kind=SpanKind.SERVER,
            attributes={"messaging.system": "nats", "messaging.destination.name": subject},
        ) as span:
            if kind == "models":
                await self._nats_send(reply, encode_json(self.models()))
                return
            streaming = _wants_stream(msg.data)
            try:
                prepared = self.prepare("chat" if kind == "chat" else "completion", msg.data, arrived)
                span.set_attribute("tandem.request_id", prepared.request_id)
                if prepared.stream:
                    async with contextlib.aclosing(self.stream(prepared)) as chunks:
                        async for data in chunks:
                            await self.nc.publish(reply, data)
                else:
                    await self._nats_send(reply, await self.complete(prepared))
            except OpenAIError as e:
                span.set_status(Status(StatusCode.ERROR, e.message))
                _log.info("request_failed", subject=subject, status=e.status, error=e.message)
                await self._nats_send(reply, error_body(e, with_status=True))
            except Exception as e:
                _log.exception("public_request_failed", subject=subject, error=repr(e))
                span.record_exception(e)
                span.set_status(Status(StatusCode.ERROR, repr(e)))
                err = OpenAIError(500, f"Internal error: {type(e).__name__}")
                await self._nats_send(reply, error_body(err, with_status=True))
            if streaming:
                await self._nats_send(reply, DONE)

    async def _nats_send(self, subject: str, data: bytes) -> None:
        try:
            await self.nc.publish(subject, data)
        except Exception as e:
            _log.warning("public_reply_failed", reply_subject=subject, error=repr(e))


def _wants_stream(body: bytes) -> bool:
    try:
        return msgspec.json.decode(body, type=_StreamFlag).stream is True
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False


# ---- HTTP app -----------------------------------------------------------------------------------------

FRONTEND_KEY = web.AppKey("frontend", Frontend)


def _json_response(data: bytes, status: int = 200, request_id: str | None = None) -> web.Response:
    headers = {"X-Request-Id": request_id} if request_id else None
    return web.Response(body=data, status=status, content_type="application/json", headers=headers)


def _error_response(err: OpenAIError) -> web.Response:
    return _json_response(error_body(err), err.status)


@web.middleware
async def _trace_and_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """One SERVER span per request; every error becomes an OpenAI error body."""
    route = request.match_info.route.resource
    name = f"{request.method} {route.canonical if route is not None else request.path}"
    tracer = get_tracer("tandem.frontend")
    with tracer.start_as_current_span(
        name,
        context=extract_context(request.headers),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": request.method, "url.path": request.path},
    ) as span:
        try:
            resp = await handler(request)
        except web.HTTPException as e:
            msg = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
            resp = _error_response(OpenAIError(e.status, msg or e.reason))
        except Exception as e:
            _log.exception("http_handler_failed", path=request.path, error=repr(e))
            span.record_exception(e)
            resp = _error_response(OpenAIError(500, f"Internal error: {type(e).__name__}"))
        span.set_attribute("http.response.status_code", resp.status)
        if resp.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        return resp


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    fe = request.app[FRONTEND_KEY]
    ready, problems = await fe.readiness()
    if ready:
        return web.json_response({"status": "ready", "workers": len(fe.registry.instances)})
    return _error_response(OpenAIError(503, "Not ready: " + "; ".join(problems) + ".", code="not_ready"))


async def _models(request: web.Request) -> web.Response:
    return _json_response(encode_json(request.app[FRONTEND_KEY].models()))


async def _model(request: web.Request) -> web.Response:
    fe = request.app[FRONTEND_KEY]
    model_id = request.match_info["model"]
    for card in fe.models().data:
        if card.id == model_id:
            return _json_response(encode_json(card))
    raise web.HTTPNotFound(text=f"The model '{model_id}' does not exist.")


def _generate_handler(kind: RequestKind) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        arrived = time.perf_counter()
        fe = request.app[FRONTEND_KEY]
        body = await request.read()
        try:
            prepared = fe.prepare(kind, body, arrived)
        except OpenAIError as e:
            _log.info("request_rejected", path=request.path, status=e.status, error=e.message)
            return _error_response(e)
        trace.get_current_span().set_attribute("tandem.request_id", prepared.request_id)
        if not prepared.stream:
            try:
                return _json_response(await fe.complete(prepared), request_id=prepared.request_id)
            except OpenAIError as e:
                _log.info("request_failed", request_id=prepared.request_id, status=e.status, error=e.message)
                return _error_response(e)
        return await _stream_sse(request, fe, prepared)

    return handler


async def _stream_sse(request: web.Request, fe: Frontend, prepared: PreparedRequest) -> web.StreamResponse:
    """SSE: headers go out with the first chunk, so an error before it gets a real status.

    An error after that is sent as one ``data: {"error": ...}`` event, then ``data: [DONE]``.
    """
    rid = prepared.request_id
    resp: web.StreamResponse | None = None
    error: OpenAIError | None = None
    try:
        async with contextlib.aclosing(fe.stream(prepared)) as chunks:
            async for data in chunks:
                if resp is None:
                    resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
                    resp.headers["X-Request-Id"] = rid
                    await resp.prepare(request)
                await resp.write(b"data: " + data + b"\n\n")
    except OpenAIError as e:
        error = e
    except asyncio.CancelledError:
        # aiohttp cancelled the handler (client went away): aclosing closed the generation
        # (Cancel published, inbox unsubscribed).
        _log.info("client_disconnected", request_id=rid, how="cancelled")
        raise
    except ConnectionError:
        # A write failed (client went away): same cleanup through aclosing.
        _log.info("client_disconnected", request_id=rid, how="write_failed")
        return resp if resp is not None else web.Response(status=499)
    except Exception as e:
        if resp is None:
            raise  # the middleware answers 500 with an OpenAI error body
        _log.exception("stream_failed", request_id=rid, error=repr(e))
        error = OpenAIError(500, f"Internal error: {type(e).__name__}")
    if error is not None:
        _log.info("request_failed", request_id=rid, status=error.status, error=error.message)
        if resp is None:
            return _error_response(error)
    if resp is None:  # cannot happen: a finished stream yields at least its final chunk
        raise RuntimeError("stream ended without any chunk")
    try:
        if error is not None:
            await resp.write(b"data: " + error_body(error) + b"\n\n")
        await resp.write(b"data: " + DONE + b"\n\n")
        await resp.write_eof()
    except ConnectionError:
        _log.info("client_disconnected", request_id=rid, how="write_failed")
    return resp


def create_app(frontend: Frontend) -> web.Application:
    """The aiohttp application serving ``frontend``.

    Run it with ``handler_cancellation=True`` (``AppRunner``/``TestServer`` kwarg) so a client
    that disconnects cancels its request promptly.
    """
    app = web.Application(middlewares=[_trace_and_errors], client_max_size=MAX_BODY_BYTES)
    app[FRONTEND_KEY] = frontend
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model}", _model)
    app.router.add_post("/v1/chat/completions", _generate_handler("chat"))
    app.router.add_post("/v1/completions", _generate_handler("completion"))
    return app


# ---- process ------------------------------------------------------------------------------------------


def _model_name(model_dir: Path) -> str:
    """``prepared.json``'s model name, else the directory name."""
    try:
        name = json.loads((model_dir / "prepared.json").read_text()).get("model")
    except (OSError, ValueError):
        name = None
    return name if isinstance(name, str) and name else model_dir.name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of ``python -m tandem.services.frontend``."""
    p = common_parser("frontend", "OpenAI-compatible HTTP API and public NATS subjects.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-dir", default=None, help="prepared model directory (default: prepare_model())")
    p.add_argument("--model-name", default=None, help="served model id (default: from the model dir)")
    p.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN)
    p.add_argument(
        "--chunk-timeout",
        type=float,
        default=DEFAULT_CHUNK_TIMEOUT_S,
        help="seconds without token progress before a request fails with 504",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the frontend process until SIGINT/SIGTERM; returns the exit code."""
    args = parse_args(argv)

    async def setup(svc: ServiceBase) -> None:
        if args.model_dir:
            model_dir = Path(args.model_dir)
        else:
            from tandem.engine.weights import prepare_model

            model_dir = await asyncio.to_thread(prepare_model)
        tokenizer = await asyncio.to_thread(Tokenizer, model_dir)
        config = FrontendConfig(
            model_name=args.model_name or _model_name(model_dir),
            max_model_len=args.max_model_len,
            chunk_timeout_s=args.chunk_timeout,
        )
        fe = Frontend(
            svc.nc, svc.subjects, tokenizer, config, tracker=svc.tracker, instance_id=svc.instance_id
        )
        await fe.start()
        svc.on_close(fe.close)
        runner = web.AppRunner(
            create_app(fe), handler_cancellation=True, shutdown_timeout=8.0, access_log=None
        )
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        # LIFO: stop NATS intake first, then stop HTTP (in-flight HTTP requests finish, bounded).
        svc.on_unregister(runner.cleanup)
        svc.on_unregister(fe.stop_intake)
        svc.log.info("http_listening", host=args.host, port=args.port, model=config.model_name)

    return run_service(setup, "frontend", args)


if __name__ == "__main__":
    raise SystemExit(main())
