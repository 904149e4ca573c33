"""KvEventPublisher: retries until its deadline with one Nats-Msg-Id per batch (JetStream drops
a retried duplicate), keeps order, and drops a batch only after the deadline."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog

from tandem.protocol.messages import KvCleared, KvEvent, KvEventBatch, decoder
from tandem.services.worker import kv_events
from tandem.services.worker.kv_events import KvEventPublisher


class FlakyJetStream:
    """Fails the first ``failures`` publishes (as a node failing over does), then stores."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[tuple[str, bytes, dict[str, str]]] = []
        self.stored: list[KvEventBatch] = []

    async def publish(self, subject: str, payload: bytes, **kw: Any) -> Any:
        headers: dict[str, str] = kw["headers"]
        self.calls.append((subject, payload, dict(headers)))
        if self.failures > 0:
            self.failures -= 1
            raise TimeoutError("no acknowledgement")
        self.stored.append(decoder(KvEventBatch).decode(payload))
        return None


def _events(first: int, n: int) -> list[KvEvent]:
    return [KvEvent(event_id=i, data=KvCleared()) for i in range(first, first + n)]


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    real_sleep = asyncio.sleep
    monkeypatch.setattr(kv_events.asyncio, "sleep", lambda s: real_sleep(min(s, 0.001)))


async def test_retries_carry_the_same_msg_id_and_batches_differ() -> None:
    js = FlakyJetStream(failures=7)  # more than the old fixed 5 attempts
    pub = KvEventPublisher(js, "ns.kv.events.w", "w", structlog.get_logger())
    pub.start()
    try:
        pub.put(_events(0, 3))
        assert await pub.flush(5.0)
        pub.put(_events(3, 2))
        assert await pub.flush(5.0)
    finally:
        await pub.stop()
    assert [b.events[0].event_id for b in js.stored] == [0, 3]
    assert pub.published == 5
    first_ids = {c[2]["Nats-Msg-Id"] for c in js.calls[:8]}
    assert len(first_ids) == 1, "every retry of one batch must carry one Nats-Msg-Id"
    (first,) = first_ids
    assert first.startswith("w:") and first.endswith(":0")
    assert js.calls[-1][2]["Nats-Msg-Id"].endswith(":3")


async def test_a_new_publisher_never_reuses_an_old_msg_id() -> None:
    """A restarted worker counts event ids from 0 again: its ids must not be de-duplicated
    against its previous life's."""
    a, b = FlakyJetStream(0), FlakyJetStream(0)
    for js in (a, b):
        pub = KvEventPublisher(js, "s", "w", structlog.get_logger())
        pub.start()
        pub.put(_events(0, 1))
        assert await pub.flush(5.0)
        await pub.stop()
    assert a.calls[0][2]["Nats-Msg-Id"] != b.calls[0][2]["Nats-Msg-Id"]


async def test_a_batch_is_dropped_only_after_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_events, "PUBLISH_DEADLINE_S", 0.05)
    js = FlakyJetStream(failures=10**9)
    pub = KvEventPublisher(js, "s", "w", structlog.get_logger())
    pub.start()
    try:
        pub.put(_events(0, 2))
        assert await pub.flush(5.0)  # idle again: the batch was given up
    finally:
        await pub.stop()
    assert js.stored == [] and pub.published == 0
    assert len(js.calls) >= 2
