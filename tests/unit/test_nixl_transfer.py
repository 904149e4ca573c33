"""tandem.transfer.nixl: pure helpers, and real NIXL READs between two processes (CPU, UCX).

The owner (prefill side) runs in a spawned process that polls its notifications every 0.5 ms,
as a worker does; the reader (decode side) runs in the test process on the asyncio loop. Every
wait has a timeout so a NIXL hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch

from tandem.transfer.nixl import (
    KvTransferAgent,
    KvTransferError,
    NixlUnavailableError,
    alloc_kv_cache,
    coalesce_descriptors,
    compat_hash,
    split_chunks,
)

# A tiny KV tensor: (num_blocks, num_layers, 2, block_size, kv_heads, head_dim), bf16.
SHAPE = (16, 2, 2, 4, 2, 8)
BLOCK_NBYTES = 2 * 2 * 4 * 2 * 8 * 2  # 512 B
OWNER = "owner-0"
IPC_TIMEOUT_S = 20.0


def kv_pattern(seed: int) -> torch.Tensor:
    """A KV tensor whose every bf16 element has pseudo-random bits fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**15), 2**15, SHAPE, dtype=torch.int16, generator=gen)
    return bits.view(torch.bfloat16)


def owner_main(conn: Connection, seed: int) -> None:
    """Owner process: registers a patterned KV tensor, polls notifications, obeys commands."""
    kv = kv_pattern(seed)
    agent = KvTransferAgent(OWNER, kv, BLOCK_NBYTES)

    def hello() -> dict[str, Any]:
        descs = agent.block_descriptors(range(SHAPE[0]))
        return {"metadata": agent.metadata, "descs": descs}

    conn.send(hello())
    received: list[bytes] = []
    paused_until = 0.0
    while True:
        if time.monotonic() >= paused_until:
            received.extend(agent.poll_notifs())
        if conn.poll(0):
            cmd, arg = conn.recv()
            if cmd == "stop":
                break
            if cmd == "wait_notif":  # reply once `arg` arrived (or after 10 s) with all so far
                deadline = time.monotonic() + 10
                while arg not in received and time.monotonic() < deadline:
                    received.extend(agent.poll_notifs())
                    time.sleep(0.0005)
                conn.send(list(received))
            elif cmd == "pause":  # stop calling into NIXL for `arg` seconds
                paused_until = time.monotonic() + arg
                conn.send("paused")
            elif cmd == "restart":  # new agent, same name, new data (seed `arg`)
                agent.close()
                kv = kv_pattern(arg)
                agent = KvTransferAgent(OWNER, kv, BLOCK_NBYTES)
                conn.send(hello())
        time.sleep(0.0005)
    agent.close()


def recv(conn: Connection, timeout: float = IPC_TIMEOUT_S) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"no answer from the owner process within {timeout} s")
    return conn.recv()


class Owner:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=owner_main, args=(child, 1), daemon=True)
        self.proc.start()
        child.close()
        self.info: dict[str, Any] = recv(self.conn, 60)

    def call(self, cmd: str, arg: Any = None) -> Any:
        self.conn.send((cmd, arg))
        return recv(self.conn)

    async def acall(self, cmd: str, arg: Any = None) -> Any:
        """Like :meth:`call`, but keeps the event loop (and the reader's NIXL tasks) running."""
        self.conn.send((cmd, arg))
        loop, ready = asyncio.get_running_loop(), asyncio.Event()
        loop.add_reader(self.conn.fileno(), ready.set)
        try:
            async with asyncio.timeout(IPC_TIMEOUT_S):
                await ready.wait()
        finally:
            loop.remove_reader(self.conn.fileno())
        return self.conn.recv()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("stop", None))
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


@pytest.fixture(scope="module")
def owner() -> Iterator[Owner]:
    o = Owner()
    try:
        yield o
    finally:
        o.stop()


