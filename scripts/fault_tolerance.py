#!/usr/bin/env python3
"""Fault-tolerance suite: Dynamo's scenario — N clients × M streaming greedy requests, one process
killed (or restarted) during the run — for each fault tandem must survive (issue 6).

    .venv/bin/python scripts/fault_tolerance.py [--scenarios all|decode_killed,...]
        [--clients 8] [--requests 100] [--fault-at 30] [--engine mock|model]
        [--max-tokens 64] [--speedup-ratio 1] [--deterministic] [--json OUT]

For each scenario this script starts its own ``nats-server`` (JetStream, a store directory, so a
restart keeps the streams) and the topology from the launcher's own plan
(:func:`tandem.services.launch_plan.plan_processes`, plus router replicas where the scenario
needs them), so it can kill and restart any single process. Then:

1. **Baseline**: every client sends its requests (chat completions, ``stream: true``,
   ``temperature: 0``, a fixed ``seed``) with no fault; the outputs are kept.
2. **Fault run**: the same requests again; at ``--fault-at`` seconds the scenario's fault
   happens (SIGKILL, and for ``*_restarted`` a fresh process with the same command line 1 s
   later; ``nats_restarted`` restarts the server on the same port and store).
3. Every request is classified: *succeeded* (complete stream, ``[DONE]``), *failed* (an HTTP error
   or an error event), *hung* (no end within ``--request-timeout``); *equal* counts successes
   whose text equals the baseline's for the same request.
4. *recovery_s*: the longest silence between two chunks of any stream in flight at the fault,
   i.e. how long the worst-hit client waited (the fault-free run's longest is printed too).
5. *served_after_s*: after the run, how long until a fresh request succeeds (the stack serves
   again; matters when no spare existed).
6. *stranded*: after the run every live worker reports its pool (``check_integrity``); blocks in
   use or pinned once idle, and integrity failures, are stranded.

Scenarios (``--scenarios``): ``decode_killed`` (2 decode workers, one killed: requests migrate),
``prefill_killed`` (2 prefill workers, one killed), ``decode_restarted`` (the only decode worker
killed, restarted 1 s later), ``indexer_restarted``, ``router_killed`` (2 router replicas, one
killed), ``nats_restarted``, ``nats_node_killed`` (a 3-node JetStream cluster, every stream and
bucket R3; the node leading the KV-events stream is killed and stays down); and ``none`` (no
fault: two runs of the same requests, e.g. to count outputs that differ between them without
``--deterministic``). CI runs a 2-client × 10-request version of each fault
(``tests/e2e/test_faults.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tandem.protocol import Subjects  # noqa: E402
from tandem.protocol.messages import ErrorReply, InstanceInfo, WorkerStats, WorkerStatsRequest, encode  # noqa: E402
from tandem.services.auth import server_list  # noqa: E402
from tandem.services.launch_plan import ProcessSpec, child_env, parse_args, plan_processes  # noqa: E402

SCENARIOS = (
    "decode_killed",
    "prefill_killed",
    "decode_restarted",
    "indexer_restarted",
    "router_killed",
    "nats_restarted",
    "nats_node_killed",
    "none",
)
#: Per scenario: topology flags (on top of the engine flags) and the process to hit.
TOPOLOGY: dict[str, tuple[list[str], str]] = {
    "decode_killed": (["--prefill", "1", "--decode", "2"], "decode-0"),
    "prefill_killed": (["--prefill", "2", "--decode", "2"], "prefill-0"),
    "decode_restarted": (["--prefill", "1", "--decode", "1"], "decode-0"),
    "indexer_restarted": (["--prefill", "1", "--decode", "2"], "indexer"),
    "router_killed": (["--prefill", "1", "--decode", "2"], "router"),
    "nats_restarted": (["--prefill", "1", "--decode", "2"], "nats"),
    "nats_node_killed": (["--prefill", "1", "--decode", "2", "--nats-cluster", "3"], "nats"),
    "none": (["--prefill", "1", "--decode", "2"], ""),
}
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- processes -------------------------------------------------------------------------------------


class NatsServer:
    """A nats-server with JetStream on a fixed port and store directory (restartable), or with
    ``nodes`` > 1 a local JetStream cluster of that many (the launcher's ``--nats-cluster``
    layout: :func:`tandem.services.nats_embedded.plan_cluster`, no client authentication)."""

    def __init__(self, log_dir: Path, nodes: int = 1) -> None:
        from tandem.services.auth import new_password
        from tandem.services.nats_embedded import cluster_url, nats_argv, plan_cluster

        self.log_dir = log_dir
        self.store = log_dir / "nats-store"
        self.store.mkdir(parents=True, exist_ok=True)
        if nodes == 1:
            self.port = free_port()
            self.nodes = [("nats", self.port, nats_argv(str(self.store), self.port))]
            self.url = f"nats://127.0.0.1:{self.port}"
        else:
            planned = plan_cluster(nodes, log_dir, self.store, new_password())
            self.nodes = [(n.name, n.port, n.argv) for n in planned]
            self.url = cluster_url(planned, None)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * len(self.nodes)
        #: The node :meth:`kill_stream_leader` killed (its server name), for the report.
        self.killed: str | None = None

    def start(self) -> None:
        for i in range(len(self.nodes)):
            self.start_node(i)

    def start_node(self, i: int) -> None:
        name, port, argv = self.nodes[i]
        with (self.log_dir / f"{name}.log").open("ab") as out:
            self.procs[i] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not start")

    def kill(self, i: int = 0) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(10)

    async def kill_stream_leader(self, stream: str) -> str:
        """SIGKILL the node leading ``stream`` (the worst node to lose); return its server name."""
        import nats

        from tandem.services.auth import server_list

        nc = await nats.connect(server_list(self.url), connect_timeout=2)
        try:
            info = await nc.jetstream().stream_info(stream)
        finally:
            await nc.close()
        leader = info.cluster.leader if info.cluster is not None else None
        index = int(leader.rsplit("-", 1)[1]) if leader else 0
        self.kill(index)
        self.killed = leader or self.nodes[0][0]
        return self.killed

    def stop(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


@dataclass
class Proc:
    spec: ProcessSpec
    popen: subprocess.Popen[bytes]


class Topology:
    """The tandem processes of one scenario, started from the launcher's plan."""

    def __init__(self, launch_args: list[str], nats: NatsServer, log_dir: Path, routers: int = 1) -> None:
        self.port = free_port()
        self.namespace = f"ft{os.getpid()}x{int(time.time() * 1000) % 100000}"
        cfg = parse_args([*launch_args, "--port", str(self.port), "--namespace", self.namespace])
        specs = plan_processes(cfg, nats.url)
        extra = [
            ProcessSpec(f"router-{i}", "router", next(s.args for s in specs if s.service == "router"))
            for i in range(1, routers)
        ]
        self.specs = specs[:2] + extra + specs[2:]
        self.cfg = cfg
        self.nats = nats
        self.log_dir = log_dir
        self.procs: dict[str, Proc] = {}
        self.base_url = f"http://127.0.0.1:{self.port}"

    def _spawn(self, spec: ProcessSpec) -> Proc:
        log = (self.log_dir / f"{spec.name}.log").open("ab")
        env = child_env(spec, dict(os.environ))
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        popen = subprocess.Popen(
            spec.argv(), cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        proc = self.procs[spec.name] = Proc(spec, popen)
        return proc

    async def start(self, ready_timeout_s: float = 300.0) -> None:
        for spec in self.specs:
            self._spawn(spec)
        deadline = time.monotonic() + ready_timeout_s
        async with aiohttp.ClientSession() as session:
            while True:
                for p in self.procs.values():
                    if p.popen.poll() is not None:
                        raise RuntimeError(f"{p.spec.name} exited with {p.popen.returncode} at start")
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with session.get(f"{self.base_url}/ready", timeout=aiohttp.ClientTimeout(2)) as r:
                        if r.status == 200 and len(await self.instances()) == self.cfg.num_workers:
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"topology not ready in {ready_timeout_s:.0f} s (logs in {self.log_dir})"
                    )
                await asyncio.sleep(0.3)

    def kill(self, name: str) -> None:
        p = self.procs[name]
        if p.popen.poll() is None:
            os.kill(p.popen.pid, signal.SIGKILL)
            p.popen.wait(10)

    def restart(self, name: str) -> None:
        self._spawn(self.procs[name].spec)

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.popen.wait(30)
            except subprocess.TimeoutExpired:
                p.popen.kill()

    async def instances(self) -> dict[str, InstanceInfo]:
        import msgspec
        import nats

        subjects = Subjects(self.namespace)
        # Every node is tried once (a dead cluster node is skipped for the next).
        nc = await nats.connect(server_list(self.nats.url), connect_timeout=2, max_reconnect_attempts=1)
        try:
            try:
                kv = await nc.jetstream().key_value(subjects.instances_bucket)
                keys = await kv.keys()
            except Exception:
                return {}
            out = {}
            for key in keys:
                with contextlib.suppress(Exception):
                    entry = await kv.get(key)
                    if entry.value:
                        info = msgspec.msgpack.decode(entry.value, type=InstanceInfo)
                        out[info.instance_id] = info
            return out
        finally:
            await nc.close()

    async def pool_report(self, settle_s: float = 15.0) -> dict[str, Any]:
        """Every registered worker's pool once idle: stranded blocks and integrity."""
        import msgspec
        import nats

        subjects = Subjects(self.namespace)
        infos = await self.instances()
        deadline = time.monotonic() + settle_s
        while not infos and time.monotonic() < deadline:  # the bucket may be electing a leader
            await asyncio.sleep(0.5)
            infos = await self.instances()
        nc = await nats.connect(server_list(self.nats.url), connect_timeout=2)
        decoder = msgspec.msgpack.Decoder(WorkerStats | ErrorReply)
        report: dict[str, Any] = {"workers": 0, "in_use": 0, "pinned": 0, "integrity_failures": []}
        try:
            deadline = time.monotonic() + settle_s
            for wid in sorted(infos):
                while True:
                    try:
                        msg = await nc.request(
                            subjects.worker_debug(wid),
                            encode(WorkerStatsRequest(check_integrity=True)),
                            timeout=10,
                        )
                        st = decoder.decode(msg.data)
                    except Exception as e:  # a worker that is gone: not counted
                        st = ErrorReply(code=503, message=repr(e))
                    if not isinstance(st, WorkerStats):
                        break
                    idle = st.in_use_blocks == 0 and st.pinned_blocks == 0 and st.pending_transfers == 0
                    if idle or time.monotonic() > deadline:
                        report["workers"] += 1
                        report["in_use"] += st.in_use_blocks
                        report["pinned"] += st.pinned_blocks
                        if not st.integrity_ok:
                            report["integrity_failures"].append(f"{wid}: {st.integrity_error}")
                        break
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()
        return report


