#!/usr/bin/env python3
"""Benchmark a running tandem deployment through its OpenAI HTTP API.

Two modes (start the system first, e.g. ``scripts/up``):

``load`` (default)
    ``--requests`` streaming ``/v1/completions`` requests, ``--concurrency`` in flight, each a
    prompt of ``--prompt-tokens`` random token ids (distinct per request, so no prefix-cache hits
    unless ``--shared-prefix-tokens``), greedy, ``--max-tokens`` new tokens (``ignore_eos``).
    Reports TTFT, inter-token latency (per request: (last − first token time) / (tokens − 1)),
    end-to-end latency (p50/p90/p99), output tokens/s, and the KV transfer rate the ``tandem``
    reply extension reports (bytes / ms) next to this machine's memcpy rate for a buffer of the
    same size (numpy copy).

``overhead``
    One request in flight: the serving path's added latency = TTFT measured here over HTTP minus
    the engine's own prefill time for the same prompt. The prefill time comes from the ``tandem``
    extension's ``prefill_ms`` when the frontend reports it, else from ``--reference-engine DTYPE``
    (the prompt prefilled by an in-process engine; use the workers' dtype and ``--threads``).

Output: a readable table; ``--json PATH`` (or ``-``) also writes the numbers as JSON.

    .venv/bin/python scripts/bench.py --prompt-tokens 1000 --max-tokens 32 --concurrency 4 --requests 16
    .venv/bin/python scripts/bench.py --mode overhead --prompt-tokens 256 --requests 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import numpy as np

DEFAULT_MODEL = "smollm2-135m-instruct"
VOCAB_LOW, VOCAB_HIGH = 200, 49000  # plain-text token ids of SmolLM2's 49152 vocabulary


@dataclass
class RequestResult:
    """Timings (ms) and counters of one streamed request."""

    ok: bool
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_ms: float = 0.0
    itl_ms: float | None = None
    e2e_ms: float = 0.0
    kv_bytes: int = 0
    kv_ms: float = 0.0
    prefill_ms: float | None = None
    prefill_worker: str = ""
    decode_worker: str = ""


@dataclass
class Summary:
    """Aggregates of one run."""

    mode: str
    requests: int
    failed: int
    concurrency: int
    prompt_tokens: int
    max_tokens: int
    wall_s: float
    output_tokens: int
    output_tok_per_s: float
    ttft_ms: dict[str, float] = field(default_factory=dict)
    itl_ms: dict[str, float] = field(default_factory=dict)
    e2e_ms: dict[str, float] = field(default_factory=dict)
    kv_transfers: int = 0
    kv_bytes_p50: float = 0.0
    kv_gbps: dict[str, float] = field(default_factory=dict)
    memcpy_gbps: float | None = None
    memcpy_64mib_gbps: float | None = None
    overhead_ms: dict[str, float] = field(default_factory=dict)
    prefill_ms_source: str = ""
    errors: list[str] = field(default_factory=list)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 and mean of ``values`` (empty dict when there are none)."""
    if not values:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "mean": float(arr.mean()),
    }


