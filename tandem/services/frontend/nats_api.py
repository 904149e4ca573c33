"""Entry point: the public NATS subjects ``{ns}.v1.chat.completions``, ``{ns}.v1.completions`` and
``{ns}.v1.models`` (queue group ``frontend``). The convention is in the package docstring.

Each message is handled in its own task on the frontend's
:class:`~tandem.services.runtime.TaskTracker`, inside a SERVER span whose parent is the
message's ``traceparent`` header. Errors are OpenAI's error body plus ``"status"`` (and
``"retry_after"`` when the pipeline gave a retry hint), see
:func:`tandem.protocol.openai.error_body`. (:func:`tandem.services.runtime.serve` is not used:
it speaks msgpack Structs and ``ErrorReply``, these subjects speak OpenAI JSON.)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from opentelemetry.trace import SpanKind, Status, StatusCode

from tandem.protocol import Subjects
from tandem.protocol.openai import OpenAIError, encode_json, error_body
from tandem.services.frontend.render import DONE
from tandem.services.runtime import extract_context, get_logger, get_tracer

if TYPE_CHECKING:
    from tandem.services.frontend.service import Frontend

__all__ = ["PublicNatsApi"]

PublicKind = Literal["chat", "completion", "models"]

_log = get_logger("tandem.frontend")


class _StreamFlag(msgspec.Struct):
    """Lenient peek at ``"stream"`` of a body that failed validation (NATS error framing)."""

    stream: Any = False


def _wants_stream(body: bytes) -> bool:
    try:
        return msgspec.json.decode(body, type=_StreamFlag).stream is True
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False


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
                    subject, queue=Subjects.FRONTEND_QUEUE, cb=self._callback(kind, subject)
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
            self._fe.tracker.spawn(self.handle(kind, subject, msg), name=f"public:{subject}")

        return cb

    async def handle(self, kind: PublicKind, subject: str, msg: NatsMsg) -> None:
        """Answer one public NATS request."""
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
                prepared = fe.prepare(kind, msg.data, arrived)
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
