"""KV indexer restarts against a real nats-server: snapshot + stream tail == full replay ==
never restarted; replicas agree; unusable snapshots fall back to a full replay with a warning;
health says ready only after the catch-up. Every test runs with both radix tree implementations."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import structlog
from nats.aio.client import Client as NatsClient

from tandem.kvbm.radix import NATIVE_AVAILABLE
from tandem.protocol import Subjects
from tandem.protocol.messages import (
    INDEXER_SNAPSHOT_VERSION,
    Health,
    HealthRequest,
    IndexerSnapshot,
    InstanceInfo,
    KvCleared,
    KvEvent,
    KvEventBatch,
    KvRemoved,
    OverlapQuery,
    RadixTreeState,
    encode,
)
from tandem.services.discovery import WorkerRegistration
from tandem.services.indexer import KvIndexer
from tandem.services.indexer_snapshot import CREATED_HEADER, SEQ_HEADER, SNAPSHOT_OBJECT, snapshot_bucket
from tandem.services.messaging import request
from tandem.services.runtime import ensure_jetstream
from tests.service.test_indexer import NO_SNAPSHOTS, Indexers, scores, stored
from tests.service.util import eventually

FULL_REPLAY = dataclasses.replace(NO_SNAPSHOTS, snapshot_restore=False)


@pytest.fixture
def ns() -> str:
    return f"ixr{uuid.uuid4().hex[:8]}"


@pytest.fixture(
    params=[
        pytest.param("native", marks=pytest.mark.skipif(not NATIVE_AVAILABLE, reason="extension not built")),
        "python",
    ]
)
def radix_impl(request: pytest.FixtureRequest) -> str:
    impl: str = request.param
    return impl


@pytest.fixture
async def indexers(nats_url: str, ns: str, radix_impl: str) -> AsyncIterator[Indexers]:
    ix = Indexers(nats_url, ns, radix_impl)
    try:
        yield ix
    finally:
        await ix.close()


class History:
    """Publishes a deterministic random KV-event history: sequences over a few shared prefixes,
    removals, clears, worker restarts (ids back to 0), several events per batch. Remembers what
    it published (messages, events) and the prompts (for queries)."""

    def __init__(self, nc: NatsClient, ns: str, seed: int = 0) -> None:
        self.js = nc.jetstream()
        self.subjects = Subjects(ns)
        self.rng = random.Random(seed)
        self.next_id: dict[str, int] = {}
        self.held: dict[str, list[int]] = {}
        self.prompts: list[list[int]] = [[1000 * p + i for i in range(1, 9)] for p in range(1, 4)]
        self._fresh = 10**6
        self.messages = 0
        self.events = 0

    def _id(self, worker: str) -> int:
        eid = self.next_id.get(worker, 0)
        self.next_id[worker] = eid + 1
        return eid

    def _event(self, worker: str) -> KvEvent:
        rng, held = self.rng, self.held.setdefault(worker, [])
        r = rng.random()
        if r < 0.6 or not held:
            prefix = rng.choice(self.prompts)[: rng.randrange(0, 9)]
            tail = [self._next_hash() for _ in range(rng.randrange(1 if not prefix else 0, 5))]
            prompt = prefix + tail
            self.prompts.append(prompt)
            held.extend(prompt)
            return stored(self._id(worker), prompt)
        if r < 0.93:
            gone = rng.sample(held, min(len(held), rng.randrange(1, 4)))
            for h in gone:
                held.remove(h)
            return KvEvent(event_id=self._id(worker), data=KvRemoved(block_hashes=gone))
        held.clear()
        return KvEvent(event_id=self._id(worker), data=KvCleared())

    def _next_hash(self) -> int:
        self._fresh += 1
        return self._fresh

    async def publish(self, worker: str, *events: KvEvent) -> None:
        batch = KvEventBatch(worker_id=worker, events=list(events))
        await self.js.publish(self.subjects.kv_events(worker), encode(batch))
        self.messages += 1
        self.events += len(events)

    async def random(self, batches: int, workers: list[str]) -> None:
        """``batches`` messages of 1-3 events from ``workers``; now and then a worker restarts."""
        for _ in range(batches):
            w = self.rng.choice(workers)
            if self.rng.random() < 0.03 and self.next_id.get(w):
                self.next_id[w] = 0  # restarted: ids from 0, fresh pool
                self.held[w] = []
            await self.publish(w, *(self._event(w) for _ in range(self.rng.randrange(1, 4))))

    def queries(self) -> list[list[int]]:
        return [p for p in self.prompts if p] + [p[:k] for p in self.prompts[:6] for k in range(1, len(p))]


def view(ix: KvIndexer) -> tuple[Any, ...]:
    """What an indexer knows, independent of slots: holders of each block, sequence starts, each
    worker's block count and last event id, the tree's anomaly counters."""
    t = ix.tree
    workers = {w: (t.worker_num_blocks(w), t.last_event_id(w)) for w in t.workers()}
    return (
        t.block_holders(),
        t.sequence_starts(),
        workers,
        (t.gaps, t.unknown_parent_events, t.unknown_removed_blocks),
    )


async def answers(ix: KvIndexer, queries: list[list[int]]) -> list[dict[str, int]]:
    """The indexer's overlap handler's answers (what the router gets from this replica)."""
    out = []
    for q in queries:
        r = await ix.overlap(OverlapQuery(request_id="q", block_hashes=q), None)
        out.append(r.scores)
    return out


async def caught_up(*ixs: KvIndexer, limit_s: float = 10.0) -> None:
    await asyncio.wait_for(asyncio.gather(*(ix.caught_up.wait() for ix in ixs)), limit_s)


async def health(nc: NatsClient, ns: str) -> Health:
    reply: Health = await request(nc, Subjects(ns).health("indexer"), HealthRequest(), Health, timeout=2)
    return reply


async def stored_snapshot(nc: NatsClient, ns: str) -> tuple[int, IndexerSnapshot]:
    """``(stream seq in the object headers, decoded snapshot)`` of the stored snapshot."""
    obs = await nc.jetstream().object_store(snapshot_bucket(Subjects(ns)))
    res = await obs.get(SNAPSHOT_OBJECT)
    assert res.info.headers is not None
    seq = int(res.info.headers[SEQ_HEADER][0])
    float(res.info.headers[CREATED_HEADER][0])
    return seq, msgspec.msgpack.decode(res.data, type=IndexerSnapshot)


async def test_restart_from_snapshot_applies_only_the_tail(
    nc: NatsClient, ns: str, indexers: Indexers
) -> None:
    """Events → snapshot → indexer stops → more events → a new indexer restores the snapshot and
    applies exactly the tail: it knows and answers what a never-restarted indexer and a full
    replay know, and all three go on agreeing on live events."""
    hist = History(nc, ns, seed=1)
    workers = [f"w{i}" for i in range(6)]
    ref = await indexers.start()  # never restarted
    first = await indexers.start()
    await hist.random(120, workers)
    await eventually(lambda: first.applied_seq == ref.applied_seq == hist.messages)
    assert await first.write_snapshot() == 120
    assert (await stored_snapshot(nc, ns))[0] == 120
    await first.svc.shutdown()

    events_before = hist.events
    await hist.random(30, [*workers, "late"])  # the tail, with a worker the snapshot lacks
    tail_events = hist.events - events_before
    await eventually(lambda: ref.applied_seq == hist.messages)

    restarted = await indexers.start()
    full = await indexers.start(FULL_REPLAY)
    await caught_up(restarted, full)
    assert restarted.start_mode == "snapshot" and restarted.restored_seq == 120
    assert restarted.catchup_batches == 30 and restarted.events == tail_events  # the tail only
    assert restarted.duplicates == 0 and restarted.stream_gaps == 0
    assert full.start_mode == "replay" and full.catchup_batches == 150 and full.events == hist.events
    assert view(restarted) == view(ref) == view(full)
    queries = hist.queries()
    want = await answers(ref, queries)
    assert await answers(restarted, queries) == want == await answers(full, queries)
    assert any(want) and max(len(a) for a in want) >= 2
    h = await health(nc, ns)
    assert h.ready and ("start=snapshot snapshot_seq=120" in h.detail or "start=replay" in h.detail)

    await hist.random(20, [*workers, "late"])
    await eventually(lambda: restarted.applied_seq == full.applied_seq == ref.applied_seq == 170)
    assert view(restarted) == view(ref) == view(full)
    restarted.tree.check_integrity()


async def test_two_replicas_started_together_agree(nc: NatsClient, ns: str, indexers: Indexers) -> None:
    """Two replicas starting at once from the same snapshot and tail (each consumes the whole
    stream itself; overlap queries go to either through the queue group) answer identically."""
    hist = History(nc, ns, seed=2)
    workers = [f"w{i}" for i in range(5)]
    writer = await indexers.start()
    await hist.random(80, workers)
    await eventually(lambda: writer.applied_seq == 80)
    await writer.write_snapshot()
    await writer.svc.shutdown()
    await hist.random(25, workers)

    a, b = await asyncio.gather(indexers.start(), indexers.start())
    await caught_up(a, b)
    assert a.start_mode == b.start_mode == "snapshot"
    assert a.catchup_batches == b.catchup_batches == 25
    await hist.random(25, workers)  # live events reach both
    await eventually(lambda: a.applied_seq == b.applied_seq == 130)
    assert view(a) == view(b)
    queries = hist.queries()
    want = await answers(a, queries)
    assert await answers(b, queries) == want
    # Through NATS (the queue group picks a replica per query): the same answers.
    for q, expected in list(zip(queries, want, strict=True))[:40]:
        assert await scores(nc, ns, q) == expected


async def test_health_is_ready_only_after_the_catch_up(
    nc: NatsClient, ns: str, indexers: Indexers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the tail is being applied the indexer says not ready (and why) but already answers
    overlap queries from the restored snapshot (the router keeps routing); ready once caught up."""
    hist = History(nc, ns, seed=3)
    first = await indexers.start()
    await hist.random(40, ["a", "b"])
    await eventually(lambda: first.applied_seq == 40)
    await first.write_snapshot()
    snapshot_view = view(first)
    queries = hist.queries()
    snapshot_answers = await answers(first, queries)
    await first.svc.shutdown()
    await hist.random(10, ["a", "b"])

    gate = asyncio.Event()
    apply = KvIndexer._on_event_msg

    async def gated(self: KvIndexer, msg: Any) -> None:
        await gate.wait()
        await apply(self, msg)

    monkeypatch.setattr(KvIndexer, "_on_event_msg", gated)
    second = await indexers.start()
    h = await health(nc, ns)
    assert not h.ready
    assert "catching up: stream seq 40 of 50" in h.detail and "snapshot_seq=40" in h.detail
    assert view(second) == snapshot_view
    got = [await scores(nc, ns, q) for q in queries]
    assert got == snapshot_answers and any(got)  # answered from the snapshot meanwhile
    gate.set()
    await caught_up(second)
    h = await health(nc, ns)
    assert h.ready and "start=snapshot" in h.detail and "ready_ms=" in h.detail
    assert second.catchup_batches == 10


