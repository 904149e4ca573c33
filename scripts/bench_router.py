#!/usr/bin/env python3
"""Router decision time at scale: the pure policy + active-sequence bookkeeping, no NATS.

Builds synthetic workers (default 64 prefill + 192 decode, block size 16), each with requests
already in flight, and drives the router's own :class:`RouterScheduler` with a stream of
requests shaped like chat traffic: a shared system prefix from a few groups plus a unique tail,
~1000–2000 prompt tokens, overlap scores as the KV indexer would return them (the group prefix
cached on a fraction of the workers, some with longer matches). Per request it times

* ``decide``: candidates → busy filter → policy ranking → conditional disaggregation;
* ``rank_decode``: the decode choice after a remote prefill;
* ``bookkeeping``: add/free on the prefill worker, add + confirm on the decode worker, and the
  ``RequestFinished`` of an older request (steady state),

while one worker's heartbeat changes per request (so heartbeat reconciliation runs too), and
prints p50/p99/max in microseconds, of the wall time (``perf_counter_ns``) and of this thread's
CPU time (``thread_time_ns``: on a shared machine the wall time also holds whatever else ran).
The goal is decide p99 < 1 ms at 256 workers.

    .venv/bin/python scripts/bench_router.py [--prefill 64] [--decode 192] [--requests 5000]
        [--mode kv] [--temperature 0] [--inflight 16]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections import deque

import msgspec

from tandem.protocol.messages import InstanceInfo, WorkerLoad
from tandem.services.router.config import RouterConfig
from tandem.services.router.policy import ROUTER_MODES
from tandem.services.router.scheduler import RouterScheduler

BLOCK = 16


def make_info(wid: str, role: str, rng: random.Random, now: float) -> InstanceInfo:
    return InstanceInfo(
        instance_id=wid,
        role=role,  # type: ignore[arg-type]
        model="m",
        block_size=BLOCK,
        num_blocks=8192,
        block_nbytes=1 << 16,
        compat_hash="c1",
        nixl_agent_name=f"agent-{wid}",
        nixl_metadata=b"",
        heartbeat_at=now,
        load=WorkerLoad(
            num_running=rng.randrange(0, 32),
            num_waiting=rng.randrange(0, 4),
            used_blocks=rng.randrange(0, 4000),
            waiting_prefill_tokens=rng.randrange(0, 3000) if role == "prefill" else 0,
        ),
    )


class Traffic:
    """Prompts = one of ``groups`` shared prefixes + a unique tail, with indexer-like overlaps."""

    def __init__(self, rng: random.Random, workers: list[str], groups: int = 16) -> None:
        self.rng = rng
        self.serial = 0
        self.prefixes = [[(g << 40) | i for i in range(rng.randrange(16, 64))] for g in range(groups)]
        # Which workers hold each group's prefix (and how much of it), as the radix tree would say.
        self.cached: list[dict[str, int]] = []
        for prefix in self.prefixes:
            holders = rng.sample(workers, k=max(1, int(len(workers) * rng.uniform(0.05, 0.3))))
            self.cached.append({w: rng.randrange(1, len(prefix) + 1) for w in holders})

    def next(self) -> tuple[int, list[int], dict[str, int]]:
        rng = self.rng
        g = rng.randrange(len(self.prefixes))
        prefix = self.prefixes[g]
        n_tokens = rng.randrange(1000, 2000)
        n_full = n_tokens // BLOCK
        self.serial += 1
        tail = [(1 << 62) | (self.serial << 12) | i for i in range(max(0, n_full - len(prefix)))]
        hashes = (prefix + tail)[:n_full]
        return n_tokens, hashes, dict(self.cached[g])


def pct(xs: list[int], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] / 1000.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", type=int, default=64, help="prefill workers (64)")
    ap.add_argument("--decode", type=int, default=192, help="decode workers (192)")
    ap.add_argument("--requests", type=int, default=5000, help="timed requests (5000)")
    ap.add_argument("--warmup", type=int, default=500, help="untimed requests first (500)")
    ap.add_argument("--inflight", type=int, default=16, help="requests in flight per decode worker (16)")
    ap.add_argument("--mode", default="kv", choices=ROUTER_MODES, help="--router-mode (kv)")
    ap.add_argument("--temperature", type=float, default=0.0, help="--router-temperature (0)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    now = time.time()
    infos: dict[str, InstanceInfo] = {}
    for i in range(args.prefill):
        infos[f"prefill-{i}"] = make_info(f"prefill-{i}", "prefill", rng, now)
    for i in range(args.decode):
        infos[f"decode-{i}"] = make_info(f"decode-{i}", "decode", rng, now)
    names = list(infos)
    decoders = [n for n in names if n.startswith("decode")]
    cfg = RouterConfig(
        router_mode=args.mode,
        router_temperature=args.temperature,
        active_decode_blocks_threshold=0.95,
        active_prefill_tokens_threshold=1 << 20,
    )
    sched = RouterScheduler(cfg, rng=random.Random(args.seed + 1))
    traffic = Traffic(rng, names)

    # Requests already in flight on the decode workers (handed off, acked).
    inflight: deque[str] = deque()
    for w in decoders:
        for k in range(args.inflight):
            n_tokens, hashes, _ = traffic.next()
            rid = f"pre-{w}-{k}"
            sched.active.add(infos[w], rid, hashes, n_tokens, 0, now=now)
            sched.active.confirm(rid, now)
            inflight.append(rid)

    t_decide: list[int] = []
    t_rank: list[int] = []
    t_book: list[int] = []
    t_total: list[int] = []
    c_decide: list[int] = []
    c_rank: list[int] = []
    c_book: list[int] = []
    c_total: list[int] = []
    reasons: dict[str, int] = {}
    n_blocks: list[int] = []
    clock = now
    perf = time.perf_counter_ns
    cpu = time.thread_time_ns
    gc.collect()
    for n in range(args.warmup + args.requests):
        clock += 0.002  # 500 requests/s
        # One worker heartbeats (its report changes; reconciliation runs on the next decision).
        hb = rng.choice(names)
        seqs = sched.active.get(hb)
        infos[hb] = msgspec.structs.replace(
            infos[hb],
            heartbeat_at=clock,
            load=WorkerLoad(  # what a worker serving only this router would report
                num_running=len(seqs) if seqs else 0,
                used_blocks=(seqs.active_blocks if seqs else 0) + rng.randrange(0, 200),
                waiting_prefill_tokens=seqs.prefill_tokens if seqs else 0,
            ),
        )
        n_tokens, hashes, scores = traffic.next()
        rid = f"r{n}"
        values = infos  # a Mapping, like the registry's
        n_blocks.append(len(hashes))

        t0, u0 = perf(), cpu()
        d = sched.decide(values, n_tokens, hashes, scores, now=clock)
        t1, u1 = perf(), cpu()
        tb = tr = cb = cr = 0
        if d.prefill is not None:
            p = d.prefill[0]
            b0, v0 = perf(), cpu()
            sched.active.add(p, rid, hashes, n_tokens, sched.uncached_tokens(p, n_tokens, scores), now=clock)
            sched.active.free(rid, p.instance_id)  # PrefillResult came back
            b1, v1 = perf(), cpu()
            ranked = sched.rank_decode(
                values,
                n_tokens,
                hashes,
                scores,
                prefill_worker=p.instance_id,
                compat_hash=p.compat_hash,
                now=clock,
            )
            b2, v2 = perf(), cpu()
            target = ranked[0]
            prefill_tokens = 0
            tb += b1 - b0
            tr = b2 - b1
            cb += v1 - v0
            cr = v2 - v1
        else:
            target = d.local[0]
            prefill_tokens = sched.uncached_tokens(target, n_tokens, scores)
        b3, v3 = perf(), cpu()
        sched.active.add(
            target,
            rid,
            hashes,
            n_tokens,
            prefill_tokens,
            now=clock,
            prefill_until_heartbeat=d.prefill is None,
        )
        sched.active.confirm(rid, clock)
        inflight.append(rid)
        sched.active.free(inflight.popleft())  # RequestFinished of the oldest one
        b4, v4 = perf(), cpu()
        tb += b4 - b3
        cb += v4 - v3
        if n >= args.warmup:
            t_decide.append(t1 - t0)
            c_decide.append(u1 - u0)
            if d.prefill is not None:
                t_rank.append(tr)
                c_rank.append(cr)
            t_book.append(tb)
            c_book.append(cb)
            t_total.append((t1 - t0) + tr + tb)
            c_total.append((u1 - u0) + cr + cb)
            reasons[d.reason] = reasons.get(d.reason, 0) + 1

    print(
        f"router decision time: {args.prefill} prefill + {args.decode} decode workers, mode={args.mode}, "
        f"temperature={args.temperature}, {args.inflight} in flight per decode worker, "
        f"{args.requests} requests (~{statistics.mean(n_blocks):.0f} full blocks of {BLOCK} tokens each)"
    )
    print(
        f"{'step':<14}{'p50 us':>10}{'p99 us':>10}{'max us':>10}"
        f"{'cpu p50':>10}{'cpu p99':>10}{'cpu max':>10}{'n':>8}"
    )
    for name, xs, cs in (
        ("decide", t_decide, c_decide),
        ("rank_decode", t_rank, c_rank),
        ("bookkeeping", t_book, c_book),
        ("total", t_total, c_total),
    ):
        if xs:
            print(
                f"{name:<14}{pct(xs, 0.5):>10.1f}{pct(xs, 0.99):>10.1f}{max(xs) / 1000:>10.1f}"
                f"{pct(cs, 0.5):>10.1f}{pct(cs, 0.99):>10.1f}{max(cs) / 1000:>10.1f}{len(xs):>8}"
            )
    print("reasons:", ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
    print(f"tracked requests: {len(sched.active)}, reconciled: {sched.active.reconciled}")
    ok, ok_cpu = pct(t_decide, 0.99) < 1000.0, pct(c_decide, 0.99) < 1000.0
    print(f"goal decide p99 < 1 ms: wall {'met' if ok else 'NOT met'}, cpu {'met' if ok_cpu else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
