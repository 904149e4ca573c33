"""A 3-node JetStream cluster with TLS, end to end: ``launcher --nats-cluster 3 --nats-tls``.

The launcher starts three nats-servers (routes on loopback, TLS required from clients, the
generated users and permissions) and 1 prefill + 2 decode mock workers. Checked:

* plain TCP and anonymous TLS logins are refused; the client credential over TLS works;
* the KV-events stream, the instances bucket and the indexer's snapshot store are R3;
* while 2 clients stream requests, the node leading the KV-events stream is SIGKILLed: every
  request completes (a stream cut by the lost connection migrates), the launcher restarts the
  node, KV events keep reaching the stream (none dropped), and the stack serves afterwards;
* no node logged a permission violation, and the launcher stops everything with status 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from tandem.protocol import Subjects
from tandem.services.auth import NatsAuth, password_file, server_list
from tandem.services.indexer_snapshot import snapshot_bucket
from tests.conftest import free_port
from tests.e2e.conftest import launch_until_ready, log_tails

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

NS = "e2e-cluster"
MODEL = "smollm2-135m-instruct"


@dataclass
class Cluster:
    proc: subprocess.Popen[str]
    base_url: str
    log_dir: Path
    auth_dir: Path
    out_path: Path
    nats_url: str = ""

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def login(self, user: str) -> dict[str, Any]:
        auth = NatsAuth(
            nats_user=user,
            nats_password_file=str(password_file(self.auth_dir, user)),
            nats_tls_ca=str(self.auth_dir / "nats-ca.pem"),
        )
        return auth.connect_options()

    def node_pid(self, index: int) -> int:
        out = self.output()
        m = re.search(r"NATS cluster \(JetStream, R3, TLS\) at \S+, pid (\d+), (\d+), (\d+),", out)
        assert m, out[-2000:]
        pids = [int(m.group(index + 1))]
        pids += [int(p) for p in re.findall(rf"launcher: restarted nats-{index} \(pid \d+ -> (\d+)", out)]
        return pids[-1]


def _start(tmp: Path) -> Cluster:
    port = free_port()
    log_dir, auth_dir, out_path = tmp / "logs", tmp / "auth", tmp / "launcher.out"
    log_dir.mkdir(parents=True)
    args = [
        "--nats-cluster", "3", "--nats-tls",
        "--port", str(port), "--namespace", NS, "--log-dir", str(log_dir),
        "--nats-auth-dir", str(auth_dir), "--ready-timeout", "120",
        "--engine", "mock", "--speedup-ratio", "20", "--workers-per-process", "1",
        "--prefill", "1", "--decode", "2", "--disagg-min-tokens", "0",
    ]  # fmt: skip
    proc = launch_until_ready(args, out_path, log_dir)
    run = Cluster(proc, f"http://127.0.0.1:{port}", log_dir, auth_dir, out_path)
    m = re.search(r"NATS cluster \(JetStream, R3, TLS\) at (\S+), pid", run.output())
    if m is None:  # stop what was started before failing, or it outlives the test session
        _stop(run)
        raise AssertionError(f"no NATS cluster line in the launcher's output:\n{run.output()[-3000:]}")
    run.nats_url = m.group(1)
    return run


def _stop(run: Cluster) -> int:
    if run.proc.poll() is None:
        run.proc.send_signal(signal.SIGTERM)
    try:
        return run.proc.wait(90)
    except subprocess.TimeoutExpired:
        run.proc.kill()
        return run.proc.wait(10)


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    run = await asyncio.to_thread(_start, tmp_path_factory.mktemp("cluster"))
    try:
        yield run
    finally:
        await asyncio.to_thread(_stop, run)


async def _stream(session: aiohttp.ClientSession, run: Cluster, i: int) -> str:
    """One streaming chat request; returns 'ok' or what went wrong."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"request {i}: tell me about rivers"}],
        "max_tokens": 24,
        "ignore_eos": True,
        "stream": True,
    }
    async with session.post(f"{run.base_url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            return f"HTTP {resp.status}: {(await resp.text())[:200]}"
        async for raw in resp.content:
            line = raw.decode(errors="replace").strip()
            if line == "data: [DONE]":
                return "ok"
            if line.startswith("data:") and '"error"' in line:
                return line[:300]
    return "stream ended without [DONE]"


async def test_tls_and_credentials_are_required(cluster: Cluster) -> None:
    servers = server_list(cluster.nats_url)
    assert len(servers) == 3 and all(u.startswith("tls://127.0.0.1:") for u in servers)
    plain = servers[0].replace("tls://", "nats://")
    with pytest.raises(Exception):  # noqa: B017 - the server insists on TLS: any refusal will do
        await nats.connect(plain, allow_reconnect=False, connect_timeout=2)
    ctx = ssl.create_default_context(cafile=str(cluster.auth_dir / "nats-ca.pem"))
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(servers[0], tls=ctx, allow_reconnect=False, connect_timeout=2)
    nc = await nats.connect(servers, allow_reconnect=False, **cluster.login("client"))
    try:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "ignore_eos": True}
        msg = await nc.request(Subjects(NS).completions, json.dumps(body).encode(), timeout=60)
        assert json.loads(msg.data)["choices"][0]["text"]
    finally:
        await nc.close()