@pytest.fixture(scope="module")
def reader() -> Iterator[KvTransferAgent]:
    kv = alloc_kv_cache(SHAPE, torch.bfloat16)
    with KvTransferAgent("reader-0", kv, BLOCK_NBYTES) as agent:
        agent.kv = kv  # type: ignore[attr-defined]  # the tests inspect the bytes
        yield agent


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


# ---- pure helpers -------------------------------------------------------------------------------


def test_coalesce_merges_only_runs_contiguous_on_both_sides() -> None:
    b = 100
    local = [(0, b, 0), (b, b, 0), (2 * b, b, 0), (5 * b, b, 0), (6 * b, b, 0)]
    remote = [(1000, b, 0), (1000 + b, b, 0), (9000, b, 0), (9000 + b, b, 0), (9000 + 2 * b, b, 0)]
    out_l, out_r = coalesce_descriptors(local, remote)
    # pair 1->2: local contiguous but remote jumps; pair 2->3: remote contiguous but local jumps.
    assert out_l == [(0, 2 * b, 0), (2 * b, b, 0), (5 * b, 2 * b, 0)]
    assert out_r == [(1000, 2 * b, 0), (9000, b, 0), (9000 + b, 2 * b, 0)]
    assert sum(n for _, n, _ in out_l) == 5 * b


def test_coalesce_edge_cases() -> None:
    assert coalesce_descriptors([], []) == ([], [])
    one = ([(8, 4, 0)], [(64, 4, 0)])
    assert coalesce_descriptors(*one) == one
    # fully contiguous -> one descriptor
    n = 63
    loc = [(i * 16, 16, 0) for i in range(n)]
    rem = [(4096 + i * 16, 16, 0) for i in range(n)]
    assert coalesce_descriptors(loc, rem) == ([(0, 16 * n, 0)], [(4096, 16 * n, 0)])
    # reversed order is not contiguous
    assert len(coalesce_descriptors(loc[::-1], rem[::-1])[0]) == n
    # a device change breaks a run
    assert len(coalesce_descriptors([(0, 4, 0), (4, 4, 1)], [(0, 4, 0), (4, 4, 0)])[0]) == 2
    with pytest.raises(ValueError):
        coalesce_descriptors([(0, 4, 0)], [])
    with pytest.raises(ValueError):
        coalesce_descriptors([(0, 4, 0)], [(0, 8, 0)])


def test_split_chunks_bounds_bytes_at_block_boundaries() -> None:
    b = 16
    local = [(0, 10 * b, 0), (1000, b, 0), (2000, 2 * b, 0)]
    remote = [(5000, 10 * b, 0), (7000, b, 0), (9000, 2 * b, 0)]
    chunks = split_chunks(local, remote, b, 3 * b)
    assert [sum(n for _, n, _ in loc) for loc, _ in chunks] == [3 * b, 3 * b, 3 * b, 2 * b, 2 * b]
    # the tail of the 10-block run shares a chunk with the next 1-block pair
    assert chunks[3] == ([(9 * b, b, 0), (1000, b, 0)], [(5000 + 9 * b, b, 0), (7000, b, 0)])
    flat_l = [d for loc, _ in chunks for d in loc]
    flat_r = [d for _, rem in chunks for d in rem]
    assert coalesce_descriptors(flat_l, flat_r) == (local, remote)  # nothing lost or reordered
    # a limit below one block still moves one block per chunk
    assert len(split_chunks(local, remote, b, 1)) == 13
    assert split_chunks([], [], b, 3 * b) == []
    with pytest.raises(ValueError):
        split_chunks([(0, b + 1, 0)], [(0, b + 1, 0)], b, 3 * b)


def test_alloc_kv_cache_is_aligned_zeroed_and_writable() -> None:
    t = alloc_kv_cache((3, 2, 2, 4, 2, 8), torch.bfloat16)
    assert t.shape == (3, 2, 2, 4, 2, 8) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % (2 << 20) == 0
    assert not bits(t).any()
    t.fill_(1.5)
    assert bool((t == 1.5).all())


