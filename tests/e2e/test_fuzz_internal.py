"""Property-based fuzzing of every internal NATS subject of a running stack (issue 6, "Hostile
input"): the router's, the indexer's and the workers' request subjects, the broadcast and
fire-and-forget ones (cancel, finished notices, KV notifications) and the KV-events stream.

The stack is the launcher's (mock workers, 1 prefill + 1 decode, ``--no-nats-auth`` so the fuzzer
reaches subjects a real deployment's permissions keep it from: this is about a buggy or
compromised peer that *is* allowed to publish). Payloads: random bytes, msgpack and JSON of
random values (huge integers, floats, deep lists, binary), and valid messages with one field
replaced by a random value.

Properties:
* a request whose payload does not decode as the subject's message gets an ``ErrorReply`` with a
  4xx code within 5 s; no payload ever gets a 500;
* afterwards every service answers its health request, both workers' pools pass
  ``check_integrity()`` with nothing in use or pinned once idle (pinned KV is leased for
  ``--kv-ttl-s 2``), no process exited, and a real request over HTTP succeeds.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.protocol import Subjects
from tandem.protocol.messages import (
    Cancel,
    DecodeRequest,
    ErrorReply,
    Health,
    HealthRequest,
    KvCleared,
    KvEvent,
    KvEventBatch,
    KvStored,
    OverlapQuery,
    PrefillRequest,
    RouteRequest,
    SamplingParams,
    StoredBlock,
    WorkerStats,
    WorkerStatsRequest,
    encode,
)
from tests.conftest import free_port
from tests.e2e.conftest import launch_until_ready, log_tails

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

T = TypeVar("T")
NS = "e2e-fuzz"
MODEL = "smollm2-135m-instruct"
FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

_S = Subjects(NS)
_SAMPLING = SamplingParams(max_tokens=4)
#: A valid message per subject kind (mutated by the fuzzer).
VALID: dict[str, msgspec.Struct] = {
    "route": RouteRequest(
        request_id="fz",
        model=MODEL,
        token_ids=list(range(1, 40)),
        block_hashes=[1, 2],
        sampling=_SAMPLING,
        reply_to="fz.reply",
    ),
    "prefill": PrefillRequest(
        request_id="fz", token_ids=list(range(1, 40)), block_hashes=[1, 2], sampling=_SAMPLING
    ),
    "generate": DecodeRequest(
        request_id="fz",
        token_ids=list(range(1, 40)),
        block_hashes=[1, 2],
        sampling=_SAMPLING,
        reply_to="fz.r",
    ),
    "overlap": OverlapQuery(request_id="fz", block_hashes=[1, 2, 3]),
    "health": HealthRequest(request_id="fz"),
    "debug": WorkerStatsRequest(check_integrity=False),
    "cancel": Cancel(request_id="fz"),
    "kv_events": KvEventBatch(
        worker_id="decode-0",
        events=[
            KvEvent(event_id=10**6, data=KvStored(blocks=[StoredBlock(block_hash=5, tokens_hash=6)])),
            KvEvent(event_id=10**6 + 1, data=KvCleared()),
        ],
    ),
}

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=12), c, max_size=6),
    max_leaves=24,
)


def _mutated(kind: str) -> st.SearchStrategy[bytes]:
    base = msgspec.to_builtins(VALID[kind])

    def mutate(key_value: tuple[str, Any]) -> bytes:
        key, value = key_value
        out = dict(base)
        out[key] = value
        return msgspec.msgpack.encode(out)

    return st.tuples(st.sampled_from(sorted(base)), values).map(mutate)


def payloads(kind: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=512),
        values.map(msgspec.msgpack.encode),
        values.map(lambda v: json.dumps(v, default=repr).encode()),
        _mutated(kind),
    )


#: Request subjects: (kind, subject, the message type the service decodes).
REQUESTS: list[tuple[str, str, type[msgspec.Struct]]] = [
    ("route", _S.router_generate, RouteRequest),
    ("overlap", _S.indexer_overlap, OverlapQuery),
    ("prefill", _S.worker_prefill("prefill-0"), PrefillRequest),
    ("generate", _S.worker_generate("decode-0"), DecodeRequest),
    ("debug", _S.worker_debug("decode-0"), WorkerStatsRequest),
    ("health", _S.worker_health("prefill-0"), HealthRequest),
    ("health", _S.health("router"), HealthRequest),
    ("health", _S.health("indexer"), HealthRequest),
]
#: Fire-and-forget subjects.
NOTICES: list[tuple[str, str]] = [
    ("cancel", _S.cancel),
    ("cancel", _S.worker_cancel("decode-0")),
    ("cancel", _S.request_finished),
    ("cancel", _S.prefill_finished),
    ("cancel", f"{NS}.worker.prefill-0.kv_notify"),
]


class Stack:
    """The launcher's stack plus a NATS client on a private event loop (hypothesis is sync)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port, self.nats_port = free_port(), free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-client", daemon=True)
        self.thread.start()
        self.out = tmp / "launcher.out"
        args = [
            "--no-nats-auth",
            "--nats-port", str(self.nats_port), "--port", str(self.port), "--namespace", NS,
            "--log-dir", str(tmp / "logs"), "--engine", "mock", "--speedup-ratio", "1000000",
            "--prefill", "1", "--decode", "1", "--workers-per-process", "1", "--disagg-min-tokens", "0",
            "--kv-ttl-s", "2", "--ready-timeout", "120",
        ]  # fmt: skip
        self.proc = launch_until_ready(args, self.out, tmp / "logs")
        self.nc = self.run(nats.connect(f"nats://127.0.0.1:{self.nats_port}"))
        self.js = self.nc.jetstream()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.nc.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    async def _request(self, subject: str, data: bytes) -> ErrorReply | bytes | None:
        try:
            msg = await self.nc.request(subject, data, timeout=5)
        except nats.errors.TimeoutError:
            return None
        try:
            return msgspec.msgpack.decode(msg.data, type=ErrorReply)
        except msgspec.ValidationError:
            return msg.data
        except msgspec.DecodeError:
            return msg.data

    def request(self, subject: str, data: bytes) -> ErrorReply | bytes | None:
        return self.run(self._request(subject, data))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("fuzz"))
    try:
        yield s
    finally:
        s.close()


