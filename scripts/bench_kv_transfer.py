#!/usr/bin/env python3
"""Benchmark NIXL KV-block READs between two processes (CPU, UCX), next to an in-process memcpy.

An owner process (the prefill side) holds a block-major KV tensor
``(num_blocks, 30, 2, 16, 3, 64)`` bf16 (SmolLM2-135M: 368,640 B per 16-token block) and polls
its NIXL notifications every ``--owner-poll-ms``, as a worker does. This process (the decode side)
READs prompts of ``--tokens`` tokens through :class:`tandem.transfer.KvTransferAgent`, with block
ids that are

* ``contiguous``: a run of blocks on both sides, coalesced into one NIXL descriptor;
* ``scattered``: random, distinct block ids on both sides (a fragmented pool), mostly one
  descriptor per block.

GB/s = bytes / ``KvTransferStats.ms`` (set-up + transfer + completion polling), 1 GB = 1e9 B.
The very first READ to the owner (UCX connection set-up included) is reported apart, and
``--first-reads N`` measures it N times per way of starting from a fresh reader agent: ``cold``
(straight to the READ), ``connect`` (:meth:`KvTransferAgent.connect` half a second before) and
``connect+probe`` (connect, then a one-block READ into the reader's pool: what a decode worker
does when the owner registers); the READ is the first ``--tokens`` size, contiguous.
``median``/``best`` are over the ``--iters`` READs after one warm-up READ per row. ``memcpy``
copies the same number of bytes between two tensors in this process with one thread. Each
configuration runs with KV tensors from :func:`tandem.transfer.alloc_kv_cache` (huge pages) and
from plain ``torch.empty`` (``--alloc``): over UCX/cma the page size dominates the rate.


    .venv/bin/python scripts/bench_kv_transfer.py [--tokens 1008 4096 16384] [--iters 10]
    .venv/bin/python scripts/bench_kv_transfer.py --tokens 1008 --alloc hugepage --first-reads 5
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from tandem.transfer.nixl import DEFAULT_MAX_CHUNK_BYTES, KvTransferAgent, alloc_kv_cache

BLOCK_SHAPE = (30, 2, 16, 3, 64)  # layers, K/V, block_size, kv_heads, head_dim
BLOCK_TOKENS = BLOCK_SHAPE[2]
BLOCK_NBYTES = 30 * 2 * 16 * 3 * 64 * 2  # bf16: 368,640 B


def make_kv(num_blocks: int, fill_ids: bool, alloc: str) -> torch.Tensor:
    """A KV tensor with every page touched; with ``fill_ids`` each block's int16 words = its id.

    ``alloc``: ``"hugepage"`` (:func:`tandem.transfer.alloc_kv_cache`) or ``"malloc"``
    (``torch.empty``: 4 KiB pages unless the kernel's THP mode is ``always``).
    """
    shape = (num_blocks, *BLOCK_SHAPE)
    if alloc == "hugepage":
        kv = alloc_kv_cache(shape, torch.bfloat16)
    else:
        kv = torch.empty(shape, dtype=torch.bfloat16)
    words = kv.view(torch.int16).view(num_blocks, -1)
    if fill_ids:
        words.copy_(torch.arange(num_blocks, dtype=torch.int16)[:, None].expand_as(words))
    else:
        words.fill_(-1)
    return kv


def owner_main(conn: Connection, num_blocks: int, poll_s: float, alloc: str) -> None:
    kv = make_kv(num_blocks, fill_ids=True, alloc=alloc)
    agent = KvTransferAgent(f"bench-owner-{alloc}", kv, BLOCK_NBYTES)
    conn.send({"metadata": agent.metadata, "descs": agent.block_descriptors(range(num_blocks))})
    received = 0
    while not conn.poll(0):
        received += len(agent.poll_notifs())
        time.sleep(poll_s)
    conn.recv()
    conn.send(received)
    agent.close()


def memcpy_gbps(nbytes: int, iters: int, alloc: str) -> float:
    """Best single-thread in-process copy rate for ``nbytes`` (GB/s) between ``alloc`` buffers."""
    blocks = -(-nbytes // BLOCK_NBYTES)
    src = make_kv(blocks, fill_ids=True, alloc=alloc).view(torch.uint8).view(-1)[:nbytes]
    dst = make_kv(blocks, fill_ids=False, alloc=alloc).view(torch.uint8).view(-1)[:nbytes]
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


async def bench(args: argparse.Namespace, alloc: str) -> list[dict[str, Any]]:
    max_blocks = max(-(-t // BLOCK_TOKENS) for t in args.tokens)
    pool_blocks = 2 * max_blocks  # room to scatter
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    owner = ctx.Process(
        target=owner_main, args=(child, pool_blocks, args.owner_poll_ms / 1e3, alloc), daemon=True
    )
    owner.start()
    if not conn.poll(120):
        owner.kill()
        raise SystemExit("owner process did not start within 120 s")
    info = conn.recv()
    local_kv = make_kv(pool_blocks, fill_ids=False, alloc=alloc)
    reader = KvTransferAgent(f"bench-reader-{alloc}", local_kv, BLOCK_NBYTES)
    owner_name = f"bench-owner-{alloc}"
    rng = random.Random(0)
    rows: list[dict[str, Any]] = []
    n_req = 0
    cold: float | None = None
    try:
        for tokens in args.tokens:
            n = -(-tokens // BLOCK_TOKENS)
            layouts = {
                "contiguous": (list(range(n)), list(range(max_blocks, max_blocks + n))),
                "scattered": (rng.sample(range(pool_blocks), n), rng.sample(range(pool_blocks), n)),
            }
            for layout, (remote_ids, local_ids) in layouts.items():
                descs = [info["descs"][i] for i in remote_ids]
                times: list[float] = []
                for _ in range(args.iters + 1):
                    n_req += 1
                    stats = await reader.read_blocks(
                        owner_name,
                        info["metadata"],
                        descs,
                        local_ids,
                        f"req-{n_req}".encode(),
                        60.0,
                        max_chunk_bytes=args.max_chunk_mib << 20,
                    )
                    times.append(stats.ms / 1e3)
                words = local_kv.view(torch.int16).view(pool_blocks, -1)
                for r, loc in zip(remote_ids, local_ids, strict=True):
                    if words[loc, 0] != r or words[loc, -1] != r:
                        raise SystemExit(f"bad data: local block {loc} should hold remote block {r}")
                nbytes = n * BLOCK_NBYTES
                n_descs = 1 + sum(
                    1
                    for i in range(1, n)
                    if not (remote_ids[i] == remote_ids[i - 1] + 1 and local_ids[i] == local_ids[i - 1] + 1)
                )
                rest = times[1:]
                rows.append(
                    {
                        "alloc": alloc,
                        "tokens": tokens,
                        "blocks": n,
                        "MB": nbytes / 1e6,
                        "layout": layout,
                        "descs": n_descs,
                        "median": nbytes / statistics.median(rest) / 1e9,
                        "best": nbytes / min(rest) / 1e9,
                        "median_ms": statistics.median(rest) * 1e3,
                        "memcpy": memcpy_gbps(nbytes, args.iters, alloc),
                    }
                )
                if cold is None:  # the very first READ to the owner: connection set-up included
                    cold = nbytes / times[0] / 1e9
        firsts, n_first = await first_reads(args, alloc, info, owner_name, pool_blocks, max_blocks)
        n_req += n_first
        rows[0]["firsts"] = firsts
        # Every READ's notification must have reached the owner.
        await asyncio.sleep(0.05)
        conn.send("stop")
        if not conn.poll(30):
            raise SystemExit("owner did not answer")
        got = conn.recv()
        if got != n_req:
            raise SystemExit(f"owner got {got} notifications, expected {n_req}")
    finally:
        reader.close()
        owner.join(10)
        if owner.is_alive():
            owner.kill()
    if cold is not None:
        rows[0]["first"] = cold
    return rows


async def first_reads(
    args: argparse.Namespace,
    alloc: str,
    info: dict[str, Any],
    owner_name: str,
    pool_blocks: int,
    max_blocks: int,
) -> tuple[dict[str, list[float]], int]:
    """GB/s of the first READ of a fresh reader agent, per way of warming it up; and the number
    of notifications those READs sent the owner."""
    n = -(-args.tokens[0] // BLOCK_TOKENS)
    descs = [info["descs"][i] for i in range(n)]
    out: dict[str, list[float]] = {"cold": [], "connect": [], "connect+probe": []}
    sent = 0
    for k in range(args.first_reads):
        for mode in out:
            kv = make_kv(pool_blocks, fill_ids=False, alloc=alloc)
            reader = KvTransferAgent(f"bench-first-{alloc}-{mode}-{k}", kv, BLOCK_NBYTES)
            try:
                if mode != "cold":
                    await reader.connect(owner_name, info["metadata"])
                if mode == "connect+probe":  # into a block the measured READ does not use
                    await reader.read_blocks(owner_name, info["metadata"], descs[-1:], [0], b"", 10.0)
                if mode != "cold":
                    await asyncio.sleep(0.5)  # the owner registered a while before the request
                stats = await reader.read_blocks(
                    owner_name, info["metadata"], descs, list(range(max_blocks, max_blocks + n)), b"f", 60.0
                )
                sent += 1
                out[mode].append(stats.bytes / stats.ms / 1e6)
            finally:
                reader.close()
    return out, sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1008, 4096, 16384], help="prompt sizes")
    ap.add_argument("--iters", type=int, default=10, help="timed READs per row (after one warm-up)")
    ap.add_argument("--owner-poll-ms", type=float, default=1.0, help="owner's poll_notifs() interval")
    ap.add_argument(
        "--max-chunk-mib", type=int, default=DEFAULT_MAX_CHUNK_BYTES >> 20, help="max bytes per NIXL request"
    )
    ap.add_argument(
        "--alloc", choices=["hugepage", "malloc", "both"], default="both", help="KV tensor allocation"
    )
    ap.add_argument(
        "--first-reads",
        type=int,
        default=3,
        help="fresh reader agents per warm-up mode for the first-READ figures (0 = skip)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    allocs = ["hugepage", "malloc"] if args.alloc == "both" else [args.alloc]
    rows = [row for alloc in allocs for row in asyncio.run(bench(args, alloc))]
    print(
        f"NIXL READ between two processes (UCX, DRAM), owner polls every {args.owner_poll_ms} ms, "
        f"requests <= {args.max_chunk_mib} MiB, {args.iters} READs per row; GB/s = 1e9 B/s"
    )
    head = (
        f"{'alloc':<8} {'tokens':>6} {'blocks':>6} {'MB':>7} {'layout':<10} {'descs':>5} "
        f"{'median ms':>9} {'median':>7} {'best':>7} {'memcpy':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['alloc']:<8} {r['tokens']:>6} {r['blocks']:>6} {r['MB']:>7.1f} {r['layout']:<10} "
            f"{r['descs']:>5} {r['median_ms']:>9.2f} {r['median']:>7.2f} {r['best']:>7.2f} "
            f"{r['memcpy']:>7.2f}"
        )
    for r in rows:
        if "first" in r:
            print(
                f"first READ to a new peer ({r['alloc']}, UCX connection set-up included): "
                f"{r['first']:.2f} GB/s"
            )
        for mode, rates in r.get("firsts", {}).items():
            if rates:
                med = statistics.median(rates)
                print(
                    f"first READ of a fresh reader, {r['tokens']} tokens, {r['alloc']}, {mode:<13}: "
                    f"median {med:.2f} GB/s = {med / r['memcpy']:.2f}x memcpy "
                    f"({', '.join(f'{x:.2f}' for x in rates)})"
                )


if __name__ == "__main__":
    main()
