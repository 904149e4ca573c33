"""Shared service runtime: NATS connection, typed request/reply, discovery, tracing, logging, shutdown.

Every tandem process (frontend, router, indexer, worker) is built from these pieces:

* :func:`connect` — a NATS connection with reconnects and a client name.
* :func:`serve` — subscribe a typed async handler to a subject. Each message is decoded with a
  cached msgspec msgpack decoder and handled in its own task (tracked by a :class:`TaskTracker`
  so shutdown can drain it). A bad payload is answered with ``ErrorReply(400)``, a handler
  exception with ``ErrorReply(500)`` (or the code of a :class:`ServiceError`); the subscription
  never dies. Trace context is taken from the ``traceparent`` header into a SERVER span.
* :func:`request` / :func:`publish` — typed send with ``traceparent`` injected. ``request``
  raises :class:`RemoteError` for an ``ErrorReply``, :class:`NoRespondersError` (503) when nobody
  listens and :class:`RequestTimeoutError` (a ``TimeoutError``) on timeout.
* :func:`ensure_jetstream` — idempotently create the KV-events stream and the instances bucket.
* Discovery (the instances bucket and heartbeats) is in :mod:`tandem.services.discovery`.
* :func:`setup_logging`, :func:`setup_tracing` — structlog JSON lines on stderr, OpenTelemetry.
* :class:`ServiceBase`, :func:`run_service`, :func:`common_parser` — process life cycle: uvloop,
  health responder, ``event="ready"`` log line, SIGINT/SIGTERM → graceful shutdown, exit 0.

Shutdown order (:meth:`ServiceBase.shutdown`): run the *unregister* hooks (e.g. delete the worker's
registry entry) → wait the grace period (peers notice) → unsubscribe every served subject (no new
work) → drain in-flight handler tasks (timeout, then cancel) → cancel the service's background
tasks (:meth:`ServiceBase.spawn`) → run the *close* hooks (watchers, consumers) → drain the NATS
connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, MutableMapping
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import SpanKind, Status, StatusCode

from tandem.protocol import DEFAULT_NAMESPACE, Subjects
from tandem.protocol.messages import ErrorReply, Health, HealthRequest, Message, encode
from tandem.services.auth import (
    JETSTREAM_REPLICAS_ENV,
    NatsAuth,
    add_auth_arguments,
    redact_url,
    server_list,
)

__all__ = [
    "DEFAULT_NATS_URL",
    "Handler",
    "NoRespondersError",
    "RemoteError",
    "RequestTimeoutError",
    "ServiceBase",
    "ServiceError",
    "TaskTracker",
    "common_parser",
    "connect",
    "decode_as",
    "ensure_jetstream",
    "extract_context",
    "get_logger",
    "get_tracer",
    "inject_headers",
    "probe_liveness",
    "publish",
    "request",
    "run_service",
    "serve",
    "setup_logging",
    "setup_tracing",
]

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"

#: KV events older than this are dropped by the stream (seconds).
KV_EVENTS_MAX_AGE_S = 3600.0
#: The KV-events stream drops a message whose ``Nats-Msg-Id`` it saw this recently (seconds):
#: a publish retried after a lost acknowledgement (a node failing over) is stored once.
KV_EVENTS_DUPLICATE_WINDOW_S = 120.0
#: Instances bucket TTL: an entry not refreshed for this long expires (seconds).
INSTANCE_TTL_S = 10.0
#: Worker heartbeat period (seconds).
HEARTBEAT_INTERVAL_S = 1.0

M = TypeVar("M", bound=Message)
R = TypeVar("R", bound=Message)

#: A served handler: ``await handler(decoded_message, raw_nats_msg)``; a returned Message is the reply.
Handler = Callable[[Any, NatsMsg], Awaitable[Message | None]]

_log = structlog.get_logger("tandem.runtime")


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


# ---- logging ----------------------------------------------------------------------------------------


def setup_logging(service: str, level: str = "info") -> None:
    """Configure structlog: one JSON object per line on stderr.

    Every line carries ``service``, ``level``, ``timestamp`` (ISO UTC) and any contextvars bound
    with ``structlog.contextvars.bind_contextvars`` (``serve`` binds ``request_id`` per message).
    ``level``: debug/info/warning/error. Stdlib logging (nats-py) goes to stderr at WARNING+.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")

    def add_service(
        _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict.setdefault("service", service)
        return event_dict

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_service,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(stream=sys.stderr, level=max(numeric, logging.WARNING))


def get_logger(name: str = "tandem") -> Any:
    """A structlog logger (configured by :func:`setup_logging`)."""
    return structlog.get_logger(name)


# ---- tracing ----------------------------------------------------------------------------------------

_provider: TracerProvider | None = None
_tracers: dict[tuple[int, str], trace.Tracer] = {}


def setup_tracing(service: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """Create the tracer provider used by the runtime (resource ``service.name = service``).

    Spans go to an OTLP/HTTP exporter when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (batched), and
    to ``exporter`` when given (synchronously; tests pass an ``InMemorySpanExporter``). With
    neither, nothing would ever read a span, so the sampler records none of its own
    (``ParentBased(ALWAYS_OFF)``: a root span is not sampled, a remote parent's decision is
    kept): spans still exist and trace ids still propagate in ``traceparent``, at a third of
    the cost. Calling it again replaces the runtime's provider; the first call also installs
    it as the OTel global one.
    """
    global _provider
    exporting = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")) or exporter is not None
    resource = Resource.create({"service.name": service})
    provider = (
        TracerProvider(resource=resource)
        if exporting
        else TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_OFF))
    )
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if _provider is None:
        trace.set_tracer_provider(provider)
    _provider = provider
    _tracers.clear()
    return provider


