"""Prefill router against a real nats-server, with fake workers and a fake indexer served in-test."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription

from tandem.protocol import Subjects
from tandem.protocol.messages import (
    Ack,
    Cancel,
    DecodeRequest,
    ErrorReply,
    Health,
    HealthRequest,
    InstanceInfo,
    KvTransferParams,
    OverlapQuery,
    OverlapScores,
    PrefillFinished,
    PrefillRequest,
    PrefillResult,
    RequestFinished,
    RouteRequest,
    SamplingParams,
    TokenChunk,
    encode,
)
from tandem.services.messaging import ServiceError, TaskTracker, serve
from tandem.services.router import PrefillRouter, RouterConfig
from tandem.services.runtime import ServiceBase, ensure_jetstream
from tests.service.util import eventually

BLOCK = 4
FIRST = 4242


@dataclass
class FakeWorker:
    """Records what it receives; behaviour is configurable per test."""

    id: str
    role: str
    prefills: list[PrefillRequest] = field(default_factory=list)
    decodes: list[DecodeRequest] = field(default_factory=list)
    cancels: list[Cancel] = field(default_factory=list)
    prefill_hook: Callable[[PrefillRequest], Awaitable[PrefillResult | None]] | None = None
    decode_error: ServiceError | None = None
    decode_hook: Callable[[DecodeRequest], Awaitable[None]] | None = None
    compat: str = "c1"
    #: Answers liveness probes on ``worker_health(id)`` (False: as if the process were gone).
    alive: bool = True

    def info(self) -> InstanceInfo:
        return InstanceInfo(
            instance_id=self.id,
            role=self.role,  # type: ignore[arg-type]
            model="m",
            block_size=BLOCK,
            num_blocks=1000,
            block_nbytes=64,
            compat_hash=self.compat,
            nixl_agent_name=f"agent-{self.id}",
            nixl_metadata=b"md",
            heartbeat_at=time.time(),
        )

    def kv(self, req: PrefillRequest) -> KvTransferParams:
        n = -(-len(req.token_ids) // BLOCK)
        return KvTransferParams(
            agent_name=f"agent-{self.id}",
            agent_metadata=b"md",
            block_ids=list(range(n)),
            descriptors=[(1000 + 64 * i, 64, 0) for i in range(n)],
            block_nbytes=64,
            num_tokens=len(req.token_ids),
            block_hashes=req.block_hashes,
            compat_hash=self.compat,
            expires_at=time.time() + 30,
        )

    async def on_prefill(self, req: PrefillRequest, _m: NatsMsg) -> PrefillResult:
        self.prefills.append(req)
        if self.prefill_hook is not None:
            res = await self.prefill_hook(req)
            if res is not None:
                return res
        return PrefillResult(
            request_id=req.request_id,
            worker_id=self.id,
            first_token=FIRST,
            cached_tokens=8,
            prefill_ms=12.5,
            kv=self.kv(req),
        )

    async def on_decode(self, req: DecodeRequest, _m: NatsMsg) -> Ack:
        self.decodes.append(req)
        if self.decode_hook is not None:
            await self.decode_hook(req)
        if self.decode_error is not None:
            raise self.decode_error
        return Ack(request_id=req.request_id, worker_id=self.id)

    async def on_cancel(self, msg: Cancel, _m: NatsMsg) -> None:
        self.cancels.append(msg)

    async def on_health(self, req: HealthRequest, _m: NatsMsg) -> Health:
        return Health(service="worker", instance_id=self.id, holds=True if req.request_id else None)


class Env:
    """One namespace: fake workers, a fake indexer, one router, a client connection."""

    def __init__(self, nats_url: str, nc: NatsClient) -> None:
        self.nats_url = nats_url
        self.nc = nc
        self.ns = f"rt{uuid.uuid4().hex[:8]}"
        self.subjects = Subjects(self.ns)
        self.tracker = TaskTracker()
        self.subs: list[Subscription] = []
        self.overlap: dict[str, int] = {}
        self.svc: ServiceBase | None = None
        self.router: PrefillRouter | None = None
        self.replicas: list[ServiceBase] = []

    async def add_worker(self, worker: FakeWorker) -> FakeWorker:
        s = self.subjects
        self.subs.append(
            await serve(
                self.nc, s.worker_prefill(worker.id), PrefillRequest, worker.on_prefill, tracker=self.tracker
            )
        )
        self.subs.append(
            await serve(
                self.nc, s.worker_generate(worker.id), DecodeRequest, worker.on_decode, tracker=self.tracker
            )
        )
        self.subs.append(
            await serve(self.nc, s.worker_cancel(worker.id), Cancel, worker.on_cancel, tracker=self.tracker)
        )
        if worker.alive:
            self.subs.append(
                await serve(
                    self.nc, s.worker_health(worker.id), HealthRequest, worker.on_health, tracker=self.tracker
                )
            )
        kv = await ensure_jetstream(self.nc.jetstream(), s)
        await kv.put(worker.id, encode(worker.info()))
        if self.router is not None:
            await self.router.registry.wait_for(lambda d: worker.id in d, timeout=3)
        return worker

    async def start_router(self, **config: object) -> PrefillRouter:
        async def overlap(q: OverlapQuery, _m: NatsMsg) -> OverlapScores:
            return OverlapScores(request_id=q.request_id, scores=dict(self.overlap))

        self.subs.append(
            await serve(self.nc, self.subjects.indexer_overlap, OverlapQuery, overlap, tracker=self.tracker)
        )
        self.svc = ServiceBase("router", nats_url=self.nats_url, namespace=self.ns, drain_timeout_s=2.0)
        await self.svc.start()
        cfg = RouterConfig(**{"disagg_min_tokens": 8, "ack_timeout_s": 1.0, **config})  # type: ignore[arg-type]
        self.router = PrefillRouter(self.svc, cfg)
        await self.router.start()
        await wait_for_interest(self.nc, self.subjects.router_generate)
        return self.router

    async def add_replica(self, **config: object) -> PrefillRouter:
        """Another router in the same queue group (after :meth:`start_router`)."""
        svc = ServiceBase("router", nats_url=self.nats_url, namespace=self.ns, drain_timeout_s=2.0)
        await svc.start()
        self.replicas.append(svc)
        cfg = RouterConfig(**{"disagg_min_tokens": 8, "ack_timeout_s": 1.0, **config})  # type: ignore[arg-type]
        router = PrefillRouter(svc, cfg)
        await router.start()
        return router

    async def route(
        self, n_tokens: int, *, seed: int | None = None, request_id: str | None = None, prefix: int = 1000
    ) -> Inbox:
        inbox = Inbox(self.nc)
        await inbox.start()
        tokens = list(range(1, n_tokens + 1))
        req = RouteRequest(
            request_id=request_id or uuid.uuid4().hex,
            model="m",
            token_ids=tokens,
            block_hashes=[prefix + i for i in range(n_tokens // BLOCK)],
            sampling=SamplingParams(max_tokens=4, seed=seed),
            reply_to=inbox.subject,
        )
        inbox.request = req
        await self.nc.publish(self.subjects.router_generate, encode(req), reply=inbox.subject)
        return inbox

    async def close(self) -> None:
        for svc in self.replicas:
            await svc.shutdown()
        if self.svc is not None:
            await self.svc.shutdown()
        for sub in self.subs:
            await sub.unsubscribe()
        await self.tracker.drain(1.0)


class Inbox:
    """The frontend's side: collects what arrives on ``reply_to``."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.subject = nc.new_inbox()
        self.items: list[TokenChunk | ErrorReply] = []
        #: Who held the request, in order (the router's ``Ack`` messages).
        self.acks: list[Ack] = []
        self.request: RouteRequest | None = None
        self.statuses: list[str] = []
        self._sub: Subscription | None = None
        self._dec = msgspec.msgpack.Decoder(TokenChunk | ErrorReply | Ack)

    async def start(self) -> None:
        async def cb(msg: NatsMsg) -> None:
            if not msg.data:  # a NATS status message (e.g. no responders)
                self.statuses.append(msg.headers.get("Status", "") if msg.headers else "")
                return
            item = self._dec.decode(msg.data)
            if isinstance(item, Ack):
                self.acks.append(item)
            else:
                self.items.append(item)

        self._sub = await self.nc.subscribe(self.subject, cb=cb)

    async def wait(self, n: int = 1, limit_s: float = 3.0) -> list[TokenChunk | ErrorReply]:
        await eventually(lambda: len(self.items) >= n, limit_s)
        return self.items


