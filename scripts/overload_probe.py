#!/usr/bin/env python3
"""Overload and decode-placement probe (issue 6: "Overload", "Decode placement").

    .venv/bin/python scripts/overload_probe.py [--engine mock|model] [--prefill 1] [--decode 2]
        [--max-inflight 32] [--burst 96] [--overload-x 10] [--duration 20]
        [--prompt-tokens 1500] [--max-tokens 64] [--num-blocks 400] [--json OUT]

Starts ``python -m tandem.services.launcher`` (mock workers at ``--speedup-ratio 1`` by default,
``--num-gpu-blocks-override`` small enough that KV capacity matters), then:

1. **Burst** (the probe of issue 6: "96 concurrent long prompts"): ``--burst`` requests of
   ~``--prompt-tokens`` tokens at once (non-streaming, ``max_tokens`` ``--max-tokens``). Reported:
   status codes, whether every 429/503 carried ``Retry-After``, how long a refused request waited
   for its answer (p50/p99, ms: an early refusal, not a timeout), and on which decode worker the
   successes ran (``tandem.decode_worker``): the spread shows whether decode work herds.
2. **Overload**: ``--overload-x`` × ``--max-inflight`` clients, each sending requests back to back
   for ``--duration`` s. Reported: status codes, refusal latency, and every process's RSS before,
   at its peak and after (MB): RSS must stay flat while the excess is refused.
3. **Recovery**: once the load stops, ``--recovery`` sequential requests must all succeed.

Exit status 0 when no request hung or got a 5xx other than 503-with-Retry-After, every
refusal carried ``Retry-After``, and the stack recovered.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench_scale import free_port, pct, sample_rss  # noqa: E402

MODEL = "smollm2-135m-instruct"
WORDS = ("amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "iris", "juniper")


def prompt(i: int, tokens: int) -> str:
    """A prompt of about ``tokens`` tokens, unique from its first words (no shared prefix)."""
    head = f"Request {i}: summarise the following notes. "
    body = " ".join(f"{WORDS[(i + k) % len(WORDS)]}{(i * 31 + k) % 97}" for k in range(tokens // 2))
    return head + body


class Tally:
    """Outcomes of a phase's requests."""

    def __init__(self) -> None:
        self.status: collections.Counter[str] = collections.Counter()
        self.refusal_ms: list[float] = []
        self.refusals_without_retry_after = 0
        self.decode_workers: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()

    def report(self) -> dict[str, Any]:
        return {
            "status": dict(sorted(self.status.items())),
            "refusal_ms_p50": pct(self.refusal_ms, 0.5),
            "refusal_ms_p99": pct(self.refusal_ms, 0.99),
            "refusals_without_retry_after": self.refusals_without_retry_after,
            "decode_workers": dict(sorted(self.decode_workers.items())),
            "errors": dict(self.errors.most_common(5)),
        }


async def one(
    session: aiohttp.ClientSession, base: str, body: dict[str, Any], tally: Tally, timeout_s: float
) -> None:
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(f"{base}/v1/completions", json=body) as resp:
                text = await resp.text()
                ms = (time.perf_counter() - t0) * 1e3
                tally.status[str(resp.status)] += 1
                if resp.status == 200:
                    reply = json.loads(text)
                    tally.decode_workers[str(reply.get("tandem", {}).get("decode_worker"))] += 1
                    return
                if resp.status in (429, 503):
                    tally.refusal_ms.append(ms)
                    if "Retry-After" not in resp.headers:
                        tally.refusals_without_retry_after += 1
                try:
                    code = json.loads(text)["error"].get("code") or json.loads(text)["error"].get("type")
                except (ValueError, KeyError, TypeError, AttributeError):
                    code = text[:80]
                tally.errors[f"{resp.status} {code}"] += 1
    except TimeoutError:
        tally.status["hung"] += 1
    except (aiohttp.ClientError, OSError) as e:
        tally.status["connection_error"] += 1
        tally.errors[type(e).__name__] += 1


