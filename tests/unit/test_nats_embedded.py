"""The embedded NATS plan: cluster node configs, TLS files, the launcher's flags for both, and
JetStream replicas handed to every process. (The cluster itself runs in
``tests/e2e/test_nats_cluster.py`` and ``tests/e2e/test_faults.py``.)"""

from __future__ import annotations

import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from tandem.services.auth import server_list
from tandem.services.launch_plan import parse_args, plan_processes
from tandem.services.nats_embedded import (
    cluster_url,
    free_port,
    node_config,
    plan_cluster,
    wait_listening,
    write_tls_files,
)


def test_node_config_routes_to_the_others_with_the_route_password(tmp_path: Path) -> None:
    ports = [(4001, 6001), (4002, 6002), (4003, 6003)]
    text = node_config(1, ports, tmp_path / "s", "pw", "nats.conf", None)
    assert 'include "nats.conf"' in text
    assert 'listen: "127.0.0.1:4002"' in text and 'listen: "127.0.0.1:6002"' in text
    assert "nats-route://route:pw@127.0.0.1:6001" in text and "nats-route://route:pw@127.0.0.1:6003" in text
    assert "127.0.0.1:6002" not in text.split("routes:")[1]  # not a route to itself
    assert 'authorization { user: "route", password: "pw" }' in text
    assert 'server_name: "tandem-nats-1"' in text
    assert "tls" not in text
    assert "include" not in node_config(0, ports, tmp_path, "pw", None, None)


def test_node_config_refuses_a_value_that_would_break_the_syntax(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config"):
        node_config(0, [(1, 2)], tmp_path / 'a"b', "pw", None, None)


def test_plan_cluster_writes_private_configs_and_lists_every_url(tmp_path: Path) -> None:
    users = tmp_path / "nats.conf"
    users.write_text("# users\n")
    nodes = plan_cluster(3, tmp_path, tmp_path / "store", "pw", users, ports=[(1, 2), (3, 4), (5, 6)])
    assert [n.name for n in nodes] == ["nats-0", "nats-1", "nats-2"]
    for n in nodes:
        assert stat.S_IMODE(n.config.stat().st_mode) == 0o600
        assert n.argv[-2:] == ["-c", str(n.config)]
        assert n.store_dir.is_dir()
    assert server_list(cluster_url(nodes, None)) == [
        "nats://127.0.0.1:1",
        "nats://127.0.0.1:3",
        "nats://127.0.0.1:5",
    ]
    with pytest.raises(ValueError):
        plan_cluster(2, tmp_path, tmp_path / "store", "pw", ports=[(1, 2)])


def test_tls_files_chain_to_the_ca_and_name_loopback(tmp_path: Path) -> None:
    files = write_tls_files(tmp_path)
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # What every process does with --nats-tls-ca: both files load.
    ctx = ssl.create_default_context(cafile=str(files.ca))
    ctx.load_cert_chain(str(files.cert), str(files.key))


def test_server_list() -> None:
    assert server_list("nats://a:1") == ["nats://a:1"]
    assert server_list(" tls://a:1, tls://b:2 ,") == ["tls://a:1", "tls://b:2"]
    with pytest.raises(ValueError):
        server_list(" , ")


def test_cluster_flags_set_replicas_for_every_process() -> None:
    cfg = parse_args(["--nats-cluster", "3", "--engine", "mock"])
    assert cfg.replicas == 3
    specs = plan_processes(cfg, "nats://a:1,nats://b:2,nats://c:3", tls_ca="/x/ca.pem")
    for spec in specs:
        args = list(spec.args)
        assert args[args.index("--jetstream-replicas") + 1] == "3", spec.name
        assert args[args.index("--nats-tls-ca") + 1] == "/x/ca.pem", spec.name
        assert args[args.index("--nats-url") + 1] == "nats://a:1,nats://b:2,nats://c:3"
    single = plan_processes(parse_args(["--engine", "mock"]), "nats://a:1")
    assert all("--jetstream-replicas" not in s.args and "--nats-tls-ca" not in s.args for s in single)
    assert parse_args(["--nats-cluster", "3", "--jetstream-replicas", "1"]).replicas == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--nats-cluster", "0"],
        ["--nats-cluster", "3", "--nats-port", "4222"],
        ["--nats-url", "nats://x:1", "--nats-cluster", "3"],
        ["--nats-url", "nats://x:1", "--nats-tls"],
        ["--jetstream-replicas", "3"],  # one embedded server cannot hold 3 replicas
        ["--nats-cluster", "3", "--jetstream-replicas", "6"],
    ],
)
def test_bad_nats_flags_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert "--" in capsys.readouterr().err


def test_wait_listening_returns_once_the_port_accepts_and_fails_on_exit() -> None:
    with socket.socket() as srv:  # something already listening
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            wait_listening(sleeper, srv.getsockname()[1], timeout_s=5)
            assert sleeper.poll() is None  # left running
        finally:
            sleeper.kill()
            sleeper.wait()
    quitter = subprocess.Popen([sys.executable, "-c", "pass"])
    with pytest.raises(RuntimeError, match="exited"):
        wait_listening(quitter, free_port(), timeout_s=10)
    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    with pytest.raises(RuntimeError, match="not listening"):
        wait_listening(silent, free_port(), timeout_s=0.3)
    assert silent.wait(5) is not None  # killed