async def wait_for_interest(nc: NatsClient, subject: str, limit_s: float = 3.0) -> None:
    """Wait until a request on ``subject`` from ``nc`` finds a responder.

    nats-server (2.15) may answer "no responders" to another connection's publish for about a
    millisecond after a subscription was flushed (seen in ~4% of immediate tries).
    """
    deadline = time.monotonic() + limit_s
    while True:
        try:
            await nc.request(subject, b"", timeout=1)  # empty payload: the router answers 400
            return
        except nats.errors.NoRespondersError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.005)


@pytest.fixture
async def env(nats_url: str, nc: NatsClient) -> AsyncIterator[Env]:
    e = Env(nats_url, nc)
    try:
        yield e
    finally:
        await e.close()


async def test_disaggregated_path(env: Env) -> None:
    p = await env.add_worker(FakeWorker("p1", "prefill"))
    d = await env.add_worker(FakeWorker("d1", "decode"))
    await env.start_router()
    inbox = await env.route(40)
    [chunk] = await inbox.wait(1)
    await eventually(lambda: len(d.decodes) == 1)

    assert isinstance(chunk, TokenChunk)
    assert chunk.index == 0 and chunk.token_ids == [FIRST] and chunk.worker_id == "p1"
    assert chunk.finish_reason is None and chunk.error is None
    [pre] = p.prefills
    [dec] = d.decodes
    assert inbox.request is not None
    assert pre.token_ids == inbox.request.token_ids
    assert pre.sampling.seed is not None  # the router assigned one ...
    assert dec.sampling.seed == pre.sampling.seed  # ... and both sides use it
    assert dec.kv is not None and dec.kv.agent_name == "agent-p1" and dec.kv.num_tokens == 40
    assert dec.first_token == FIRST and dec.prefill_worker_id == "p1"
    assert dec.reply_to == inbox.subject
    assert dec.metrics.prefill_worker == "p1" and dec.metrics.cached_tokens == 8
    assert dec.metrics.prefill_ms == 12.5
    assert p.cancels == []
    await asyncio.sleep(0.05)
    assert len(inbox.items) == 1  # the rest comes from the decode worker