# ---- clients ---------------------------------------------------------------------------------------


@dataclass
class Result:
    client: int
    index: int
    status: str = "hung"  # succeeded | failed | hung
    text: str = ""
    error: str = ""
    started: float = 0.0
    ended: float = 0.0
    chunk_times: list[float] = field(default_factory=list)


def request_body(client: int, index: int, max_tokens: int) -> dict[str, Any]:
    topic = ("rivers", "stars", "bridges", "forests", "engines", "cities", "music", "glaciers")[
        (client + index) % 8
    ]
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": f"You are assistant number {client}. Answer briefly."},
            {
                "role": "user",
                "content": f"Request {index}: tell me about {topic}, item {index * 7 + client}.",
            },
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 1000 * client + index,
        "stream": True,
    }


async def one_request(
    session: aiohttp.ClientSession, base_url: str, res: Result, body: dict[str, Any], timeout_s: float
) -> None:
    res.started = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    res.status, res.error = "failed", f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return
                parts: list[str] = []
                async for raw in resp.content:
                    line = raw.decode(errors="replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    res.chunk_times.append(time.monotonic())
                    if data == "[DONE]":
                        res.status, res.text = "succeeded", "".join(parts)
                        return
                    obj = json.loads(data)
                    if "error" in obj:
                        res.status, res.error = "failed", str(obj["error"].get("message", obj["error"]))[:200]
                        return
                    for choice in obj.get("choices", []):
                        parts.append((choice.get("delta") or {}).get("content") or "")
                res.status, res.error = "failed", "stream ended without [DONE]"
    except TimeoutError:
        res.status, res.error = "hung", f"no end within {timeout_s:g} s"
    except (aiohttp.ClientError, OSError) as e:
        res.status, res.error = "failed", f"{type(e).__name__}: {e}"
    finally:
        res.ended = time.monotonic()


async def run_clients(
    base_url: str, clients: int, requests: int, max_tokens: int, timeout_s: float
) -> list[Result]:
    results = [Result(c, i) for c in range(clients) for i in range(requests)]
    connector = aiohttp.TCPConnector(limit=clients * 2)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:

        async def client(c: int) -> None:
            for i in range(requests):
                await one_request(
                    session, base_url, results[c * requests + i], request_body(c, i, max_tokens), timeout_s
                )

        await asyncio.gather(*(client(c) for c in range(clients)))
    return results


def longest_gap(results: list[Result], at: float | None) -> float:
    """Longest silence (s) between consecutive chunks (from the request's start) of any request in
    flight at ``at`` (every request when None)."""
    worst = 0.0
    for r in results:
        if at is not None and not (r.started <= at <= (r.ended or at)):
            continue
        times = [r.started, *r.chunk_times]
        worst = max(worst, max((b - a for a, b in itertools.pairwise(times)), default=0.0))
    return worst


async def served_again(
    topo: Topology, max_tokens: int, timeout_s: float, within_s: float = 60.0
) -> float | None:
    """Seconds until a fresh request succeeds after the run (None: not within ``within_s``)."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - t0 < within_s:
            res = Result(-1, 0)
            await one_request(session, topo.base_url, res, request_body(99, 0, max_tokens), timeout_s)
            if res.status == "succeeded":
                return round(time.monotonic() - t0, 3)
            await asyncio.sleep(0.5)
    return None


# ---- scenarios -------------------------------------------------------------------------------------


async def inject(topo: Topology, scenario: str, target: str) -> None:
    if scenario == "none":
        return
    if scenario == "nats_restarted":
        topo.nats.kill()
        await asyncio.sleep(2.0)
        topo.nats.start()
        return
    if scenario == "nats_node_killed":
        await topo.nats.kill_stream_leader(Subjects(topo.namespace).kv_events_stream)
        return
    topo.kill(target)
    if scenario in ("decode_restarted", "indexer_restarted"):
        await asyncio.sleep(1.0)
        topo.restart(target)


async def run_scenario(scenario: str, args: argparse.Namespace, log_root: Path) -> dict[str, Any]:
    flags, target = TOPOLOGY[scenario]
    engine = ["--engine", args.engine]
    if args.engine == "mock":
        engine += ["--speedup-ratio", str(args.speedup_ratio), "--workers-per-process", "1"]
    if args.deterministic:
        engine += ["--deterministic"]
    log_dir = log_root / scenario
    log_dir.mkdir(parents=True, exist_ok=True)
    nats = NatsServer(log_dir, nodes=3 if scenario == "nats_node_killed" else 1)
    nats.start()
    topo = Topology(
        [*engine, *flags, *args.extra], nats, log_dir, routers=2 if scenario == "router_killed" else 1
    )
    out: dict[str, Any] = {"scenario": scenario, "target": target, "total": args.clients * args.requests}
    try:
        await topo.start()
        base = await run_clients(
            topo.base_url, args.clients, args.requests, args.max_tokens, args.request_timeout
        )
        out["baseline_failed"] = sum(r.status != "succeeded" for r in base)
        out["baseline_gap_s"] = round(longest_gap(base, None), 3)
        t0 = time.monotonic()
        run = asyncio.create_task(
            run_clients(topo.base_url, args.clients, args.requests, args.max_tokens, args.request_timeout)
        )
        await asyncio.sleep(args.fault_at)
        fault_at = time.monotonic()
        if run.done():
            out["note"] = "the run ended before the fault: raise --requests or lower --fault-at"
        await inject(topo, scenario, target)
        results = await run
        out["run_s"] = round(time.monotonic() - t0, 2)
        by_key = {(r.client, r.index): r for r in base}
        out["succeeded"] = sum(r.status == "succeeded" for r in results)
        out["failed"] = sum(r.status == "failed" for r in results)
        out["hung"] = sum(r.status == "hung" for r in results)
        out["equal"] = sum(
            r.status == "succeeded"
            and by_key[(r.client, r.index)].status == "succeeded"
            and r.text == by_key[(r.client, r.index)].text
            for r in results
        )
        out["in_flight_at_fault"] = sum(r.started <= fault_at <= r.ended for r in results)
        out["recovery_s"] = round(longest_gap(results, fault_at), 3)
        out["served_after_s"] = await served_again(topo, args.max_tokens, args.request_timeout)
        errors = sorted({r.error for r in results if r.error})
        out["errors"] = errors[:5]
        out["stranded"] = await topo.pool_report()
        if nats.killed:
            out["target"] = nats.killed
    finally:
        topo.stop()
        nats.stop()
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = (
        "scenario",
        "total",
        "succeeded",
        "failed",
        "hung",
        "equal",
        "in_flight_at_fault",
        "recovery_s",
        "baseline_gap_s",
        "served_after_s",
    )
    print(" | ".join(cols) + " | stranded (in use / pinned / integrity)")
    for r in rows:
        s = r.get("stranded", {})
        bad = len(s.get("integrity_failures", [])) or "ok"
        strand = f"{s.get('in_use', '?')} / {s.get('pinned', '?')} / {bad}"
        print(" | ".join(str(r.get(c, "-")) for c in cols) + f" | {strand}")
        for e in r.get("errors", []):
            print(f"    error: {e}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default="all", help=f"comma list of {', '.join(SCENARIOS)} (or all)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=100, help="requests per client")
    p.add_argument("--fault-at", type=float, default=30.0, help="seconds into the fault run")
    p.add_argument("--engine", choices=("mock", "model"), default="mock")
    p.add_argument("--speedup-ratio", type=float, default=1.0, help="mock timing divisor")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--deterministic", action="store_true", help="start workers with --deterministic")
    p.add_argument(
        "--request-timeout", type=float, default=120.0, help="a request not done by then is hung (s)"
    )
    p.add_argument("--log-dir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("extra", nargs="*", help="more launcher flags (after --)")
    return p


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    names = SCENARIOS[:-1] if args.scenarios == "all" else tuple(args.scenarios.split(","))
    for n in names:
        if n not in SCENARIOS:
            raise SystemExit(f"unknown scenario {n!r}")
    log_root = args.log_dir or Path(tempfile.mkdtemp(prefix="tandem-ft-"))
    rows = []
    for n in names:
        print(f"# {n} ...", flush=True)
        row = await run_scenario(n, args, log_root)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"# logs: {log_root}")
    return rows


def main() -> int:
    args = build_parser().parse_args()
    rows = asyncio.run(main_async(args))
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    ok = all(
        r["succeeded"] == r["total"]
        and r["equal"] == r["total"]
        and r["stranded"]["in_use"] == 0
        and r["stranded"]["pinned"] == 0
        and not r["stranded"]["integrity_failures"]
        for r in rows
    )
    return 0 if ok else 1


__all__ = ["SCENARIOS", "NatsServer", "Result", "Topology", "asdict", "main_async", "run_scenario"]

if __name__ == "__main__":
    sys.exit(main())
