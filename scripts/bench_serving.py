#!/usr/bin/env python3
"""Serving benchmark, tandem vs NVIDIA Dynamo 1.6.1, both on mock engines, in one run.

    .venv/bin/python scripts/bench_serving.py [--modes agg,disagg] [--speedup 1e6] [--repeat 1]
        [--sides tandem,dynamo] [--router-modes kv] [--workers 2] [--client aiperf|openai]
        [--requests 200] [--concurrency 8] [trace options...] [--json OUT]

For each mode (``agg``: N aggregated workers; ``disagg``: 1 prefill + 1 decode worker) and each
side, a fresh stack is started, the same streaming request trace is sent by the same client
(``serve_bench.py`` from the peer harness, with aiperf when installed), and the stack is stopped.
Sides alternate within a repeat, so both see the same machine (this one drifts ~2.5x between
hours: only same-run ratios count). Printed: req/s, TTFT p50/p99, ITL p50/p99, prefix-cache hit
fraction (server-reported ``cached_tokens``) per run, and tandem/Dynamo ratios.

* tandem: ``python -m tandem.services.launcher --engine mock`` (real frontend, router, indexer;
  mock workers: real scheduler, KV block manager and events; Dynamo's timing model divided by
  ``--speedup``), with Dynamo's stack settings (block size 16, 4096 blocks per worker) and its
  mocker's batch limits (256 sequences, 8192 tokens per step).
* Dynamo: ``dynamo_stack.sh up agg|disagg --speedup X`` (2 mockers or 1 prefill + 1 decode
  mocker, frontend with ``--router-mode kv``). Needs ``bash ../shared/peers/setup.sh`` first.
  With ``--workers`` other than 2 or a router mode other than ``kv``, the same processes are
  started by this script (same environment and mocker flags as ``dynamo_stack.sh``).

Trace options (``--system-tokens``, ``--user-tokens``, ``--output-tokens``, ``--system-prompts``,
``--max-turns``, ``--seed``) go to ``serve_bench.py`` unchanged (``workload.py trace``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PEERS_ROOT = Path(os.environ.get("PEERS_ROOT", "/tmp/peers"))
TANDEM_MODEL = "smollm2-135m-instruct"
DYNAMO_MODEL = "smollm2"
BLOCK_SIZE = 16
BLOCKS_PER_WORKER = 4096
#: Dynamo 1.6.1 mocker's defaults (``python -m dynamo.mocker --help``), given to tandem's mock
#: workers too so both sides batch alike (tandem's own defaults suit the CPU model).
MOCKER_MAX_NUM_SEQS = 256
MOCKER_MAX_NUM_BATCHED_TOKENS = 8192
METRICS = ("req_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "cache_hit_frac")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_bench(
    args: argparse.Namespace, base_url: str, model: str, label: str, out_dir: Path
) -> dict[str, Any]:
    """Run the peer harness's client against ``base_url``; its JSON result."""
    out = out_dir / f"{label}.json"
    cmd = [
        str(args.peer_python),
        str(args.peers / "serve_bench.py"),
        "--base-url",
        base_url,
        "--model",
        model,
        "--client",
        args.client,
        "--requests",
        str(args.requests),
        "--concurrency",
        str(args.concurrency),
        "--label",
        label,
        "--out",
        str(out),
        *args.trace_args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"serve_bench failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def run_tandem(args: argparse.Namespace, mode: str, router_mode: str, out_dir: Path) -> dict[str, Any]:
    port = free_port()
    log_dir = out_dir / f"tandem-{mode}-{router_mode}-logs"
    topo = (
        ["--aggregated", "--decode", str(args.workers)]
        if mode == "agg"
        else ["--prefill", "1", "--decode", "1"]
    )
    cmd = [
        sys.executable,
        "-m",
        "tandem.services.launcher",
        "--engine",
        "mock",
        "--speedup-ratio",
        str(args.speedup),
        "--block-size",
        str(BLOCK_SIZE),
        "--num-gpu-blocks-override",
        str(BLOCKS_PER_WORKER),
        "--max-num-seqs",
        str(MOCKER_MAX_NUM_SEQS),
        "--max-num-batched-tokens",
        str(MOCKER_MAX_NUM_BATCHED_TOKENS),
        # One worker per process, as Dynamo runs one mocker per process (tandem's default hosts
        # up to 64 mock workers in one process, i.e. on one core).
        "--workers-per-process",
        "1",
        "--router-mode",
        router_mode,
        "--port",
        str(port),
        "--log-dir",
        str(log_dir),
        "--log-level",
        "warning",
        *(["--model-dir", str(args.model_dir)] if args.model_dir else []),
        *topo,
        *args.tandem_args,
    ]
    stdout = open(out_dir / f"tandem-{mode}-{router_mode}.out", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=stdout, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while "tandem is ready" not in Path(stdout.name).read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tandem did not start:\n{Path(stdout.name).read_text()[-3000:]}")
            time.sleep(0.3)
        label = f"tandem-{mode}-{router_mode}-s{args.speedup:g}{args.label_suffix}"
        return serve_bench(args, f"http://127.0.0.1:{port}/v1", TANDEM_MODEL, label, out_dir)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        stdout.close()


def run_dynamo(args: argparse.Namespace, mode: str, out_dir: Path) -> dict[str, Any]:
    port = free_port()
    stack = args.peers / "dynamo_stack.sh"
    up = [
        "bash",
        str(stack),
        "up",
        mode,
        "--speedup",
        str(args.speedup),
        "--port",
        str(port),
        "--nats-port",
        str(free_port()),
        "--block-size",
        str(BLOCK_SIZE),
        "--blocks",
        str(BLOCKS_PER_WORKER),
    ]
    proc = subprocess.run(up, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"dynamo_stack up failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    try:
        label = f"dynamo-{mode}-kv-s{args.speedup:g}{args.label_suffix}"
        return serve_bench(args, f"http://127.0.0.1:{port}/v1", DYNAMO_MODEL, label, out_dir)
    finally:
        subprocess.run(["bash", str(stack), "down"], capture_output=True, text=True, timeout=120)


def _dynamo_env(args: argparse.Namespace, nats_port: int, run_dir: Path) -> dict[str, str]:
    """The peer harness's Dynamo environment (``dynamo_stack.sh env``), with our own run dir."""
    out = subprocess.run(
        ["bash", str(args.peers / "dynamo_stack.sh"), "env", str(nats_port)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    env = dict(os.environ)
    for line in out.splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export ") :].partition("=")
            env[key] = value
    env["DYN_FILE_KV"] = str(run_dir / "kvstore")
    env["XDG_CACHE_HOME"] = str(run_dir / "cache")
    env["DYN_LOG"] = "warn"
    return env


def _wait_http(url: str, body: bytes | None, deadline: float) -> bool:
    import urllib.request

    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def run_dynamo_custom(args: argparse.Namespace, mode: str, router_mode: str, out_dir: Path) -> dict[str, Any]:
    """Dynamo with ``--workers`` aggregated mockers (or 1 + 1 disaggregated) and any router mode,
    started like ``dynamo_stack.sh`` does (same environment, same mocker flags)."""
    run_dir = Path(tempfile.mkdtemp(prefix="dynamo-", dir=out_dir))
    port, nats_port = free_port(), free_port()
    env = _dynamo_env(args, nats_port, run_dir)
    py = str(args.peer_python)
    common = [
        "--model-path", str(PEERS_ROOT / "smollm2-dir"), "--model-name", DYNAMO_MODEL,
        "--num-gpu-blocks-override", str(BLOCKS_PER_WORKER), "--block-size", str(BLOCK_SIZE),
        "--speedup-ratio", str(args.speedup),
    ]  # fmt: skip
    cmds: list[list[str]] = [
        [str(PEERS_ROOT / "venv" / "bin" / "nats-server"), "-a", "127.0.0.1", "-p", str(nats_port), "-js",
         "-sd", str(run_dir / "js")],
    ]  # fmt: skip
    if mode == "agg":
        cmds += [[py, "-m", "dynamo.mocker", *common] for _ in range(args.workers)]
    else:
        cmds += [
            [py, "-m", "dynamo.mocker", *common, "--disaggregation-mode", m] for m in ("prefill", "decode")
        ]
    cmds.append(
        [py, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(port),
         "--router-mode", router_mode]
    )  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for i, cmd in enumerate(cmds):
            log = open(run_dir / f"proc-{i}.log", "wb")  # noqa: SIM115
            logs.append(log)
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
            if i == 0:
                time.sleep(1.0)
        body = json.dumps(
            {"model": DYNAMO_MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
        ).encode()
        if not _wait_http(f"http://127.0.0.1:{port}/v1/chat/completions", body, time.monotonic() + 240):
            raise RuntimeError(f"Dynamo did not become ready (logs in {run_dir})")
        time.sleep(3.0)  # let every mocker register with the router
        label = f"dynamo-{mode}-{router_mode}-w{args.workers}-s{args.speedup:g}{args.label_suffix}"
        return serve_bench(args, f"http://127.0.0.1:{port}/v1", DYNAMO_MODEL, label, out_dir)
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
        for proc in reversed(procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for log in logs:
            log.close()


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    return (
        f"{v:.3f}"
        if isinstance(v, float) and abs(v) < 10
        else (f"{v:.1f}" if isinstance(v, float) else str(v))
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=Path, default=REPO.parent / "shared" / "peers", help="peer harness dir")
    ap.add_argument("--peer-python", type=Path, default=PEERS_ROOT / "venv" / "bin" / "python")
    ap.add_argument(
        "--model-dir", type=Path, default=None, help="tandem's model dir (default: its prepared one)"
    )
    ap.add_argument("--modes", default="agg,disagg")
    ap.add_argument("--sides", default="tandem,dynamo")
    ap.add_argument("--router-modes", default="kv", help="tandem --router-mode values, comma-separated")
    ap.add_argument("--workers", type=int, default=2, help="aggregated workers (agg mode)")
    ap.add_argument("--speedup", type=float, default=1e6, help="--speedup-ratio of both mockers")
    ap.add_argument("--client", default="aiperf", choices=["aiperf", "openai", "auto"])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", type=Path, default=None, help="write every run and the ratios here")
    ap.add_argument(
        "--tandem-arg",
        action="append",
        default=[],
        dest="tandem_args",
        help="extra launcher flag for tandem (repeatable, e.g. --tandem-arg=--router-temperature=0.5)",
    )
    args, trace_args = ap.parse_known_args()
    args.trace_args = trace_args
    if not (args.peers / "serve_bench.py").exists():
        ap.error(f"peer harness not found in {args.peers} (--peers)")
    if not args.peer_python.exists():
        ap.error(f"{args.peer_python} missing: run bash {args.peers}/setup.sh first")
    sides = args.sides.split(",")
    router_modes = args.router_modes.split(",")
    out_dir = Path(tempfile.mkdtemp(prefix="tandem-bench-serving-"))
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        args.label_suffix = f"-r{rep}" if args.repeat > 1 else ""  # one artifact dir per run
        for mode in args.modes.split(","):
            for side in sides:
                if side == "dynamo":
                    todo = [("dynamo", rm) for rm in router_modes]
                else:
                    todo = [("tandem", rm) for rm in router_modes]
                for who, rm in todo:
                    t0 = time.monotonic()
                    custom = args.workers != 2 or rm != "kv"
                    res = (
                        (
                            run_dynamo_custom(args, mode, rm, out_dir)
                            if custom
                            else run_dynamo(args, mode, out_dir)
                        )
                        if who == "dynamo"
                        else run_tandem(args, mode, rm, out_dir)
                    )
                    flat = {
                        "req_per_s": res.get("req_per_s"),
                        "ttft_p50_ms": (res.get("ttft_ms") or {}).get("p50"),
                        "ttft_p99_ms": (res.get("ttft_ms") or {}).get("p99"),
                        "itl_p50_ms": (res.get("itl_ms") or {}).get("p50"),
                        "itl_p99_ms": (res.get("itl_ms") or {}).get("p99"),
                        "cache_hit_frac": res.get("cache_hit_frac"),
                        "completed": res.get("completed"),
                        "errors": res.get("errors"),
                        "client": res.get("client"),
                    }
                    row = {
                        "side": who,
                        "mode": mode,
                        "router_mode": rm,
                        "repeat": rep,
                        **flat,
                    }
                    runs.append(row)
                    print(
                        f"{who:7s} {mode:6s} {rm:12s} "
                        + " ".join(f"{k}={fmt(row[k])}" for k in METRICS)
                        + f" ({time.monotonic() - t0:.0f} s)",
                        file=sys.stderr,
                    )

    print(f"\n{'side':8s}{'mode':8s}{'router':13s}" + "".join(f"{m:>15s}" for m in METRICS))
    for r in runs:
        print(
            f"{r['side']:8s}{r['mode']:8s}{r['router_mode']:13s}"
            + "".join(f"{fmt(r[m]):>15s}" for m in METRICS)
        )
    ratios: list[dict[str, Any]] = []
    for mode in args.modes.split(","):
        for rm in router_modes:
            dyn = [r for r in runs if r["side"] == "dynamo" and r["mode"] == mode and r["router_mode"] == rm]
            tan = [r for r in runs if r["side"] == "tandem" and r["mode"] == mode and r["router_mode"] == rm]
            if not dyn or not tan:
                continue
            d, t = dyn[-1], tan[-1]
            ratio = {m: (t[m] / d[m] if t[m] is not None and d[m] else None) for m in METRICS}
            ratios.append({"mode": mode, "router_mode": rm, **ratio})
            print(f"ratio   {mode:8s}{rm:13s}" + "".join(f"{fmt(ratio[m]):>15s}" for m in METRICS))
    # Same side, same repeat: every router mode's TTFT p50/p99 over the last mode's (e.g.
    # ``--router-modes kv,round-robin``: kv / round-robin). Only same-run ratios mean anything.
    policy_ratios: list[dict[str, Any]] = []
    if len(router_modes) > 1:
        base_rm = router_modes[-1]
        for r in runs:
            if r["router_mode"] == base_rm:
                continue
            base = [
                b
                for b in runs
                if (b["side"], b["mode"], b["repeat"], b["router_mode"])
                == (r["side"], r["mode"], r["repeat"], base_rm)
            ]
            if not base:
                continue
            b = base[0]
            pr = {
                m: (r[m] / b[m] if r[m] is not None and b[m] else None)
                for m in ("ttft_p50_ms", "ttft_p99_ms")
            }
            policy_ratios.append(
                {
                    "side": r["side"],
                    "mode": r["mode"],
                    "repeat": r["repeat"],
                    "ratio": f"{r['router_mode']}/{base_rm}",
                    **pr,
                }
            )
            print(
                f"{r['side']:8s}{r['mode']:8s}rep {r['repeat']}  {r['router_mode']}/{base_rm}: "
                f"TTFT p50 {fmt(pr['ttft_p50_ms'])}  p99 {fmt(pr['ttft_p99_ms'])}"
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"runs": runs, "ratios": ratios, "policy_ratios": policy_ratios, "artifacts": str(out_dir)},
                indent=2,
            )
        )
    print(f"(artifacts in {out_dir})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
