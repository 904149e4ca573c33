"""KvEventPublisher (Dynamo's name): a worker's KV events to JetStream, in order.

The engine client hands over each batch of events the block manager emitted (:meth:`put`, on the
loop thread, in engine order); one task publishes them as ``KvEventBatch`` on
``Subjects.kv_events(worker_id)``, captured by the KV-events stream the indexer replays. Lists
queued while a publish is in flight merge into the next batch. A failed publish is retried,
backing off from 0.1 s to 1 s, for up to :data:`PUBLISH_DEADLINE_S` (long enough for a JetStream
cluster to elect a new stream leader after a node dies, or for a restarted server to come back);
a batch that still fails is dropped with an error log — the indexer sees the gap in ``event_id``
and recovers.

Every batch carries ``Nats-Msg-Id: <worker id>:<publisher nonce>:<first event id>``: when a
publish was stored but its acknowledgement was lost (a JetStream node failing over), the retry is
dropped by the stream's de-duplication window instead of being stored twice. The nonce (random,
per publisher) keeps a restarted worker, whose event ids start again at 0, from colliding with
its previous life's ids.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from tandem.protocol.messages import KvEvent, KvEventBatch, encode

__all__ = ["KvEventPublisher"]

#: Retry a failed publish for this long before dropping the batch (seconds).
PUBLISH_DEADLINE_S = 30.0
#: One publish's wait for the stream's acknowledgement (seconds).
PUBLISH_TIMEOUT_S = 5.0


class KvEventPublisher:
    """Publishes one worker's KV events.

    Args:
        js: the JetStream context to publish through.
        subject: ``Subjects.kv_events(worker_id)``.
        worker_id: goes into every batch.
        log: a structlog logger.
    """

    def __init__(self, js: Any, subject: str, worker_id: str, log: Any) -> None:
        self._js = js
        self.subject = subject
        self.worker_id = worker_id
        self.log = log
        self._queue: asyncio.Queue[list[KvEvent]] = asyncio.Queue()
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        self._nonce = uuid.uuid4().hex[:12]
        #: Events published so far.
        self.published = 0

    def start(self) -> None:
        """Start the publishing task."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kv-events:{self.worker_id}")

    def put(self, events: list[KvEvent]) -> None:
        """Queue events (loop thread), in engine order."""
        self._queue.put_nowait(events)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being published."""
        return self._queue.empty() and not self._busy

    async def flush(self, timeout_s: float) -> bool:
        """Wait until :attr:`idle` (at most ``timeout_s``); False if it did not get there."""
        deadline = time.monotonic() + timeout_s
        while not self.idle:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def stop(self) -> None:
        """Cancel the publishing task (call :meth:`flush` first to publish what is queued)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=5.0)

    async def _run(self) -> None:
        while True:
            events = await self._queue.get()
            self._busy = True
            try:
                while not self._queue.empty():
                    events.extend(self._queue.get_nowait())
                await self._publish(events)
            finally:
                self._busy = False

    async def _publish(self, events: list[KvEvent]) -> None:
        payload = encode(KvEventBatch(worker_id=self.worker_id, events=events))
        headers = {"Nats-Msg-Id": f"{self.worker_id}:{self._nonce}:{events[0].event_id}"}
        deadline = time.monotonic() + PUBLISH_DEADLINE_S
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._js.publish(self.subject, payload, timeout=PUBLISH_TIMEOUT_S, headers=headers)
                self.published += len(events)
                return
            except Exception as exc:
                self.log.warning(
                    "kv_events_publish_failed", attempt=attempt, events=len(events), error=repr(exc)
                )
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(1.0, 0.1 * 2 ** (attempt - 1)))
        self.log.error("kv_events_dropped", first_event_id=events[0].event_id, events=len(events))
