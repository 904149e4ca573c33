"""KV indexer: which worker caches which prompt blocks; answers overlap queries for the router.

Life cycle
----------
1. **start** — connect (:class:`~tandem.services.runtime.ServiceBase`), make sure the KV-events
   stream and the instances bucket exist, load the registered workers
   (:class:`~tandem.services.runtime.InstanceRegistry`).
2. **replay** — subscribe to the stream ``{NS}_KV_EVENTS`` with an *ordered, ephemeral* consumer
   delivering from the first stored message. Every indexer replica therefore sees every event and
   a restarted indexer rebuilds its :class:`~tandem.kvbm.radix.RadixTree` from the stream
   (events are kept for ``KV_EVENTS_MAX_AGE_S``). The indexer is *caught up* (health
   ``ready=True``) once the consumer has no pending messages.
3. **serve** — apply each :class:`~tandem.protocol.messages.KvEventBatch` in stream order (with the
   native tree, payloads are parsed by its C parser; anything it does not take is decoded by
   msgspec, so both accept and reject exactly the same payloads) and answer
   :class:`~tandem.protocol.messages.OverlapQuery` → :class:`~tandem.protocol.messages.OverlapScores`
   on ``{ns}.indexer.overlap`` (queue group ``indexer``), also while replaying (partial answers).

   * an event id that does not follow the worker's previous one is logged (``kv_event_gap``);
     an id back at 0 after a higher one means the worker restarted with an empty pool: its old
     blocks are dropped before the event is applied;
   * a payload that is not a ``KvEventBatch`` is logged and skipped (the ordered consumer has no
     acks: nothing is redelivered);
   * a worker that leaves the instances bucket (delete, or heartbeat older than the TTL) has its
     blocks removed; a worker the tree knows but the bucket does not (e.g. events replayed from a
     worker that died before this indexer started) is removed once it has been both unregistered
     and silent for ``--stale-worker-s`` seconds.
4. **stop** — SIGINT/SIGTERM: unsubscribe, drain in-flight queries, stop the consumer and the
   registry watch, drain the connection (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import time
from typing import Any

import msgspec
from nats.aio.msg import Msg as NatsMsg
from nats.js import api

from tandem.kvbm._wire import decode_kv_event_batch
from tandem.kvbm.radix import EventGap, NativeRadixTree, make_radix_tree
from tandem.protocol.messages import InstanceInfo, OverlapQuery, OverlapScores
from tandem.services.runtime import (
    InstanceRegistry,
    ServiceBase,
    common_parser,
    run_service,
)

SERVICE = "indexer"
#: Lag samples kept (the health answer reports their p50/p99) and the sampling period (messages).
LAG_SAMPLES = 4096
LAG_SAMPLE_EVERY = 8


class KvIndexer:
    """The indexer's state and handlers, attached to a started :class:`ServiceBase`.

    ``stale_worker_s``: seconds after which a worker that is not registered and sent no event is
    dropped from the tree. ``sweep_interval_s``: how often that is checked (seconds).
    ``radix_impl``: ``"native"``, ``"python"`` or ``"auto"`` (:func:`~tandem.kvbm.radix.make_radix_tree`;
    default: ``TANDEM_RADIX``, else the native tree when it is built).
    """

    def __init__(
        self,
        svc: ServiceBase,
        *,
        stale_worker_s: float = 15.0,
        sweep_interval_s: float = 2.0,
        radix_impl: str | None = None,
    ) -> None:
        self.svc = svc
        self.tree = make_radix_tree(radix_impl)
        self._native = self.tree if isinstance(self.tree, NativeRadixTree) else None
        self.registry = InstanceRegistry(svc.js, svc.subjects)
        self.stale_worker_s = stale_worker_s
        self.sweep_interval_s = sweep_interval_s
        self.caught_up = asyncio.Event()
        self.batches = 0
        self.events = 0
        #: Indexer lag samples (ms): apply time minus the event's JetStream timestamp, for every
        #: ``LAG_SAMPLE_EVERY``-th live message (replayed ones are not lag).
        self.lag_ms: collections.deque[float] = collections.deque(maxlen=LAG_SAMPLES)
        self.bad_payloads = 0
        self.gaps = 0
        self.restarts = 0
        self._last_event_at: dict[str, float] = {}  # worker -> time.monotonic() of its last event
        self._consumer: Any = None
        self.log = svc.log
        self._received = 0

    async def start(self) -> None:
        """Load workers, start the stream consumer and serve overlap queries.

        Raises the JetStream error if the consumer cannot be created.
        """
        svc = self.svc
        self.registry.on_removed(self._on_worker_removed)
        await self.registry.start()
        svc.on_close(self.registry.stop)

        info = await svc.js.stream_info(svc.subjects.kv_events_stream)
        if info.state.messages == 0:
            self.caught_up.set()
        self._consumer = await svc.js.subscribe(
            svc.subjects.kv_events_wildcard,
            stream=svc.subjects.kv_events_stream,
            cb=self._on_event_msg,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL,
            idle_heartbeat=2.0,
        )
        svc.on_close(self._stop_consumer)
        svc.readiness = self._readiness
        await svc.serve(
            svc.subjects.indexer_overlap, OverlapQuery, self.overlap, queue=svc.subjects.INDEXER_QUEUE
        )
        svc.spawn(self._sweep(), name="indexer-sweep")
        self.log.info(
            "indexer_started",
            stream=svc.subjects.kv_events_stream,
            stream_messages=info.state.messages,
            workers=len(self.registry),
            radix=self.tree.IMPL,
        )

    async def _stop_consumer(self) -> None:
        if self._consumer is not None:
            await self._consumer.unsubscribe()
            self._consumer = None

    def _readiness(self) -> tuple[bool, str]:
        detail = f"blocks={self.tree.num_blocks()} workers={len(self.tree.workers())} events={self.events}"
        if self.lag_ms:
            lags = sorted(self.lag_ms)
            p50, p99 = lags[len(lags) // 2], lags[min(len(lags) - 1, round(0.99 * (len(lags) - 1)))]
            detail += f" lag_p50_ms={p50:.2f} lag_p99_ms={p99:.2f}"
        if not self.caught_up.is_set():
            return False, "replaying KV events; " + detail
        return True, detail

    # ---- queries ----------------------------------------------------------------------------------

    async def overlap(self, query: OverlapQuery, _msg: NatsMsg) -> OverlapScores:
        """Leading cached blocks per worker for ``query.block_hashes`` (workers with 0 left out)."""
        return OverlapScores(
            request_id=query.request_id,
            scores=self.tree.find_matches(query.block_hashes),
            tree_blocks=self.tree.num_blocks(),
        )

    # ---- events -----------------------------------------------------------------------------------

    async def _on_event_msg(self, msg: NatsMsg) -> None:
        # Runs in the consumer's delivery task, one message at a time, in stream order.
        try:
            self._apply_payload(msg.subject, msg.data)
        finally:
            if self.caught_up.is_set():
                self._received += 1
                if self._received % LAG_SAMPLE_EVERY == 0:
                    with contextlib.suppress(Exception):  # a message without JetStream metadata
                        sent = msg.metadata.timestamp.timestamp()
                        self.lag_ms.append((time.time() - sent) * 1e3)
            else:
                try:
                    pending = msg.metadata.num_pending
                except Exception:  # not a JetStream message (cannot happen on this consumer)
                    pending = 0
                if pending == 0:
                    self.caught_up.set()
                    self.log.info("caught_up", events=self.events, blocks=self.tree.num_blocks())

    def _apply_payload(self, subject: str, data: bytes) -> None:
        native = self._native
        if native is not None:
            # Fast path (native tree): its C parser takes the payload as tandem's encoder writes
            # it and answers None for anything else, which msgspec then accepts or rejects below.
            parsed = native.parse(data)
            if parsed is not None:
                worker, events = parsed
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
        self._batch_started(worker)
        tree = self.tree
        for ev in batch.events:
            if ev.event_id == 0 and tree.last_event_id(worker) is not None:
                self._worker_restarted(worker)
            gap = tree.apply(worker, ev)
            self.events += 1
            if gap is not None:
                self._log_gap(gap)

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
    p.add_argument(
        "--stale-worker-s",
        type=float,
        default=15.0,
        help="drop blocks of a worker that is not registered and silent for this long (seconds)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tandem.services.indexer``; returns the exit code."""
    args = build_parser().parse_args(argv)

    async def setup(svc: ServiceBase) -> None:
        await KvIndexer(svc, stale_worker_s=args.stale_worker_s).start()

    return run_service(setup, SERVICE, args)


if __name__ == "__main__":
    raise SystemExit(main())
