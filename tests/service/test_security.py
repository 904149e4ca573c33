"""NATS authentication and authorization: forgery attempts against a real, authenticated nats-server.

The server runs with the config the launcher writes (:func:`tandem.services.launch_plan.plan_users`
→ :func:`tandem.services.auth.write_credentials`) for a small mock topology: users ``indexer``,
``router``, ``frontend``, ``prefill-0``, ``decode-0``, ``decode-1``, ``launcher``, and two API
clients ``client`` / ``client2``. One extra ``observer`` user (allowed everything, tests only)
watches the subjects an attacker aims at, so every refusal is checked twice: the server reports a
permission violation to the offender, and nothing arrives where it was aimed.

Each forgery here must fail with auth on: anonymous or wrong-password connections, the client
credential reading others' inboxes or token streams, publishing Cancel / Prefill / Decode
requests, KV events or registry entries, and a worker posing as another worker. Positive
controls (what each role must be able to do) keep the refusals from passing vacuously.
"""

from __future__ import annotations

import asyncio
import contextlib
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from tandem.engine.config import EngineConfig
from tandem.protocol import Subjects
from tandem.protocol.messages import (
    Cancel,
    DecodeRequest,
    HealthRequest,
    KvCleared,
    KvEvent,
    KvEventBatch,
    PrefillRequest,
    SamplingParams,
    encode,
)
from tandem.services import nats_embedded, processes
from tandem.services.auth import (
    NatsAuth,
    NatsUser,
    Permissions,
    inbox_prefix,
    new_password,
    password_file,
    permissions,
    server_config,
    write_credentials,
)
from tandem.services.launch_plan import LaunchConfig, plan_users
from tandem.services.messaging import sync_with_server
from tandem.services.processes import tail
from tandem.services.runtime import connect, ensure_jetstream
from tests.service.util import eventually

NS = "sec"
S = Subjects(NS)
OBSERVER = "observer"


@dataclass
class SecureNats:
    url: str
    auth_dir: Path
    log_path: Path


@pytest.fixture(scope="module")
async def secure_nats() -> AsyncIterator[SecureNats]:
    """An authenticated nats-server (JetStream on) with the launcher's users for NS."""
    cfg = LaunchConfig(
        prefill=1,
        decode=2,
        namespace=NS,
        workers_per_process=1,
        engine=EngineConfig(engine="mock"),
        nats_clients="client,client2",
    )
    with tempfile.TemporaryDirectory(prefix="tandem-sec-") as tmp:
        root = Path(tmp)
        users = [NatsUser(name, new_password(), perms) for name, perms in plan_users(cfg)]
        users.append(NatsUser(OBSERVER, new_password(), Permissions(publish=(">",), subscribe=(">",))))
        conf = write_credentials(root / "auth", users)
        store = root / "store"
        store.mkdir()
        child, url = await nats_embedded.start_nats(root, str(store), config=conf)
        try:
            yield SecureNats(url, root / "auth", child.log_path)
        finally:
            await processes.stop_children([[child]], grace_s=5)


@dataclass
class Conn:
    """A connection as one user, with the errors the server sent it."""

    nc: NatsClient
    errors: list[str] = field(default_factory=list)

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e.lower()]


@pytest.fixture
async def login(secure_nats: SecureNats) -> AsyncIterator[Callable[[str], Awaitable[Conn]]]:
    """``await login(user)``: a connection as ``user`` (closed after the test)."""
    opened: list[NatsClient] = []

    async def _login(user: str) -> Conn:
        conn = Conn(nc=NatsClient())

        async def on_error(e: Exception) -> None:
            conn.errors.append(str(e))

        auth = NatsAuth.for_user(user, password_file(secure_nats.auth_dir, user))
        await conn.nc.connect(
            secure_nats.url,
            name=f"test-{user}",
            allow_reconnect=False,
            error_cb=on_error,
            **auth.connect_options(),
        )
        opened.append(conn.nc)
        return conn

    yield _login
    for nc in opened:
        await nc.close()


