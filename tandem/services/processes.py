"""Child processes of the launcher: start, stop, tail, supervise.

* :func:`spawn` starts a command in its own session (a process-group leader with a parent-death
  signal, so nothing outlives the launcher) with its output in ``<log dir>/<name>.log``;
  :func:`stop_children` stops groups of them in order (SIGTERM, grace period, SIGKILL of the group).
* :class:`Supervisor` restarts a process that exits, with back-off (policy in
  :mod:`tandem.services.launcher`'s docstring and :func:`tandem.services.launch_plan.restart_delay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tandem.services.launch_plan import (
    CORE_SERVICES,
    DEFAULT_STOP_GRACE_S,
    RESTART_STABLE_S,
    LaunchError,
    ProcessSpec,
    restart_delay,
)

LOG_TAIL_LINES = 30
_PR_SET_PDEATHSIG = 1


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


def dead_child(children: Sequence[Child]) -> Child | None:
    return next((c for c in children if not c.alive()), None)


def died_message(child: Child) -> str:
    return (
        f"{child.name} exited with status {child.proc.returncode}; "
        f"last lines of {child.log_path}:\n{tail(child.log_path)}"
    )


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
            self._fail(f"{died_message(child)}\n{name} failed to start: stopping")
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
            self._fail(f"{died_message(child)}\ngiving up on {name} ({why}): stopping")
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