async def test_seed_is_kept_when_given(env: Env) -> None:
    p = await env.add_worker(FakeWorker("p1", "prefill"))
    d = await env.add_worker(FakeWorker("d1", "decode"))
    await env.start_router()
    await env.route(40, seed=7)
    await eventually(lambda: len(d.decodes) == 1)
    assert p.prefills[0].sampling.seed == 7 == d.decodes[0].sampling.seed


async def test_short_prompt_goes_straight_to_decode(env: Env) -> None:
    p = await env.add_worker(FakeWorker("p1", "prefill"))
    d = await env.add_worker(FakeWorker("d1", "decode"))
    await env.start_router(disagg_min_tokens=64)
    inbox = await env.route(20)
    await eventually(lambda: len(d.decodes) == 1)
    dec = d.decodes[0]
    assert dec.kv is None and dec.first_token is None and dec.prefill_worker_id is None
    assert dec.sampling.seed is not None
    assert p.prefills == []
    await asyncio.sleep(0.05)
    assert inbox.items == []  # the decode worker emits chunk 0 itself


async def test_cached_prompt_stays_local(env: Env) -> None:
    """Uncached tokens, not prompt length, decide: a mostly cached long prompt is not disaggregated."""
    p = await env.add_worker(FakeWorker("p1", "prefill"))
    d = await env.add_worker(FakeWorker("d1", "decode"))
    env.overlap = {"d1": 9}  # 36 of 40 tokens cached on the decode worker
    await env.start_router(disagg_min_tokens=8)
    await env.route(40)
    await eventually(lambda: len(d.decodes) == 1)
    assert d.decodes[0].kv is None and p.prefills == []