class Watch:
    """The observer's subscription to ``subject``: what arrived there."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn  # the observer's connection
        self.msgs: list[Msg] = []

    async def on_msg(self, msg: Msg) -> None:
        self.msgs.append(msg)


@pytest.fixture
async def observe(login: Callable[[str], Awaitable[Conn]]) -> Callable[[str], Awaitable[Watch]]:
    """``await observe(subject)``: messages published to ``subject`` (seen by the observer)."""
    holder: list[Conn] = []

    async def _observe(subject: str) -> Watch:
        if not holder:
            holder.append(await login(OBSERVER))
        watch = Watch(holder[0])
        await holder[0].nc.subscribe(subject, cb=watch.on_msg)
        await sync_with_server(holder[0].nc)
        return watch

    return _observe


async def settle(*conns: Conn) -> None:
    """Let the server answer everything sent so far (a violation arrives before the PONG)."""
    for c in conns:
        await sync_with_server(c.nc)
    await asyncio.sleep(0.2)


async def refused_publish(conn: Conn, subject: str, payload: bytes, watch: Watch) -> None:
    before = len(conn.violations())
    await conn.nc.publish(subject, payload)
    await settle(conn)
    assert len(conn.violations()) > before, f"{subject}: no permission violation ({conn.errors})"
    assert watch.msgs == [], f"{subject}: the forged message was delivered"


async def refused_subscribe(conn: Conn, subject: str) -> None:
    before = len(conn.violations())
    await conn.nc.subscribe(subject)
    await settle(conn)
    new = conn.violations()[before:]
    assert any("subscription" in v.lower() for v in new), f"{subject}: subscription allowed ({conn.errors})"


def _sampling() -> SamplingParams:
    return SamplingParams(max_tokens=4)


# ---- authentication ------------------------------------------------------------------------------


async def test_anonymous_connection_is_refused(secure_nats: SecureNats) -> None:
    with pytest.raises(nats.errors.Error, match=r"(?i)authorization violation"):
        await nats.connect(secure_nats.url, allow_reconnect=False, connect_timeout=2)


async def test_wrong_password_is_refused(secure_nats: SecureNats) -> None:
    with pytest.raises(nats.errors.Error, match=r"(?i)authorization violation"):
        await nats.connect(
            secure_nats.url, user="router", password="guess", allow_reconnect=False, connect_timeout=2
        )


async def test_runtime_connect_names_the_refusal(secure_nats: SecureNats, tmp_path: Path) -> None:
    bad = tmp_path / "pw"
    bad.write_text("wrong\n")
    with pytest.raises(ConnectionError, match=r"(?i)authorization violation"):
        await connect(secure_nats.url, "test", connect_timeout=1.5, auth=NatsAuth.for_user("frontend", bad))
    nc = await connect(
        secure_nats.url,
        "test",
        auth=NatsAuth.for_user("frontend", password_file(secure_nats.auth_dir, "frontend")),
    )
    assert nc.is_connected
    await nc.close()


def test_credentials_are_private_files(secure_nats: SecureNats) -> None:
    assert stat.S_IMODE(secure_nats.auth_dir.stat().st_mode) == 0o700
    files = list(secure_nats.auth_dir.iterdir())
    assert {f.name for f in files} >= {"nats.conf", "client.password", "decode-0.password"}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


# ---- the client credential -----------------------------------------------------------------------


async def test_client_reaches_the_public_api_and_its_own_inbox(
    login: Callable[[str], Awaitable[Conn]], observe: Callable[[str], Awaitable[Watch]]
) -> None:
    """Positive control: what the client credential is for."""
    watch = await observe(S.chat_completions)
    client = await login("client")
    sub = await client.nc.subscribe(f"{inbox_prefix('client')}.mine")
    await client.nc.publish(S.chat_completions, b"{}", reply=f"{inbox_prefix('client')}.mine")
    await settle(client)
    await eventually(lambda: bool(watch.msgs), limit_s=10)
    assert client.violations() == []
    assert [m.data for m in watch.msgs] == [b"{}"]
    await sub.unsubscribe()


@pytest.mark.parametrize(
    "subject",
    [
        "_INBOX.>",
        f"{inbox_prefix('frontend')}.>",  # the frontend's token streams
        f"{inbox_prefix('client2')}.>",  # another API user's replies
        f"{inbox_prefix('router')}.>",
        S.worker_generate("decode-0"),  # posing as a worker
        S.worker_prefill("*"),
        S.router_generate,  # reading other users' requests
        S.chat_completions,  # posing as the frontend
        S.kv_events_wildcard,
        S.cancel,
        ">",
    ],
)
async def test_client_cannot_subscribe_beyond_its_inbox(
    login: Callable[[str], Awaitable[Conn]], subject: str
) -> None:
    await refused_subscribe(await login("client"), subject)


async def test_client_cannot_read_another_clients_replies(
    login: Callable[[str], Awaitable[Conn]],
) -> None:
    """client2's reply inbox stays private even while client tries to listen."""
    client = await login("client")
    client2 = await login("client2")
    stolen: list[Msg] = []

    async def steal(msg: Msg) -> None:
        stolen.append(msg)

    await client.nc.subscribe(f"{inbox_prefix('client2')}.>", cb=steal)
    got = await client2.nc.subscribe(f"{inbox_prefix('client2')}.x")
    frontend = await login("frontend")  # the frontend answers into any _INBOX.>
    await frontend.nc.publish(f"{inbox_prefix('client2')}.x", b"secret answer")
    await settle(client, client2, frontend)
    assert (await got.next_msg(timeout=2)).data == b"secret answer"
    assert stolen == []
    assert client.violations()


