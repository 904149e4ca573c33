"""The KV transport seam without NIXL: the in-pool copy (:class:`LocalTransport`) and the mock
engine's :class:`SimulatedTransport` (time = bytes / bandwidth, notifications in process or over
a NATS-like connection), plus the protocol helpers. No torch, no nixl, no NATS server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tandem.transfer.base import KvTransferError, KvTransport, block_ids_of, compat_hash, pool_descriptors
from tandem.transfer.local import LocalTransport
from tandem.transfer.simulated import SimulatedTransport, transfer_seconds

BLOCK = 1_000_000  # bytes per block: 20 blocks at 1 GB/s = 20 ms


class FakeNats:
    """Just enough of a NATS client: subscribe(subject, cb) / publish(subject, data)."""

    def __init__(self) -> None:
        self.subs: dict[str, Callable[[Any], Awaitable[None]]] = {}
        self.published: list[tuple[str, bytes]] = []

    async def subscribe(self, subject: str, cb: Callable[[Any], Awaitable[None]]) -> Any:
        self.subs[subject] = cb
        fake = self

        class Sub:
            async def unsubscribe(self) -> None:
                fake.subs.pop(subject, None)

        return Sub()

    async def publish(self, subject: str, data: bytes) -> None:
        self.published.append((subject, data))
        cb = self.subs.get(subject)
        if cb is not None:

            class Msg:
                pass

            m = Msg()
            m.data = data  # type: ignore[attr-defined]
            await cb(m)


@pytest.fixture
async def pair() -> Any:
    """An owner and a reader simulated transport in this process (1 GB/s)."""
    owner = SimulatedTransport("owner-t", 64, BLOCK, 1.0)
    reader = SimulatedTransport("reader-t", 64, BLOCK, 1.0)
    yield owner, reader
    await owner.aclose()
    await reader.aclose()


def test_every_transport_satisfies_the_protocol() -> None:
    sim = SimulatedTransport("proto-sim", 4, 16, 0.0)

    async def copy(src: list[int], dst: list[int]) -> None:
        pass

    local = LocalTransport("proto-sim", sim.metadata, 0, 4, 16, copy)
    assert isinstance(sim, KvTransport) and isinstance(local, KvTransport)
    asyncio.run(sim.aclose())


def test_transfer_modules_do_not_import_torch_or_nixl() -> None:
    code = (
        "import sys, tandem.transfer, tandem.transfer.simulated, tandem.transfer.local; "
        "assert 'torch' not in sys.modules and 'nixl' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_descriptors_round_trip_and_compat_hash() -> None:
    descs = pool_descriptors([3, 0, 7], 4096, 100, 8)
    assert descs == [(4396, 100, 0), (4096, 100, 0), (4796, 100, 0)]
    assert block_ids_of(descs, 4096, 100, 8) == [3, 0, 7]
    with pytest.raises(IndexError):
        pool_descriptors([8], 0, 100, 8)
    with pytest.raises(ValueError):
        block_ids_of([(4097, 100, 0)], 4096, 100, 8)  # not on a block boundary
    with pytest.raises(ValueError):
        block_ids_of([(4096, 99, 0)], 4096, 100, 8)  # not one block
    h = compat_hash("m", 30, 3, 64, "bfloat16", 16)
    assert h == compat_hash("m", 30, 3, 64, "torch.bfloat16", 16) and len(h) == 16
    assert h != compat_hash("m", 30, 3, 64, "bfloat16", 16, layout="mock")


def test_transfer_seconds() -> None:
    assert transfer_seconds(2_000_000_000, 64.0) == pytest.approx(2 / 64)
    assert transfer_seconds(10**9, 0.0) == 0.0


async def test_simulated_read_takes_bytes_over_bandwidth_and_notifies(pair: Any) -> None:
    owner, reader = pair
    woken: list[int] = []
    owner.set_notif_callback(lambda: woken.append(1))
    descs = owner.block_descriptors(range(20))
    assert descs[1] == (BLOCK, BLOCK, 0)
    t0 = time.perf_counter()
    stats = await reader.read_blocks(owner.name, owner.metadata, descs, list(range(40, 60)), b"req-1", 5.0)
    elapsed = time.perf_counter() - t0
    expected = 20 * BLOCK / 1e9  # 20 ms
    assert expected <= elapsed < expected + 0.05
    assert (stats.blocks, stats.bytes) == (20, 20 * BLOCK)
    assert stats.ms == pytest.approx(elapsed * 1e3, abs=5.0)
    assert woken == [1]
    assert owner.poll_notifs() == [b"req-1"]
    assert owner.poll_notifs() == []
    assert reader.pending_transfers == 0


async def test_simulated_pending_during_read(pair: Any) -> None:
    owner, reader = pair
    task = asyncio.create_task(
        reader.read_blocks(
            owner.name, owner.metadata, owner.block_descriptors(range(30)), list(range(30)), b"x", 5
        )
    )
    await asyncio.sleep(0.01)
    assert reader.pending_transfers == 1 and owner.poll_notifs() == []
    await task
    assert reader.pending_transfers == 0 and owner.poll_notifs() == [b"x"]


async def test_simulated_zero_blocks_still_notifies_and_zero_bandwidth_is_instant() -> None:
    owner = SimulatedTransport("owner-z", 8, BLOCK, 0.0)
    reader = SimulatedTransport("reader-z", 8, BLOCK, 0.0)
    try:
        stats = await reader.read_blocks(owner.name, owner.metadata, [], [], b"empty", 1.0)
        assert stats.blocks == 0 and owner.poll_notifs() == [b"empty"]
        t0 = time.perf_counter()
        await reader.read_blocks(
            owner.name, owner.metadata, owner.block_descriptors(range(8)), list(range(8)), b"a", 1
        )
        assert time.perf_counter() - t0 < 0.02
        await reader.notify(owner.name, owner.metadata, b"b")
        assert owner.poll_notifs() == [b"a", b"b"]
    finally:
        await owner.aclose()
        await reader.aclose()


async def test_simulated_timeout_and_bad_input(pair: Any) -> None:
    owner, reader = pair
    descs = owner.block_descriptors(range(60))  # 60 ms at 1 GB/s
    t0 = time.perf_counter()
    with pytest.raises(KvTransferError, match="timeout"):
        await reader.read_blocks(owner.name, owner.metadata, descs, list(range(60)), b"slow", 0.02)
    assert 0.02 <= time.perf_counter() - t0 < 0.05
    assert owner.poll_notifs() == []  # a failed READ delivers nothing
    with pytest.raises(ValueError):
        await reader.read_blocks(owner.name, owner.metadata, descs[:2], [0], b"n", 1)
    with pytest.raises(ValueError):
        await reader.read_blocks(owner.name, owner.metadata, [(0, BLOCK - 1, 0)], [0], b"n", 1)
    with pytest.raises(IndexError):
        await reader.read_blocks(owner.name, owner.metadata, descs[:1], [64], b"n", 1)
    with pytest.raises(KvTransferError):
        await reader.read_blocks(owner.name, b"\x00garbage", descs[:1], [0], b"n", 1)
    with pytest.raises(KvTransferError):
        await reader.connect(owner.name, b"not metadata")
    await reader.connect(owner.name, owner.metadata)  # a no-op for a good peer
    assert reader.pending_transfers == 0


async def test_simulated_peer_gone_and_names_unique() -> None:
    owner = SimulatedTransport("owner-g", 4, BLOCK, 0.0)
    reader = SimulatedTransport("reader-g", 4, BLOCK, 0.0)
    with pytest.raises(ValueError, match="already exists"):
        SimulatedTransport("owner-g", 4, BLOCK, 0.0)
    meta = owner.metadata
    await owner.aclose()
    with pytest.raises(KvTransferError, match="gone"):
        await reader.read_blocks("owner-g", meta, [(0, BLOCK, 0)], [0], b"n", 1)
    again = SimulatedTransport("owner-g", 4, BLOCK, 0.0)  # the name is free again
    await again.aclose()
    await reader.aclose()
    with pytest.raises(KvTransferError, match="closed"):
        await reader.notify("x", meta, b"n")


async def test_simulated_notification_over_nats_to_another_process() -> None:
    """An owner in another process is reached on its notify subject (here a fake NATS)."""
    nc = FakeNats()
    owner = SimulatedTransport("owner-n", 4, BLOCK, 0.0, nc=nc, notify_subject="ns.worker.owner-n.kv_notify")
    await owner.start()
    reader = SimulatedTransport("reader-n", 4, BLOCK, 0.0, nc=nc)
    try:
        import msgspec

        from tandem.transfer import simulated

        # The same owner as seen from another process: a different process token.
        foreign = msgspec.msgpack.encode(
            simulated._PeerAddress(
                transport="simulated", process="elsewhere", notify_subject=owner_subject(owner)
            )
        )
        woken: list[int] = []
        owner.set_notif_callback(lambda: woken.append(1))
        await reader.read_blocks("owner-n", foreign, [(0, BLOCK, 0)], [1], b"req-n", 1.0)
        assert nc.published == [("ns.worker.owner-n.kv_notify", b"req-n")]
        assert owner.poll_notifs() == [b"req-n"] and woken == [1]
        no_nats = SimulatedTransport("reader-nn", 4, BLOCK, 0.0)
        with pytest.raises(KvTransferError, match="another process"):
            await no_nats.notify("owner-n", foreign, b"x")
        await no_nats.aclose()
    finally:
        await owner.aclose()
        await reader.aclose()
    assert "ns.worker.owner-n.kv_notify" not in nc.subs  # unsubscribed


def owner_subject(t: SimulatedTransport) -> str:
    import msgspec

    from tandem.transfer import simulated

    return msgspec.msgpack.decode(t.metadata, type=simulated._PeerAddress).notify_subject


async def test_local_transport_copies_within_the_pool_and_notifies() -> None:
    copies: list[tuple[list[int], list[int]]] = []

    async def copy(src: list[int], dst: list[int]) -> None:
        copies.append((src, dst))

    base, nbytes = 1 << 20, 512
    local = LocalTransport("tandem-w", b"meta", base, 16, nbytes, copy)
    woken: list[int] = []
    local.set_notif_callback(lambda: woken.append(1))
    descs = local.block_descriptors([5, 6, 9])
    assert descs[0] == (base + 5 * nbytes, nbytes, 0)
    stats = await local.read_blocks("tandem-w", b"meta", descs, [1, 2, 3], b"r", 1.0)
    assert copies == [([5, 6, 9], [1, 2, 3])]
    assert (stats.blocks, stats.bytes) == (3, 3 * nbytes)
    assert local.poll_notifs() == [b"r"] and woken == [1]
    # Nothing to copy: no copy call, still a notification.
    await local.read_blocks("tandem-w", b"meta", [], [], b"r2", 1.0)
    assert len(copies) == 1 and local.poll_notifs() == [b"r2"]
    await local.notify("tandem-w", b"meta", b"r3")
    assert local.poll_notifs() == [b"r3"]
    with pytest.raises(KvTransferError):
        await local.read_blocks("tandem-other", b"meta", descs, [1, 2, 3], b"x", 1.0)
    with pytest.raises(ValueError):
        await local.read_blocks("tandem-w", b"meta", [(base + 1, nbytes, 0)], [1], b"x", 1.0)
    with pytest.raises(IndexError):
        await local.read_blocks("tandem-w", b"meta", descs[:1], [16], b"x", 1.0)
    assert len(copies) == 1 and local.poll_notifs() == [] and local.pending_transfers == 0
    await local.aclose()