def shutdown_tracing() -> None:
    """Flush and stop the runtime's tracer provider (no-op without one)."""
    if _provider is not None:
        _provider.force_flush(5000)
        _provider.shutdown()


def get_tracer(name: str = "tandem") -> trace.Tracer:
    """Tracer from the runtime's provider (or the OTel global one before :func:`setup_tracing`)."""
    if _provider is None:
        return trace.get_tracer(name)
    key = (id(_provider), name)
    tracer = _tracers.get(key)
    if tracer is None:
        tracer = _tracers[key] = _provider.get_tracer(name)
    return tracer


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Return ``headers`` (a new dict if None) with the current trace context (``traceparent``)."""
    carrier: dict[str, str] = {} if headers is None else headers
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The OTel context carried by NATS ``headers`` (empty context when there is none)."""
    return propagate.extract(dict(headers) if headers else {})


# ---- connection -------------------------------------------------------------------------------------


async def connect(
    url: str, name: str, *, connect_timeout: float = 10.0, auth: NatsAuth | None = None
) -> NatsClient:
    """Connect to NATS as client ``name``, with ``auth``'s credentials and TLS when given.

    Retries the initial connection for up to ``connect_timeout`` seconds (the server may still be
    starting), then raises ``ConnectionError`` (naming the last error, e.g. an authorization
    violation). Once connected, reconnects forever (every 0.5 s); connection events are logged,
    and a permission violation (the server refused a publish or subscribe) as an error.
    """
    log = _log.bind(nats_url=redact_url(url), client=name)
    options = auth.connect_options() if auth is not None else {}
    holder: list[NatsClient] = []
    #: The error to report if the first connection never succeeds: a refused login wins over
    #: what later attempts see (the server resets those connections).
    first_error: list[Exception] = []

    async def on_error(e: Exception) -> None:
        refused = bool(first_error) and "authorization violation" in str(first_error[0]).lower()
        if not holder and not refused:
            first_error[:] = [e]
        if "permissions violation" in str(e).lower():
            log.error("nats_permission_denied", error=str(e), user=options.get("user"))
        else:
            log.warning("nats_error", error=repr(e))

    async def on_disconnected() -> None:
        closing = bool(holder) and (holder[0].is_closed or holder[0].is_draining)
        if closing:
            log.debug("nats_disconnected")
        else:
            log.warning("nats_disconnected")

    async def on_reconnected() -> None:
        log.info("nats_reconnected")

    try:
        async with asyncio.timeout(connect_timeout):
            nc = await nats.connect(
                server_list(url),
                name=name,
                connect_timeout=2.0,
                allow_reconnect=True,
                reconnect_time_wait=0.5,
                max_reconnect_attempts=-1,
                ping_interval=10,
                max_outstanding_pings=3,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                **options,
            )
    except TimeoutError:
        why = f" (last error: {first_error[0]})" if first_error else ""
        raise ConnectionError(
            f"could not connect to NATS at {redact_url(url)} within {connect_timeout} s{why}"
        ) from None
    holder.append(nc)
    return nc


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
    await nc.flush(timeout=5)  # the server knows the subscription when serve returns
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