def _decodes(data: bytes, tp: type[msgspec.Struct]) -> bool:
    try:
        msgspec.msgpack.decode(data, type=tp)
        return True
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False


@pytest.mark.parametrize(("kind", "subject", "tp"), REQUESTS, ids=[f"{k}:{s}" for k, s, _ in REQUESTS])
def test_request_subjects_answer_malformed_payloads_with_a_4xx(
    stack: Stack, kind: str, subject: str, tp: type[msgspec.Struct]
) -> None:
    @FUZZ
    @given(data=payloads(kind))
    def check(data: bytes) -> None:
        reply = stack.request(subject, data)
        if isinstance(reply, ErrorReply):
            assert reply.code != 500, (subject, data[:200], reply)
        if not _decodes(data, tp):
            assert isinstance(reply, ErrorReply), (subject, data[:200], reply)
            assert 400 <= reply.code < 500, (subject, data[:200], reply)

    check()


@pytest.mark.parametrize(("kind", "subject"), NOTICES, ids=[s for _, s in NOTICES])
def test_notice_subjects_take_anything(stack: Stack, kind: str, subject: str) -> None:
    @FUZZ
    @given(data=payloads(kind))
    def check(data: bytes) -> None:
        stack.run(stack.nc.publish(subject, data))

    check()
    stack.run(stack.nc.flush())
    for service in ("router", "indexer"):  # still answering after every notice
        assert isinstance(stack.request(_S.health(service), encode(HealthRequest())), bytes), service


def test_kv_event_stream_takes_anything(stack: Stack) -> None:
    """Forged and garbage batches on a worker's KV-events subject (the indexer replays them)."""

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(data=payloads("kv_events"))
    def check(data: bytes) -> None:
        stack.run(stack.js.publish(_S.kv_events("decode-0"), data))

    check()
    assert isinstance(stack.request(_S.health("indexer"), encode(HealthRequest())), bytes)


def test_everything_still_serves_with_intact_pools(stack: Stack) -> None:
    for service in ("router", "indexer", "frontend"):
        reply = stack.request(_S.health(service), encode(HealthRequest()))
        assert isinstance(reply, bytes), (service, reply)
        assert msgspec.msgpack.decode(reply, type=Health).service == service
    resp = requests.post(
        f"{stack.base_url}/v1/completions",
        json={"model": MODEL, "prompt": "still there?", "max_tokens": 4, "ignore_eos": True},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    for worker in ("prefill-0", "decode-0"):
        deadline = time.monotonic() + 20
        while True:
            raw = stack.request(_S.worker_debug(worker), encode(WorkerStatsRequest(check_integrity=True)))
            assert isinstance(raw, bytes), (worker, raw)
            stats = msgspec.msgpack.decode(raw, type=WorkerStats)
            assert stats.integrity_ok, (worker, stats.integrity_error)
            if stats.in_use_blocks == 0 and stats.pinned_blocks == 0 and stats.pending_transfers == 0:
                break
            assert time.monotonic() < deadline, (worker, stats)
            time.sleep(0.2)
    out = stack.out.read_text()
    assert "exited with status" not in out, f"{out[-3000:]}\n{log_tails(stack.tmp / 'logs')}"