def _bad_snapshots(ns: str) -> dict[str, bytes]:
    stream = Subjects(ns).kv_events_stream
    good_tree = RadixTreeState(workers=[], mask_words=1, hashes=b"", masks=b"", roots=b"")
    inconsistent = RadixTreeState(workers=[], mask_words=1, hashes=b"\x01" * 8, masks=b"\x00" * 8, roots=b"")

    def snap(**kw: Any) -> bytes:
        fields: dict[str, Any] = {
            "version": INDEXER_SNAPSHOT_VERSION,
            "stream": stream,
            "stream_seq": 3,
            "created_at": 0.0,
            "indexer_id": "t",
            "events": 3,
            "tree": good_tree,
        }
        return encode(IndexerSnapshot(**(fields | kw)))

    return {
        "garbage": b"\xc1not msgpack at all",
        "truncated": snap()[:-5],
        "version": snap(version=INDEXER_SNAPSHOT_VERSION + 1),
        "other stream": snap(stream="OTHER_KV_EVENTS"),
        "inconsistent": snap(tree=inconsistent),
        "ahead of the stream": snap(stream_seq=10**6),
    }


@pytest.mark.parametrize(
    "kind", ["garbage", "truncated", "version", "other stream", "inconsistent", "ahead of the stream"]
)
async def test_unusable_snapshot_is_ignored_with_a_warning(
    nc: NatsClient, ns: str, indexers: Indexers, kind: str
) -> None:
    hist = History(nc, ns, seed=4)
    ref = await indexers.start()
    await hist.random(30, ["a", "b", "c"])
    await eventually(lambda: ref.applied_seq == 30)
    obs = await nc.jetstream().object_store(snapshot_bucket(Subjects(ns)))
    await obs.put(SNAPSHOT_OBJECT, _bad_snapshots(ns)[kind])
    with structlog.testing.capture_logs() as logs:
        ix = await indexers.start()
        await caught_up(ix)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    expected = "snapshot_ahead_of_stream" if kind == "ahead of the stream" else "snapshot_unusable"
    assert [e["event"] for e in warnings] == [expected], warnings
    assert warnings[0]["fallback"] == "full_replay"
    assert ix.start_mode == "replay" and ix.restored_seq is None and ix.catchup_batches == 30
    assert view(ix) == view(ref)


