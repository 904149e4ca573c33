"""KV indexer snapshots: the radix tree stored in, and restored from, a JetStream object store.

Format: one :class:`~tandem.protocol.messages.IndexerSnapshot` (msgspec msgpack, versioned by
:data:`~tandem.protocol.messages.INDEXER_SNAPSHOT_VERSION`): the tree's state after applying the
KV-events stream up to sequence ``stream_seq``, with the stream's name, the creation time, the
writing indexer's id and the number of events it reflects.

Storage: object :data:`SNAPSHOT_OBJECT` in the object store ``{ns}-indexer-snapshot``
(:func:`snapshot_bucket`), replaced by each write; headers :data:`SEQ_HEADER` and
:data:`CREATED_HEADER` repeat its sequence and time so replicas can check it without reading it.

Read once, at start, to restore the tree before catching up on the stream's tail; written by a
caught-up replica when one is due (by age or by messages applied past the stored one) and on
stop. :class:`SnapshotMixin` holds this logic for :class:`~tandem.services.indexer.KvIndexer`
(life cycle steps 1, 2, 5 and 6 in :mod:`tandem.services.indexer`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import random
import re
import time
from typing import Any, Literal, Protocol

import msgspec
import nats.js.errors
from nats.aio.msg import Msg as NatsMsg
from nats.js import api
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_DIGEST_TYPE, OBJ_STREAM_TEMPLATE, ObjectStore

from tandem.kvbm.radix import BaseRadixTree
from tandem.protocol import Subjects
from tandem.protocol.messages import INDEXER_SNAPSHOT_VERSION, IndexerSnapshot, encode
from tandem.services.messaging import decode_as
from tandem.services.runtime import ServiceBase, ack_info

#: Name of the snapshot in the object store (one object, replaced by each write).
SNAPSHOT_OBJECT = "snapshot"
#: Object headers (Go-compatible ``{name: [value]}``) carrying the snapshot's stream sequence and
#: its creation time (Unix seconds), so replicas can check it without downloading it.
SEQ_HEADER = "Tandem-Stream-Seq"
CREATED_HEADER = "Tandem-Created-At"


def snapshot_bucket(subjects: Subjects) -> str:
    """The JetStream object store holding the indexer snapshot: ``{ns}-indexer-snapshot`` (a
    character a bucket name cannot hold becomes ``_``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{subjects.ns}-indexer-snapshot")


class SnapshotSettings(Protocol):
    """The settings snapshots read (:class:`~tandem.services.indexer.IndexerConfig` has them)."""

    @property
    def snapshot_interval_s(self) -> float: ...
    @property
    def snapshot_every_batches(self) -> int: ...
    @property
    def snapshot_on_stop(self) -> bool: ...
    @property
    def snapshot_load_timeout_s(self) -> float: ...


class SnapshotMixin:
    """Snapshot store, restore and writes of :class:`~tandem.services.indexer.KvIndexer` (its base
    class; the attributes below are set by its ``__init__``)."""

    svc: ServiceBase
    config: SnapshotSettings
    tree: BaseRadixTree
    log: Any
    caught_up: asyncio.Event
    snapshot_check_s: float
    start_mode: Literal["snapshot", "replay"]
    events: int
    applied_seq: int
    restored_seq: int | None
    restored_events: int
    snapshots_written: int
    restore_ms: dict[str, float]
    _last_event_at: dict[str, float]
    _store: ObjectStore | None
    _stored_seq: int
    _stored_at: float
    _write_lock: asyncio.Lock

    async def _open_store(self) -> ObjectStore | None:
        """The snapshot object store, created if missing; None (logged) if JetStream refuses."""
        js, bucket = self.svc.js, snapshot_bucket(self.svc.subjects)
        try:
            try:
                return await js.object_store(bucket)
            except nats.js.errors.BucketNotFoundError:
                pass
            try:
                return await js.create_object_store(
                    bucket=bucket,
                    storage=api.StorageType.FILE,
                    description="tandem KV indexer snapshot",
                    replicas=self.svc.jetstream_replicas,
                )
            except nats.js.errors.BadRequestError:  # created concurrently by another replica
                return await js.object_store(bucket)
        except Exception as e:
            self.log.warning("snapshot_store_unavailable", bucket=bucket, error=repr(e))
            return None

    async def _restore(self, first_seq: int, last_seq: int) -> None:
        """Load the stored snapshot into the (empty) tree if it is usable for a stream holding
        sequences ``first_seq .. last_seq``; otherwise log why and leave the tree empty."""
        if self._store is None:
            return
        log = self.log.bind(bucket=snapshot_bucket(self.svc.subjects), fallback="full_replay")
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.config.snapshot_load_timeout_s):
                data = await self._fetch_snapshot(self._store)
        except nats.js.errors.ObjectNotFoundError:
            log.info("no_snapshot")
            return
        except Exception as e:  # digest mismatch, timeout, bad metadata, connection
            log.warning("snapshot_unusable", reason="unreadable", error=repr(e))
            return
        t_fetch = time.perf_counter()
        stream = self.svc.subjects.kv_events_stream
        try:
            snap: IndexerSnapshot = decode_as(IndexerSnapshot, data)
            if snap.version != INDEXER_SNAPSHOT_VERSION:
                raise ValueError(f"version {snap.version}, this indexer reads {INDEXER_SNAPSHOT_VERSION}")
            if snap.stream != stream:
                raise ValueError(f"snapshot of stream {snap.stream!r}, not {stream!r}")
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            log.warning("snapshot_unusable", reason="undecodable", error=str(e), nbytes=len(data))
            return
        if snap.stream_seq > last_seq:
            log.warning("snapshot_ahead_of_stream", snapshot_seq=snap.stream_seq, stream_last_seq=last_seq)
            return
        if snap.stream_seq + 1 < first_seq:
            log.warning(
                "snapshot_too_old",
                snapshot_seq=snap.stream_seq,
                stream_first_seq=first_seq,
                expired=first_seq - snap.stream_seq - 1,
            )
            return
        try:
            self.tree.restore(snap.tree)
        except ValueError as e:
            log.warning("snapshot_unusable", reason="inconsistent", error=str(e), nbytes=len(data))
            return
        now = time.monotonic()
        for worker in self.tree.workers():
            self._last_event_at[worker] = now  # the stale-worker sweep counts from here
        self.applied_seq = self.restored_seq = snap.stream_seq
        self.restored_events = snap.events
        self.start_mode = "snapshot"
        self._stored_seq, self._stored_at = snap.stream_seq, snap.created_at
        t_end = time.perf_counter()
        self.restore_ms = {"fetch": 1e3 * (t_fetch - t0), "restore": 1e3 * (t_end - t_fetch)}
        self.log.info(
            "snapshot_restored",
            snapshot_seq=snap.stream_seq,
            stream_last_seq=last_seq,
            tail=last_seq - snap.stream_seq,
            blocks=self.tree.num_blocks(),
            workers=len(self.tree.workers()),
            nbytes=len(data),
            age_s=round(time.time() - snap.created_at, 1),
            written_by=snap.indexer_id,
            fetch_ms=round(self.restore_ms["fetch"], 1),
            restore_ms=round(self.restore_ms["restore"], 1),
        )

    async def _fetch_snapshot(self, store: ObjectStore) -> bytes:
        """The stored snapshot's bytes, read like ``ObjectStore.get`` (the object's chunks through
        an ordered consumer, size and SHA-256 digest checked) but with a callback: nats-py's
        ``get`` iterates a queue, and its flow-control replies then wait for a 0.25 s tick, which
        made a 3 MB read take ~270 ms instead of ~40 ms. Raises ``ObjectNotFoundError`` (none
        stored), ``BadObjectMetaError`` / ``DigestMismatchError`` (corrupt) or the JetStream
        error."""
        info = await store.get_info(SNAPSHOT_OBJECT)
        if not info.nuid or info.is_link():
            raise nats.js.errors.BadObjectMetaError
        if not info.size:
            return b""
        bucket = snapshot_bucket(self.svc.subjects)
        parts: list[bytes] = []
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def on_chunk(msg: NatsMsg) -> None:
            parts.append(msg.data)
            if ack_info(msg.reply)[1] == 0 and not done.done():
                done.set_result(None)

        sub = await self.svc.js.subscribe(
            OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=info.nuid),
            stream=OBJ_STREAM_TEMPLATE.format(bucket=bucket),
            cb=on_chunk,
            ordered_consumer=True,
        )
        try:
            await done
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        data = b"".join(parts)
        digest = (info.digest or "").removeprefix(OBJ_DIGEST_TYPE).removeprefix(OBJ_DIGEST_TYPE.upper())
        if len(data) != info.size or hashlib.sha256(data).digest() != base64.urlsafe_b64decode(digest):
            raise nats.js.errors.DigestMismatchError
        return data

    def _snapshot_due(self) -> bool:
        cfg = self.config
        behind = self.applied_seq - self._stored_seq
        if behind <= 0:
            return False
        if cfg.snapshot_every_batches and behind >= cfg.snapshot_every_batches:
            return True
        return bool(cfg.snapshot_interval_s) and time.time() - self._stored_at >= cfg.snapshot_interval_s

    async def _refresh_stored(self) -> None:
        """Take the stored snapshot's sequence and time from its headers (another replica may have
        written it)."""
        if self._store is None:
            return
        try:
            info = await self._store.get_info(SNAPSHOT_OBJECT)
        except nats.js.errors.ObjectNotFoundError:
            return
        headers = info.headers or {}
        with contextlib.suppress(KeyError, IndexError, TypeError, ValueError):
            seq, at = headers[SEQ_HEADER], headers[CREATED_HEADER]
            seq, at = seq[0] if isinstance(seq, list) else seq, at[0] if isinstance(at, list) else at
            self._stored_seq, self._stored_at = int(seq), float(at)

    async def _snapshot_loop(self) -> None:
        await self.caught_up.wait()
        while True:
            await asyncio.sleep(self.snapshot_check_s * random.uniform(0.75, 1.25))
            if not self._snapshot_due():
                continue
            try:
                await self._refresh_stored()
                if self._snapshot_due():
                    await self.write_snapshot()
            except Exception as e:  # the next check retries
                self.log.warning("snapshot_write_failed", error=repr(e))

    async def _snapshot_on_stop(self) -> None:
        if self._store is None or not self.config.snapshot_on_stop:
            return
        if self.applied_seq > self._stored_seq:
            try:
                await self.write_snapshot()
            except Exception as e:
                self.log.warning("snapshot_write_failed", error=repr(e), at="stop")

    async def write_snapshot(self) -> int | None:
        """Store the current state as the snapshot now (whatever is due); returns the stream
        sequence it reflects, or None when there is no snapshot store. Serializing takes
        O(blocks) on the event loop (no event is applied meanwhile); storing is asynchronous.
        Raises the JetStream error if storing fails (the previous snapshot stays)."""
        if self._store is None:
            return None
        async with self._write_lock:
            t0 = time.perf_counter()
            seq, created = self.applied_seq, time.time()
            snap = IndexerSnapshot(
                version=INDEXER_SNAPSHOT_VERSION,
                stream=self.svc.subjects.kv_events_stream,
                stream_seq=seq,
                created_at=created,
                indexer_id=self.svc.instance_id,
                events=self.restored_events + self.events,
                tree=self.tree.snapshot(),
            )
            data = encode(snap)
            t_ser = time.perf_counter()
            meta = api.ObjectMeta(
                name=SNAPSHOT_OBJECT,
                description=f"tandem KV indexer snapshot v{INDEXER_SNAPSHOT_VERSION}",
                headers={SEQ_HEADER: [str(seq)], CREATED_HEADER: [repr(created)]},
            )
            await self._store.put(SNAPSHOT_OBJECT, data, meta=meta)
            self._stored_seq, self._stored_at = seq, created
            self.snapshots_written += 1
            self.log.info(
                "snapshot_written",
                stream_seq=seq,
                nbytes=len(data),
                blocks=self.tree.num_blocks(),
                workers=len(self.tree.workers()),
                serialize_ms=round(1e3 * (t_ser - t0), 1),
                store_ms=round(1e3 * (time.perf_counter() - t_ser), 1),
            )
            return seq
