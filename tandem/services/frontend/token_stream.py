"""Stage 2 of the pipeline: one routed request's in-order :class:`TokenChunk` stream.

:class:`TokenStream` owns the transport of one request and nothing else: it takes a fresh
inbox, publishes the ``RouteRequest`` (reply subject = the inbox), reorders the chunks that
arrive there by ``index``, enforces the no-progress timeout, maps every failure to an
:class:`OpenAIError` and, when it is closed before the pipeline finished the request, publishes
``Cancel``. It knows nothing about text, stop strings or response formats (that is
:mod:`.output`, :mod:`.generation` and :mod:`.render`).

Inboxes
-------
A frontend does not subscribe an inbox per request: one :class:`InboxMux` per NATS connection
subscribes ``_INBOX.<nuid>.*`` once and hands each stream its own ``_INBOX.<nuid>.<n>``; the
messages arriving there are appended to that stream's queue in the subscription's callback
(nats-py's request mux, for streams). A request costs no ``SUB``/``UNSUB`` round of the
protocol and no task per message; a stream that has chunks queued hands them out without
waiting (:meth:`TokenStream.poll_chunk`), which lets the HTTP layer write every chunk already
here in one go. Releasing an inbox (closing the stream) drops whatever still arrives for it.

Migration seam
--------------
A later ``migration.py`` (Dynamo's ``Migration`` operator, ``migration.rs``) wraps this class:
a ``MigratingStream`` that hands out the same :meth:`TokenStream.next_chunk` and, when a stream
fails in a retryable way (an :class:`OpenAIError` with status 502/503/504 from
:meth:`~TokenStream.next_chunk`, or the registry reporting the decode worker gone), closes it
(which publishes its ``Cancel``) and opens a new :class:`TokenStream` for the *same* client
request with ``token_ids = prompt + generated so far``, ``sampling.max_tokens`` reduced by the
tokens already generated and fresh ``block_hashes``. What this class provides for that:

* it is built from explicit route fields (:meth:`TokenStream.__init__`), not from a frontend
  or a prepared request, so a wrapper can build the follow-up stream itself;
* ``request_id`` is the pipeline's id of *this attempt*: give the follow-up its own id (e.g.
  ``f"{id}.m1"``) so the first attempt's ``Cancel`` cannot reach it;
* ``index_base`` renumbers the chunks it hands out (``index + index_base``), so a follow-up
  started with ``index_base = previous.next_index`` continues the client-visible chunk indices;
* :attr:`TokenStream.finished`, :attr:`TokenStream.next_index` and :meth:`TokenStream.stop`
  tell a wrapper where the attempt stands and let it end one without a client-visible error.

:mod:`.migration` is that wrapper.

Liveness
--------
A stream knows who holds its request from the ``Ack`` messages that arrive on its inbox: the
router replica that took the ``RouteRequest`` acks on receipt (``service="router"``), and again
with the decode worker's id once that worker accepted the request (``service="worker"``). While
the stream has had no message for ``liveness_interval_s``, it asks the holder's liveness (the
``liveness`` callback: a ``HealthRequest`` to ``Subjects.health_instance("router", id)`` or
``Subjects.worker_health(id)``, with the request id) once per interval. A holder gone from NATS
(no responders: a killed process is noticed by the server at once), one that answers it does
not hold the request any more (its chunks were lost, e.g. in a NATS restart), or one silent for
``LIVENESS_MISSES`` probes in a row (a hung one) ends the stream with a 503
``code="worker_lost"``, which :mod:`.migration` retries on another worker — seconds after the
fault, not after the ``chunk_timeout_s`` of silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription

from tandem.protocol import Subjects
from tandem.protocol.messages import Ack, Cancel, ErrorReply, RouteRequest, SamplingParams, TokenChunk, encode
from tandem.protocol.openai import OpenAIError
from tandem.services.messaging import sync_with_server
from tandem.services.observability import get_logger, inject_headers

__all__ = [
    "LIVENESS_MISSES",
    "MAX_PENDING_CHUNKS",
    "MAX_QUEUED_MESSAGES",
    "InboxMux",
    "Liveness",
    "TokenStream",
    "error_from_reply",
]

#: Reordering buffer bound: more out-of-order chunks than this means a broken producer.
MAX_PENDING_CHUNKS = 4096
#: Messages queued for one stream and not read yet; beyond this the stream fails (502).
MAX_QUEUED_MESSAGES = 65536
#: Liveness probes in a row without an answer after which a holder counts as gone.
LIVENESS_MISSES = 3

#: ``await liveness(service, instance_id, request_id)``: True = alive and holding the request,
#: False = gone (no responders) or no longer holding it (lost), None = no answer in time (a miss).
Liveness = Callable[[str, str, str], Awaitable[bool | None]]

_log = get_logger("tandem.frontend")
_inbox_decoder = msgspec.msgpack.Decoder(TokenChunk | ErrorReply | Ack)


def error_from_reply(err: ErrorReply) -> OpenAIError:
    """The client-facing error for a pipeline ``ErrorReply`` (its code, type and retry hint)."""
    status = err.code if 400 <= err.code < 600 else 500
    return OpenAIError(status, err.message, type=err.type or None, retry_after_s=err.retry_after_s)


class InboxMux:
    """One wildcard inbox subscription shared by every :class:`TokenStream` of a connection.

    :meth:`start` subscribes ``<prefix>.*`` (``prefix`` = a fresh ``_INBOX.<nuid>``) and waits
    until the server has it; :meth:`open` gives a stream the inbox ``<prefix>.<n>`` and routes
    what arrives there to the stream's queue, until :meth:`release`. Messages for an inbox that
    is not open (any more) are dropped. After a reconnect nats-py subscribes again by itself.
    :meth:`of` is the connection's shared mux (what a :class:`TokenStream` built without one uses).
    """

    _shared: ClassVar[weakref.WeakKeyDictionary[NatsClient, InboxMux]] = weakref.WeakKeyDictionary()

    def __init__(self, nc: NatsClient) -> None:
        self._nc = weakref.ref(nc)  # weak: the shared registry is keyed by the connection
        self.prefix = nc.new_inbox()
        self._streams: dict[str, TokenStream] = {}
        self._ids = itertools.count(1)
        self._sub: Subscription | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def of(cls, nc: NatsClient) -> InboxMux:
        """The mux shared by the streams of ``nc`` (created on first use, not started)."""
        mux = cls._shared.get(nc)
        if mux is None:
            mux = cls._shared[nc] = cls(nc)
        return mux

    @property
    def nc(self) -> NatsClient:
        nc = self._nc()
        if nc is None:
            raise RuntimeError("the NATS connection of this inbox mux is gone")
        return nc

    @property
    def started(self) -> bool:
        return self._sub is not None

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, inbox: object) -> bool:
        return inbox in self._streams

    async def start(self) -> None:
        """Subscribe the wildcard and flush (idempotent)."""
        if self._sub is not None:
            return
        async with self._lock:
            if self._sub is None:
                sub = await self.nc.subscribe(f"{self.prefix}.*", cb=self._on_msg)
                await sync_with_server(self.nc)
                self._sub = sub

    async def stop(self) -> None:
        """Unsubscribe (idempotent); open streams get nothing more (they time out)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def open(self, stream: TokenStream) -> str:
        """A fresh inbox whose messages go to ``stream`` (:meth:`TokenStream._deliver`)."""
        inbox = f"{self.prefix}.{next(self._ids)}"
        self._streams[inbox] = stream
        return inbox

    def release(self, inbox: str) -> None:
        """Stop routing ``inbox`` (idempotent)."""
        self._streams.pop(inbox, None)

    async def _on_msg(self, msg: NatsMsg) -> None:
        # Runs in the subscription's task for every message: route it, nothing else.
        stream = self._streams.get(msg.subject)
        if stream is not None:
            stream._deliver(msg)