async def test_snapshot_older_than_the_stream_falls_back_to_full_replay(
    nc: NatsClient, ns: str, indexers: Indexers
) -> None:
    """Events after the snapshot expired from the stream (max age): the snapshot plus what is left
    would miss them, so the indexer replays what the stream holds, with a warning."""
    hist = History(nc, ns, seed=5)
    first = await indexers.start()
    await hist.random(20, ["a", "b"])
    await eventually(lambda: first.applied_seq == 20)
    await first.write_snapshot()
    await first.svc.shutdown()
    await hist.random(20, ["a", "b"])
    stream = Subjects(ns).kv_events_stream
    await nc.jetstream().purge_stream(stream, seq=25)  # messages 1..24 gone, 21..24 after the snapshot
    with structlog.testing.capture_logs() as logs:
        ix = await indexers.start()
        await caught_up(ix)
    too_old = [e for e in logs if e["event"] == "snapshot_too_old"]
    assert too_old and too_old[0]["expired"] == 4 and too_old[0]["log_level"] == "warning"
    assert ix.start_mode == "replay" and ix.catchup_batches == 16 and ix.applied_seq == 40
    assert ix.stream_gaps == 0  # a replay from the first stored message is no gap


async def test_snapshot_right_at_the_first_stored_message_is_used(
    nc: NatsClient, ns: str, indexers: Indexers
) -> None:
    """Messages up to the snapshot's sequence expired, none after it: snapshot + tail is exact."""
    hist = History(nc, ns, seed=6)
    ref = await indexers.start()
    first = await indexers.start()
    await hist.random(20, ["a", "b"])
    await eventually(lambda: first.applied_seq == ref.applied_seq == 20)
    await first.write_snapshot()
    await first.svc.shutdown()
    await hist.random(10, ["a", "b"])
    await nc.jetstream().purge_stream(Subjects(ns).kv_events_stream, seq=21)
    await eventually(lambda: ref.applied_seq == 30)
    ix = await indexers.start()
    await caught_up(ix)
    assert ix.start_mode == "snapshot" and ix.catchup_batches == 10
    assert view(ix) == view(ref)


