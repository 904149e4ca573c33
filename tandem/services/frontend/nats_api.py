"""Entry point: the public NATS subjects ``{ns}.v1.chat.completions``, ``{ns}.v1.completions`` and
``{ns}.v1.models`` (queue group ``frontend``). The convention is in the package docstring.

Each message first passes the edge checks (:mod:`.edge`) in the subscription's callback: the API
key (``Authorization: Bearer <key>`` NATS header; 401), the payload size
(``--max-request-bytes``; 413) and, for the completion subjects, the admission bound (429 with
``"retry_after"``). A refused message is answered right there, with no task and no parsing
beyond a lenient peek at ``"stream"`` (so a streaming client still gets its ``[DONE]``). An
admitted message is handled in its own task on the frontend's
:class:`~tandem.services.messaging.TaskTracker`, inside a SERVER span whose parent is the
message's ``traceparent`` header; its admission slot is released when that task ends, however
it ends. Errors are OpenAI's error body plus ``"status"`` (and ``"retry_after"`` when there is
a retry hint), see :func:`tandem.protocol.openai.error_body`; every payload, however malformed
(invalid UTF-8, msgpack, 100k nested arrays), gets one.
(:func:`tandem.services.messaging.serve` is not used: it speaks msgpack Structs and
``ErrorReply``, these subjects speak OpenAI JSON.)

Each subscription buffers at most :data:`PENDING_MSGS_LIMIT` messages /
``PENDING_BYTES_FACTOR × --max-request-bytes`` bytes not yet seen by its callback; beyond that
NATS drops messages (slow consumer) rather than the frontend growing without bound.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from opentelemetry.trace import SpanKind, Status, StatusCode

from tandem.protocol import Subjects
from tandem.protocol.openai import OpenAIError, encode_json, error_body
from tandem.services.frontend.edge import authorization_error
from tandem.services.frontend.render import DONE
from tandem.services.observability import extract_context, get_logger, get_tracer

if TYPE_CHECKING:
    from tandem.services.frontend.service import Frontend

__all__ = ["PENDING_BYTES_FACTOR", "PENDING_MSGS_LIMIT", "PublicNatsApi"]

PublicKind = Literal["chat", "completion", "models"]

#: Messages one public subscription buffers before its callback sees them (NATS drops beyond).
PENDING_MSGS_LIMIT = 16384
#: Bytes one public subscription buffers, in units of ``--max-request-bytes``.
PENDING_BYTES_FACTOR = 16

_log = get_logger("tandem.frontend")

#: ``"stream": true`` anywhere in a body (framing of a body too broken to decode).
_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true\b')


class _StreamFlag(msgspec.Struct):
    """Lenient peek at ``"stream"`` of a body that failed validation (NATS error framing)."""

    stream: Any = False


def _wants_stream(body: bytes) -> bool:
    """Whether ``body`` asks for a stream (so its error is followed by ``[DONE]``).

    A body nested too deeply or with invalid UTF-8 cannot be decoded even leniently: then it
    counts as streaming if ``"stream": true`` appears anywhere in it (at worst a non-streaming
    client gets one extra ``[DONE]`` after its error). Malformed JSON otherwise: not streaming.
    """
    try:
        return msgspec.json.decode(body, type=_StreamFlag).stream is True
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    except (RecursionError, UnicodeDecodeError):
        return _STREAM_TRUE.search(body) is not None


def _header(msg: NatsMsg, name: str) -> str | None:
    """NATS header ``name`` (case-insensitive), or None."""
    headers = msg.headers
    if not headers:
        return None
    value = headers.get(name)
    if value is None:
        lower = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lower), None)
    return value


class PublicNatsApi:
    """Serves the public subjects for ``frontend``; :meth:`start` subscribes, :meth:`stop` stops."""

    def __init__(self, frontend: Frontend) -> None:
        self._fe = frontend
        self._subs: list[Subscription] = []
        self._tracer = get_tracer("tandem.frontend")

    async def start(self) -> None:
        """Subscribe the three subjects in queue group ``frontend``."""
        fe = self._fe
        s = fe.subjects
        subjects: tuple[tuple[str, PublicKind], ...] = (
            (s.chat_completions, "chat"),
            (s.completions, "completion"),
            (s.models, "models"),
        )
        for subject, kind in subjects:
            self._subs.append(
                await fe.nc.subscribe(
                    subject,
                    queue=Subjects.FRONTEND_QUEUE,
                    cb=self._callback(kind, subject),
                    pending_msgs_limit=PENDING_MSGS_LIMIT,
                    pending_bytes_limit=PENDING_BYTES_FACTOR * fe.config.max_request_bytes,
                )
            )

    async def stop(self) -> None:
        """Unsubscribe (idempotent); requests already running finish on the tracker."""
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _callback(self, kind: PublicKind, subject: str) -> Callable[[NatsMsg], Awaitable[None]]:
        async def cb(msg: NatsMsg) -> None:
            await self.admit(kind, subject, msg)

        return cb

    async def admit(self, kind: PublicKind, subject: str, msg: NatsMsg) -> None:
        """The edge checks for one message: refuse it at once (401 / 413 / 429), or hand it to
        :meth:`handle` in a tracked task holding an admission slot (completion subjects)."""
        fe = self._fe
        if not msg.reply:
            _log.warning("public_request_without_reply", subject=subject)
            return
        refusal = authorization_error(_header(msg, "Authorization"), fe.api_key)
        if refusal is None and len(msg.data) > fe.config.max_request_bytes:
            limit = fe.config.max_request_bytes
            refusal = OpenAIError(
                413, f"Payload too large: at most {limit} bytes are accepted.", code="request_too_large"
            )
        if refusal is None and kind != "models":
            if fe.admission.try_acquire():
                task = fe.tracker.spawn(self.handle(kind, subject, msg), name=f"public:{subject}")
                # A done callback runs however the task ends, even cancelled before it started.
                task.add_done_callback(lambda _t: fe.admission.release())
                return
            refusal = fe.admission.busy_error()
        if refusal is not None:
            _log.debug("public_request_refused", subject=subject, status=refusal.status)
            await self._send(msg.reply, error_body(refusal, with_status=True))
            if kind != "models" and _wants_stream(msg.data):
                await self._send(msg.reply, DONE)
            return
        fe.tracker.spawn(self.handle(kind, subject, msg), name=f"public:{subject}")

    async def handle(self, kind: PublicKind, subject: str, msg: NatsMsg) -> None:
        """Answer one public NATS request (already through :meth:`admit`'s checks)."""
        arrived = time.perf_counter()
        fe = self._fe
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
                await self._send(reply, encode_json(fe.models()))
                return
            streaming = _wants_stream(msg.data)
            try:
                prepared = await fe.prepare_async(kind, msg.data, arrived)
                span.set_attribute("tandem.request_id", prepared.request_id)
                if prepared.stream:
                    async with contextlib.aclosing(fe.stream(prepared)) as chunks:
                        async for data in chunks:
                            await fe.nc.publish(reply, data)
                else:
                    await self._send(reply, await fe.complete(prepared))
            except OpenAIError as e:
                span.set_status(Status(StatusCode.ERROR, e.message))
                _log.info("request_failed", subject=subject, status=e.status, error=e.message)
                await self._send(reply, error_body(e, with_status=True))
            except Exception as e:
                _log.exception("public_request_failed", subject=subject, error=repr(e))
                span.record_exception(e)
                span.set_status(Status(StatusCode.ERROR, repr(e)))
                err = OpenAIError(500, f"Internal error: {type(e).__name__}")
                await self._send(reply, error_body(err, with_status=True))
            if streaming:
                await self._send(reply, DONE)

    async def _send(self, subject: str, data: bytes) -> None:
        try:
            await self._fe.nc.publish(subject, data)
        except Exception as e:
            _log.warning("public_reply_failed", reply_subject=subject, error=repr(e))
