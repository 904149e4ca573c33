"""tandem.services.runtime against a real nats-server: serve/request, errors, tracing, discovery."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tandem.protocol import Subjects
from tandem.protocol.messages import (
    ErrorReply,
    Health,
    HealthRequest,
    InstanceInfo,
    OverlapQuery,
    OverlapScores,
    encode,
)
from tandem.services import messaging, observability
from tandem.services.discovery import InstanceRegistry, WorkerRegistration
from tandem.services.messaging import (
    NoRespondersError,
    RemoteError,
    RequestTimeoutError,
    ServiceError,
    TaskTracker,
    request,
    serve,
)
from tandem.services.nats_embedded import wait_listening
from tandem.services.runtime import ServiceBase, ensure_jetstream
from tests.conftest import free_port, nats_server_binary


def subject() -> str:
    return f"t{uuid.uuid4().hex[:8]}.echo"


async def echo(q: OverlapQuery, _msg: NatsMsg) -> OverlapScores:
    if q.request_id == "boom":
        raise RuntimeError("kaboom")
    if q.request_id == "busy":
        raise ServiceError(503, "busy", type="unavailable")
    return OverlapScores(request_id=q.request_id, scores={"w": len(q.block_hashes)})


async def test_serve_replies(nc: NatsClient) -> None:
    subj = subject()
    tracker = TaskTracker()
    sub = await serve(nc, subj, OverlapQuery, echo, queue="q", tracker=tracker)
    try:
        r = await request(
            nc, subj, OverlapQuery(request_id="a", block_hashes=[1, 2, 3]), OverlapScores, timeout=2
        )
        assert r == OverlapScores(request_id="a", scores={"w": 3})
    finally:
        await sub.unsubscribe()


async def test_bad_payload_gets_400_and_service_keeps_serving(nc: NatsClient) -> None:
    subj = subject()
    sub = await serve(nc, subj, OverlapQuery, echo)
    try:
        resp = await nc.request(subj, b"\xc1 not msgpack", timeout=2)
        err = msgspec.msgpack.decode(resp.data, type=ErrorReply)
        assert err.code == 400
        # Valid msgpack, wrong message type: also 400.
        resp = await nc.request(subj, encode(HealthRequest()), timeout=2)
        assert msgspec.msgpack.decode(resp.data, type=ErrorReply).code == 400
        r = await request(nc, subj, OverlapQuery(request_id="b", block_hashes=[]), OverlapScores, timeout=2)
        assert r.request_id == "b"
    finally:
        await sub.unsubscribe()


async def test_handler_errors_become_error_replies(nc: NatsClient) -> None:
    subj = subject()
    sub = await serve(nc, subj, OverlapQuery, echo)
    try:
        with pytest.raises(RemoteError) as ei:
            await request(
                nc, subj, OverlapQuery(request_id="boom", block_hashes=[]), OverlapScores, timeout=2
            )
        assert ei.value.code == 500
        assert "kaboom" in ei.value.message
        with pytest.raises(RemoteError) as ei:
            await request(
                nc, subj, OverlapQuery(request_id="busy", block_hashes=[]), OverlapScores, timeout=2
            )
        assert ei.value.code == 503
        # Still serving.
        r = await request(nc, subj, OverlapQuery(request_id="c", block_hashes=[1]), OverlapScores, timeout=2)
        assert r.scores == {"w": 1}
    finally:
        await sub.unsubscribe()


async def test_no_responders_and_timeout(nc: NatsClient) -> None:
    with pytest.raises(NoRespondersError) as ei:
        await request(nc, subject(), OverlapQuery(request_id="x", block_hashes=[]), OverlapScores, timeout=1)
    assert ei.value.code == 503

    subj = subject()
    release = asyncio.Event()

    async def slow(q: OverlapQuery, _m: NatsMsg) -> OverlapScores:
        await release.wait()
        return OverlapScores(request_id=q.request_id, scores={})

    tracker = TaskTracker()
    sub = await serve(nc, subj, OverlapQuery, slow, tracker=tracker)
    try:
        with pytest.raises(RequestTimeoutError):
            await request(nc, subj, OverlapQuery(request_id="x", block_hashes=[]), OverlapScores, timeout=0.2)
        with pytest.raises(asyncio.TimeoutError):  # the documented base class
            await request(nc, subj, OverlapQuery(request_id="y", block_hashes=[]), OverlapScores, timeout=0.2)
    finally:
        release.set()
        assert await tracker.drain(2.0) == 0
        await sub.unsubscribe()


async def test_slow_handler_does_not_block_others(nc: NatsClient) -> None:
    subj = subject()
    release = asyncio.Event()

    async def handler(q: OverlapQuery, _m: NatsMsg) -> OverlapScores:
        if q.request_id == "slow":
            await release.wait()
        return OverlapScores(request_id=q.request_id, scores={})

    tracker = TaskTracker()
    sub = await serve(nc, subj, OverlapQuery, handler, tracker=tracker)
    try:
        slow = asyncio.create_task(
            request(nc, subj, OverlapQuery(request_id="slow", block_hashes=[]), OverlapScores, timeout=5)
        )
        await asyncio.sleep(0.05)
        fast = await request(
            nc, subj, OverlapQuery(request_id="fast", block_hashes=[]), OverlapScores, timeout=1
        )
        assert fast.request_id == "fast"
        assert not slow.done()
        release.set()
        assert (await slow).request_id == "slow"
    finally:
        release.set()
        await tracker.drain(2.0)
        await sub.unsubscribe()


async def test_traceparent_propagates(nc: NatsClient) -> None:
    exporter = InMemorySpanExporter()
    observability.setup_tracing("test-runtime", exporter=exporter)
    subj = subject()
    sub = await serve(nc, subj, OverlapQuery, echo)
    try:
        tracer = observability.get_tracer("test")
        with tracer.start_as_current_span("client-root") as root:
            await request(nc, subj, OverlapQuery(request_id="t", block_hashes=[]), OverlapScores, timeout=2)
        trace_id = root.get_span_context().trace_id
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            servers = [
                s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER and s.name == subj
            ]
            if servers:
                break
            await asyncio.sleep(0.01)
        assert servers, "no server span"
        server = servers[0]
        assert server.context.trace_id == trace_id
        assert server.parent is not None and server.parent.is_remote
        client = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT and s.name == subj]
        assert client and server.parent.span_id == client[0].context.span_id
        assert server.attributes is not None and server.attributes["tandem.request_id"] == "t"
    finally:
        await sub.unsubscribe()
        observability.setup_tracing("test-runtime")  # stop recording into this exporter


def make_info(iid: str, role: str = "both", heartbeat_at: float | None = None) -> InstanceInfo:
    return InstanceInfo(
        instance_id=iid,
        role=role,  # type: ignore[arg-type]
        model="m",
        block_size=16,
        num_blocks=100,
        block_nbytes=1024,
        compat_hash="h",
        nixl_agent_name=iid,
        nixl_metadata=b"",
        heartbeat_at=time.time() if heartbeat_at is None else heartbeat_at,
    )


async def test_ensure_jetstream_is_idempotent(nc: NatsClient) -> None:
    subjects = Subjects(f"ns{uuid.uuid4().hex[:8]}")
    js = nc.jetstream()
    kv1 = await ensure_jetstream(js, subjects)
    kv2 = await ensure_jetstream(js, subjects)
    assert kv1._name == kv2._name == subjects.instances_bucket
    info = await js.stream_info(subjects.kv_events_stream)
    assert info.config.subjects == [subjects.kv_events_wildcard]
    # Both at once (two processes starting together).
    other = Subjects(f"ns{uuid.uuid4().hex[:8]}")
    await asyncio.gather(ensure_jetstream(js, other), ensure_jetstream(js, other))


async def test_registry_put_delete_and_stale(nc: NatsClient) -> None:
    subjects = Subjects(f"ns{uuid.uuid4().hex[:8]}")
    js = nc.jetstream()
    kv = await ensure_jetstream(js, subjects)
    await kv.put("pre", encode(make_info("pre", "prefill")))  # present before the watch starts
    await kv.put("evil", encode(make_info("pre", "decode")))  # key and id differ: impersonation

    registry = InstanceRegistry(js, subjects, ttl_s=1.0, sweep_interval_s=0.1)
    added: list[str] = []
    removed: list[str] = []

    async def on_added(info: InstanceInfo) -> None:
        added.append(info.instance_id)

    async def on_removed(info: InstanceInfo) -> None:
        removed.append(info.instance_id)

    registry.on_added(on_added)
    registry.on_removed(on_removed)
    await registry.start()
    try:
        assert "pre" in registry and registry.instances["pre"].role == "prefill"
        assert "evil" not in registry and len(registry) == 1

        reg = WorkerRegistration(js, subjects, lambda: make_info("w1", "decode"), interval_s=0.2)
        await reg.start()
        await registry.wait_for(lambda d: "w1" in d, timeout=2)
        # Heartbeats keep it alive past the TTL.
        await asyncio.sleep(1.3)
        assert "w1" in registry
        assert added.count("w1") == 1
        await reg.stop()
        await registry.wait_for(lambda d: "w1" not in d, timeout=2)
        assert "w1" in removed

        # "pre" never heartbeats: dropped once heartbeat_at is older than the TTL.
        await registry.wait_for(lambda d: "pre" not in d, timeout=3)

        # A stale entry written later is never added.
        await kv.put("old", encode(make_info("old", heartbeat_at=time.time() - 60)))
        await kv.put("garbage", b"not msgpack")
        await asyncio.sleep(0.3)
        assert "old" not in registry and "garbage" not in registry

        with pytest.raises(TimeoutError):
            await registry.wait_for(lambda d: "never" in d, timeout=0.2)
    finally:
        await registry.stop()


async def test_registry_probes_a_stale_entry_before_dropping_it(nc: NatsClient) -> None:
    """Late heartbeats (a JetStream leader election stalls the bucket) do not drop a worker that
    answers its health subject; the watch is re-synced; one that stops answering goes."""
    subjects = Subjects(f"ns{uuid.uuid4().hex[:8]}")
    js = nc.jetstream()
    kv = await ensure_jetstream(js, subjects)
    await kv.put("w1", encode(make_info("w1", "decode")))

    async def health(_req: HealthRequest, _m: NatsMsg) -> Health:
        return Health(service="worker", instance_id="w1")

    tracker = TaskTracker()
    sub = await messaging.serve(nc, subjects.worker_health("w1"), HealthRequest, health, tracker=tracker)
    registry = InstanceRegistry(js, subjects, ttl_s=0.5, sweep_interval_s=0.1)
    await registry.start()
    try:
        assert "w1" in registry
        await asyncio.sleep(1.5)  # three TTLs without a heartbeat, but it answers every probe
        assert "w1" in registry
        assert registry.probes_answered >= 1 and registry.resyncs >= 1
        await sub.unsubscribe()  # now it is gone: no responders
        await registry.wait_for(lambda d: "w1" not in d, timeout=3)
    finally:
        await registry.stop()
        await tracker.drain(1.0)


async def test_service_base_health_and_shutdown(nats_url: str, nc: NatsClient) -> None:
    ns = f"ns{uuid.uuid4().hex[:8]}"
    svc = ServiceBase("svc", nats_url=nats_url, namespace=ns, grace_s=0.1, drain_timeout_s=2.0)
    await svc.start()
    started = asyncio.Event()
    finish = asyncio.Event()
    unregistered: list[bool] = []

    async def slowish(q: OverlapQuery, _m: NatsMsg) -> OverlapScores:
        started.set()
        await finish.wait()
        return OverlapScores(request_id=q.request_id, scores={})

    async def unregister() -> None:
        unregistered.append(True)

    svc.on_unregister(unregister)
    subj = f"{ns}.slow"
    await svc.serve(subj, OverlapQuery, slowish)
    try:
        deadline = time.monotonic() + 3
        while True:  # nats-server may report no responders for ~1 ms after another client's SUB
            try:
                h = await request(nc, svc.subjects.health("svc"), HealthRequest(), Health, timeout=2)
                break
            except NoRespondersError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.005)
        assert h.service == "svc" and h.ready and h.instance_id == svc.instance_id

        inflight = asyncio.create_task(
            request(nc, subj, OverlapQuery(request_id="r", block_hashes=[]), OverlapScores, timeout=5)
        )
        await started.wait()
        shutdown = asyncio.create_task(svc.shutdown())
        await asyncio.sleep(0.3)
        assert unregistered == [True]
        assert not shutdown.done()  # draining the in-flight handler
        finish.set()
        assert (await inflight).request_id == "r"  # the in-flight request still got its answer
        await asyncio.wait_for(shutdown, 5)
        assert svc.nc.is_closed
    finally:
        finish.set()
        await svc.shutdown()


async def test_registry_survives_a_nats_restart(tmp_path: Path) -> None:
    """A NATS restart longer than the heartbeat TTL empties nothing: no sweep while down, then a
    re-sync from the bucket with one TTL of grace, and the worker's heartbeats resume."""
    import nats as nats_client

    port = free_port()
    argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path)]

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(proc, port)
        return proc

    server = start()
    url = f"nats://127.0.0.1:{port}"
    opts = {"reconnect_time_wait": 0.2, "max_reconnect_attempts": -1}
    worker_nc = await nats_client.connect(url, **opts)
    watcher_nc = await nats_client.connect(url, **opts)
    subjects = Subjects(f"rr{uuid.uuid4().hex[:6]}")
    try:
        await ensure_jetstream(worker_nc.jetstream(), subjects, instance_ttl_s=30)
        info = make_info("w1", "decode")
        reg = WorkerRegistration(worker_nc.jetstream(), subjects, lambda: info, interval_s=0.2)
        await reg.start()
        registry = InstanceRegistry(watcher_nc.jetstream(), subjects, ttl_s=1.0, sweep_interval_s=0.1)
        await registry.start()
        try:
            await registry.wait_for(lambda d: "w1" in d, timeout=3)
            server.kill()
            server.wait(5)
            await asyncio.sleep(2.0)  # twice the TTL with no heartbeat possible
            assert "w1" in registry  # nothing swept while disconnected
            server = start()
            await asyncio.sleep(1.5)  # reconnect, re-sync, heartbeats resume
            assert "w1" in registry
            assert registry.resyncs >= 1
            before = registry.get("w1")
            assert before is not None
            await asyncio.sleep(0.6)
            after = registry.get("w1")
            assert after is not None and after.heartbeat_at > before.heartbeat_at  # live again
        finally:
            await registry.stop()
            await reg.stop()
    finally:
        await worker_nc.close()
        await watcher_nc.close()
        server.kill()
        server.wait(5)
