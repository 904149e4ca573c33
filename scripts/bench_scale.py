#!/usr/bin/env python3
"""Scale benchmark: many mock workers behind one frontend, router and indexer.

    .venv/bin/python scripts/bench_scale.py [--prefill 64] [--decode 192] [--speedup 1]
        [--requests 2000] [--concurrency 64] [--router-mode kv] [--json OUT]

Starts ``python -m tandem.services.launcher --engine mock`` with ``--prefill`` + ``--decode`` mock
workers (64 to a process), measures the time until every worker is registered and ``/ready``
answers, then sends ``--requests`` streaming-off completions (``--concurrency`` at a time; prompts
of ~600 tokens built from 32 shared prefixes, so the indexer holds real overlap) and reports:

* the launcher's ready time (s) and requests/s, TTFT p50/p99 as the frontend reports it
  (``tandem.ttft_ms``);
* the router's routing decision time p50/p99 (µs; the router's own timer around the policy and
  its active-sequence bookkeeping, read from its health answer): wall time, and the router
  thread's CPU time (the wall time also holds whatever else the saturated machine ran);
* the indexer's lag: time from a KV event's JetStream timestamp to its application (ms, p50/p99,
  from its health answer), and KV events applied;
* the peak RSS of every process (MB), grouped by service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import nats
import psutil

from tandem.protocol.messages import Health, HealthRequest, decoder, encode
from tandem.protocol.subjects import Subjects
from tandem.services.auth import NatsAuth, password_file

REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def prompts(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    words = ["amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "iris", "juniper"]
    prefixes = [" ".join(rnd.choice(words) + str(rnd.randrange(100)) for _ in range(200)) for _ in range(32)]
    out = []
    for i in range(n):
        p = prefixes[min(31, int(rnd.paretovariate(1.0)) - 1)]
        out.append(f"{p} question {i}: " + " ".join(rnd.choice(words) for _ in range(40)))
    return out


async def health(nc: Any, ns: str, service: str) -> str:
    msg = await nc.request(Subjects(ns).health(service), encode(HealthRequest()), timeout=5)
    return decoder(Health).decode(msg.data).detail


def detail_value(detail: str, key: str) -> float | None:
    m = re.search(rf"\b{re.escape(key)}=([0-9.]+)", detail)
    return float(m.group(1)) if m else None


async def load(
    base: str, texts: list[str], concurrency: int, max_tokens: int
) -> tuple[list[float], float, int]:
    ttfts: list[float] = []
    errors = 0
    queue = list(enumerate(texts))
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def user() -> None:
            nonlocal errors
            while queue:
                _, text = queue.pop()
                body = {"model": MODEL, "prompt": text, "max_tokens": max_tokens, "ignore_eos": True}
                async with session.post(f"{base}/v1/completions", json=body) as resp:
                    if resp.status != 200:
                        errors += 1
                        continue
                    reply = await resp.json()
                    ttfts.append(float(reply["tandem"]["ttft_ms"]))

        await asyncio.gather(*(user() for _ in range(concurrency)))
    return ttfts, time.perf_counter() - t0, errors


def sample_rss(root: psutil.Process, peak: dict[str, float]) -> None:
    for p in root.children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            m = re.search(r"tandem\.services\.(\w+)", cmd)
            name = m.group(1) if m else ("nats-server" if "nats-server" in cmd else None)
            if name is None:
                continue
            key = f"{name}:{p.pid}"
            peak[key] = max(peak.get(key, 0.0), p.memory_info().rss / 1e6)
        except psutil.Error:
            continue


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--decode", type=int, default=192)
    ap.add_argument("--speedup", type=float, default=1.0)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--router-mode", default="kv")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    port, nats_port = free_port(), free_port()
    ns = "scale"
    log_dir = Path(tempfile.mkdtemp(prefix="tandem-bench-scale-"))
    cmd = [
        sys.executable, "-m", "tandem.services.launcher", "--engine", "mock",
        "--prefill", str(a.prefill), "--decode", str(a.decode), "--speedup-ratio", str(a.speedup),
        "--router-mode", a.router_mode, "--port", str(port), "--nats-port", str(nats_port),
        "--namespace", ns, "--log-dir", str(log_dir), "--log-level", "warning",
        "--nats-auth-dir", str(log_dir / "auth"),
    ]  # fmt: skip
    out_path = log_dir / "launcher.out"
    out = out_path.open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)  # noqa: ASYNC220
    root = psutil.Process(proc.pid)
    peak: dict[str, float] = {}
    result: dict[str, Any] = {"workers": a.prefill + a.decode}
    try:
        while "tandem is ready" not in out_path.read_text():
            if proc.poll() is not None or time.perf_counter() - t0 > 300:
                print(out_path.read_text()[-3000:], file=sys.stderr)
                return 1
            await asyncio.sleep(0.2)
        ready = re.search(r"ready in ([0-9.]+) s", out_path.read_text())
        result["ready_s"] = float(ready.group(1)) if ready else round(time.perf_counter() - t0, 1)
        sample_rss(root, peak)
        login = NatsAuth.for_user("launcher", password_file(log_dir / "auth", "launcher"))  # health probes
        nc = await nats.connect(f"nats://127.0.0.1:{nats_port}", **login.connect_options())
        stop = asyncio.Event()

        async def sampler() -> None:
            while not stop.is_set():
                sample_rss(root, peak)
                await asyncio.sleep(1.0)

        sampling = asyncio.create_task(sampler())
        ttfts, wall, errors = await load(
            f"http://127.0.0.1:{port}", prompts(a.requests, a.seed), a.concurrency, a.max_tokens
        )
        stop.set()
        await sampling
        await asyncio.sleep(1.0)
        router, indexer = await health(nc, ns, "router"), await health(nc, ns, "indexer")
        await nc.close()
        result.update(
            requests=len(ttfts),
            errors=errors,
            req_per_s=round(len(ttfts) / wall, 1),
            ttft_p50_ms=pct(ttfts, 0.5),
            ttft_p99_ms=pct(ttfts, 0.99),
            router_decide_p50_us=detail_value(router, "decide_p50_us"),
            router_decide_p99_us=detail_value(router, "decide_p99_us"),
            router_decide_cpu_p50_us=detail_value(router, "decide_cpu_p50_us"),
            router_decide_cpu_p99_us=detail_value(router, "decide_cpu_p99_us"),
            indexer_lag_p50_ms=detail_value(indexer, "lag_p50_ms"),
            indexer_lag_p99_ms=detail_value(indexer, "lag_p99_ms"),
            indexer_events=detail_value(indexer, "events"),
            router_health=router,
            indexer_health=indexer,
        )
        by_service: dict[str, list[float]] = {}
        for key, mb in peak.items():
            by_service.setdefault(key.split(":")[0], []).append(mb)
        result["rss_mb"] = {
            k: {"processes": len(v), "max": round(max(v)), "mean": round(statistics.mean(v))}
            for k, v in sorted(by_service.items())
        }
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        out.close()
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
