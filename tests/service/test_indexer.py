"""KV indexer against a real nats-server: events from the stream → overlap scores. Every test runs
with the native radix tree (C parser fast path, msgspec fallback) and the pure-Python one."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator

import pytest
import structlog
from nats.aio.client import Client as NatsClient

from tandem.kvbm.radix import NATIVE_AVAILABLE
from tandem.protocol import Subjects
from tandem.protocol.messages import (
    Health,
    HealthRequest,
    InstanceInfo,
    KvCleared,
    KvEvent,
    KvEventBatch,
    KvEventData,
    KvRemoved,
    KvStored,
    OverlapQuery,
    OverlapScores,
    StoredBlock,
    encode,
)
from tandem.services.discovery import WorkerRegistration
from tandem.services.indexer import IndexerConfig, KvIndexer
from tandem.services.messaging import NoRespondersError, request
from tandem.services.runtime import ServiceBase, connect
from tests.service.util import eventually


@pytest.fixture
def ns() -> str:
    return f"ix{uuid.uuid4().hex[:8]}"


@pytest.fixture(
    params=[
        pytest.param("native", marks=pytest.mark.skipif(not NATIVE_AVAILABLE, reason="extension not built")),
        "python",
    ]
)
def radix_impl(request: pytest.FixtureRequest) -> str:
    impl: str = request.param
    return impl


#: Indexer settings of these tests: no periodic or on-stop snapshots (tests write them explicitly).
NO_SNAPSHOTS = IndexerConfig(
    stale_worker_s=3600.0, snapshot_interval_s=0, snapshot_every_batches=0, snapshot_on_stop=False
)


class Indexers:
    """Starts in-process indexers on one namespace and shuts them all down."""

    def __init__(self, nats_url: str, ns: str, radix_impl: str) -> None:
        self.nats_url = nats_url
        self.ns = ns
        self.radix_impl = radix_impl
        self.started: list[ServiceBase] = []

    async def start(
        self,
        config: IndexerConfig | None = None,
        *,
        stale_worker_s: float | None = None,
        sweep_interval_s: float = 2.0,
        snapshot_check_s: float = 1.0,
    ) -> KvIndexer:
        """A started indexer (``config`` default: :data:`NO_SNAPSHOTS`, ``stale_worker_s`` if
        given), serving overlap queries; its catch-up may still be running."""
        config = config or NO_SNAPSHOTS
        if stale_worker_s is not None:
            config = dataclasses.replace(config, stale_worker_s=stale_worker_s)
        svc = ServiceBase("indexer", nats_url=self.nats_url, namespace=self.ns, drain_timeout_s=2.0)
        self.started.append(svc)
        await svc.start()
        indexer = KvIndexer(
            svc,
            config,
            sweep_interval_s=sweep_interval_s,
            snapshot_check_s=snapshot_check_s,
            radix_impl=self.radix_impl,
        )
        assert self.radix_impl == indexer.tree.IMPL
        await indexer.start()
        await self._wait_for_interest(svc.subjects.indexer_overlap)
        return indexer

    async def _wait_for_interest(self, subject: str, limit_s: float = 3.0) -> None:
        """Wait until ``subject`` has a responder as seen from another connection.

        nats-server (2.15) may answer "no responders" to another connection's publish for about
        a millisecond after a subscription was flushed.
        """
        client = await connect(self.nats_url, "test-indexer-probe")
        try:
            async with asyncio.timeout(limit_s):
                while True:
                    try:
                        probe = OverlapQuery(request_id="probe", block_hashes=[])
                        await request(client, subject, probe, OverlapScores, timeout=1)
                        return
                    except NoRespondersError:
                        await asyncio.sleep(0.005)
        finally:
            await client.close()

    async def close(self) -> None:
        for svc in self.started:
            await svc.shutdown()


@pytest.fixture
async def indexers(nats_url: str, ns: str, radix_impl: str) -> AsyncIterator[Indexers]:
    ix = Indexers(nats_url, ns, radix_impl)
    try:
        yield ix
    finally:
        await ix.close()


def stored(event_id: int, hashes: list[int], parent: int | None = None) -> KvEvent:
    blocks = [StoredBlock(block_hash=h, tokens_hash=h + 1000) for h in hashes]
    return KvEvent(event_id=event_id, data=KvStored(blocks=blocks, parent_hash=parent))


def ev(event_id: int, data: KvEventData) -> KvEvent:
    return KvEvent(event_id=event_id, data=data)


async def publish_events(nc: NatsClient, ns: str, worker: str, *events: KvEvent) -> None:
    await nc.jetstream().publish(
        Subjects(ns).kv_events(worker), encode(KvEventBatch(worker_id=worker, events=list(events)))
    )


async def scores(nc: NatsClient, ns: str, hashes: list[int]) -> dict[str, int]:
    r = await request(
        nc,
        Subjects(ns).indexer_overlap,
        OverlapQuery(request_id="q", block_hashes=hashes),
        OverlapScores,
        timeout=2,
    )
    return r.scores


async def test_events_to_overlap_scores(nc: NatsClient, ns: str, indexers: Indexers) -> None:
    indexer = await indexers.start()
    await publish_events(nc, ns, "wa", stored(0, [1, 2, 3]))
    await publish_events(nc, ns, "wb", stored(0, [1, 2]), stored(1, [9], parent=2))
    await eventually(lambda: indexer.events == 3)
    assert await scores(nc, ns, [1, 2, 3, 4]) == {"wa": 3, "wb": 2}
    assert await scores(nc, ns, [1, 2, 9]) == {"wa": 2, "wb": 3}
    assert await scores(nc, ns, [7]) == {}

    await publish_events(nc, ns, "wa", ev(1, KvRemoved(block_hashes=[3])))
    await publish_events(nc, ns, "wb", ev(2, KvCleared()))
    await eventually(lambda: indexer.events == 5)
    assert await scores(nc, ns, [1, 2, 3]) == {"wa": 2}

    h = await request(nc, Subjects(ns).health("indexer"), HealthRequest(), Health, timeout=2)
    assert h.ready and h.service == "indexer"


async def test_health_reports_indexer_lag(nc: NatsClient, ns: str, indexers: Indexers) -> None:
    """Live events are sampled for lag (apply time minus JetStream timestamp): p50/p99 in ms."""
    indexer = await indexers.start()
    for i in range(32):
        await publish_events(nc, ns, "wl", stored(i, [100 + i], parent=(99 + i) if i else None))
    await eventually(lambda: indexer.events == 32)
    assert len(indexer.lag_ms) == 32 // 8
    assert all(0 <= lag < 10_000 for lag in indexer.lag_ms)
    h = await request(nc, Subjects(ns).health("indexer"), HealthRequest(), Health, timeout=2)
    assert "lag_p50_ms=" in h.detail and "lag_p99_ms=" in h.detail


async def test_worker_leaving_registry_removes_its_blocks(
    nc: NatsClient, ns: str, indexers: Indexers
) -> None:
    indexer = await indexers.start()
    info = InstanceInfo(
        instance_id="wgone",
        role="both",
        model="m",
        block_size=16,
        num_blocks=8,
        block_nbytes=1,
        compat_hash="c",
        nixl_agent_name="a",
        nixl_metadata=b"",
        heartbeat_at=0.0,
    )
    reg = WorkerRegistration(nc.jetstream(), Subjects(ns), lambda: info, interval_s=0.2)
    await reg.start()
    try:
        await eventually(lambda: "wgone" in indexer.registry)
        await publish_events(nc, ns, "wgone", stored(0, [5, 6]))
        await publish_events(nc, ns, "wstay", stored(0, [5]))
        await eventually(lambda: indexer.events == 2)
        assert await scores(nc, ns, [5, 6]) == {"wgone": 2, "wstay": 1}
    finally:
        await reg.stop()
    await eventually(lambda: "wgone" not in indexer.tree.workers())
    assert await scores(nc, ns, [5, 6]) == {"wstay": 1}
    indexer.tree.check_integrity()


async def test_unregistered_silent_worker_is_swept(nc: NatsClient, ns: str, indexers: Indexers) -> None:
    indexer = await indexers.start(stale_worker_s=0.3, sweep_interval_s=0.1)
    await publish_events(nc, ns, "ghost", stored(0, [1]))
    await eventually(lambda: indexer.events == 1)
    await eventually(lambda: "ghost" not in indexer.tree.workers(), limit_s=3)
    assert await scores(nc, ns, [1]) == {}


async def test_bad_payload_is_skipped_and_gap_logged(nc: NatsClient, ns: str, indexers: Indexers) -> None:
    indexer = await indexers.start()
    js = nc.jetstream()
    with structlog.testing.capture_logs() as logs:
        await js.publish(Subjects(ns).kv_events("wx"), b"\xc1garbage")
        # Valid msgpack, wrong message: rejected by the indexer's fast decoder too.
        await js.publish(Subjects(ns).kv_events("wx"), encode(OverlapQuery(request_id="x", block_hashes=[1])))
        # A worker id that is not UTF-8 (msgspec raises UnicodeDecodeError, not DecodeError).
        await js.publish(
            Subjects(ns).kv_events("wx"), b"\x83\xa4kind\xa9kv_events\xa9worker_id\xa2\xff\xff\xa6events\x90"
        )
        await publish_events(nc, ns, "wx", stored(0, [1]))
        await publish_events(nc, ns, "wx", stored(3, [2], parent=1))  # ids 1 and 2 lost
        await eventually(lambda: indexer.events == 2)
    assert indexer.bad_payloads == 3
    assert indexer.gaps == 1
    assert any(e["event"] == "bad_kv_event_batch" for e in logs)
    gap = [e for e in logs if e["event"] == "kv_event_gap"]
    assert gap and gap[0]["expected"] == 1 and gap[0]["got"] == 3 and gap[0]["missed"] == 2
    assert await scores(nc, ns, [1, 2]) == {"wx": 2}


async def test_batch_naming_another_worker_is_dropped(nc: NatsClient, ns: str, indexers: Indexers) -> None:
    """A forged batch on w2's subject that names w1 (a ``KvCleared`` that would wipe w1's blocks,
    or a store in w1's name) changes nothing: batches count only from their own worker's subject."""
    indexer = await indexers.start()
    await publish_events(nc, ns, "w1", stored(0, [1, 2]))
    forged = KvEventBatch(worker_id="w1", events=[ev(1, KvCleared()), stored(2, [9])])
    with structlog.testing.capture_logs() as logs:
        await nc.jetstream().publish(Subjects(ns).kv_events("w2"), encode(forged))
        await publish_events(nc, ns, "w2", stored(0, [5]))
        await eventually(lambda: indexer.events == 2)
    assert indexer.bad_payloads == 1
    assert any(e["event"] == "kv_event_batch_foreign_worker" for e in logs)
    assert await scores(nc, ns, [1, 2]) == {"w1": 2}
    assert await scores(nc, ns, [9]) == {}


async def test_worker_restart_drops_its_old_blocks(nc: NatsClient, ns: str, indexers: Indexers) -> None:
    indexer = await indexers.start()
    await publish_events(nc, ns, "wr", stored(0, [1, 2]), stored(1, [3], parent=2))
    await publish_events(nc, ns, "wr", stored(0, [7]))  # restarted: ids from 0, fresh pool
    await eventually(lambda: indexer.events == 3)
    assert indexer.restarts == 1
    assert await scores(nc, ns, [1, 2]) == {}
    assert await scores(nc, ns, [7]) == {"wr": 1}


async def test_restart_rebuilds_from_stream(nc: NatsClient, ns: str, indexers: Indexers) -> None:
    first = await indexers.start()
    await publish_events(nc, ns, "w1", stored(0, [1, 2, 3]))
    await publish_events(nc, ns, "w2", stored(0, [1]))
    await publish_events(nc, ns, "w1", ev(1, KvRemoved(block_hashes=[3])))
    await eventually(lambda: first.events == 3)
    expected = await scores(nc, ns, [1, 2, 3])
    assert expected == {"w1": 2, "w2": 1}
    await indexers.started[0].shutdown()

    second = await indexers.start()
    await asyncio.wait_for(second.caught_up.wait(), 3)
    assert second.events == 3
    assert await scores(nc, ns, [1, 2, 3]) == expected
    assert second.tree.num_blocks() == first.tree.num_blocks()

    # Two replicas both see new events.
    third = await indexers.start()
    await asyncio.wait_for(third.caught_up.wait(), 3)
    await publish_events(nc, ns, "w2", stored(1, [2], parent=1))
    await eventually(lambda: second.events == 4 and third.events == 4)
    assert second.tree.find_matches([1, 2]) == third.tree.find_matches([1, 2]) == {"w1": 2, "w2": 2}