# ---- JetStream: events stream and instances bucket ----------------------------------------------------


async def ensure_jetstream(
    js: JetStreamContext,
    subjects: Subjects,
    *,
    events_max_age_s: float = KV_EVENTS_MAX_AGE_S,
    instance_ttl_s: float = INSTANCE_TTL_S,
    replicas: int = 1,
) -> KeyValue:
    """Create (if missing) the KV-events stream and the instances bucket; return the bucket.

    Stream ``subjects.kv_events_stream`` captures ``subjects.kv_events_wildcard`` (limits retention,
    file storage, ``events_max_age_s`` seconds, de-duplication of ``Nats-Msg-Id`` over
    :data:`KV_EVENTS_DUPLICATE_WINDOW_S`). Bucket ``subjects.instances_bucket``: history 1,
    ``instance_ttl_s`` seconds. Both are stored on ``replicas`` servers of a JetStream cluster (R3
    survives one node's loss; 1 on a single server). Safe to call from every process concurrently:
    an existing stream or bucket is kept as it is. Raises ``nats.js.errors.APIError`` on other
    JetStream errors (e.g. more replicas than servers).
    """
    try:
        await js.stream_info(subjects.kv_events_stream)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(
                name=subjects.kv_events_stream,
                subjects=[subjects.kv_events_wildcard],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=events_max_age_s,
                num_replicas=replicas,
                duplicate_window=KV_EVENTS_DUPLICATE_WINDOW_S,
            )
        except nats.js.errors.BadRequestError:
            await js.stream_info(subjects.kv_events_stream)  # created concurrently; else re-raises
    try:
        return await js.key_value(subjects.instances_bucket)
    except nats.js.errors.BucketNotFoundError:
        try:
            return await js.create_key_value(
                bucket=subjects.instances_bucket, history=1, ttl=instance_ttl_s, replicas=replicas
            )
        except nats.js.errors.BadRequestError:
            return await js.key_value(subjects.instances_bucket)


# ---- process life cycle ---------------------------------------------------------------------------------


def common_parser(service: str, description: str | None = None) -> argparse.ArgumentParser:
    """argparse parser with the options every service takes.

    ``--nats-url`` (default ``$NATS_URL`` or ``nats://127.0.0.1:4222``), ``--namespace`` (default
    ``$TANDEM_NAMESPACE`` or ``tandem``), ``--log-level`` (default ``info``), and the NATS
    credential / TLS flags of :class:`tandem.services.auth.NatsAuth` (``--nats-user``,
    ``--nats-password-file``, ``--nats-creds``, ``--nats-tls-ca`` …; defaults from ``$NATS_USER``
    …; the password only from its file or ``$NATS_PASSWORD``).
    """
    p = argparse.ArgumentParser(prog=f"python -m tandem.services.{service}", description=description)
    p.add_argument("--nats-url", default=os.environ.get("NATS_URL", DEFAULT_NATS_URL))
    p.add_argument("--namespace", default=os.environ.get("TANDEM_NAMESPACE", DEFAULT_NAMESPACE))
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--jetstream-replicas",
        type=int,
        default=int(os.environ.get(JETSTREAM_REPLICAS_ENV) or 1),
        help="servers each JetStream stream, bucket and object store this service creates is stored "
        "on (3 on a 3-node cluster: survives one node's loss; default $TANDEM_JETSTREAM_REPLICAS or 1)",
    )
    add_auth_arguments(p.add_argument_group("NATS credentials and TLS"))
    return p