async def test_streams_and_buckets_are_replicated(cluster: Cluster) -> None:
    s = Subjects(NS)
    # The indexer's own login: it may look at all three (the launcher's may not see the snapshot).
    nc = await nats.connect(server_list(cluster.nats_url), **cluster.login("indexer"))
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + 30
        while True:  # the indexer creates its snapshot store once it has caught up
            try:
                obj = await js.stream_info(f"OBJ_{snapshot_bucket(s)}")
                break
            except nats.js.errors.NotFoundError:
                assert time.monotonic() < deadline, "no snapshot store"
                await asyncio.sleep(0.5)
        for info in (
            await js.stream_info(s.kv_events_stream),
            await js.stream_info(f"KV_{s.instances_bucket}"),
            obj,
        ):
            assert info.config.num_replicas == 3, info.config
            assert info.cluster is not None and info.cluster.leader, info.cluster
    finally:
        await nc.close()


async def test_losing_the_stream_leader_loses_no_request(cluster: Cluster) -> None:
    run = cluster
    s = Subjects(NS)
    nc = await nats.connect(server_list(run.nats_url), **run.login("indexer"))
    try:
        js = nc.jetstream()
        before = (await js.stream_info(s.kv_events_stream)).state.messages
        leader = (await js.stream_info(s.kv_events_stream)).cluster.leader  # type: ignore[union-attr]
        assert leader is not None
        index = int(leader.rsplit("-", 1)[1])
        results: list[str] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

            async def client(c: int) -> None:
                for i in range(12):
                    results.append(await _stream(session, run, 100 * c + i))

            clients = asyncio.gather(*(client(c) for c in range(2)))
            await asyncio.sleep(1.0)
            old_pid = run.node_pid(index)
            os.kill(old_pid, signal.SIGKILL)
            await clients
            deadline = time.monotonic() + 30
            while f"launcher: restarted nats-{index}" not in run.output():
                assert time.monotonic() < deadline, run.output()[-2000:]
                await asyncio.sleep(0.2)
            assert run.node_pid(index) != old_pid
            after = [await _stream(session, run, 900 + i) for i in range(4)]
        assert results.count("ok") == 24, results
        assert after == ["ok"] * 4, after
        deadline = time.monotonic() + 30
        while True:
            try:  # this client may itself have been on the killed node: it reconnects
                if (await js.stream_info(s.kv_events_stream)).state.messages > before:
                    break
            except nats.errors.TimeoutError:
                pass
            assert time.monotonic() < deadline, "no KV events stored after the node was lost"
            await asyncio.sleep(0.5)
    finally:
        await nc.close()
    for path in run.log_dir.glob("*.log"):
        text = path.read_text(errors="replace")
        assert "kv_events_dropped" not in text, (path.name, log_tails(run.log_dir))


async def test_no_permission_violation_and_clean_stop(cluster: Cluster) -> None:
    for path in cluster.log_dir.glob("nats-*.log"):
        text = path.read_text(errors="replace")
        assert "Violation" not in text, [ln for ln in text.splitlines() if "Violation" in ln][:10]
    for path in cluster.log_dir.glob("*.log"):
        assert "nats_permission_denied" not in path.read_text(errors="replace"), path.name
    code = await asyncio.to_thread(_stop, cluster)
    assert code == 0, cluster.output()[-3000:]