def body(i: int, a: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": prompt(i, a.prompt_tokens),
        "max_tokens": a.max_tokens,
        "ignore_eos": True,
    }


def rss_by_process(root: psutil.Process) -> dict[str, float]:
    now: dict[str, float] = {}
    sample_rss(root, now)
    return now


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("mock", "model"), default="mock")
    ap.add_argument("--prefill", type=int, default=1)
    ap.add_argument("--decode", type=int, default=2)
    ap.add_argument("--max-inflight", type=int, default=32)
    ap.add_argument("--burst", type=int, default=96)
    ap.add_argument("--overload-x", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-blocks", type=int, default=400, help="KV blocks per worker (16 tokens each)")
    ap.add_argument("--recovery", type=int, default=5)
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("extra", nargs="*", help="more launcher flags (after --)")
    a = ap.parse_args()

    port = free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="tandem-overload-"))
    cmd = [
        sys.executable, "-m", "tandem.services.launcher", "--engine", a.engine,
        "--prefill", str(a.prefill), "--decode", str(a.decode), "--max-inflight", str(a.max_inflight),
        "--num-gpu-blocks-override", str(a.num_blocks), "--port", str(port),
        "--namespace", "overload", "--log-dir", str(log_dir), "--log-level", "warning", *a.extra,
    ]  # fmt: skip
    if a.engine == "mock":
        cmd += ["--speedup-ratio", "1", "--workers-per-process", "1"]
    out_path = log_dir / "launcher.out"
    out = out_path.open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)  # noqa: ASYNC220
    root = psutil.Process(proc.pid)
    base = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"engine": a.engine, "prefill": a.prefill, "decode": a.decode}
    t0 = time.perf_counter()
    try:
        while "tandem is ready" not in out_path.read_text():
            if proc.poll() is not None or time.perf_counter() - t0 > 600:
                print(out_path.read_text()[-3000:], file=sys.stderr)
                return 1
            await asyncio.sleep(0.2)
        timeout = aiohttp.ClientTimeout(total=None)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            # 1. burst
            burst = Tally()
            await asyncio.gather(
                *(one(session, base, body(i, a), burst, a.request_timeout) for i in range(a.burst))
            )
            result["burst"] = {"requests": a.burst, **burst.report()}
            # 2. overload
            rss_before = rss_by_process(root)
            peak: dict[str, float] = dict(rss_before)
            over = Tally()
            clients = max(1, round(a.overload_x * a.max_inflight))
            deadline = time.perf_counter() + a.duration
            counter = iter(range(10**9))

            async def client() -> None:
                while time.perf_counter() < deadline:
                    await one(session, base, body(10_000 + next(counter), a), over, a.request_timeout)

            async def sampler() -> None:
                while time.perf_counter() < deadline:
                    sample_rss(root, peak)
                    await asyncio.sleep(1.0)

            await asyncio.gather(sampler(), *(client() for _ in range(clients)))
            await asyncio.sleep(2.0)
            rss_after = rss_by_process(root)
            result["overload"] = {"clients": clients, "duration_s": a.duration, **over.report()}
            result["rss_mb"] = {
                k: {
                    "before": round(rss_before.get(k, 0)),
                    "peak": round(v),
                    "after": round(rss_after.get(k, 0)),
                }
                for k, v in sorted(peak.items())
            }
            # 3. recovery
            rec = Tally()
            for i in range(a.recovery):
                await one(session, base, body(900_000 + i, a), rec, a.request_timeout)
            result["recovery"] = rec.report()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        out.close()
    result["log_dir"] = str(log_dir)
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    bad = 0
    for phase in ("burst", "overload", "recovery"):
        r = result[phase]
        bad += r["status"].get("hung", 0) + r["refusals_without_retry_after"]
        bad += sum(n for code, n in r["status"].items() if code.startswith("5") and code != "503")
    bad += result["recovery"]["status"].get("200", 0) != a.recovery
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