HookFn = Callable[[], Awaitable[None]]


class ServiceBase:
    """One service process's resources and their shutdown.

    Owns the NATS connection (``nc``, ``js``), ``subjects``, a :class:`TaskTracker` for handler
    tasks, the served subscriptions and the shutdown hooks. Usable in-process (tests):
    ``await svc.start()``, ``await svc.serve(...)``, ``await svc.shutdown()``.
    """

    def __init__(
        self,
        name: str,
        *,
        nats_url: str,
        namespace: str = DEFAULT_NAMESPACE,
        instance_id: str | None = None,
        grace_s: float = 0.5,
        drain_timeout_s: float = 10.0,
        auth: NatsAuth | None = None,
        jetstream_replicas: int = 1,
    ) -> None:
        if jetstream_replicas < 1:
            raise ValueError("--jetstream-replicas must be at least 1")
        self.name = name
        self.nats_url = nats_url
        #: Replicas of the JetStream assets this service creates (:func:`ensure_jetstream`).
        self.jetstream_replicas = jetstream_replicas
        #: Credentials / TLS for the NATS connection (None: anonymous, plain TCP).
        self.auth = auth
        self.subjects = Subjects(namespace)
        self.instance_id = instance_id or f"{name}-{uuid.uuid4().hex[:8]}"
        self.grace_s = grace_s
        self.drain_timeout_s = drain_timeout_s
        self.tracker = TaskTracker()
        self._background = TaskTracker()
        self.log = get_logger(f"tandem.{name}").bind(instance_id=self.instance_id)
        self.stopping = asyncio.Event()
        #: Returns ``(ready, detail)`` for health answers; default: always ready.
        self.readiness: Callable[[], tuple[bool, str]] = lambda: (True, "")
        #: ``holds(request_id)``: whether this service still holds a request (liveness probes
        #: with ``HealthRequest.request_id``); None = it holds no requests.
        self.holds: Callable[[str], bool] | None = None
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._subs: list[Subscription] = []
        self._unregister_hooks: list[HookFn] = []
        self._close_hooks: list[HookFn] = []
        self._shut_down = False

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError("service not started")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("service not started")
        return self._js

    async def start(self) -> None:
        """Connect, make sure the JetStream stream/bucket exist and answer health requests."""
        self._nc = await connect(self.nats_url, f"{self.name}:{self.instance_id}", auth=self.auth)
        self._js = self._nc.jetstream()
        await ensure_jetstream(self._js, self.subjects, replicas=self.jetstream_replicas)
        await self.serve(self.subjects.health(self.name), HealthRequest, self._health, queue=self.name)
        await self.serve(
            self.subjects.health_instance(self.name, self.instance_id), HealthRequest, self._health
        )

    async def _health(self, req: HealthRequest, _msg: NatsMsg) -> Health:
        ready, detail = self.readiness()
        holds = None
        if req.request_id:
            holds = self.holds is not None and self.holds(req.request_id)
        return Health(
            service=self.name, instance_id=self.instance_id, ready=ready, detail=detail, holds=holds
        )

    async def serve(
        self,
        subject: str,
        msg_type: type[M],
        handler: Callable[[M, NatsMsg], Awaitable[Message | None]],
        *,
        queue: str | None = None,
    ) -> Subscription:
        """:func:`serve` with this service's tracker; the subscription is closed on shutdown."""
        sub = await serve(
            self.nc, subject, msg_type, handler, queue=queue, service=self.name, tracker=self.tracker
        )
        self._subs.append(sub)
        return sub

    def on_unregister(self, hook: HookFn) -> None:
        """Run ``await hook()`` first on shutdown (e.g. delete the registry entry). LIFO order."""
        self._unregister_hooks.append(hook)

    def on_close(self, hook: HookFn) -> None:
        """Run ``await hook()`` after handlers drained, before the connection closes. LIFO order."""
        self._close_hooks.append(hook)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task[Any]:
        """Start a long-lived background task owned by the service.

        Unlike handler tasks it is not waited for: it is cancelled at shutdown, after the handlers
        drained and before the close hooks run.
        """
        return self._background.spawn(coro, name=name)

    def request_stop(self) -> None:
        """Ask :meth:`run_until_stopped` to return (signal handlers call this)."""
        self.stopping.set()

    async def _run_hooks(self, hooks: list[HookFn], what: str) -> None:
        for hook in reversed(hooks):
            try:
                async with asyncio.timeout(self.drain_timeout_s):
                    await hook()
            except Exception as e:
                self.log.warning("shutdown_hook_failed", stage=what, error=repr(e))

    async def shutdown(self) -> None:
        """Graceful stop (idempotent); see the module docstring for the order."""
        if self._shut_down:
            return
        self._shut_down = True
        self.stopping.set()
        self.log.info("shutting_down", inflight=len(self.tracker))
        await self._run_hooks(self._unregister_hooks, "unregister")
        if self._unregister_hooks and self.grace_s > 0:
            await asyncio.sleep(self.grace_s)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        cancelled = await self.tracker.drain(self.drain_timeout_s)
        if cancelled:
            self.log.warning("handlers_cancelled", count=cancelled)
        await self._background.drain(0)
        await self._run_hooks(self._close_hooks, "close")
        if self._nc is not None:
            try:
                async with asyncio.timeout(5.0):
                    await self._nc.drain()
            except Exception as e:
                self.log.warning("nats_drain_failed", error=repr(e))
                with contextlib.suppress(Exception):
                    await self._nc.close()
        self.log.info("stopped")