async def test_periodic_snapshots_and_snapshot_on_stop(nc: NatsClient, ns: str, indexers: Indexers) -> None:
    """A snapshot is written every N batches, and every T seconds if messages were applied; a
    stopping indexer writes a last one, and the next start has no tail to apply."""
    hist = History(nc, ns, seed=7)
    by_count = dataclasses.replace(NO_SNAPSHOTS, snapshot_every_batches=10, snapshot_on_stop=True)
    a = await indexers.start(by_count, snapshot_check_s=0.02)
    await caught_up(a)
    for _ in range(5):
        await hist.random(5, ["a", "b", "c"])
        await eventually(lambda: a.applied_seq == hist.messages)
        await asyncio.sleep(0.1)
    assert a.snapshots_written == 2 and (await stored_snapshot(nc, ns))[0] in range(20, 26)
    await hist.random(3, ["a"])
    await eventually(lambda: a.applied_seq == 28)
    await a.svc.shutdown()
    seq, snap = await stored_snapshot(nc, ns)
    assert seq == snap.stream_seq == 28 and snap.version == INDEXER_SNAPSHOT_VERSION
    assert snap.events == hist.events and snap.indexer_id == a.svc.instance_id

    by_time = dataclasses.replace(NO_SNAPSHOTS, snapshot_interval_s=0.3)
    b = await indexers.start(by_time, snapshot_check_s=0.02)
    await caught_up(b)
    assert b.restored_seq == 28 and b.catchup_batches == 0 and b.restored_events == hist.events
    assert view(b) == view(a)
    await asyncio.sleep(0.5)
    assert b.snapshots_written == 0  # nothing applied since the stored one
    await hist.random(2, ["a"])
    await eventually(lambda: (b.snapshots_written, b._stored_seq) == (1, 30), limit_s=3)


