"""KV indexer: which worker caches which prompt blocks; answers overlap queries for the router.

Snapshot storage, restore and writes are in :mod:`tandem.services.indexer_snapshot`.

Life cycle
----------
1. **start** — connect (:class:`~tandem.services.runtime.ServiceBase`), make sure the KV-events
   stream and the instances bucket exist, load the registered workers
   (:class:`~tandem.services.discovery.InstanceRegistry`), open (or create) the snapshot object
   store ``{ns}-indexer-snapshot``
   (:func:`~tandem.services.indexer_snapshot.snapshot_bucket`). Health: ``ready=False``.
2. **restore** — load the stored :class:`~tandem.protocol.messages.IndexerSnapshot` (the radix
   tree after applying the stream up to sequence ``stream_seq``) into the empty tree (either
   implementation). It is skipped, with a warning, and the indexer replays the whole stream
   instead when it is unreadable, undecodable, of another version or inconsistent
   (``snapshot_unusable``), when its ``stream_seq`` is past the stream's last sequence (the stream
   was recreated: ``snapshot_ahead_of_stream``) or when events after it have already expired from
   the stream (``KV_EVENTS_MAX_AGE_S``: ``snapshot_too_old``). ``--no-snapshot-restore`` always
   replays.
3. **catch up** — subscribe to the stream ``{NS}_KV_EVENTS`` with an *ordered, ephemeral* consumer
   (one per replica: every replica sees every event; a durable shared consumer would split them)
   delivering from ``stream_seq + 1`` (from the first stored message without a snapshot), so the
   result equals a full replay; messages at or below the last applied sequence (a consumer reset)
   are skipped. Overlap queries are served from here on (partial answers while catching up). The
   indexer is *caught up* (health ``ready=True``) once the consumer has no pending messages.
4. **serve** — apply each :class:`~tandem.protocol.messages.KvEventBatch` in stream order (with the
   native tree, payloads are parsed by its C parser; anything it does not take is decoded by
   msgspec, so both accept and reject exactly the same payloads) and answer
   :class:`~tandem.protocol.messages.OverlapQuery` → :class:`~tandem.protocol.messages.OverlapScores`
   on ``{ns}.indexer.overlap`` (queue group ``indexer``).

   * an event id that does not follow the worker's previous one is logged (``kv_event_gap``);
     an id back at 0 after a higher one means the worker restarted with an empty pool: its old
     blocks are dropped before the event is applied; a stream sequence that skips messages
     (deleted or expired before they were applied) is logged (``kv_stream_gap``);
   * a payload that is not a ``KvEventBatch`` is logged and skipped (the ordered consumer has no
     acks: nothing is redelivered);
   * a worker that leaves the instances bucket (delete, or heartbeat older than the TTL) has its
     blocks removed; a worker the tree knows but the bucket does not (e.g. events replayed, or a
     snapshot restored, from a worker that died before this indexer started) is removed once it
     has been both unregistered and silent for ``--stale-worker-s`` seconds (counted from the
     restore or its last event).
5. **snapshot** — once caught up, every replica checks about once a second
   (:meth:`KvIndexer.write_snapshot`): a snapshot is due when the stored one is older than
   ``--snapshot-interval-s`` or ``--snapshot-every-batches`` stream messages behind, and this
   replica has applied messages past it. Before writing, the replica reads the stored
   snapshot's sequence and time (another replica may just have written one), so the replicas
   share the work and usually one of them writes per interval; a race costs a redundant write,
   never a wrong snapshot (any replica's state at any sequence is a valid one). The tree is
   serialized synchronously on the event loop, between two events, so it reflects exactly the
   messages up to ``applied_seq``.
6. **stop** — SIGINT/SIGTERM: unsubscribe, drain in-flight queries, cancel the sweep and snapshot
   tasks, write a last snapshot if messages were applied past the stored one
   (``--snapshot-on-stop``), stop the consumer and the registry watch, drain the connection
   (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from nats.aio.msg import Msg as NatsMsg
from nats.js import api
from nats.js.object_store import ObjectStore

from tandem.config import add_arguments, from_namespace, option
from tandem.kvbm._wire import decode_kv_event_batch
from tandem.kvbm.radix import EventGap, NativeRadixTree, make_radix_tree
from tandem.protocol.messages import InstanceInfo, OverlapQuery, OverlapScores
from tandem.services.discovery import InstanceRegistry
from tandem.services.indexer_snapshot import SnapshotMixin
from tandem.services.runtime import ServiceBase, ack_info, common_parser, run_service

SERVICE = "indexer"
#: Lag samples kept (the health answer reports their p50/p99) and the sampling period (messages).
LAG_SAMPLES = 4096
LAG_SAMPLE_EVERY = 8

Phase = Literal["starting", "restoring", "catching_up", "ready"]


@dataclass(frozen=True, kw_only=True)
class IndexerConfig:
    """KV indexer settings; each field is also a ``--flag``. ``ValueError`` on negative values."""

    stale_worker_s: float = option(
        15.0, help="drop blocks of a worker that is not registered and silent for this long (seconds)"
    )
    snapshot_interval_s: float = option(
        30.0,
        help="write a snapshot once the stored one is this old and messages were applied past it "
        "(seconds; 0: not by time)",
    )
    snapshot_every_batches: int = option(
        50_000,
        help="write a snapshot once this many KV event batches (stream messages) were applied past "
        "the stored one (0: not by count)",
    )
    snapshot_restore: bool = option(
        True, help="start from the stored snapshot plus the stream's tail (off: replay the whole stream)"
    )
    snapshot_on_stop: bool = option(True, help="write a last snapshot when stopping")
    snapshot_load_timeout_s: float = option(
        30.0, help="give up loading the snapshot after this long and replay the whole stream (seconds)"
    )

    def __post_init__(self) -> None:
        for name in ("stale_worker_s", "snapshot_interval_s", "snapshot_every_batches"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.snapshot_load_timeout_s <= 0:
            raise ValueError("snapshot_load_timeout_s must be > 0")

    @property
    def snapshots_periodic(self) -> bool:
        """Snapshots are written periodically (by time, by count or both)."""
        return self.snapshot_interval_s > 0 or self.snapshot_every_batches > 0


class KvIndexer(SnapshotMixin):
    """The indexer's state and handlers, attached to a started :class:`ServiceBase`.

    ``config``: :class:`IndexerConfig` (default: its defaults). ``sweep_interval_s``: how often
    unregistered silent workers are looked for (seconds). ``snapshot_check_s``: how often a
    snapshot is checked for being due (seconds, jittered ±25 %). ``radix_impl``: ``"native"``,
    ``"python"`` or ``"auto"`` (:func:`~tandem.kvbm.radix.make_radix_tree`; default:
    ``TANDEM_RADIX``, else the native tree when it is built).

    Counters: ``events`` / ``batches`` (applied by this process), ``catchup_batches`` (stream
    messages applied before caught up: the tail after a snapshot, or the whole stream),
    ``restored_events`` (events the restored snapshot reflects), ``duplicates`` (messages at or
    below ``applied_seq``, skipped), ``stream_gaps``, ``bad_payloads``, ``gaps``, ``restarts``,
    ``snapshots_written``. ``applied_seq``: stream sequence of the last message applied (or of
    the restored snapshot). ``start_mode``: ``"snapshot"`` or ``"replay"``.
    """

    config: IndexerConfig  # narrows SnapshotMixin's

    def __init__(
        self,
        svc: ServiceBase,
        config: IndexerConfig | None = None,
        *,
        sweep_interval_s: float = 2.0,
        snapshot_check_s: float = 1.0,
        radix_impl: str | None = None,
    ) -> None:
        self.svc = svc
        self.config = config or IndexerConfig()
        self.tree = make_radix_tree(radix_impl)
        self._native = self.tree if isinstance(self.tree, NativeRadixTree) else None
        self.registry = InstanceRegistry(svc.js, svc.subjects, replicas=svc.jetstream_replicas)
        self.stale_worker_s = self.config.stale_worker_s
        self.sweep_interval_s = sweep_interval_s
        self.snapshot_check_s = snapshot_check_s
        self.caught_up = asyncio.Event()
        self.phase: Phase = "starting"
        self.start_mode: Literal["snapshot", "replay"] = "replay"
        self.batches = 0
        self.events = 0
        self.catchup_batches = 0
        self.restored_events = 0
        self.restored_seq: int | None = None
        self.applied_seq = 0
        self.duplicates = 0
        self.stream_gaps = 0
        self.snapshots_written = 0
        #: Seconds from :meth:`start` to caught up (None before).
        self.ready_s: float | None = None
        #: Restoring the snapshot (ms): ``fetch`` (object store → bytes), ``restore`` (decode and
        #: rebuild the tree); empty if none was restored.
        self.restore_ms: dict[str, float] = {}
        #: Indexer lag samples (ms): apply time minus the event's JetStream timestamp, for every
        #: ``LAG_SAMPLE_EVERY``-th live message (replayed ones are not lag).
        self.lag_ms: collections.deque[float] = collections.deque(maxlen=LAG_SAMPLES)
        self.bad_payloads = 0
        self.gaps = 0
        self.restarts = 0
        self._last_event_at: dict[str, float] = {}  # worker -> time.monotonic() of its last event
        self._consumer: Any = None
        self._store: ObjectStore | None = None
        self._stored_seq = 0  # stream sequence and creation time (Unix s) of the stored snapshot
        self._stored_at = 0.0
        self._write_lock = asyncio.Lock()
        self._catchup_target = 0
        self._started_at = time.monotonic()
        self.log = svc.log
        self._received = 0

    async def start(self) -> None:
        """Load workers, restore the snapshot, start the stream consumer and serve overlap queries
        (life cycle 1-3; returns before the catch-up is done: see :attr:`caught_up`).

        Raises the JetStream error if the stream or the consumer cannot be reached.
        """
        svc = self.svc
        self._started_at = time.monotonic()
        svc.readiness = self._readiness
        self.registry.on_removed(self._on_worker_removed)
        await self.registry.start()
        svc.on_close(self.registry.stop)
        self._store = await self._open_store()

        stream = svc.subjects.kv_events_stream
        info = await svc.js.stream_info(stream)
        if self.config.snapshot_restore:
            self.phase = "restoring"
            await self._restore(info.state.first_seq, info.state.last_seq)
        start_seq = self.applied_seq + 1
        self.phase = "catching_up"
        self._catchup_target = info.state.last_seq
        if info.state.messages == 0 or info.state.last_seq < start_seq:
            self._set_caught_up()
        consumer = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if start_seq > 1 else api.DeliverPolicy.ALL,
            opt_start_seq=start_seq if start_seq > 1 else None,
        )
        self._consumer = await svc.js.subscribe(
            svc.subjects.kv_events_wildcard,
            stream=stream,
            cb=self._on_event_msg,
            ordered_consumer=True,
            config=consumer,
            idle_heartbeat=2.0,
        )
        # nats-py's ordered consumer restarts from its last delivered sequence + 1 when it resets
        # (missed heartbeat, reconnect); before any delivery that is 1 unless told where we start.
        # (Messages at or below applied_seq would be skipped anyway.)
        with contextlib.suppress(AttributeError):
            self._consumer._sub._jsi._sseq = start_seq - 1
        svc.on_close(self._stop_consumer)
        svc.on_close(self._snapshot_on_stop)  # close hooks run LIFO: before the consumer stops
        await svc.serve(
            svc.subjects.indexer_overlap, OverlapQuery, self.overlap, queue=svc.subjects.INDEXER_QUEUE
        )
        svc.spawn(self._sweep(), name="indexer-sweep")
        if not self.caught_up.is_set():
            svc.spawn(self._watch_catch_up(), name="indexer-catch-up")
        if self._store is not None and self.config.snapshots_periodic:
            svc.spawn(self._snapshot_loop(), name="indexer-snapshots")
        self.log.info(
            "indexer_started",
            stream=stream,
            stream_messages=info.state.messages,
            start_seq=start_seq,
            start_mode=self.start_mode,
            workers=len(self.registry),
            radix=self.tree.IMPL,
        )

    async def _stop_consumer(self) -> None:
        if self._consumer is not None:
            await self._consumer.unsubscribe()
            self._consumer = None

    def _readiness(self) -> tuple[bool, str]:
        detail = (
            f"blocks={self.tree.num_blocks()} workers={len(self.tree.workers())} events={self.events} "
            f"stream_seq={self.applied_seq} start={self.start_mode}"
        )
        if self.restored_seq is not None:
            detail += f" snapshot_seq={self.restored_seq}"
        if self.lag_ms:
            lags = sorted(self.lag_ms)
            p50, p99 = lags[len(lags) // 2], lags[min(len(lags) - 1, round(0.99 * (len(lags) - 1)))]
            detail += f" lag_p50_ms={p50:.2f} lag_p99_ms={p99:.2f}"
        if self.phase == "starting":
            return False, "starting; " + detail
        if self.phase == "restoring":
            return False, "restoring the snapshot; " + detail
        if not self.caught_up.is_set():
            return False, (
                f"catching up: stream seq {self.applied_seq} of {self._catchup_target} "
                f"({self.catchup_batches} batches applied); " + detail
            )
        return True, detail + f" ready_ms={1e3 * (self.ready_s or 0.0):.0f}"

    def _set_caught_up(self) -> None:
        if self.caught_up.is_set():
            return
        self.ready_s = time.monotonic() - self._started_at
        self.phase = "ready"
        self.caught_up.set()
        self.log.info(
            "caught_up",
            start_mode=self.start_mode,
            snapshot_seq=self.restored_seq,
            stream_seq=self.applied_seq,
            catchup_batches=self.catchup_batches,
            events=self.events,
            blocks=self.tree.num_blocks(),
            ready_ms=round(1e3 * self.ready_s, 1),
        )

    async def _watch_catch_up(self) -> None:
        """Backstop for the pending count of delivered messages: caught up also when the consumer
        has nothing left to deliver (e.g. the messages expected at start expired meanwhile)."""
        while not self.caught_up.is_set():
            await asyncio.sleep(1.0)
            sub = self._consumer
            if sub is None:
                return
            with contextlib.suppress(Exception):
                ci = await sub.consumer_info()
                if ci.num_pending == 0 and sub.pending_msgs == 0:
                    self._set_caught_up()

    # ---- queries ----------------------------------------------------------------------------------

    async def overlap(self, query: OverlapQuery, _msg: NatsMsg | None) -> OverlapScores:
        """Leading cached blocks per worker for ``query.block_hashes`` (workers with 0 left out)."""
        return OverlapScores(
            request_id=query.request_id,
            scores=self.tree.find_matches(query.block_hashes),
            tree_blocks=self.tree.num_blocks(),
        )

    # ---- events -----------------------------------------------------------------------------------

    async def _on_event_msg(self, msg: NatsMsg) -> None:
        # Runs in the consumer's delivery task, one message at a time, in stream order.
        seq, pending = ack_info(msg.reply)
        if seq is not None:
            if seq <= self.applied_seq:  # already applied (or restored): a consumer reset
                self.duplicates += 1
                if pending == 0 and not self.caught_up.is_set():
                    self._set_caught_up()
                return
            if self.applied_seq and seq != self.applied_seq + 1:
                self._log_stream_gap(seq)
        try:
            self._apply_payload(msg.subject, msg.data)
        finally:
            if seq is not None:
                self.applied_seq = seq
            if self.caught_up.is_set():
                self._received += 1
                if self._received % LAG_SAMPLE_EVERY == 0:
                    with contextlib.suppress(Exception):  # a message without JetStream metadata
                        sent = msg.metadata.timestamp.timestamp()
                        self.lag_ms.append((time.time() - sent) * 1e3)
            else:
                self.catchup_batches += 1
                if pending == 0:
                    self._set_caught_up()

    def _apply_payload(self, subject: str, data: bytes) -> None:
        native = self._native
        if native is not None:
            # Fast path (native tree): its C parser takes the payload as tandem's encoder writes
            # it and answers None for anything else, which msgspec then accepts or rejects below.
            parsed = native.parse(data)
            if parsed is not None:
                worker, events = parsed
                if not self._from_its_subject(subject, worker):
                    return
                self._batch_started(worker)
                apply_parsed = native.apply_parsed
                for event in events:
                    if event[0] == 0 and native.last_event_id(worker) is not None:
                        self._worker_restarted(worker)
                    gap = apply_parsed(worker, *event)
                    self.events += 1
                    if gap is not None:
                        self._log_gap(gap)
                return
        try:
            # Same wire format and validation as decode_as(KvEventBatch, data), lighter objects.
            batch = decode_kv_event_batch(data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
            self.bad_payloads += 1
            self.log.warning("bad_kv_event_batch", msg_subject=subject, error=str(e), nbytes=len(data))
            return
        worker = batch.worker_id
        if not self._from_its_subject(subject, worker):
            return
        self._batch_started(worker)
        tree = self.tree
        for ev in batch.events:
            if ev.event_id == 0 and tree.last_event_id(worker) is not None:
                self._worker_restarted(worker)
            gap = tree.apply(worker, ev)
            self.events += 1
            if gap is not None:
                self._log_gap(gap)

    def _from_its_subject(self, subject: str, worker: str) -> bool:
        """A batch is applied only from its worker's own subject (``kv_events(worker_id)``: NATS
        permissions let a worker publish only there), so one worker cannot write — or wipe —
        another's blocks by naming it in the payload. Others are counted in ``bad_payloads``."""
        if subject == self.svc.subjects.kv_events(worker):
            return True
        self.bad_payloads += 1
        self.log.warning("kv_event_batch_foreign_worker", msg_subject=subject, worker_id=worker)
        return False

    def _batch_started(self, worker: str) -> None:
        self.batches += 1
        self._last_event_at[worker] = time.monotonic()

    def _worker_restarted(self, worker: str) -> None:
        # The worker restarted (fresh pool, ids from 0): its old blocks are gone.
        self.restarts += 1
        self.log.info("worker_restarted", worker_id=worker, last_event_id=self.tree.last_event_id(worker))
        self.tree.remove_worker(worker)

    def _log_gap(self, gap: EventGap) -> None:
        self.gaps += 1
        self.log.warning(
            "kv_event_gap", worker_id=gap.worker_id, expected=gap.expected, got=gap.got, missed=gap.missed
        )

    def _log_stream_gap(self, seq: int) -> None:
        self.stream_gaps += 1
        self.log.warning(
            "kv_stream_gap", expected_seq=self.applied_seq + 1, got_seq=seq, missed=seq - self.applied_seq - 1
        )

    # ---- workers leaving -------------------------------------------------------------------------

    async def _on_worker_removed(self, info: InstanceInfo) -> None:
        self._drop_worker(info.instance_id, reason="unregistered")

    def _drop_worker(self, worker: str, *, reason: str) -> None:
        if worker in self.tree.workers():
            blocks = self.tree.worker_num_blocks(worker)
            self.tree.remove_worker(worker)
            self.log.info("worker_blocks_removed", worker_id=worker, blocks=blocks, reason=reason)
        self._last_event_at.pop(worker, None)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            now = time.monotonic()
            for worker in self.tree.workers():
                if worker in self.registry:
                    continue
                if now - self._last_event_at.get(worker, 0.0) > self.stale_worker_s:
                    self._drop_worker(worker, reason="not_registered")


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(SERVICE, "KV indexer: radix tree of cached blocks → overlap scores for the router.")
    add_arguments(p, IndexerConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tandem.services.indexer``; returns the exit code (2 for bad
    flags)."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        config = from_namespace(IndexerConfig, args)
    except ValueError as e:
        p.error(str(e))

    async def setup(svc: ServiceBase) -> None:
        await KvIndexer(svc, config).start()

    return run_service(setup, SERVICE, args)


if __name__ == "__main__":
    raise SystemExit(main())