async def test_only_both_workers_means_aggregated(env: Env) -> None:
    b = await env.add_worker(FakeWorker("b1", "both"))
    await env.start_router()
    await env.route(40)
    await eventually(lambda: len(b.decodes) == 1)
    assert b.decodes[0].kv is None and b.prefills == []


async def test_prefill_picks_worker_with_most_overlap(env: Env) -> None:
    p1 = await env.add_worker(FakeWorker("p1", "prefill"))
    p2 = await env.add_worker(FakeWorker("p2", "prefill"))
    p3 = await env.add_worker(FakeWorker("p3", "prefill"))
    d = await env.add_worker(FakeWorker("d1", "decode"))
    env.overlap = {"p1": 2, "p2": 6, "p3": 4}
    await env.start_router()
    for n in range(1, 6):  # one at a time: no in-flight load to spread
        await env.route(40)
        await eventually(lambda: len(d.decodes) == n)  # noqa: B023 (awaited inside the iteration)
    assert len(p2.prefills) == 5 and p1.prefills == [] and p3.prefills == []
    assert all(dec.prefill_worker_id == "p2" for dec in d.decodes)


async def test_prefill_load_spreads_concurrent_requests(env: Env) -> None:
    release = asyncio.Event()

    async def hold(_req: PrefillRequest) -> None:
        await release.wait()

    p1 = await env.add_worker(FakeWorker("p1", "prefill", prefill_hook=hold))
    p2 = await env.add_worker(FakeWorker("p2", "prefill", prefill_hook=hold))
    d = await env.add_worker(FakeWorker("d1", "decode"))
    await env.start_router()
    for _ in range(4):
        await env.route(40)
    await eventually(lambda: len(p1.prefills) + len(p2.prefills) == 4)
    assert len(p1.prefills) == 2 and len(p2.prefills) == 2  # in-flight blocks count as load
    release.set()
    await eventually(lambda: len(d.decodes) == 4)


async def test_prefill_error_gives_error_chunk(env: Env) -> None:
    async def fail(_req: PrefillRequest) -> None:
        raise ServiceError(400, "prompt too long", type="invalid_request_error")

    await env.add_worker(FakeWorker("p1", "prefill", prefill_hook=fail))
    d = await env.add_worker(FakeWorker("d1", "decode"))
    await env.start_router()
    inbox = await env.route(40)
    [chunk] = await inbox.wait(1)
    assert isinstance(chunk, TokenChunk)
    assert chunk.index == 0 and chunk.finish_reason == "error"
    assert chunk.error is not None and chunk.error.code == 400 and "prompt too long" in chunk.error.message
    assert d.decodes == []


async def test_prefill_timeout_gives_504_and_frees(env: Env) -> None:
    async def slow(_req: PrefillRequest) -> None:
        await asyncio.sleep(1.0)

    p = await env.add_worker(FakeWorker("p1", "prefill", prefill_hook=slow))
    await env.add_worker(FakeWorker("d1", "decode"))
    await env.start_router(prefill_timeout_s=0.2)
    inbox = await env.route(40)
    [chunk] = await inbox.wait(1)
    assert isinstance(chunk, TokenChunk) and chunk.error is not None and chunk.error.code == 504
    await eventually(lambda: len(p.cancels) == 1)  # it may still pin KV: told to free it


async def test_decode_refusal_after_first_token_frees_prefill(env: Env) -> None:
    p = await env.add_worker(FakeWorker("p1", "prefill"))
    await env.add_worker(
        FakeWorker("d1", "decode", decode_error=ServiceError(409, "compat hash mismatch", type="conflict"))
    )
    await env.start_router()
    inbox = await env.route(40)
    first, err = await inbox.wait(2)
    assert isinstance(first, TokenChunk) and first.index == 0 and first.token_ids == [FIRST]
    assert isinstance(err, TokenChunk) and err.index == 1 and err.finish_reason == "error"
    assert err.error is not None and err.error.code == 409
    await eventually(lambda: len(p.cancels) == 1)
    assert p.cancels[0].request_id == first.request_id