async def test_replicas_share_the_snapshot_writes(nc: NatsClient, ns: str, indexers: Indexers) -> None:
    """A replica reads the stored snapshot's sequence and time before writing: after another one
    wrote, its own write is not due any more."""
    hist = History(nc, ns, seed=10)
    config = dataclasses.replace(NO_SNAPSHOTS, snapshot_every_batches=10)
    a, b = await indexers.start(config), await indexers.start(config)
    await hist.random(12, ["a", "b"])
    await eventually(lambda: a.applied_seq == b.applied_seq == 12)
    assert a._snapshot_due() and b._snapshot_due()
    assert await a.write_snapshot() == 12
    await b._refresh_stored()
    assert not b._snapshot_due() and b._stored_seq == 12
    await hist.random(10, ["a", "b"])
    await eventually(lambda: b.applied_seq == 22)
    assert b._snapshot_due()


async def test_workers_gone_before_the_restart_are_still_swept(
    nc: NatsClient, ns: str, indexers: Indexers
) -> None:
    """A worker in the snapshot that is not registered (died while the indexer was down) is
    dropped once unregistered and silent for --stale-worker-s, as after a full replay; a
    registered one is kept; one that unregisters later is dropped at once."""
    info = InstanceInfo(
        instance_id="alive",
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
    hist = History(nc, ns, seed=8)
    try:
        first = await indexers.start()
        await hist.publish("ghost", stored(0, [1, 2]))
        await hist.publish("alive", stored(0, [1]))
        await eventually(lambda: first.applied_seq == 2)
        await first.write_snapshot()
        await first.svc.shutdown()

        config = dataclasses.replace(NO_SNAPSHOTS, stale_worker_s=0.5)
        ix = await indexers.start(config, sweep_interval_s=0.1)
        await caught_up(ix)
        assert ix.start_mode == "snapshot" and ix.tree.workers() == {"ghost", "alive"}
        assert await scores(nc, ns, [1, 2]) == {"ghost": 2, "alive": 1}  # not at once: grace
        await eventually(lambda: ix.tree.workers() == {"alive"}, limit_s=5)
        assert await scores(nc, ns, [1, 2]) == {"alive": 1}
    finally:
        await reg.stop()
    await eventually(lambda: ix.tree.workers() == set())


async def test_a_snapshot_store_that_cannot_be_created_means_replay(
    nc: NatsClient, ns: str, indexers: Indexers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No object store (JetStream refuses it): the indexer still starts, replays and serves."""
    hist = History(nc, ns, seed=9)
    await ensure_jetstream(nc.jetstream(), Subjects(ns))
    await hist.random(5, ["a"])

    async def refuse(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("no object store here")

    import nats.js.client

    monkeypatch.setattr(nats.js.client.JetStreamContext, "object_store", refuse)
    with structlog.testing.capture_logs() as logs:
        ix = await indexers.start()
        await caught_up(ix)
    assert any(e["event"] == "snapshot_store_unavailable" for e in logs)
    assert ix.start_mode == "replay" and ix.catchup_batches == 5
    assert await ix.write_snapshot() is None


async def test_consumer_reset_skips_what_was_applied(nc: NatsClient, ns: str, indexers: Indexers) -> None:
    """nats-py's ordered consumer re-creates itself after a missed heartbeat or a reconnect,
    from its last delivered sequence + 1 (told the snapshot's sequence at start). Messages at or
    below the last applied sequence that a reset re-delivers anyway are skipped."""
    hist = History(nc, ns, seed=11)
    first = await indexers.start()
    await hist.random(15, ["a", "b"])
    await eventually(lambda: first.applied_seq == 15)
    await first.write_snapshot()
    await first.svc.shutdown()
    ref = await indexers.start(FULL_REPLAY)
    ix = await indexers.start()
    await caught_up(ix, ref)
    jsi = ix._consumer._sub._jsi  # nats-py internals: the ordered consumer's state
    assert jsi._sseq == 15 and ix.catchup_batches == 0
    await jsi.reset_ordered_consumer(jsi._sseq + 1)  # as after a missed heartbeat: nothing again
    await hist.random(3, ["a"])
    await eventually(lambda: ix.applied_seq == ref.applied_seq == 18)
    assert ix.duplicates == 0
    await jsi.reset_ordered_consumer(1)  # from the start: everything again, all skipped
    await eventually(lambda: ix.duplicates == 18)
    await hist.random(2, ["b"])
    await eventually(lambda: ix.applied_seq == ref.applied_seq == 20)
    assert view(ix) == view(ref) and ix.stream_gaps == 0
