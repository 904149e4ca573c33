"""Stage 2 of the pipeline: one routed request's in-order :class:`TokenChunk` stream.

:class:`TokenStream` owns the transport of one request and nothing else: it subscribes a fresh
inbox, publishes the ``RouteRequest`` (reply subject = the inbox), reorders the chunks that
arrive there by ``index``, enforces the no-progress timeout, maps every failure to an
:class:`OpenAIError` and, when it is closed before the pipeline finished the request, publishes
``Cancel``. It knows nothing about text, stop strings or response formats (that is
:mod:`.output`, :mod:`.generation` and :mod:`.render`).

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
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription

from tandem.protocol import Subjects
from tandem.protocol.messages import Ack, Cancel, ErrorReply, RouteRequest, SamplingParams, TokenChunk, encode
from tandem.protocol.openai import OpenAIError
from tandem.services.runtime import get_logger, inject_headers

__all__ = ["MAX_PENDING_CHUNKS", "TokenStream", "error_from_reply"]

#: Reordering buffer bound: more out-of-order chunks than this means a broken producer.
MAX_PENDING_CHUNKS = 4096

_log = get_logger("tandem.frontend")
_inbox_decoder = msgspec.msgpack.Decoder(TokenChunk | ErrorReply | Ack)


def error_from_reply(err: ErrorReply) -> OpenAIError:
    """The client-facing error for a pipeline ``ErrorReply`` (its code, type and retry hint)."""
    status = err.code if 400 <= err.code < 600 else 500
    return OpenAIError(status, err.message, type=err.type or None, retry_after_s=err.retry_after_s)


class TokenStream:
    """One attempt at running a request through the pipeline, as in-order token chunks.

    Use as ``async with TokenStream(...) as stream:`` (or :meth:`start` / :meth:`close`) and call
    :meth:`next_chunk` until it returns None. Leaving the block always unsubscribes the inbox
    and, unless the pipeline finished the request (final or error chunk), publishes ``Cancel``
    with the reason the stream ended: ``"client"`` (default: the consumer went away),
    ``"timeout"``, ``"error"``, or what :meth:`stop` was given.
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
        #: Set once the pipeline finished the request (final or error chunk): no Cancel needed.
        self.finished = False
        #: Why a Cancel goes out if the stream is closed before it finished.
        self.cancel_reason = "client"
        self._ended = False
        self._sub: Subscription | None = None
        self._pending: dict[int, TokenChunk] = {}
        self._next_index = 0
        self._closed = False

    @property
    def next_index(self) -> int:
        """The client-visible index the next chunk will get (``index_base`` + chunks handed out)."""
        return self.index_base + self._next_index

    async def __aenter__(self) -> TokenStream:
        await self.start()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self.close()

    async def start(self) -> None:
        """Subscribe the inbox, then publish the RouteRequest (reply subject = inbox).

        Raises :class:`OpenAIError` (503) if the publish fails.
        """
        inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(inbox)
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
            raise OpenAIError(503, f"could not reach the router: {e}") from e

    def stop(self, reason: str) -> None:
        """Stop reading (e.g. ``"stop_string"``): :meth:`next_chunk` returns None from now on and
        :meth:`close` cancels the request with ``reason`` unless it already finished."""
        self._end(reason)

    async def close(self) -> None:
        """Unsubscribe the inbox; publish Cancel unless the request finished remotely. Idempotent."""
        if self._closed:
            return
        self._closed = True
        rid = self.request_id
        if self._sub is not None and not self.finished:
            try:
                await self.nc.publish(
                    self.subjects.cancel,
                    encode(Cancel(request_id=rid, reason=self.cancel_reason)),
                    headers=inject_headers(),
                )
                _log.info("request_cancelled", request_id=rid, reason=self.cancel_reason)
            except Exception as e:
                _log.warning("cancel_publish_failed", request_id=rid, error=repr(e))
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception as e:
                _log.warning("inbox_unsubscribe_failed", request_id=rid, error=repr(e))

    async def next_chunk(self) -> TokenChunk | None:
        """The next chunk in index order, or None once the stream ended (after the final chunk,
        or after :meth:`stop`).

        Raises :class:`OpenAIError`: an error chunk or ``ErrorReply`` from the pipeline (its
        code, type and retry hint), no router subscribed (503), too many out-of-order chunks
        (502) and no in-order progress for ``chunk_timeout_s`` (504).
        """
        if self._ended:
            return None
        chunk = self._pending.pop(self._next_index, None)
        if chunk is None:
            chunk = await self._receive()
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

    async def _receive(self) -> TokenChunk:
        """Wait for chunk ``_next_index`` (or an error chunk), buffering later ones."""
        if self._sub is None:
            raise RuntimeError("TokenStream not started")
        timeout = self.chunk_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._end("timeout")
                raise OpenAIError(
                    504, f"No tokens for request {self.request_id} within {timeout:g} s.", code="timeout"
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
                return chunk
            if chunk.index > self._next_index and chunk.index not in self._pending:
                if len(self._pending) >= MAX_PENDING_CHUNKS:
                    self._end("error")
                    raise OpenAIError(502, "Too many out-of-order token chunks.")
                self._pending[chunk.index] = chunk
            else:
                _log.debug("chunk_dropped", request_id=chunk.request_id, index=chunk.index)

    def _decode(self, msg: NatsMsg) -> TokenChunk | None:
        """A chunk for this request, or None for anything to skip; raises for replies that end it."""
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            self._end("error")
            raise OpenAIError(503, "No router is serving requests (no responders on router.generate).")
        try:
            obj = _inbox_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            _log.warning("bad_inbox_message", request_id=self.request_id, error=str(e))
            return None
        if isinstance(obj, Ack):
            return None
        if isinstance(obj, ErrorReply):
            self._end("error")
            raise error_from_reply(obj)
        if obj.request_id and obj.request_id != self.request_id:
            _log.warning("foreign_chunk", request_id=self.request_id, chunk_request_id=obj.request_id)
            return None
        return obj