def test_compat_hash_is_stable_and_sensitive() -> None:
    base: dict[str, Any] = dict(
        model="SmolLM2-135M-Instruct", num_layers=30, num_kv_heads=3, head_dim=64, dtype="bfloat16"
    )
    h = compat_hash(**base, block_size=16)
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == compat_hash(**base, block_size=16)
    assert h == compat_hash(**{**base, "dtype": torch.bfloat16}, block_size=16)
    assert h != compat_hash(**{**base, "dtype": torch.float16}, block_size=16)
    assert h != compat_hash(**base, block_size=32)
    assert h != compat_hash(**{**base, "num_kv_heads": 4}, block_size=16)
    assert h != compat_hash(**{**base, "model": "other"}, block_size=16)
    assert h != compat_hash(**base, block_size=16, protocol_version=999)
    assert h != compat_hash(**base, block_size=16, layout="layer-major")


def test_import_is_lazy_and_missing_nixl_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    code = "import sys, tandem.transfer.nixl; assert 'nixl' not in sys.modules, 'eager nixl import'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    monkeypatch.setitem(sys.modules, "nixl._api", None)  # makes `from nixl._api import` fail
    with pytest.raises(NixlUnavailableError, match=r"torch==2\.13\.0"):
        KvTransferAgent("x", torch.zeros(4, 8, dtype=torch.bfloat16), 16)


def test_constructor_validates_the_tensor() -> None:
    with pytest.raises(ValueError):
        KvTransferAgent("x", torch.zeros(4, 8, dtype=torch.bfloat16), 24)  # 64 B % 24 != 0
    with pytest.raises(ValueError):
        KvTransferAgent("x", torch.zeros(8, 4, dtype=torch.bfloat16).t(), 16)  # not contiguous


