"""Typed request/reply over NATS: errors, the msgpack codec, :func:`serve`, :func:`request`,
:func:`publish`, :func:`probe_liveness`, and the :class:`TaskTracker` that owns handler tasks.

* :func:`serve` — subscribe a typed async handler to a subject. Each message is decoded with a
  cached msgspec msgpack decoder and handled in its own task (tracked by a :class:`TaskTracker`
  so shutdown can drain it). A bad payload is answered with ``ErrorReply(400)``, a handler
  exception with ``ErrorReply(500)`` (or the code of a :class:`ServiceError`); the subscription
  never dies. Trace context is taken from the ``traceparent`` header into a SERVER span.
* :func:`request` / :func:`publish` — typed send with ``traceparent`` injected. ``request``
  raises :class:`RemoteError` for an ``ErrorReply``, :class:`NoRespondersError` (503) when nobody
  listens and :class:`RequestTimeoutError` (a ``TimeoutError``) on timeout.

Every payload is a msgspec Struct of :mod:`tandem.protocol.messages`; no dicts on the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from opentelemetry.trace import SpanKind, Status, StatusCode

from tandem.protocol.messages import ErrorReply, Health, HealthRequest, Message, encode
from tandem.services.observability import extract_context, get_tracer, inject_headers

__all__ = [
    "DEFAULT_TRACKER",
    "Handler",
    "NoRespondersError",
    "RemoteError",
    "RequestTimeoutError",
    "ServiceError",
    "TaskTracker",
    "decode_as",
    "probe_liveness",
    "publish",
    "request",
    "serve",
    "sync_with_server",
]

M = TypeVar("M", bound=Message)
R = TypeVar("R", bound=Message)

#: A served handler: ``await handler(decoded_message, raw_nats_msg)``; a returned Message is the reply.
Handler = Callable[[Any, NatsMsg], Awaitable[Message | None]]

_log = structlog.get_logger("tandem.messaging")


# ---- errors -------------------------------------------------------------------------------------


class ServiceError(Exception):
    """An error with an HTTP-like ``code`` (see :class:`ErrorReply`).

    Raise it from a served handler to answer ``ErrorReply(code, message, type=type)`` instead of
    the generic 500.
    """

    def __init__(self, code: int, message: str, *, type: str = "internal_error") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.type = type

    def to_reply(self, request_id: str = "") -> ErrorReply:
        """The :class:`ErrorReply` carrying this error."""
        return ErrorReply(code=self.code, message=self.message, request_id=request_id, type=self.type)


class RemoteError(ServiceError):
    """The remote side answered ``ErrorReply``; ``code``/``message``/``type`` are copied from it."""

    @classmethod
    def from_reply(cls, reply: ErrorReply) -> RemoteError:
        return cls(reply.code, reply.message, type=reply.type)


class NoRespondersError(RemoteError):
    """Nobody is subscribed to the subject (code 503)."""

    def __init__(self, subject: str) -> None:
        super().__init__(503, f"no responders on {subject}", type="service_unavailable")
        self.subject = subject


class RequestTimeoutError(TimeoutError):
    """No reply within the timeout. A ``TimeoutError`` (== ``asyncio.TimeoutError``)."""

    def __init__(self, subject: str, timeout: float) -> None:
        super().__init__(f"no reply on {subject} within {timeout:.3f} s")
        self.subject = subject
        self.timeout = timeout


# ---- codec ----------------------------------------------------------------------------------------

_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def _decoder(tp: Any) -> msgspec.msgpack.Decoder[Any]:
    dec = _decoders.get(tp)
    if dec is None:
        dec = msgspec.msgpack.Decoder(tp)
        _decoders[tp] = dec
    return dec


def decode_as(tp: Any, data: bytes) -> Any:
    """Decode msgpack ``data`` as ``tp`` (a Struct type or a union) with a cached decoder.

    Raises ``msgspec.DecodeError`` / ``msgspec.ValidationError`` on bad input.
    """
    return _decoder(tp).decode(data)


# ---- in-flight task tracking --------------------------------------------------------------------------


class TaskTracker:
    """Owns the tasks spawned by :func:`serve` (and anything else a service spawns).

    Tasks remove themselves when done; :meth:`drain` waits for the rest with a timeout and then
    cancels what is left.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task[Any]:
        """Start ``coro`` as a tracked task. Exceptions are logged, never lost."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("task_failed", task=task.get_name(), error=repr(task.exception()))

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float) -> int:  # noqa: ASYNC109
        """Wait up to ``timeout`` seconds for tracked tasks; cancel the rest.

        Returns the number of tasks that had to be cancelled.
        """
        if not self._tasks:
            return 0
        if timeout <= 0:
            pending = set(self._tasks)
        else:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        return len(pending)


#: Tracker used by :func:`serve` when none is given (one per process; drained by run_service).
DEFAULT_TRACKER = TaskTracker()


# ---- serve / request / publish ----------------------------------------------------------------------


async def _reply(nc: NatsClient, subject: str | None, msg: Message) -> None:
    if not subject:
        return
    try:
        await nc.publish(subject, encode(msg), headers=inject_headers())
    except Exception as e:  # connection closing; nothing else to do
        _log.warning("reply_failed", reply_subject=subject, error=repr(e))


async def sync_with_server(nc: NatsClient, round_trip_s: float = 5.0) -> None:
    """Return once the server has processed everything ``nc`` sent before the call (a SUB: the
    subscription is registered; a PUB: it was routed). ``nats.errors.FlushTimeoutError`` after
    ``round_trip_s`` seconds per round trip.

    ``nc.flush()`` alone does not promise that with nats-py 2.16: it writes its PING straight to
    the socket while earlier commands still wait in the client's pending buffer for its flusher
    task, so the PONG can come back before the server has seen them (seen in CI as "no
    responders" to a subscription flushed just before, and as a message published to one that
    never arrived). The first flush yields to the flusher, which writes the pending commands
    before the PONG can be read; the second PING goes out after them, and the server answers a
    connection's commands in order.
    """
    await nc.flush(timeout=round_trip_s)  # type: ignore[arg-type]  # nats-py annotates int
    await nc.flush(timeout=round_trip_s)  # type: ignore[arg-type]


async def serve(
    nc: NatsClient,
    subject: str,
    msg_type: type[M],
    handler: Callable[[M, NatsMsg], Awaitable[Message | None]],
    *,
    queue: str | None = None,
    service: str = "",
    tracker: TaskTracker | None = None,
) -> Subscription:
    """Subscribe ``handler`` to ``subject`` (optionally in queue group ``queue``).

    Each message runs in its own task on ``tracker`` (default :data:`DEFAULT_TRACKER`) inside a
    SERVER span named ``subject`` whose parent is the ``traceparent`` header; ``request_id`` (if
    the message has one) is bound into the log context. Outcomes:

    * payload not decodable as ``msg_type`` → ``ErrorReply(400)`` to ``msg.reply`` (if any), logged;
    * handler returns a Message → published to ``msg.reply`` (if any) with ``traceparent``;
    * handler raises :class:`ServiceError` → ``ErrorReply(e.code)``; ``TimeoutError`` → 504;
      any other exception → ``ErrorReply(500)``; always logged, the subscription keeps serving.

    Returns the NATS subscription, already registered with the server (flushed); its owner
    unsubscribes it (``ServiceBase`` does on shutdown).
    """
    trk = tracker if tracker is not None else DEFAULT_TRACKER
    dec = _decoder(msg_type)
    tracer = get_tracer("tandem.serve")
    log = _log.bind(subject=subject, service=service) if service else _log.bind(subject=subject)

    async def handle(nmsg: NatsMsg) -> None:
        ctx = extract_context(nmsg.headers)
        with tracer.start_as_current_span(
            subject,
            context=ctx,
            kind=SpanKind.SERVER,
            attributes={"messaging.system": "nats", "messaging.destination.name": nmsg.subject},
        ) as span:
            try:
                obj = dec.decode(nmsg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                log.warning("bad_payload", msg_subject=nmsg.subject, error=str(e), nbytes=len(nmsg.data))
                span.set_status(Status(StatusCode.ERROR, "bad payload"))
                await _reply(nc, nmsg.reply, ErrorReply(code=400, message=f"bad {msg_type.__name__}: {e}"))
                return
            request_id = getattr(obj, "request_id", "")
            if request_id:
                span.set_attribute("tandem.request_id", request_id)
                structlog.contextvars.bind_contextvars(request_id=request_id)
            try:
                result = await handler(obj, nmsg)
            except ServiceError as e:
                log.warning("handler_error", code=e.code, error=e.message)
                span.set_status(Status(StatusCode.ERROR, e.message))
                await _reply(nc, nmsg.reply, e.to_reply(request_id))
                return
            except asyncio.CancelledError:
                span.set_status(Status(StatusCode.ERROR, "cancelled"))
                await _reply(
                    nc,
                    nmsg.reply,
                    ErrorReply(code=503, message="shutting down", request_id=request_id, type="unavailable"),
                )
                raise
            except TimeoutError as e:
                log.warning("handler_timeout", error=str(e) or repr(e))
                span.set_status(Status(StatusCode.ERROR, "timeout"))
                await _reply(
                    nc,
                    nmsg.reply,
                    ErrorReply(code=504, message=str(e) or "timeout", request_id=request_id, type="timeout"),
                )
                return
            except Exception as e:
                log.exception("handler_failed", error=repr(e))
                span.record_exception(e)
                span.set_status(Status(StatusCode.ERROR, repr(e)))
                await _reply(
                    nc,
                    nmsg.reply,
                    ErrorReply(
                        code=500,
                        message=f"{type(e).__name__}: {e}",
                        request_id=request_id,
                        type="internal_error",
                    ),
                )
                return
            if result is not None:
                await _reply(nc, nmsg.reply, result)

    async def on_msg(nmsg: NatsMsg) -> None:
        # Runs in the subscription's delivery task: hand off so a slow handler blocks nothing.
        trk.spawn(handle(nmsg), name=f"serve:{subject}")

    sub = await nc.subscribe(subject, queue=queue or "", cb=on_msg)
    await sync_with_server(nc)  # the server knows the subscription when serve returns
    return sub


async def request(
    nc: NatsClient,
    subject: str,
    msg: Message,
    reply_type: type[R],
    *,
    timeout: float,  # noqa: ASYNC109
    headers: dict[str, str] | None = None,
) -> R:
    """Send ``msg`` to ``subject`` and return the decoded ``reply_type`` answer.

    ``timeout`` in seconds. A CLIENT span named ``subject`` wraps the call and its context rides
    in ``traceparent``. Raises :class:`RemoteError` (the answer was an ``ErrorReply``, or it could
    not be decoded: code 502), :class:`NoRespondersError` (nobody listens, 503) or
    :class:`RequestTimeoutError` (a ``TimeoutError``).
    """
    tracer = get_tracer("tandem.request")
    with tracer.start_as_current_span(subject, kind=SpanKind.CLIENT) as span:
        request_id = getattr(msg, "request_id", "")
        if request_id:
            span.set_attribute("tandem.request_id", request_id)
        hdrs = inject_headers(dict(headers) if headers else None)
        try:
            resp = await nc.request(subject, encode(msg), timeout=timeout, headers=hdrs)
        except nats.errors.NoRespondersError:
            span.set_status(Status(StatusCode.ERROR, "no responders"))
            raise NoRespondersError(subject) from None
        except TimeoutError:  # nats.errors.TimeoutError is one
            span.set_status(Status(StatusCode.ERROR, "timeout"))
            raise RequestTimeoutError(subject, timeout) from None
        try:
            reply = _decoder(reply_type | ErrorReply).decode(resp.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            span.set_status(Status(StatusCode.ERROR, "bad reply"))
            raise RemoteError(502, f"bad reply from {subject}: {e}", type="bad_gateway") from None
        if isinstance(reply, ErrorReply):
            span.set_status(Status(StatusCode.ERROR, reply.message))
            raise RemoteError.from_reply(reply)
        return reply


async def probe_liveness(nc: NatsClient, subject: str, timeout: float, request_id: str = "") -> bool | None:  # noqa: ASYNC109
    """Liveness of the one instance serving ``subject`` (a ``HealthRequest`` responder): True if
    it answered (and, when ``request_id`` is given, still holds that request), False if nobody
    listens (a dead process: NATS says so at once) or it no longer holds the request, None if
    no answer came within ``timeout`` seconds (a miss; a hung process misses repeatedly)."""
    try:
        health = await request(nc, subject, HealthRequest(request_id=request_id), Health, timeout=timeout)
    except NoRespondersError:
        return False
    except RemoteError:
        return True  # it answered, with an error
    except TimeoutError:
        return None
    return health.holds is not False


async def publish(nc: NatsClient, subject: str, msg: Message, headers: dict[str, str] | None = None) -> None:
    """Publish ``msg`` to ``subject`` with the current trace context in the headers (fire and forget)."""
    await nc.publish(subject, encode(msg), headers=inject_headers(dict(headers) if headers else None))
