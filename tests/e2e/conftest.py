"""End-to-end fixtures: an OTLP/HTTP trace collector and the real topology started by the launcher.

Every stack is ``python -m tandem.services.launcher`` as a subprocess (its own processes, the
real model), on a free port and its own namespace, against the session's nats-server
(``nats_url`` from ``tests/conftest.py``) so the tests can also talk to the workers over NATS.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.conftest import REPO, free_port

# ---- OTLP/HTTP trace collector -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CollectedSpan:
    """One exported span, flattened: ids as hex, resource attributes as strings."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    resource: dict[str, str]

    @property
    def process(self) -> str:
        """The launcher's process name (``service.instance.id``), else ``service.name``."""
        return self.resource.get("service.instance.id") or self.resource.get("service.name", "?")


def _attr_value(value: Any) -> str:
    kind = value.WhichOneof("value")
    return "" if kind is None else str(getattr(value, kind))


class OtlpCollector:
    """A tiny OTLP/HTTP receiver (``POST /v1/traces``, protobuf) keeping spans in memory."""

    def __init__(self) -> None:
        self.spans: list[CollectedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path.rstrip("/") != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                collector.add(body)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """Value for ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}"

    def add(self, body: bytes) -> None:
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        spans = []
        for rs in req.resource_spans:
            resource = {a.key: _attr_value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    spans.append(
                        CollectedSpan(
                            sp.trace_id.hex(), sp.span_id.hex(), sp.parent_span_id.hex(), sp.name, resource
                        )
                    )
        with self._lock:
            self.spans.extend(spans)
            self.requests += 1

    def snapshot(self) -> list[CollectedSpan]:
        with self._lock:
            return list(self.spans)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="session")
def otlp_collector() -> Iterator[OtlpCollector]:
    collector = OtlpCollector()
    collector.start()
    try:
        yield collector
    finally:
        collector.stop()


# ---- the topology, through the launcher ----------------------------------------------------------


def log_tails(log_dir: Path, lines: int = 25) -> str:
    """The end of every process log in ``log_dir`` (for failure messages)."""
    out = []
    for path in sorted(log_dir.glob("*.log")):
        text = path.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {path.name} ---\n" + "\n".join(text))
    return "\n".join(out)


@dataclass
class Stack:
    """A running launcher and what it started."""

    proc: subprocess.Popen[str]
    base_url: str
    namespace: str
    nats_url: str
    log_dir: Path
    stdout_path: Path
    descendants: list[psutil.Process] = field(default_factory=list)
    exit_code: int | None = None

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM the launcher (as Ctrl-C would) and wait; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.exit_code = self.proc.wait(10)
        return self.exit_code

    def leftovers(self) -> list[str]:
        """Processes the launcher started that are still alive (should be none after stop)."""
        alive = []
        for p in self.descendants:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                continue
        return alive


def launcher_env(collector: OtlpCollector | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NATS_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    if collector is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector.endpoint
        env["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    else:
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    return env


def start_stack(
    args: Sequence[str],
    *,
    namespace: str,
    nats_url: str,
    log_dir: Path,
    collector: OtlpCollector | None = None,
    ready_timeout_s: float = 300,
) -> Stack:
    """Start the launcher with ``args`` and wait until its frontend is ready (or fail with logs)."""
    import urllib.error
    import urllib.request

    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout_path = log_dir / "launcher.out"
    argv = [
        sys.executable,
        "-m",
        "tandem.services.launcher",
        "--port",
        str(port),
        "--namespace",
        namespace,
        "--nats-url",
        nats_url,
        "--log-dir",
        str(log_dir),
        "--ready-timeout",
        str(ready_timeout_s),
        *args,
    ]
    with stdout_path.open("w") as out:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=launcher_env(collector),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    stack = Stack(proc, f"http://127.0.0.1:{port}", namespace, nats_url, log_dir, stdout_path)
    deadline = time.monotonic() + ready_timeout_s + 30
    while True:
        if proc.poll() is not None:
            raise AssertionError(
                f"launcher exited with {proc.returncode} before ready:\n{stack.output()[-3000:]}\n"
                f"{log_tails(log_dir)}"
            )
        try:
            with urllib.request.urlopen(f"{stack.base_url}/ready", timeout=2) as resp:
                if resp.status == 200 and "tandem is ready" in stack.output():
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            stack.stop()
            raise AssertionError(f"stack not ready in {ready_timeout_s:.0f} s:\n{log_tails(log_dir)}")
        time.sleep(0.5)
    stack.descendants = psutil.Process(proc.pid).children(recursive=True)
    return stack


def launch_until_ready(
    args: Sequence[str], out_path: Path, log_dir: Path, timeout_s: float = 150
) -> subprocess.Popen[str]:
    """Start ``python -m tandem.services.launcher *args`` (its output in ``out_path``) and wait
    until it prints that it is ready. If it exits or is not ready within ``timeout_s``, it is
    killed and ``AssertionError`` carries its output and the services' log tails."""
    with out_path.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.services.launcher", *args],
            cwd=REPO,
            env=launcher_env(None),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    deadline = time.monotonic() + timeout_s
    while "tandem is ready" not in out_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(10)
            output = out_path.read_text(errors="replace")
            raise AssertionError(f"launcher not ready:\n{output[-3000:]}\n{log_tails(log_dir)}")
        time.sleep(0.3)
    return proc
