"""``--nats-creds``: a service logs in to a server in operator (JWT) mode with a ``.creds`` file.

The test makes its own operator, account and user (nkeys + JWTs signed with them, the format
``nsc`` writes), starts a nats-server that trusts the operator with the account preloaded, and
checks that :func:`tandem.services.runtime.connect` with ``NatsAuth(nats_creds=...)`` logs in
and can serve a request, while an anonymous client and a user signed by a foreign account are
refused.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nkeys
import pytest

from tandem.services.auth import NatsAuth
from tandem.services.nats_embedded import nats_server_binary, wait_listening
from tandem.services.runtime import connect
from tests.conftest import free_port


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
    """A NATS v2 JWT (header ``ed25519-nkey``) for ``subject``, signed by ``issuer``."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {"version": 2, **nats_claims},
    }
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = _b64(issuer.sign(f"{header}.{body}".encode()))
    return f"{header}.{body}.{signature}"


def _creds(path: Path, user_jwt: str, user: nkeys.KeyPair) -> Path:
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    path.chmod(0o600)
    return path


_UNLIMITED = {"subs": -1, "data": -1, "payload": -1}


def _user(account: nkeys.KeyPair, name: str) -> tuple[str, nkeys.KeyPair]:
    user = _keypair(nkeys.PREFIX_BYTE_USER)
    claims = {"type": "user", "pub": {}, "sub": {}, **_UNLIMITED}
    return _jwt(account, user.public_key.decode(), name, claims), user


@pytest.fixture(scope="module")
def operator_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """A nats-server in operator mode; yields (url, good creds, foreign creds)."""
    tmp = tmp_path_factory.mktemp("creds")
    operator = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    op_pub, acc_pub = operator.public_key.decode(), account.public_key.decode()
    operator_jwt = _jwt(operator, op_pub, "tandem-test-operator", {"type": "operator"})
    limits = {"imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1, **_UNLIMITED}
    account_jwt = _jwt(operator, acc_pub, "tandem", {"type": "account", "limits": limits})
    good = _creds(tmp / "service.creds", *_user(account, "service"))
    stranger = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)  # not signed by the operator
    foreign = _creds(tmp / "foreign.creds", *_user(stranger, "intruder"))
    port = free_port()
    conf = tmp / "operator.conf"
    conf.write_text(
        f'listen: "127.0.0.1:{port}"\n'
        f'operator: "{operator_jwt}"\n'
        "resolver: MEMORY\n"
        f'resolver_preload: {{ {acc_pub}: "{account_jwt}" }}\n'
    )
    log = (tmp / "nats.log").open("w")
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_listening(proc, port)
        except RuntimeError as e:
            raise AssertionError(f"{e}:\n{(tmp / 'nats.log').read_text()}") from None
        yield f"nats://127.0.0.1:{port}", good, foreign
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


async def test_a_service_logs_in_with_a_creds_file(operator_server: tuple[str, Path, Path]) -> None:
    url, good, _ = operator_server
    server = await connect(url, "creds-server", auth=NatsAuth(nats_creds=str(good)))
    client = await connect(url, "creds-client", auth=NatsAuth(nats_creds=str(good)))
    try:

        async def echo(msg: Any) -> None:
            await msg.respond(b"pong:" + msg.data)

        await server.subscribe("t.ping", cb=echo)
        await server.flush()
        reply = await client.request("t.ping", b"1", timeout=5)
        assert reply.data == b"pong:1"
    finally:
        await asyncio.gather(server.close(), client.close())


async def test_anonymous_and_foreign_users_are_refused(operator_server: tuple[str, Path, Path]) -> None:
    url, _, foreign = operator_server
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    with pytest.raises(ConnectionError, match=r"(?i)authorization violation"):
        await connect(url, "intruder", connect_timeout=2.0, auth=NatsAuth(nats_creds=str(foreign)))