async def test_prefill_finishing_the_request_sends_final_chunk(env: Env) -> None:
    async def finish(req: PrefillRequest) -> PrefillResult:
        return PrefillResult(
            request_id=req.request_id,
            worker_id="p1",
            first_token=2,
            cached_tokens=0,
            prefill_ms=3.0,
            finish_reason="stop",
        )

    await env.add_worker(FakeWorker("p1", "prefill", prefill_hook=finish))
    d = await env.add_worker(FakeWorker("d1", "decode"))
    await env.start_router()
    inbox = await env.route(40)
    [chunk] = await inbox.wait(1)
    assert isinstance(chunk, TokenChunk)
    assert chunk.finish_reason == "stop" and chunk.token_ids == [2]
    assert (
        chunk.metrics is not None and chunk.metrics.prefill_worker == "p1" and chunk.metrics.prefill_ms == 3.0
    )
    await asyncio.sleep(0.05)
    assert d.decodes == []


async def test_cancel_during_prefill_is_not_forwarded(env: Env) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold(_req: PrefillRequest) -> None:
        entered.set()
        await release.wait()

    p = await env.add_worker(FakeWorker("p1", "prefill", prefill_hook=hold))
    d = await env.add_worker(FakeWorker("d1", "decode"))
    await env.start_router()
    inbox = await env.route(40, request_id="rq-cancel")
    await asyncio.wait_for(entered.wait(), 3)
    await env.nc.publish(env.subjects.cancel, encode(Cancel(request_id="rq-cancel")))
    await env.nc.flush()
    await asyncio.sleep(0.05)
    release.set()
    await eventually(lambda: len(p.cancels) == 1)  # pinned KV freed
    assert p.cancels[0].request_id == "rq-cancel"
    await asyncio.sleep(0.05)
    assert d.decodes == [] and inbox.items == []


async def test_no_workers_gives_503_chunk(env: Env) -> None:
    await env.start_router()
    inbox = await env.route(40)
    [chunk] = await inbox.wait(1)
    assert isinstance(chunk, TokenChunk) and chunk.finish_reason == "error"
    assert chunk.error is not None and chunk.error.code == 503


async def test_prefill_only_workers_give_503_chunk(env: Env) -> None:
    p = await env.add_worker(FakeWorker("p1", "prefill"))
    await env.start_router()
    inbox = await env.route(40)
    [chunk] = await inbox.wait(1)
    assert isinstance(chunk, TokenChunk) and chunk.error is not None and chunk.error.code == 503
    assert p.prefills == []


async def test_dead_decode_worker_is_skipped(env: Env) -> None:
    await env.add_worker(FakeWorker("p1", "prefill"))
    d1 = await env.add_worker(FakeWorker("d1", "decode"))
    # Registered, but nothing serves its subjects (it died since its last heartbeat).
    kv = await ensure_jetstream(env.nc.jetstream(), env.subjects)
    ghost = FakeWorker("d0", "decode")
    await kv.put(ghost.id, encode(ghost.info()))
    router = await env.start_router()
    await router.registry.wait_for(lambda d: "d0" in d and "d1" in d, timeout=3)
    for _ in range(4):
        await env.route(40)
    await eventually(lambda: len(d1.decodes) == 4)


async def test_bad_route_request_gets_400(env: Env) -> None:
    await env.start_router()
    resp = await env.nc.request(env.subjects.router_generate, b"\x93\x01\x02\x03", timeout=2)
    err = msgspec.msgpack.decode(resp.data, type=ErrorReply)
    assert err.code == 400


# ---- routing modes, busy workers, completion signal, replicas ------------------------------------------


async def test_round_robin_mode_cycles_decode_workers(env: Env) -> None:
    ws = [await env.add_worker(FakeWorker(f"d{i}", "decode")) for i in range(3)]
    env.overlap = {"d2": 5}  # ignored by round-robin
    router = await env.start_router(router_mode="round-robin")
    order = []
    for n in range(1, 7):  # one at a time: record who got each request
        before = [len(w.decodes) for w in ws]
        await env.route(20)
        await eventually(lambda: sum(len(w.decodes) for w in ws) == n)  # noqa: B023
        order += [w.id for w, b in zip(ws, before, strict=True) if len(w.decodes) > b]
    assert order == ["d0", "d1", "d2", "d0", "d1", "d2"]
    ok, detail = router._readiness()
    assert ok and "mode=round-robin" in detail and "decide_p99_us=" in detail
    assert router.stats()["decisions"] == 6