# ---- two processes ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_read_scattered_and_contiguous_blocks(owner: Owner, reader: KvTransferAgent) -> None:
    remote_ids = [3, 7, 8, 9, 10, 2]
    local_ids = [0, 5, 6, 7, 1, 12]  # 7,8,9 -> 5,6,7 coalesce; 10 -> 1 and 2 -> 12 do not
    descs = [owner.info["descs"][i] for i in remote_ids]
    assert all(n == BLOCK_NBYTES for _, n, _ in descs)
    reader.kv.zero_()  # type: ignore[attr-defined]

    stats = await reader.read_blocks(OWNER, owner.info["metadata"], descs, local_ids, b"req-1", 10.0)

    assert (stats.blocks, stats.bytes) == (6, 6 * BLOCK_NBYTES)
    assert stats.ms > 0
    expected = kv_pattern(1)
    got = reader.kv  # type: ignore[attr-defined]
    for r, loc in zip(remote_ids, local_ids, strict=True):
        assert torch.equal(bits(got[loc]), bits(expected[r])), f"block {r} -> {loc} differs"
    untouched = [i for i in range(SHAPE[0]) if i not in local_ids]
    assert not bits(got[untouched]).any()
    assert b"req-1" in await owner.acall("wait_notif", b"req-1")
    assert reader.pending_transfers == 0

    # A second, fully contiguous read reuses the cached connection.
    stats = await reader.read_blocks(
        OWNER, owner.info["metadata"], owner.info["descs"][4:12], list(range(8, 16)), b"req-2"
    )
    assert stats.blocks == 8
    assert torch.equal(bits(got[8:16]), bits(expected[4:12]))
    assert b"req-2" in await owner.acall("wait_notif", b"req-2")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_chunked_read_notifies_once_after_all_chunks(owner: Owner, reader: KvTransferAgent) -> None:
    remote_ids = [0, 1, 2, 3, 4, 11, 13]
    local_ids = [9, 10, 11, 12, 13, 2, 4]
    descs = [owner.info["descs"][i] for i in remote_ids]
    reader.kv.zero_()  # type: ignore[attr-defined]
    stats = await reader.read_blocks(
        OWNER,
        owner.info["metadata"],
        descs,
        local_ids,
        b"req-chunked",
        10.0,
        max_chunk_bytes=2 * BLOCK_NBYTES,
    )
    assert stats.blocks == 7
    expected = kv_pattern(1)
    for r, loc in zip(remote_ids, local_ids, strict=True):
        assert torch.equal(bits(reader.kv[loc]), bits(expected[r]))  # type: ignore[attr-defined]
    got = await owner.acall("wait_notif", b"req-chunked")
    assert got.count(b"req-chunked") == 1 and b"" not in got


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_zero_block_read_still_notifies(owner: Owner) -> None:
    # A fresh reader whose first contact with the owner is the notification alone.
    kv = torch.zeros(SHAPE, dtype=torch.bfloat16)
    with KvTransferAgent("reader-empty", kv, BLOCK_NBYTES) as agent:
        stats = await agent.read_blocks(OWNER, owner.info["metadata"], [], [], b"req-empty", 10.0)
        assert (stats.blocks, stats.bytes) == (0, 0)
        assert b"req-empty" in await owner.acall("wait_notif", b"req-empty")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_bad_requests_raise(owner: Owner, reader: KvTransferAgent) -> None:
    md, descs = owner.info["metadata"], owner.info["descs"]
    with pytest.raises(ValueError):
        await reader.read_blocks(OWNER, md, descs[:2], [0], b"x")
    with pytest.raises(ValueError):
        await reader.read_blocks(OWNER, md, [(descs[0][0], 7, 0)], [0], b"x")
    with pytest.raises(IndexError):
        await reader.read_blocks(OWNER, md, descs[:1], [SHAPE[0]], b"x")
    with pytest.raises(KvTransferError, match="expected"):
        await reader.read_blocks("someone-else", md, descs[:1], [0], b"x")
    # A range the owner never registered is refused by NIXL.
    with pytest.raises(KvTransferError):
        await reader.read_blocks(OWNER, md, [(descs[-1][0] + BLOCK_NBYTES, BLOCK_NBYTES, 0)], [0], b"x")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_owner_restart_with_same_name_reloads_metadata(owner: Owner, reader: KvTransferAgent) -> None:
    new = owner.call("restart", 2)
    assert new["metadata"] != owner.info["metadata"]
    owner.info = new
    stats = await reader.read_blocks(OWNER, new["metadata"], new["descs"][0:3], [0, 1, 2], b"req-r", 10.0)
    assert stats.blocks == 3
    assert torch.equal(bits(reader.kv[0:3]), bits(kv_pattern(2)[0:3]))  # type: ignore[attr-defined]
    assert b"req-r" in await owner.acall("wait_notif", b"req-r")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_close_is_idempotent_and_final() -> None:
    agent = KvTransferAgent("closer", torch.zeros(SHAPE, dtype=torch.bfloat16), BLOCK_NBYTES)
    agent.close()
    agent.close()
    with pytest.raises(KvTransferError, match="closed"):
        agent.poll_notifs()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_read_times_out_when_owner_stops_polling(owner: Owner, reader: KvTransferAgent) -> None:
    md, descs = owner.info["metadata"], owner.info["descs"]
    await owner.acall("pause", 1.0)  # the owner stops calling into NIXL for 1 s
    t0 = time.monotonic()
    with pytest.raises(KvTransferError, match="timed out"):
        await reader.read_blocks(OWNER, md, descs[5:6], [3], b"req-t", timeout_s=0.2)
    assert time.monotonic() - t0 < 1.0
    assert reader.pending_transfers == 0
    await asyncio.sleep(1.0)
    # Once the owner polls again, the same agents transfer normally.
    stats = await reader.read_blocks(OWNER, md, descs[5:6], [3], b"req-after", timeout_s=10)
    assert stats.blocks == 1
    assert b"req-after" in await owner.acall("wait_notif", b"req-after")