@pytest.mark.parametrize(
    ("subject", "payload"),
    [
        (S.cancel, encode(Cancel(request_id="someone-elses", reason="forged"))),
        (S.worker_cancel("prefill-0"), encode(Cancel(request_id="someone-elses", reason="forged"))),
        (
            S.worker_prefill("prefill-0"),
            encode(
                PrefillRequest(request_id="r", token_ids=[1, 2, 3], block_hashes=[], sampling=_sampling())
            ),
        ),
        (
            S.worker_generate("decode-0"),
            encode(
                DecodeRequest(
                    request_id="r",
                    token_ids=[1, 2, 3],
                    block_hashes=[],
                    sampling=_sampling(),
                    reply_to="_INBOX.x",
                )
            ),
        ),
        (S.router_generate, b"\x80"),
        (S.request_finished, b"\x80"),
        (S.kv_events("decode-0"), encode(KvEventBatch(worker_id="decode-0", events=[]))),
        (f"$KV.{S.instances_bucket}.decode-0", b"forged registry entry"),
        (f"$JS.API.STREAM.DELETE.{S.kv_events_stream}", b""),
        (f"{inbox_prefix('frontend')}.abc.1", b"forged token chunk"),
    ],
)
async def test_client_cannot_publish_internal_subjects(
    login: Callable[[str], Awaitable[Conn]],
    observe: Callable[[str], Awaitable[Watch]],
    subject: str,
    payload: bytes,
) -> None:
    watch = await observe(subject)
    await refused_publish(await login("client"), subject, payload, watch)


async def test_client_cannot_put_registry_entries_or_kv_events(
    secure_nats: SecureNats, login: Callable[[str], Awaitable[Conn]]
) -> None:
    """Through JetStream too: the put gets no ack and neither the bucket nor the stream changes."""
    launcher_conn = await login("launcher")
    kv = await ensure_jetstream(launcher_conn.nc.jetstream(), S)
    js = launcher_conn.nc.jetstream()
    events_before = (await js.stream_info(S.kv_events_stream)).state.messages

    client = await login("client")
    cjs = client.nc.jetstream(timeout=1.0)
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await cjs.publish(f"$KV.{S.instances_bucket}.decode-0", b"forged")
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await cjs.publish(S.kv_events("decode-0"), encode(KvEventBatch(worker_id="decode-0", events=[])))
    with pytest.raises(Exception):  # noqa: B017 - any refusal: the JetStream API is off limits
        await cjs.key_value(S.instances_bucket)
    await settle(client)
    assert len(client.violations()) >= 3
    with pytest.raises(Exception):  # noqa: B017 - nats.js.errors.KeyNotFoundError
        await kv.get("decode-0")
    assert (await js.stream_info(S.kv_events_stream)).state.messages == events_before


# ---- the internal roles ----------------------------------------------------------------------------


async def test_worker_cannot_act_as_another_worker(
    login: Callable[[str], Awaitable[Conn]], observe: Callable[[str], Awaitable[Watch]]
) -> None:
    worker = await login("decode-0")
    for subject, payload in [
        (S.worker_generate("decode-1"), b"\x80"),
        (S.worker_prefill("prefill-0"), b"\x80"),
        (S.worker_cancel("decode-1"), encode(Cancel(request_id="r"))),
        (S.kv_events("decode-1"), encode(KvEventBatch(worker_id="decode-1", events=[]))),
        (f"$KV.{S.instances_bucket}.decode-1", b"forged"),
        (S.cancel, encode(Cancel(request_id="r"))),
        (S.router_generate, b"\x80"),
        (f"{inbox_prefix('client')}.x", b"forged answer"),
    ]:
        await refused_publish(worker, subject, payload, await observe(subject))
    for subject in (
        S.worker_generate("decode-1"),
        f"{S.ns}.worker.*.prefill",
        f"{inbox_prefix('frontend')}.>",
    ):
        await refused_subscribe(worker, subject)