async def test_all_workers_busy_gives_503_with_retry_after(env: Env) -> None:
    d = await env.add_worker(FakeWorker("d1", "decode"))
    router = await env.start_router(active_decode_blocks_threshold=0.01, busy_retry_after_s=2.0)
    first = await env.route(80, request_id="rq-big")  # 20 blocks of 4 > 1% of 1000
    await eventually(lambda: len(d.decodes) == 1)
    assert router.scheduler.active.owner("rq-big") == "d1"

    inbox = await env.route(20, prefix=5000)
    [chunk] = await inbox.wait(1)
    assert isinstance(chunk, TokenChunk) and chunk.finish_reason == "error" and chunk.error is not None
    assert chunk.error.code == 503 and chunk.error.type == "service_unavailable"
    assert chunk.error.retry_after_s == 2.0 and "busy" in chunk.error.message
    assert len(d.decodes) == 1 and first.items == []

    # The decode worker reports the request finished: the router stops counting it.
    await env.nc.publish(
        env.subjects.request_finished, encode(RequestFinished(request_id="rq-big", worker_id="d1"))
    )
    await eventually(lambda: router.scheduler.active.owner("rq-big") is None)
    await env.route(20, prefix=5000)
    await eventually(lambda: len(d.decodes) == 2)


async def test_local_prefill_finished_releases_prefill_tokens(env: Env) -> None:
    """A worker that prefilled a request itself says so (PrefillFinished): the router stops
    counting the prompt tokens at once (the blocks stay until RequestFinished)."""
    d = await env.add_worker(FakeWorker("d1", "decode"))
    router = await env.start_router()
    await env.route(40, request_id="rq-l")
    await eventually(lambda: len(d.decodes) == 1)
    seqs = router.scheduler.active.get("d1")
    assert seqs is not None and seqs.prefill_tokens == 40
    blocks = seqs.active_blocks
    await env.nc.publish(
        env.subjects.prefill_finished, encode(PrefillFinished(request_id="rq-l", worker_id="d1"))
    )
    await eventually(lambda: seqs.prefill_tokens == 0)
    assert seqs.active_blocks == blocks and router.scheduler.active.owner("rq-l") == "d1"


async def test_cancel_after_hand_off_releases_tracked_load(env: Env) -> None:
    d = await env.add_worker(FakeWorker("d1", "decode"))
    router = await env.start_router()
    await env.route(40, request_id="rq-c")
    await eventually(lambda: len(d.decodes) == 1)
    assert router.scheduler.active.owner("rq-c") == "d1"
    await env.nc.publish(env.subjects.cancel, encode(Cancel(request_id="rq-c")))
    await eventually(lambda: router.scheduler.active.owner("rq-c") is None)
    assert "rq-c" not in router._early_cancels


async def test_replicas_track_only_their_own_requests(env: Env) -> None:
    d = await env.add_worker(FakeWorker("d1", "decode"))
    r1 = await env.start_router()
    r2 = await env.add_replica()
    n = 12
    for k in range(n):
        await env.route(40, request_id=f"rq-{k}")
    await eventually(lambda: len(d.decodes) == n)
    a, b = r1.scheduler.active, r2.scheduler.active
    mine = {f"rq-{k}": (a.owner(f"rq-{k}"), b.owner(f"rq-{k}")) for k in range(n)}
    # every request is tracked by exactly one replica (the one the queue group gave it to)
    assert all((x is None) != (y is None) for x, y in mine.values())
    assert len(a) + len(b) == n
    for k in range(n):  # the finished notification is broadcast; only the owner acts
        await env.nc.publish(
            env.subjects.request_finished, encode(RequestFinished(request_id=f"rq-{k}", worker_id="d1"))
        )
    await eventually(lambda: len(a) + len(b) == 0)