class TokenStream:
    """One attempt at running a request through the pipeline, as in-order token chunks.

    Use as ``async with TokenStream(...) as stream:`` (or :meth:`start` / :meth:`close`) and call
    :meth:`next_chunk` until it returns None (:meth:`poll_chunk` is the same without waiting).
    Leaving the block always releases the inbox and, unless the pipeline finished the request
    (final or error chunk), publishes ``Cancel`` with the reason the stream ended:
    ``"client"`` (default: the consumer went away), ``"timeout"``, ``"error"``, or what
    :meth:`stop` was given. ``inbox`` is the :class:`InboxMux` to take the inbox from (default:
    the connection's shared one, :meth:`InboxMux.of`).
    """

    def __init__(
        self,
        nc: NatsClient,
        subjects: Subjects,
        *,
        request_id: str,
        model: str,
        token_ids: list[int],
        block_hashes: list[int],
        sampling: SamplingParams,
        chunk_timeout_s: float,
        index_base: int = 0,
        inbox: InboxMux | None = None,
        liveness: Liveness | None = None,
        liveness_interval_s: float = 1.0,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.request_id = request_id
        self.model = model
        self.token_ids = token_ids
        self.block_hashes = block_hashes
        self.sampling = sampling
        self.chunk_timeout_s = chunk_timeout_s
        self.index_base = index_base
        self.liveness = liveness
        self.liveness_interval_s = liveness_interval_s
        #: ``(service, instance_id)`` of who holds the request now (from the latest ``Ack``).
        self.holder: tuple[str, str] | None = None
        self._last_activity = time.monotonic()
        self._misses = 0
        #: Set once the pipeline finished the request (final or error chunk): no Cancel needed.
        self.finished = False
        #: Why a Cancel goes out if the stream is closed before it finished.
        self.cancel_reason = "client"
        #: The reply subject of this attempt ('' before :meth:`start` and after :meth:`close`).
        self.inbox = ""
        self._mux = inbox if inbox is not None else InboxMux.of(nc)
        self._ended = False
        self._queue: deque[NatsMsg] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._overflow = False
        self._pending: dict[int, TokenChunk] = {}
        self._next_index = 0
        self._started = False
        self._closed = False

    @property
    def next_index(self) -> int:
        """The client-visible index the next chunk will get (``index_base`` + chunks handed out)."""
        return self.index_base + self._next_index

    @property
    def ended(self) -> bool:
        """No chunk will be handed out any more (final or error chunk, failure or :meth:`stop`)."""
        return self._ended

    async def __aenter__(self) -> TokenStream:
        await self.start()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self.close()

    async def start(self) -> None:
        """Take an inbox, then publish the RouteRequest (reply subject = inbox).

        Raises :class:`OpenAIError` (503) if the publish fails.
        """
        mux = self._mux
        if not mux.started:
            await mux.start()
        inbox = self.inbox = mux.open(self)
        self._started = True
        route = RouteRequest(
            request_id=self.request_id,
            model=self.model,
            token_ids=self.token_ids,
            block_hashes=self.block_hashes,
            sampling=self.sampling,
            reply_to=inbox,
        )
        try:
            await self.nc.publish(
                self.subjects.router_generate, encode(route), reply=inbox, headers=inject_headers()
            )
        except Exception as e:
            self._end("error")
            raise OpenAIError(503, f"could not reach the router: {e}", code="no_router") from e

    def stop(self, reason: str) -> None:
        """Stop reading (e.g. ``"stop_string"``): :meth:`next_chunk` returns None from now on and
        :meth:`close` cancels the request with ``reason`` unless it already finished."""
        self._end(reason)

    async def close(self) -> None:
        """Release the inbox; publish Cancel unless the request finished remotely. Idempotent."""
        if self._closed:
            return
        self._closed = True
        rid = self.request_id
        if self.inbox:
            self._mux.release(self.inbox)
            self.inbox = ""
        self._queue.clear()
        if self._started and not self.finished:
            try:
                await self.nc.publish(
                    self.subjects.cancel,
                    encode(Cancel(request_id=rid, reason=self.cancel_reason)),
                    headers=inject_headers(),
                )
                _log.info("request_cancelled", request_id=rid, reason=self.cancel_reason)
            except Exception as e:
                _log.warning("cancel_publish_failed", request_id=rid, error=repr(e))

    async def next_chunk(self) -> TokenChunk | None:
        """The next chunk in index order, or None once the stream ended (after the final chunk,
        or after :meth:`stop`).

        Raises :class:`OpenAIError`: an error chunk or ``ErrorReply`` from the pipeline (its
        code, type and retry hint), no router subscribed (503), too many out-of-order or unread
        chunks (502) and no in-order progress for ``chunk_timeout_s`` (504).
        """
        if self._ended:
            return None
        chunk = self._take()
        if chunk is None:
            chunk = await self._receive()
        return self._hand_out(chunk)

    def poll_chunk(self) -> TokenChunk | None:
        """:meth:`next_chunk` without waiting: the next chunk if it is already here, else None
        (also once the stream ended; :attr:`ended` tells which). Raises as :meth:`next_chunk`."""
        if self._ended:
            return None
        chunk = self._take()
        return None if chunk is None else self._hand_out(chunk)

    def _hand_out(self, chunk: TokenChunk) -> TokenChunk:
        self._next_index += 1
        if chunk.error is not None or chunk.finish_reason == "error":
            self.finished = True
            self._end("error")
            if chunk.error is None:
                raise OpenAIError(500, "The request failed in the serving pipeline.")
            raise error_from_reply(chunk.error)
        if chunk.finish_reason is not None:
            self.finished = True
            self._ended = True
        if self.index_base:
            chunk = msgspec.structs.replace(chunk, index=chunk.index + self.index_base)
        return chunk

    def _end(self, reason: str) -> None:
        self._ended = True
        self.cancel_reason = reason

    def _deliver(self, msg: NatsMsg) -> None:
        """The mux's callback: queue ``msg`` and wake the reader."""
        self._last_activity = time.monotonic()
        queue = self._queue
        if len(queue) >= MAX_QUEUED_MESSAGES:
            self._overflow = True
        else:
            queue.append(msg)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _take(self) -> TokenChunk | None:
        """Chunk ``_next_index`` (or an error chunk) if it is here, buffering later ones; None
        if it is not here yet."""
        if not self._started:
            raise RuntimeError("TokenStream not started")
        chunk = self._pending.pop(self._next_index, None)
        if chunk is not None:
            return chunk
        queue = self._queue
        while queue:
            chunk = self._decode(queue.popleft())
            if chunk is None:
                continue
            if chunk.error is not None or chunk.finish_reason == "error":
                return chunk  # errors end the request whatever their index
            if chunk.index == self._next_index:
                return chunk
            if chunk.index > self._next_index and chunk.index not in self._pending:
                if len(self._pending) >= MAX_PENDING_CHUNKS:
                    self._end("error")
                    raise OpenAIError(502, "Too many out-of-order token chunks.")
                self._pending[chunk.index] = chunk
            else:
                _log.debug("chunk_dropped", request_id=chunk.request_id, index=chunk.index)
        if self._overflow:
            self._end("error")
            raise OpenAIError(502, "Too many unread token chunks.")
        return None

    async def _receive(self) -> TokenChunk:
        """Wait for chunk ``_next_index`` (or an error chunk) for up to ``chunk_timeout_s``,
        probing the holder's liveness while nothing arrives (see the module docstring)."""
        timeout = self.chunk_timeout_s
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        probe_every = self.liveness_interval_s if self.liveness is not None else None
        while True:
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                self._end("timeout")
                raise OpenAIError(
                    504, f"No tokens for request {self.request_id} within {timeout:g} s.", code="timeout"
                )
            wait = left
            if probe_every is not None:
                wait = min(wait, max(self._last_activity + probe_every - now, 0.001))
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(wait, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            chunk = self._take()
            if chunk is not None:
                return chunk
            if probe_every is not None and time.monotonic() - self._last_activity >= probe_every:
                await self._check_holder()

    async def _check_holder(self) -> None:
        """Probe the holder once; raises ``OpenAIError(503, code="worker_lost")`` if it is gone."""
        holder, liveness = self.holder, self.liveness
        self._last_activity = time.monotonic()  # next probe one interval from now
        if holder is None or liveness is None:
            return
        alive = await liveness(holder[0], holder[1], self.request_id)
        if self._queue or self._pending.get(self._next_index) is not None:
            self._misses = 0
            return  # it spoke meanwhile (e.g. the final chunk just before it let go)
        if alive is None:
            self._misses += 1
        elif alive:
            self._misses = 0
        if alive is False or self._misses >= LIVENESS_MISSES:
            how = "is gone or lost it" if alive is False else f"did not answer {self._misses} probes"
            self._end("worker_lost")
            _log.warning("holder_lost", request_id=self.request_id, service=holder[0], instance_id=holder[1])
            raise OpenAIError(
                503,
                f"The {holder[0]} {holder[1]} serving request {self.request_id} {how}.",
                type="service_unavailable",
                code="worker_lost",
            )

    def _decode(self, msg: NatsMsg) -> TokenChunk | None:
        """A chunk for this request, or None for anything to skip; raises for replies that end it."""
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            self._end("error")
            raise OpenAIError(
                503, "No router is serving requests (no responders on router.generate).", code="no_router"
            )
        try:
            obj = _inbox_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            _log.warning("bad_inbox_message", request_id=self.request_id, error=str(e))
            return None
        if isinstance(obj, Ack):
            if obj.request_id == self.request_id and obj.worker_id:
                self.holder = (obj.service, obj.worker_id)
                self._misses = 0
            return None
        if isinstance(obj, ErrorReply):
            self._end("error")
            raise error_from_reply(obj)
        if obj.request_id and obj.request_id != self.request_id:
            _log.warning("foreign_chunk", request_id=self.request_id, chunk_request_id=obj.request_id)
            return None
        return obj


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