async def test_worker_may_publish_its_own_events_registry_and_chunks(
    secure_nats: SecureNats,
    login: Callable[[str], Awaitable[Conn]],
    observe: Callable[[str], Awaitable[Watch]],
) -> None:
    """Positive control for a worker: its own subjects, its KV events, its registry key."""
    launcher_conn = await login("launcher")
    kv = await ensure_jetstream(launcher_conn.nc.jetstream(), S)
    worker = await login("decode-0")
    chunks = await observe(f"{inbox_prefix('frontend')}.abc.1")
    await worker.nc.subscribe(S.worker_generate("decode-0"))
    await worker.nc.publish(f"{inbox_prefix('frontend')}.abc.1", b"chunk")
    js = worker.nc.jetstream(timeout=5)
    batch = KvEventBatch(worker_id="decode-0", events=[KvEvent(event_id=0, data=KvCleared())])
    await js.publish(S.kv_events("decode-0"), encode(batch))
    await js.publish(f"$KV.{S.instances_bucket}.decode-0", b"entry")
    await settle(worker)
    assert worker.violations() == []
    # Seen once in CI (stop 11): the chunk never reached the observer, with no violation. The
    # likely cause, nats-py's flush() PING overtaking the pending SUB (see sync_with_server), is
    # fixed; should it still happen, the chunk is published again (a refused subject never gets
    # through however often it is tried) and the failure says what each side and the server saw.

    def explain() -> str:
        return (
            f"worker connected={worker.nc.is_connected} errors={worker.errors}; "
            f"observer connected={chunks.conn.nc.is_connected} errors={chunks.conn.errors}; "
            f"server log tail:\n{tail(secure_nats.log_path)}"
        )

    for _attempt in range(3):
        with contextlib.suppress(AssertionError):
            await eventually(lambda: bool(chunks.msgs), limit_s=3)
            break
        await worker.nc.publish(f"{inbox_prefix('frontend')}.abc.1", b"chunk")
        await settle(worker)
    await eventually(lambda: bool(chunks.msgs), limit_s=3, explain=explain)
    assert worker.violations() == []
    assert {m.data for m in chunks.msgs} == {b"chunk"}
    assert (await kv.get("decode-0")).value == b"entry"
    await kv.delete("decode-0")


async def test_only_the_router_sends_work_to_workers(
    login: Callable[[str], Awaitable[Conn]], observe: Callable[[str], Awaitable[Watch]]
) -> None:
    for user in ("frontend", "indexer", "launcher"):
        conn = await login(user)
        for subject in (S.worker_prefill("prefill-0"), S.worker_generate("decode-0")):
            await refused_publish(conn, subject, b"\x80", await observe(subject))
    router = await login("router")
    watch = await observe(S.worker_prefill("prefill-0"))
    await router.nc.publish(S.worker_prefill("prefill-0"), b"\x80")
    await settle(router)
    await eventually(lambda: len(watch.msgs) == 1, limit_s=10)
    assert router.violations() == []


async def test_only_workers_publish_kv_events_and_registry_entries(
    login: Callable[[str], Awaitable[Conn]], observe: Callable[[str], Awaitable[Watch]]
) -> None:
    for user in ("frontend", "router", "indexer"):
        conn = await login(user)
        for subject in (S.kv_events("decode-0"), f"$KV.{S.instances_bucket}.decode-0"):
            await refused_publish(conn, subject, b"\x80", await observe(subject))


async def test_services_answer_only_requests_they_received(
    secure_nats: SecureNats,
    login: Callable[[str], Awaitable[Conn]],
    observe: Callable[[str], Awaitable[Watch]],
) -> None:
    """``allow_responses``: a worker may reply to a request it got, not to an arbitrary inbox."""
    router = await login("router")
    worker = await login("decode-0")
    replied: list[bytes] = []

    async def answer(msg: Msg) -> None:
        await worker.nc.publish(msg.reply, b"ack")

    await worker.nc.subscribe(S.worker_health("decode-0"), cb=answer)
    await sync_with_server(worker.nc)
    # Seen once in CI (stop 12): "no responders" right after the worker's subscription was
    # flushed, with no violation: nats-py's flush() PING overtook the pending SUB (see
    # sync_with_server, used above). Should it still happen, the request is retried; the
    # worker must still answer it (a refused subscription never would).
    for attempt in range(3):
        try:
            reply = await router.nc.request(S.worker_health("decode-0"), encode(HealthRequest()), timeout=5)
            break
        except nats.errors.NoRespondersError:
            if attempt == 2:
                raise AssertionError(
                    f"no responders 3 times; worker errors={worker.errors} "
                    f"server log tail:\n{tail(secure_nats.log_path)}"
                ) from None
            await asyncio.sleep(0.5)
    replied.append(reply.data)
    assert replied == [b"ack"]
    assert worker.violations() == []
    target = f"{inbox_prefix('router')}.not-asked"
    await refused_publish(worker, target, b"unsolicited", await observe(target))