async def test_saturated_prefill_worker_means_local_prefill(env: Env) -> None:
    release = asyncio.Event()

    async def hold(_req: PrefillRequest) -> None:
        await release.wait()

    p = await env.add_worker(FakeWorker("p1", "prefill", prefill_hook=hold))
    d = await env.add_worker(FakeWorker("d1", "decode"))
    await env.start_router(max_prefill_queue_tokens=60)
    await env.route(40, prefix=1000)  # p1 queue: 0 → remote (40 queued)
    await eventually(lambda: len(p.prefills) == 1)
    await env.route(40, prefix=2000)  # 40 < 60 → remote (80 queued)
    await eventually(lambda: len(p.prefills) == 2)
    await env.route(40, prefix=3000)  # 80 >= 60 and d1 has none queued → d1 prefills itself
    await eventually(lambda: len(d.decodes) == 1)
    assert d.decodes[0].kv is None and len(p.prefills) == 2
    release.set()
    await eventually(lambda: len(d.decodes) == 3)
    assert sum(1 for x in d.decodes if x.kv is not None) == 2


# ---- faults (issue 6) ------------------------------------------------------------------------------


async def test_router_tells_the_frontend_who_holds_the_request(env: Env) -> None:
    await env.add_worker(FakeWorker("p1", "prefill"))
    await env.add_worker(FakeWorker("d1", "decode"))
    router = await env.start_router()
    inbox = await env.route(40)
    await eventually(lambda: len(inbox.acks) == 2)
    assert [(a.service, a.worker_id) for a in inbox.acks] == [
        ("router", router.svc.instance_id),
        ("worker", "d1"),
    ]
    # The router answers liveness probes for what it holds (nothing, once handed off).
    probe = HealthRequest(request_id=inbox.acks[0].request_id)
    reply = await env.nc.request(
        env.subjects.health_instance("router", router.svc.instance_id), encode(probe), timeout=2
    )
    health = msgspec.msgpack.decode(reply.data, type=Health)
    assert health.holds is False


async def test_prefill_worker_lost_mid_prefill_falls_back_to_local_prefill(env: Env) -> None:
    async def hang(_req: PrefillRequest) -> None:
        await asyncio.sleep(30)

    p = await env.add_worker(FakeWorker("p1", "prefill", prefill_hook=hang, alive=False))
    d = await env.add_worker(FakeWorker("d1", "decode"))
    router = await env.start_router(worker_probe_interval_s=0.2)
    t0 = time.monotonic()
    await env.route(40)
    await eventually(lambda: len(d.decodes) == 1, 3.0)
    assert time.monotonic() - t0 < 2.0  # not the 120 s prefill timeout
    assert d.decodes[0].kv is None  # the decode worker prefills it itself
    assert len(p.prefills) == 1
    assert router.prefill_fallbacks == 1
    assert "p1" not in router.live_instances()  # suspect until it heartbeats again


async def test_prefill_worker_lost_tries_the_next_prefill_worker(env: Env) -> None:
    async def hang(_req: PrefillRequest) -> None:
        await asyncio.sleep(30)

    p1 = await env.add_worker(FakeWorker("p1", "prefill", prefill_hook=hang, alive=False))
    p2 = await env.add_worker(FakeWorker("p2", "prefill"))
    d = await env.add_worker(FakeWorker("d1", "decode"))
    env.overlap = {"p1": 10}  # p1 is the first choice
    await env.start_router(worker_probe_interval_s=0.2)
    inbox = await env.route(40)
    await eventually(lambda: len(d.decodes) == 1, 3.0)
    assert len(p1.prefills) == 1 and len(p2.prefills) == 1
    assert d.decodes[0].prefill_worker_id == "p2"
    assert isinstance(inbox.items[0], TokenChunk) and inbox.items[0].token_ids == [FIRST]


async def test_decode_worker_short_of_blocks_hands_the_request_on(env: Env) -> None:
    full = ServiceError(503, "not enough free KV blocks", type="kv_capacity")
    d1 = await env.add_worker(FakeWorker("d1", "decode", decode_error=full))
    d2 = await env.add_worker(FakeWorker("d2", "decode"))
    await env.add_worker(FakeWorker("p1", "prefill"))
    await env.start_router(router_mode="round-robin")
    for _ in range(4):
        await env.route(40)
    await eventually(lambda: len(d2.decodes) == 4)
    assert len(d1.decodes) >= 1  # it was asked, declined, and the request went on