def run_service(
    setup: Callable[[ServiceBase], Awaitable[None]],
    name: str,
    args: argparse.Namespace,
    *,
    instance_id: str | None = None,
    grace_s: float = 0.5,
) -> int:
    """Run a service process to completion; returns the exit code (0 after a clean stop).

    Sets up logging (``args.log_level``) and tracing, runs under uvloop, starts a
    :class:`ServiceBase` on ``args.nats_url``/``args.namespace`` (credentials and TLS from the
    :class:`~tandem.services.auth.NatsAuth` flags), awaits ``setup(svc)`` (which
    subscribes handlers and registers hooks), logs ``event="ready"`` and waits for SIGINT/SIGTERM,
    then shuts down gracefully. A failing ``setup`` is logged and gives exit code 1.
    """
    import uvloop

    setup_logging(name, args.log_level)
    setup_tracing(name)
    log = get_logger(f"tandem.{name}")

    async def main() -> int:
        svc = ServiceBase(
            name,
            nats_url=args.nats_url,
            namespace=args.namespace,
            instance_id=instance_id,
            grace_s=grace_s,
            auth=NatsAuth.from_args(args),
            jetstream_replicas=getattr(args, "jetstream_replicas", 1),
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, svc.request_stop)
        code = 0
        try:
            await svc.start()
            await setup(svc)
            svc.log.info("ready", nats_url=redact_url(args.nats_url), namespace=args.namespace)
            await svc.stopping.wait()
        except Exception as e:
            svc.log.exception("service_failed", error=repr(e))
            code = 1
        finally:
            await svc.shutdown()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        return code

    try:
        code = uvloop.run(main())
    except KeyboardInterrupt:
        code = 0
    finally:
        shutdown_tracing()
    log.info("exit", code=code)
    return code