def make_prompts(n: int, tokens: int, shared_prefix: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``tokens`` random ids; the first ``shared_prefix`` ids are common to all."""
    rng = random.Random(seed)
    prefix = [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(min(shared_prefix, tokens))]
    return [
        prefix + [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(tokens - len(prefix))] for _ in range(n)
    ]


def memcpy_gbps(nbytes: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` numpy copy rate (GB/s) for a buffer of ``nbytes`` (at least 1 MiB)."""
    n = max(int(nbytes), 1 << 20)
    src = np.ones(n, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return n / best / 1e9


async def stream_one(
    session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], max_tokens: int
) -> RequestResult:
    """Send one streaming completion and time its SSE events."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first: float | None = None
    last = t0
    ext: dict[str, Any] = {}
    usage: dict[str, Any] = {}
    chunks = 0
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                return RequestResult(False, f"HTTP {resp.status}: {(await resp.text())[:200]}")
            buf = b""
            async for data in resp.content.iter_any():
                buf += data
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    for line in event.splitlines():
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            continue
                        msg = json.loads(payload)
                        if "error" in msg:
                            return RequestResult(False, f"stream error: {msg['error']}")
                        now = time.perf_counter()
                        if msg.get("choices"):
                            chunks += 1
                            if first is None:
                                first = now
                            last = now
                        if isinstance(msg.get("tandem"), dict):
                            ext = msg["tandem"]
                        if isinstance(msg.get("usage"), dict):
                            usage = msg["usage"]
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
        return RequestResult(False, f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    if first is None:
        return RequestResult(False, "no token in the stream")
    n_out = int(usage.get("completion_tokens") or chunks)
    kv = ext.get("kv_transfer") or {}
    prefill = ext.get("prefill_ms")
    return RequestResult(
        ok=True,
        prompt_tokens=int(usage.get("prompt_tokens") or len(prompt)),
        output_tokens=n_out,
        ttft_ms=(first - t0) * 1e3,
        itl_ms=(last - first) * 1e3 / (n_out - 1) if n_out > 1 else None,
        e2e_ms=(end - t0) * 1e3,
        kv_bytes=int(kv.get("bytes") or 0),
        kv_ms=float(kv.get("ms") or 0.0),
        prefill_ms=float(prefill) if prefill is not None else None,
        prefill_worker=str(ext.get("prefill_worker") or ""),
        decode_worker=str(ext.get("decode_worker") or ""),
    )


async def run_requests(
    args: argparse.Namespace, prompts: list[list[int]], concurrency: int
) -> tuple[list[RequestResult], float]:
    """All prompts with at most ``concurrency`` in flight; returns results and wall seconds."""
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for i in range(args.warmup):  # not measured: first-connection and first-peer costs
            await stream_one(session, args.url, args.model, make_prompts(1, 16, 0, 10_000 + i)[0], 2)

        async def one(p: list[int]) -> RequestResult:
            async with sem:
                return await stream_one(session, args.url, args.model, p, args.max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        return list(results), time.perf_counter() - t0


def reference_prefill_ms(prompts: list[list[int]], dtype: str, threads: int | None) -> list[float]:
    """Prefill time (ms) of each prompt on an in-process engine (first output of a fresh request)."""
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import LLMEngine
    from tandem.engine.weights import prepare_model
    from tandem.protocol import SamplingParams

    engine = LLMEngine(
        EngineConfig(model_dir=prepare_model(), dtype=dtype, num_threads=threads, enable_prefix_caching=False)
    )
    sampling = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.add_request("warmup", prompts[0][:32], sampling)
    while engine.has_unfinished():
        engine.step()
    out = []
    for i, p in enumerate(prompts):
        t0 = time.perf_counter()
        engine.add_request(f"ref-{i}", p, sampling)
        while engine.has_unfinished():
            engine.step()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def summarize(
    args: argparse.Namespace, results: list[RequestResult], wall_s: float, concurrency: int
) -> Summary:
    good = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in good)
    transfers = [r for r in good if r.kv_bytes > 0 and r.kv_ms > 0]
    s = Summary(
        mode=args.mode,
        requests=len(results),
        failed=len(results) - len(good),
        concurrency=concurrency,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        wall_s=wall_s,
        output_tokens=out_tokens,
        output_tok_per_s=out_tokens / wall_s if wall_s > 0 else 0.0,
        ttft_ms=percentiles([r.ttft_ms for r in good]),
        itl_ms=percentiles([r.itl_ms for r in good if r.itl_ms is not None]),
        e2e_ms=percentiles([r.e2e_ms for r in good]),
        kv_transfers=len(transfers),
        errors=sorted({r.error for r in results if not r.ok})[:5],
    )
    if transfers:
        s.kv_bytes_p50 = statistics.median(r.kv_bytes for r in transfers)
        s.kv_gbps = percentiles([r.kv_bytes / r.kv_ms / 1e6 for r in transfers])
        s.kv_gbps["aggregate"] = sum(r.kv_bytes for r in transfers) / sum(r.kv_ms for r in transfers) / 1e6
        s.memcpy_gbps = memcpy_gbps(int(s.kv_bytes_p50))
        s.memcpy_64mib_gbps = memcpy_gbps(64 << 20)
    return s


def fmt_row(name: str, stats: dict[str, float], unit: str) -> str:
    if not stats:
        return f"  {name:<24} {'n/a':>10}"
    cols = "".join(f"{stats.get(k, float('nan')):>10.2f}" for k in ("p50", "p90", "p99", "mean"))
    return f"  {name:<24}{cols}  {unit}"


def render(s: Summary) -> str:
    lines = [
        f"tandem bench: mode={s.mode} requests={s.requests} (failed {s.failed}) concurrency={s.concurrency} "
        f"prompt={s.prompt_tokens} tok max_tokens={s.max_tokens}",
        f"  {'':<24}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}",
        fmt_row("TTFT", s.ttft_ms, "ms"),
        fmt_row("inter-token latency", s.itl_ms, "ms"),
        fmt_row("end-to-end latency", s.e2e_ms, "ms"),
    ]
    if s.overhead_ms:
        lines.append(
            fmt_row("serving overhead", s.overhead_ms, f"ms (TTFT - prefill, {s.prefill_ms_source})")
        )
    lines.append(
        f"  output throughput         {s.output_tok_per_s:.1f} tok/s "
        f"({s.output_tokens} tokens in {s.wall_s:.1f} s)"
    )
    if s.kv_transfers:
        lines.append(fmt_row("KV transfer rate", s.kv_gbps, "GB/s"))
        lines.append(
            f"  KV transfer aggregate     {s.kv_gbps['aggregate']:.2f} GB/s over {s.kv_transfers} transfers "
            f"(median {s.kv_bytes_p50 / 1e6:.2f} MB)"
        )
        lines.append(
            f"  memcpy on this machine    {s.memcpy_gbps:.2f} GB/s at the median transfer size, "
            f"{s.memcpy_64mib_gbps:.2f} GB/s at 64 MiB"
        )
    else:
        lines.append("  KV transfer               none reported (aggregated, cached or short prompts)")
    for err in s.errors:
        lines.append(f"  error: {err}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="frontend base URL")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--mode", choices=("load", "overhead"), default="load")
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--shared-prefix-tokens", type=int, default=0, help="ids common to every prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (overhead mode: 1)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1, help="unmeasured short requests first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    p.add_argument("--reference-engine", choices=("bfloat16", "float32"), default=None,
                   help="overhead mode: prefill the prompts in-process with this dtype when the "
                   "server reports no prefill_ms")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="threads of the reference engine")
    p.add_argument("--json", default=None, help="also write the summary as JSON to this path ('-': stdout)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("prompt_tokens", "max_tokens", "concurrency", "requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    concurrency = 1 if args.mode == "overhead" else args.concurrency
    prompts = make_prompts(args.requests, args.prompt_tokens, args.shared_prefix_tokens, args.seed)
    results, wall_s = asyncio.run(run_requests(args, prompts, concurrency))
    summary = summarize(args, results, wall_s, concurrency)
    if args.mode == "overhead":
        pairs = [(r.ttft_ms, r.prefill_ms) for r in results if r.ok and r.prefill_ms is not None]
        if len(pairs) == sum(r.ok for r in results) and pairs:
            summary.prefill_ms_source = "server prefill_ms"
        elif args.reference_engine:
            ref = reference_prefill_ms(prompts, args.reference_engine, args.threads)
            pairs = [(r.ttft_ms, ms) for r, ms in zip(results, ref, strict=True) if r.ok]
            summary.prefill_ms_source = f"in-process {args.reference_engine} engine"
        else:
            pairs = []
            summary.prefill_ms_source = "unavailable: server reports no prefill_ms; use --reference-engine"
        summary.overhead_ms = percentiles([ttft - prefill for ttft, prefill in pairs])
    print(render(summary))
    if summary.mode == "overhead" and not summary.overhead_ms:
        print(f"  serving overhead          {summary.prefill_ms_source}")
    if args.json:
        text = json.dumps(asdict(summary), indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    return 0 if summary.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