async def test_decode_worker_that_does_not_ack_is_cancelled_and_skipped(env: Env) -> None:
    async def hang(_req: DecodeRequest) -> None:
        await asyncio.sleep(30)

    await env.add_worker(FakeWorker("p1", "prefill"))
    d1 = await env.add_worker(FakeWorker("d1", "decode", decode_hook=hang))
    d2 = await env.add_worker(FakeWorker("d2", "decode"))
    router = await env.start_router(router_mode="round-robin", ack_timeout_s=0.3)
    await env.route(40)
    await env.route(40)
    await eventually(lambda: len(d2.decodes) == 2, 3.0)
    assert len(d1.decodes) == 1
    await eventually(lambda: len(d1.cancels) == 1)
    assert "d1" not in router.live_instances()


async def test_router_not_ready_without_a_decode_worker(env: Env) -> None:
    router = await env.start_router()
    assert router.svc.readiness()[0] is False
    await env.add_worker(FakeWorker("d1", "decode"))
    assert router.svc.readiness()[0] is True


async def test_decode_worker_lost_before_acking_is_noticed_by_the_probe(env: Env) -> None:
    async def hang(_req: DecodeRequest) -> None:
        await asyncio.sleep(30)

    await env.add_worker(FakeWorker("p1", "prefill"))
    d1 = await env.add_worker(FakeWorker("d1", "decode", decode_hook=hang, alive=False))
    d2 = await env.add_worker(FakeWorker("d2", "decode"))
    await env.start_router(router_mode="round-robin", ack_timeout_s=30.0, worker_probe_interval_s=0.2)
    t0 = time.monotonic()
    await env.route(40)
    await env.route(40)
    await eventually(lambda: len(d2.decodes) == 2, 3.0)
    assert time.monotonic() - t0 < 2.0  # the probe, not the 30 s Ack timeout
    assert len(d1.decodes) == 1
    await eventually(lambda: len(d1.cancels) == 1)


async def test_every_decode_worker_short_of_blocks_waits_for_room(env: Env) -> None:
    """Both decode workers decline (kv_capacity) at first: the router tries again until one has
    room, instead of failing the request (or herding it anywhere)."""
    full = ServiceError(503, "not enough free KV blocks", type="kv_capacity")
    d1 = await env.add_worker(FakeWorker("d1", "decode", decode_error=full))
    d2 = await env.add_worker(FakeWorker("d2", "decode", decode_error=full))
    await env.add_worker(FakeWorker("p1", "prefill"))
    router = await env.start_router(router_mode="round-robin", decode_wait_s=5.0)
    inbox = await env.route(40)
    await eventually(lambda: len(d1.decodes) >= 2 and len(d2.decodes) >= 2, 3.0)
    assert not any(isinstance(i, TokenChunk) and i.error for i in inbox.items), inbox.items
    d2.decode_error = None  # d2's running requests finished
    await eventually(lambda: any(a.service == "worker" for a in inbox.acks), 3.0)
    acks = [a for a in inbox.acks if a.service == "worker"]
    assert [a.worker_id for a in acks] == ["d2"], inbox.items
    assert "d1" in router.live_instances() and "d2" in router.live_instances()  # busy is not suspect


async def test_every_decode_worker_busy_past_the_wait_is_503_with_retry_after(env: Env) -> None:
    full = ServiceError(503, "not enough free KV blocks", type="kv_capacity")
    await env.add_worker(FakeWorker("d1", "decode", decode_error=full))
    await env.add_worker(FakeWorker("p1", "prefill"))
    await env.start_router(decode_wait_s=0.3, busy_retry_after_s=2.0)
    inbox = await env.route(40)
    await eventually(lambda: any(isinstance(i, TokenChunk) and i.error for i in inbox.items), 3.0)
    err = next(i.error for i in inbox.items if isinstance(i, TokenChunk) and i.error)
    assert err.code == 503 and err.retry_after_s == 2.0, err
    assert "busy" in err.message
