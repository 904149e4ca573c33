"""Supervision and NATS auth end to end: the launcher with its embedded, authenticated nats-server.

The launcher starts 2 prefill + 2 decode mock workers (one per process, router ``round-robin``)
with per-service NATS users (the default). Checked:

* the stack serves over HTTP and over NATS with the generated ``client`` credential (streaming:
  chunks into the client's own ``_INBOX.client.…`` inbox, then ``[DONE]``);
* a SIGKILLed decode worker process is restarted (a new pid, logged), its registry entry is
  removed at once and comes back when the new process registers, requests keep succeeding
  meanwhile, and the restarted worker serves again;
* a SIGKILLed router (after ready) is restarted too and requests succeed again, and so is a
  SIGKILLed nats-server (same port, store and users: the services reconnect);
* nats-server logged no permission violation over the whole run (the permission model covers
  everything the services do), and the launcher stops everything with status 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import psutil
import pytest

from tandem.protocol import Subjects
from tandem.protocol.messages import InstanceInfo
from tandem.services.auth import NatsAuth, password_file
from tandem.services.discovery import InstanceRegistry
from tests.conftest import free_port
from tests.e2e.conftest import launch_until_ready, log_tails

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

NS = "e2e-sup"
MODEL = "smollm2-135m-instruct"


@dataclass
class Launched:
    proc: subprocess.Popen[str]
    base_url: str
    log_dir: Path
    auth_dir: Path
    out_path: Path
    nats_url: str = ""
    seen_pids: set[int] = field(default_factory=set)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def pid_of(self, name: str) -> int:
        """The current pid of process ``name`` (from the launcher's started/restarted lines)."""
        out = self.output()
        pids = re.findall(rf"launcher: started {re.escape(name)} \(pid (\d+)\)", out)
        if name == "nats":
            pids = re.findall(r"launcher: nats-server \(JetStream\) at \S+, pid (\d+),", out)
        pids += re.findall(rf"launcher: restarted {re.escape(name)} \(pid \d+ -> (\d+)", out)
        assert pids, f"no pid for {name}:\n{out[-2000:]}"
        return int(pids[-1])

    def login(self, user: str) -> dict[str, Any]:
        return NatsAuth.for_user(user, password_file(self.auth_dir, user)).connect_options()

    def record_descendants(self) -> None:
        if self.proc.poll() is None:
            self.seen_pids.update(p.pid for p in psutil.Process(self.proc.pid).children(recursive=True))

    def leftovers(self) -> list[int]:
        alive = []
        for pid in self.seen_pids:
            try:
                p = psutil.Process(pid)
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                continue
        return alive


def _start(tmp: Path) -> Launched:
    port = free_port()
    log_dir = tmp / "logs"
    auth_dir = tmp / "auth"
    log_dir.mkdir(parents=True)
    out_path = tmp / "launcher.out"
    args = [
        "--port", str(port), "--namespace", NS, "--log-dir", str(log_dir),
        "--nats-auth-dir", str(auth_dir), "--ready-timeout", "120",
        "--engine", "mock", "--speedup-ratio", "1000000", "--router-mode", "round-robin",
        "--prefill", "2", "--decode", "2", "--workers-per-process", "1", "--disagg-min-tokens", "0",
    ]  # fmt: skip
    proc = launch_until_ready(args, out_path, log_dir)
    run = Launched(proc, f"http://127.0.0.1:{port}", log_dir, auth_dir, out_path)
    m = re.search(r"nats-server \(JetStream\) at (nats://\S+), pid \d+,", run.output())
    if m is None:  # stop what was started before failing, or it outlives the test session
        _stop(run)
        raise AssertionError(f"no nats-server line in the launcher's output:\n{run.output()[-3000:]}")
    run.nats_url = m.group(1)
    run.record_descendants()
    return run


def _stop(run: Launched) -> int:
    run.record_descendants()
    if run.proc.poll() is None:
        run.proc.send_signal(signal.SIGTERM)
    try:
        return run.proc.wait(90)
    except subprocess.TimeoutExpired:
        run.proc.kill()
        return run.proc.wait(10)


async def _complete(session: aiohttp.ClientSession, run: Launched, i: int) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": f"request {i}: tell me a story", "max_tokens": 4, "ignore_eos": True}
    async with session.post(f"{run.base_url}/v1/completions", json=body) as resp:
        text = await resp.text()
        assert resp.status == 200, f"HTTP {resp.status}: {text}\n{log_tails(run.log_dir)}"
        reply: dict[str, Any] = json.loads(text)
        return reply


async def _wait_for(text: str, run: Launched, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while text not in run.output():
        assert time.monotonic() < deadline, f"{text!r} not in the launcher's output:\n{run.output()[-3000:]}"
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
async def supervised(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Launched]:
    run = await asyncio.to_thread(_start, tmp_path_factory.mktemp("supervision"))
    try:
        yield run
    finally:
        await asyncio.to_thread(_stop, run)


async def test_serves_http_and_nats_with_the_client_credential(supervised: Launched) -> None:
    run = supervised
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        reply = await _complete(session, run, 0)
    assert len(reply["choices"][0]["text"]) > 0

    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(run.nats_url, allow_reconnect=False, connect_timeout=2)

    nc = await nats.connect(run.nats_url, allow_reconnect=False, **run.login("client"))
    try:
        inbox = nc.new_inbox()
        assert inbox.startswith("_INBOX.client.")
        sub = await nc.subscribe(inbox)
        body = {"model": MODEL, "prompt": "stream me", "max_tokens": 4, "ignore_eos": True, "stream": True}
        await nc.publish(Subjects(NS).completions, json.dumps(body).encode(), reply=inbox)
        chunks = []
        while True:
            msg = await sub.next_msg(timeout=30)
            if msg.data == b"[DONE]":
                break
            chunks.append(json.loads(msg.data))
        assert chunks and all("error" not in c for c in chunks), chunks
    finally:
        await nc.close()


async def test_a_killed_worker_is_restarted_and_re_registers(supervised: Launched) -> None:
    run = supervised
    removed: list[str] = []
    added: list[InstanceInfo] = []
    nc = await nats.connect(run.nats_url, **run.login("launcher"))
    registry = InstanceRegistry(nc.jetstream(), Subjects(NS))

    async def on_removed(info: InstanceInfo) -> None:
        removed.append(info.instance_id)

    async def on_added(info: InstanceInfo) -> None:
        added.append(info)

    registry.on_removed(on_removed)
    registry.on_added(on_added)
    await registry.start()
    try:
        assert {"decode-0", "decode-1", "prefill-0", "prefill-1"} <= registry.instances.keys()
        old_meta = registry.instances["decode-0"].nixl_metadata
        added.clear()
        old_pid = run.pid_of("decode-0")
        os.kill(old_pid, signal.SIGKILL)
        await _wait_for("launcher: decode-0 (pid", run)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            # While decode-0 restarts, requests keep succeeding (on decode-1).
            during = [await _complete(session, run, 100 + i) for i in range(6)]
            await _wait_for("launcher: restarted decode-0", run)
            new_pid = run.pid_of("decode-0")
            assert new_pid != old_pid and psutil.pid_exists(new_pid)
            run.record_descendants()
            deadline = time.monotonic() + 30
            while not any(i.instance_id == "decode-0" for i in added):
                assert time.monotonic() < deadline, "decode-0 did not register again"
                await asyncio.sleep(0.1)
            assert "decode-0" in removed  # the launcher removed the dead worker's entry at once
            assert registry.instances["decode-0"].nixl_metadata != old_meta  # a new process
            # Round-robin: the restarted worker serves again.
            after = [await _complete(session, run, 200 + i) for i in range(8)]
        assert all(r["choices"][0]["text"] for r in during + after)
        assert "decode-0" in {r["tandem"]["decode_worker"] for r in after}
    finally:
        await registry.stop()
        await nc.close()


async def test_a_killed_router_is_restarted(supervised: Launched) -> None:
    run = supervised
    old_pid = run.pid_of("router")
    os.kill(old_pid, signal.SIGKILL)
    await _wait_for("launcher: restarted router", run)
    assert run.pid_of("router") != old_pid
    run.record_descendants()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        deadline = time.monotonic() + 60
        while True:
            try:
                await _complete(session, run, 300)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "no answer after the router restarted"
                await asyncio.sleep(0.5)
        replies = [await _complete(session, run, 301 + i) for i in range(4)]
    assert all(r["choices"][0]["text"] for r in replies)


async def test_a_killed_nats_server_is_restarted_and_the_stack_reconnects(supervised: Launched) -> None:
    run = supervised
    old_pid = run.pid_of("nats")
    os.kill(old_pid, signal.SIGKILL)
    await _wait_for("launcher: restarted nats", run)
    assert run.pid_of("nats") != old_pid
    run.record_descendants()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        deadline = time.monotonic() + 60
        while True:
            try:
                await _complete(session, run, 400)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "no answer after nats-server restarted"
                await asyncio.sleep(0.5)
        replies = [await _complete(session, run, 401 + i) for i in range(4)]
    assert all(r["choices"][0]["text"] for r in replies)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):  # still authenticated
        await nats.connect(run.nats_url, allow_reconnect=False, connect_timeout=2)


async def test_no_permission_violation_and_clean_stop(supervised: Launched) -> None:
    run = supervised
    nats_log = (run.log_dir / "nats.log").read_text(errors="replace")
    assert "Violation" not in nats_log, [ln for ln in nats_log.splitlines() if "Violation" in ln][:10]
    for path in run.log_dir.glob("*.log"):
        assert "nats_permission_denied" not in path.read_text(errors="replace"), path.name
    code = await asyncio.to_thread(_stop, run)
    assert code == 0, run.output()[-3000:]
    await asyncio.sleep(0.5)
    assert run.leftovers() == []
    assert not run.auth_dir.exists() or all((p.stat().st_mode & 0o077) == 0 for p in run.auth_dir.iterdir())