# ---- the model itself ---------------------------------------------------------------------------------


def test_every_role_subscribes_only_to_its_own_inboxes() -> None:
    for role in ("frontend", "router", "indexer", "client", "launcher"):
        perms = permissions(role, S, user="u1")
        inboxes = [s for s in perms.subscribe if s.startswith("_INBOX")]
        assert inboxes == ["_INBOX.u1.>"], (role, perms.subscribe)
    worker = permissions("worker", S, user="w", instance_ids=["decode-7"])
    assert [s for s in worker.subscribe if s.startswith("_INBOX")] == ["_INBOX.w.>"]
    assert all("decode-7" in s for s in worker.publish if s.startswith((f"{NS}.kv.events", "$KV.")))


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` the rest."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def allowed(perms: Permissions, subject: str) -> bool:
    return any(matches(p, subject) for p in perms.publish)


def test_only_the_router_may_publish_prefill_and_generate() -> None:
    targets = [S.worker_prefill("decode-0"), S.worker_generate("decode-0"), S.worker_cancel("decode-0")]
    for role in ("frontend", "indexer", "client", "launcher", "worker"):
        perms = permissions(role, S, user="u", instance_ids=["decode-0"])
        assert not [t for t in targets if allowed(perms, t)], role
    router = permissions("router", S, user="router")
    assert all(allowed(router, t) for t in targets)


def test_only_workers_may_publish_kv_events_and_registry_entries() -> None:
    targets = [S.kv_events("decode-0"), f"$KV.{S.instances_bucket}.decode-0"]
    for role in ("frontend", "router", "indexer", "client"):
        assert not [t for t in targets if allowed(permissions(role, S, user="u"), t)], role
    worker = permissions("worker", S, user="w", instance_ids=["decode-0"])
    assert all(allowed(worker, t) for t in targets)
    other = permissions("worker", S, user="w", instance_ids=["decode-1"])
    assert not [t for t in targets if allowed(other, t)]


def test_client_reaches_only_the_public_subjects() -> None:
    client = permissions("client", S, user="c")
    public = [S.chat_completions, S.completions, S.models]
    assert all(allowed(client, t) for t in public)
    assert client.publish == (f"{NS}.v1.>",) and client.responses is None


def test_server_config_quotes_subjects_and_hides_passwords() -> None:
    user = NatsUser("w", "pw-1", permissions("worker", S, user="w", instance_ids=["decode-0"]))
    text = server_config([user])
    assert '"$KV.sec-instances.decode-0"' in text and "allow_responses: { max: 1" in text
    assert "pw-1" not in repr(user)
    with pytest.raises(ValueError):
        server_config([user, user])
    with pytest.raises(ValueError):
        NatsUser("a.b", "pw", Permissions())


def test_snapshot_bucket_matches_the_indexer() -> None:
    from tandem.services.auth import snapshot_bucket
    from tandem.services.indexer_snapshot import snapshot_bucket as indexer_bucket

    assert snapshot_bucket(S) == indexer_bucket(S)


def test_nats_auth_options() -> None:
    with pytest.raises(ValueError):
        NatsAuth(nats_password_file="/x")
    with pytest.raises(ValueError):
        NatsAuth(nats_user="u", nats_creds="/c")
    with pytest.raises(ValueError):
        NatsAuth(nats_tls_key="/k")
    opts = NatsAuth(nats_user="u").connect_options(env={"NATS_PASSWORD": "pw"})
    assert opts == {"user": "u", "password": "pw", "inbox_prefix": "_INBOX.u"}
    assert NatsAuth().connect_options(env={}) == {}
    assert NatsAuth(nats_inbox_prefix="_INBOX.x").connect_options(env={}) == {"inbox_prefix": "_INBOX.x"}
