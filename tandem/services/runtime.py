"""Service runtime: the NATS connection, JetStream set-up and the process life cycle.

Every tandem process (frontend, router, indexer, worker) is built from these pieces:

* :func:`connect` — a NATS connection with reconnects and a client name.
* :func:`ensure_jetstream` — idempotently create the KV-events stream and the instances bucket.
* :func:`ack_info` — a JetStream message's stream sequence and pending count (its reply subject).
* :class:`ServiceBase`, :func:`run_service`, :func:`common_parser` — process life cycle: uvloop,
  health responder, ``event="ready"`` log line, SIGINT/SIGTERM → graceful shutdown, exit 0.

Typed request/reply (``serve``, ``request``, ``publish``, the error types, the task tracker) is in
:mod:`tandem.services.messaging`; logging and tracing in :mod:`tandem.services.observability`;
discovery (the instances bucket and heartbeats) in :mod:`tandem.services.discovery`.

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
import os
import signal
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from tandem.protocol import DEFAULT_NAMESPACE, Subjects
from tandem.protocol.messages import Health, HealthRequest, Message
from tandem.services.auth import (
    JETSTREAM_REPLICAS_ENV,
    NatsAuth,
    add_auth_arguments,
    redact_url,
    server_list,
)
from tandem.services.messaging import TaskTracker, serve
from tandem.services.observability import get_logger, setup_logging, setup_tracing, shutdown_tracing

__all__ = [
    "DEFAULT_NATS_URL",
    "HEARTBEAT_INTERVAL_S",
    "INSTANCE_TTL_S",
    "ServiceBase",
    "ack_info",
    "common_parser",
    "connect",
    "ensure_jetstream",
    "run_service",
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

_log = structlog.get_logger("tandem.runtime")


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


def ack_info(reply: str | None) -> tuple[int | None, int]:
    """``(stream sequence, messages pending after it)`` from a JetStream message's reply subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``, or the v2 form with
    domain and account hash in front); ``(None, 0)`` for anything else."""
    if not reply:
        return None, 0
    tokens = reply.split(".")
    try:
        if len(tokens) == 9:
            return int(tokens[5]), int(tokens[8])
        if len(tokens) >= 11 and tokens[0] == "$JS":
            return int(tokens[7]), int(tokens[10])
    except ValueError:
        pass
    return None, 0


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
