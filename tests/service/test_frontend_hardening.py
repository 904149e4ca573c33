"""The frontend's edge under faults and abuse, against a real nats-server and a fake router.

Admission bound (429 + Retry-After, released on every exit path, flat memory under 10x
overload), API key (HTTP and NATS), size limits checked before any work (413, prompt characters
before tokenizing, long prompts tokenized off the event loop), malformed bodies (invalid UTF-8,
100k nested arrays: 400, never 500 or silence), sampling validation at the edge and
``/openapi.json``. The fake router is the one of ``test_frontend.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client as NatsClient

from tandem.config import to_argv
from tandem.engine.tokenizer import Tokenizer
from tandem.protocol import Subjects
from tandem.protocol.messages import ErrorReply, RouteRequest, encode
from tandem.services.frontend import Frontend, FrontendConfig, create_app
from tandem.services.frontend.config import API_KEY_ENV
from tandem.services.frontend.preprocess import TOKENIZE_IN_THREAD_CHARS
from tandem.services.frontend.service import build_parser
from tandem.services.launch_plan import build_parser as launcher_parser
from tandem.services.messaging import TaskTracker
from tandem.services.runtime import connect
from tests.service.test_frontend import MODEL, FakeRouter, chat_body, read_sse
from tests.service.util import eventually

KEY = "s3cret-key"
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from tandem.engine.weights import prepare_model

    return prepare_model()


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer(model_dir)


@dataclass
class Stack:
    """A frontend (HTTP test client + public NATS subjects) and a fake router, one namespace."""

    frontend: Frontend
    client: TestClient[web.Request, web.Application]
    router: FakeRouter
    peer: NatsClient  # the router's connection; tests use it as a NATS client too
    subjects: Subjects

    async def nats(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> Any:
        """One public NATS request/reply; the reply JSON."""
        msg = await self.peer.request(subject, data, timeout=10, headers=headers)
        return json.loads(msg.data)

    async def nats_stream(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> list[bytes]:
        """The payloads a streaming public request gets, up to and including ``[DONE]``."""
        inbox = self.peer.new_inbox()
        sub = await self.peer.subscribe(inbox)
        try:
            await self.peer.publish(subject, data, reply=inbox, headers=headers)
            out: list[bytes] = []
            while not out or out[-1] != b"[DONE]":
                out.append((await sub.next_msg(timeout=10)).data)
            return out
        finally:
            await sub.unsubscribe()

    async def ok(self, headers: dict[str, str] | None = None) -> None:
        """A valid request succeeds (the frontend still serves)."""
        resp = await self.client.post("/v1/chat/completions", json=chat_body(max_tokens=8), headers=headers)
        assert resp.status == 200, await resp.text()


@contextlib.asynccontextmanager
async def stack(nats_url: str, tokenizer: Tokenizer, **config: Any) -> AsyncIterator[Stack]:
    ns = f"hd{uuid.uuid4().hex[:8]}"
    subjects = Subjects(ns)
    nc = await connect(nats_url, f"frontend-{ns}")
    config.setdefault("api_key", "")  # no key unless a test sets one (whatever $TANDEM_API_KEY says)
    cfg = FrontendConfig(model_name=MODEL, chunk_timeout_s=5.0, health_timeout_s=0.3, **config)
    fe = Frontend(nc, subjects, tokenizer, cfg, tracker=TaskTracker())
    await fe.start()
    client = TestClient(TestServer(create_app(fe), handler_cancellation=True))
    await client.start_server()
    peer = await connect(nats_url, f"router-{ns}")
    router = FakeRouter(peer, subjects, tokenizer)
    await router.start()
    try:
        yield Stack(fe, client, router, peer, subjects)
    finally:
        for t in list(router.tasks):
            t.cancel()
        await client.close()
        await fe.close()
        await fe.tracker.drain(2.0)
        await peer.close()
        await nc.close()


def assert_openai_error(body: Any, status: int | None = None) -> dict[str, Any]:
    """``body`` is OpenAI's error body (plus ``status`` on NATS); returns the ``error`` object."""
    assert set(body["error"]) == ERROR_FIELDS, body
    assert body["error"]["message"]
    if status is not None and "status" in body:
        assert body["status"] == status, body
    err: dict[str, Any] = body["error"]
    return err


class Gate:
    """A router behaviour that sends the first chunk, then holds every request until opened."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.started = 0

    async def __call__(self, router: FakeRouter, route: RouteRequest) -> None:
        chunks = router.chunks(route, router.reply_tokens())
        await router.send(route, chunks[:1])
        self.started += 1
        await self.opened.wait()
        await router.send(route, chunks[1:])


# ---- admission -----------------------------------------------------------------------------------------


async def test_admission_bound_refuses_with_429_at_once(nats_url: str, tokenizer: Tokenizer) -> None:
    async with stack(nats_url, tokenizer, max_inflight=2) as s:
        gate = Gate()
        s.router.behavior = gate
        fe = s.frontend
        held = [
            asyncio.create_task(s.client.post("/v1/chat/completions", json=chat_body(stream=True)))
            for _ in range(2)
        ]
        await eventually(lambda: gate.started == 2)
        assert fe.admission.inflight == 2
        routed = len(s.router.routes)

        t0 = time.perf_counter()
        resp = await s.client.post("/v1/chat/completions", json=chat_body())
        assert resp.status == 429
        assert time.perf_counter() - t0 < 1.0  # at once, not queued
        assert resp.headers["Retry-After"] == "1"
        err = assert_openai_error(await resp.json())
        assert (err["type"], err["code"]) == ("rate_limit_error", "server_busy")
        resp = await s.client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"})
        assert resp.status == 429

        # public NATS: the same 429 with the hint in the body; a streaming request gets [DONE] too
        body = await s.nats(s.subjects.chat_completions, json.dumps(chat_body()).encode())
        assert body["status"] == 429 and body["retry_after"] == 1
        assert assert_openai_error(body)["code"] == "server_busy"
        payloads = await s.nats_stream(
            s.subjects.completions, b'{"model": "x", "prompt": "a", "stream": true}'
        )
        assert json.loads(payloads[0])["status"] == 429 and payloads[1:] == [b"[DONE]"]
        # models is not a completion: never refused for load
        assert (await s.nats(s.subjects.models, b""))["object"] == "list"
        assert (await s.client.get("/v1/models")).status == 200

        assert len(s.router.routes) == routed  # nothing refused reached the router
        assert fe.admission.rejected == 4 and fe.admission.inflight == 2
        gate.opened.set()
        for task in held:
            resp = await task
            assert (await read_sse(resp))[-1] == "[DONE]"
        await eventually(lambda: fe.admission.inflight == 0)
        await s.ok()
        assert len(fe.tracker) == 0


async def test_admission_slot_released_on_every_exit_path(nats_url: str, tokenizer: Tokenizer) -> None:
    """With one slot, any leaked slot makes the next request a 429."""
    async with stack(nats_url, tokenizer, max_inflight=1, max_request_bytes=4096) as s:
        fe = s.frontend

        async def released() -> None:
            await eventually(lambda: fe.admission.inflight == 0)
            await s.ok()
            assert fe.admission.inflight == 0

        # success (both transports), validation error, oversized body
        await released()
        assert (await s.nats(s.subjects.chat_completions, json.dumps(chat_body()).encode()))["object"]
        await released()
        assert (await s.client.post("/v1/chat/completions", json=chat_body(n=3))).status == 400
        await released()
        assert (await s.client.post("/v1/chat/completions", data=b"x" * 5000)).status == 413
        await released()
        assert (await s.nats(s.subjects.completions, b"{"))["status"] == 400
        await released()

        # an error from the pipeline (what serve() answers on a bad payload)
        async def reply_error(router: FakeRouter, route: RouteRequest) -> None:
            await router.nc.publish(route.reply_to, encode(ErrorReply(code=400, message="bad RouteRequest")))

        s.router.behavior = reply_error
        assert (await s.client.post("/v1/chat/completions", json=chat_body(stream=True))).status == 400
        assert (await s.nats(s.subjects.chat_completions, json.dumps(chat_body()).encode()))["status"] == 400
        s.router.behavior = None
        await released()

        # client disconnects: mid-stream, and while a non-streaming request waits
        for stream in (True, False):
            gate = Gate()
            s.router.behavior = gate
            async with ClientSession() as session:
                post = asyncio.create_task(
                    session.post(s.client.make_url("/v1/chat/completions"), json=chat_body(stream=stream))
                )
                if stream:
                    resp = await post
                    assert resp.status == 200
                    assert (await resp.content.readline()).startswith(b"data: ")
                    resp.close()
                else:
                    await eventually(lambda g=gate: g.started == 1)  # type: ignore[misc]
                    post.cancel()  # the client gives up while the request waits
                    with contextlib.suppress(asyncio.CancelledError):
                        await post
            await s.router.wait_cancel(s.router.routes[-1].request_id)
            s.router.behavior = None
            gate.opened.set()
            await released()

        # a task cancelled before it ever ran (shutdown drain) still gives its slot back
        held: list[asyncio.Task[Any]] = []
        original = fe.tracker.spawn

        def spawn_and_cancel(coro: Any, *, name: str | None = None) -> asyncio.Task[Any]:
            task = original(coro, name=name)
            task.cancel()
            held.append(task)
            return task

        fe.tracker.spawn = spawn_and_cancel  # type: ignore[method-assign]
        try:
            await s.peer.publish(s.subjects.chat_completions, json.dumps(chat_body()).encode(), reply="x.y")
            await s.peer.flush()
            await eventually(lambda: bool(held) and held[0].done())
        finally:
            fe.tracker.spawn = original  # type: ignore[method-assign]
        await released()
        assert fe.admission.admitted > 10 and fe.admission.rejected == 0


@pytest.mark.slow
async def test_overload_10x_keeps_memory_flat(nats_url: str, tokenizer: Tokenizer) -> None:
    """10x the limit, in waves: never more than the limit held, the rest refused at once, the
    tracker holds only admitted requests, and RSS does not grow from wave to wave."""
    limit = 8
    async with stack(nats_url, tokenizer, max_inflight=limit) as s:
        fe = s.frontend

        async def slow(router: FakeRouter, route: RouteRequest) -> None:
            router.routes.clear()  # the fake router's own records are not the frontend's memory
            router.headers.clear()
            await asyncio.sleep(0.3)
            await router.normal(route)

        s.router.behavior = slow
        peak = 0
        done = False

        async def watch() -> None:
            nonlocal peak
            while not done:
                peak = max(peak, fe.admission.inflight, len(fe.tracker))
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        body = json.dumps(chat_body("word " * 2000, max_tokens=8)).encode()
        rss: list[int] = []
        statuses: dict[int, int] = {}
        for _wave in range(6):
            http = [
                s.client.post("/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
                for _ in range(8 * limit)
            ]
            nats = [s.peer.request(s.subjects.chat_completions, body, timeout=10) for _ in range(2 * limit)]
            for resp in await asyncio.gather(*http):
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                await resp.read()
            for msg in await asyncio.gather(*nats):
                reply = json.loads(msg.data)
                status = reply.get("status", 200)
                statuses[status] = statuses.get(status, 0) + 1
            await eventually(lambda: fe.admission.inflight == 0)
            gc.collect()
            rss.append(psutil.Process().memory_info().rss)
        done = True
        await watcher
        assert set(statuses) == {200, 429}, statuses
        assert statuses[429] >= sum(statuses.values()) // 2  # most of each wave refused at once
        assert peak <= limit
        growth = (rss[-1] - rss[1]) / 2**20
        assert growth < 24, f"RSS grew {growth:.1f} MiB over 4 waves of 10x overload: {rss}"
        await s.ok()


# ---- API key ----------------------------------------------------------------------------------------------


async def test_api_key_required_on_http_and_nats(nats_url: str, tokenizer: Tokenizer) -> None:
    async with stack(nats_url, tokenizer, api_key=KEY) as s:
        fe = s.frontend
        good = {"Authorization": f"Bearer {KEY}"}
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": KEY},
            {"Authorization": "Basic x"},
        ):
            for method, path in (
                ("GET", "/v1/models"),
                ("GET", f"/v1/models/{MODEL}"),
                ("GET", "/openapi.json"),
                ("POST", "/v1/chat/completions"),
                ("POST", "/v1/completions"),
                ("GET", "/v1/nope"),  # unknown routes too: no route enumeration without the key
            ):
                resp = await s.client.request(method, path, json=chat_body(), headers=headers)
                assert resp.status == 401, (method, path, headers)
                assert resp.headers["WWW-Authenticate"] == "Bearer"
                err = assert_openai_error(await resp.json())
                assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_api_key")
        assert fe.admission.admitted == 0  # a refused key takes no slot
        assert not s.router.routes
        # probes stay open
        assert (await s.client.get("/health")).status == 200
        assert (await s.client.get("/live")).status == 200
        assert (await s.client.get("/ready")).status == 401  # what the stack can do: key needed
        assert (await s.client.get("/ready", headers=good)).status == 503  # no workers here
        # the right key
        assert (await s.client.get("/v1/models", headers=good)).status == 200
        assert (await s.client.get("/v1/models", headers={"Authorization": f"bearer  {KEY} "})).status == 200
        await s.ok(headers=good)
        doc = await (await s.client.get("/openapi.json", headers=good)).json()
        assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
        assert doc["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]
        assert doc["paths"]["/health"]["get"]["security"] == []

        # public NATS: the same key in an Authorization header
        data = json.dumps(chat_body()).encode()
        for headers in (None, {"Authorization": "Bearer nope"}):
            for subject in (s.subjects.chat_completions, s.subjects.completions, s.subjects.models):
                body = await s.nats(subject, data, headers=headers)
                assert body["status"] == 401
                assert assert_openai_error(body)["code"] == "invalid_api_key"
        payloads = await s.nats_stream(
            s.subjects.chat_completions, json.dumps(chat_body(stream=True)).encode()
        )
        assert json.loads(payloads[0])["status"] == 401 and payloads[1:] == [b"[DONE]"]
        assert (await s.nats(s.subjects.chat_completions, data, headers=good))["object"] == "chat.completion"
        assert (await s.nats(s.subjects.models, b"", headers={"authorization": f"Bearer {KEY}"}))["data"]


def test_api_key_comes_from_the_environment_and_stays_off_command_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert FrontendConfig().resolved_api_key() is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    cfg = FrontendConfig()
    assert cfg.resolved_api_key() == "from-env"
    assert FrontendConfig(api_key="flag").resolved_api_key() == "flag"
    assert FrontendConfig(api_key="").resolved_api_key() is None  # explicitly off
    # resolved at start: never a default in --help, never on the launcher's child command lines
    assert "from-env" not in build_parser().format_help()
    assert "from-env" not in launcher_parser().format_help()
    assert "--api-key" not in to_argv(cfg, only_changed=False)


def test_launcher_takes_over_the_new_flags() -> None:
    text = launcher_parser().format_help()
    for flag in ("--max-inflight", "--api-key", "--max-request-bytes"):
        assert flag in text
    with pytest.raises(ValueError, match="max_inflight"):
        FrontendConfig(max_inflight=-1)
    with pytest.raises(ValueError, match="max_request_bytes"):
        FrontendConfig(max_request_bytes=10)
    assert FrontendConfig().max_inflight == 256 and FrontendConfig().max_request_bytes == 4 * 2**20


# ---- sizes ------------------------------------------------------------------------------------------------


async def test_oversized_bodies_get_413_before_being_read(nats_url: str, tokenizer: Tokenizer) -> None:
    async with stack(nats_url, tokenizer, max_request_bytes=64 * 1024) as s:
        big = json.dumps(chat_body("x" * 100_000)).encode()
        resp = await s.client.post(
            "/v1/chat/completions", data=big, headers={"Content-Type": "application/json"}
        )
        assert resp.status == 413
        err = assert_openai_error(await resp.json())
        assert err["code"] == "request_too_large" and "65536" in err["message"]

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: caught while reading
            for i in range(0, len(big), 8192):
                yield big[i : i + 8192]

        resp = await s.client.post("/v1/completions", data=chunked())
        assert resp.status == 413
        assert assert_openai_error(await resp.json())["code"] == "request_too_large"
        body = await s.nats(s.subjects.chat_completions, big)
        assert body["status"] == 413
        assert not s.router.routes
        await s.ok()
        assert s.frontend.admission.inflight == 0


async def heartbeat_gap(work: Awaitable[Any]) -> tuple[Any, float]:
    """Run ``work``; also the longest the event loop went without running a 2 ms ticker, s."""
    gaps: list[float] = []
    stop = False

    async def tick() -> None:
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    try:
        result = await work
    finally:
        stop = True
        await ticker
    return result, max(gaps)


async def test_prompt_too_long_in_characters_is_refused_before_tokenizing(
    nats_url: str, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with stack(nats_url, tokenizer, max_model_len=64, max_request_bytes=16 * 2**20) as s:
        pre = s.frontend.preprocessor
        assert pre.max_token_chars >= 16  # SmolLM2: 81 (a run of spaces)
        assert pre.max_prompt_chars == 64 * pre.max_token_chars
        calls: list[int] = []

        def counting(text: str, add_special_tokens: bool = False) -> list[int]:
            calls.append(len(text))
            return []

        monkeypatch.setattr(tokenizer, "encode", counting)
        monkeypatch.setattr(pre.encoder, "encode", lambda text: counting(text))
        too_long = "a" * (pre.max_prompt_chars + 1)
        split = [  # together over the limit, each part under it
            {"role": "system", "content": too_long[:100]},
            {"role": "user", "content": too_long[100:]},
        ]
        for path, body in (
            ("/v1/completions", {"model": MODEL, "prompt": too_long}),
            ("/v1/chat/completions", {"model": MODEL, "messages": split}),
        ):
            resp = await s.client.post(path, json=body)
            assert resp.status == 400
            err = assert_openai_error(await resp.json())
            assert err["code"] == "context_length_exceeded" and "characters" in err["message"]
        assert calls == []  # never tokenized
        # token ids: refused on their count before each id is checked
        resp = await s.client.post("/v1/completions", json={"model": MODEL, "prompt": list(range(64))})
        assert resp.status == 400
        assert assert_openai_error(await resp.json())["code"] == "context_length_exceeded"
        monkeypatch.undo()

        # a 10 MB prompt: refused in well under a second, the event loop never stalls for long
        text = "hello world, this is a test. " * 350_000
        data = json.dumps({"model": MODEL, "prompt": text}).encode()
        t0 = time.perf_counter()
        resp, gap = await heartbeat_gap(
            s.client.post("/v1/completions", data=data, headers={"Content-Type": "application/json"})
        )
        assert resp.status == 400
        assert time.perf_counter() - t0 < 2.0
        assert gap < 0.5, f"event loop blocked {gap * 1000:.0f} ms"  # was ~10 s tokenizing inline


async def test_huge_bodies_within_the_size_limit_do_not_stall_the_loop(
    nats_url: str, tokenizer: Tokenizer
) -> None:
    """~4 MB bodies of many small items (2M token ids, 1M stop strings, 140k messages): refused
    with 400 in well under a second, parsed off the event loop. The bounds scale with what the
    same parse takes inline in this run (a loaded machine is slower at both)."""
    many_ids = b'{"model": "%s", "prompt": [' % MODEL.encode() + b",".join([b"1"] * 2_000_000) + b"]}"
    many_stops = (
        b'{"model": "%s", "prompt": "x", "stop": [' % MODEL.encode() + b",".join([b'"a"'] * 1_000_000) + b"]}"
    )
    message = b'{"role": "user", "content": "a"}'
    many_messages = b'{"model": "%s", "messages": [' % MODEL.encode() + b",".join([message] * 120_000) + b"]}"
    async with stack(nats_url, tokenizer) as s:
        for path, data, code in (
            ("/v1/completions", many_ids, "context_length_exceeded"),
            ("/v1/completions", many_stops, None),
            ("/v1/chat/completions", many_messages, "context_length_exceeded"),
        ):
            assert len(data) < s.frontend.config.max_request_bytes
            t0 = time.perf_counter()
            with contextlib.suppress(Exception):  # refused: what matters is how long it took
                s.frontend.preprocessor.parse("chat" if "chat" in path else "completion", data)
            inline_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            resp, gap = await heartbeat_gap(
                s.client.post(path, data=data, headers={"Content-Type": "application/json"})
            )
            assert resp.status == 400
            assert assert_openai_error(await resp.json())["code"] == code
            assert time.perf_counter() - t0 < max(3.0, 5 * inline_s)
            assert gap < max(0.5, 0.5 * inline_s), (
                f"{path}: event loop blocked {gap * 1000:.0f} ms (inline parse {inline_s * 1000:.0f} ms)"
            )
        await s.ok()


async def test_long_prompts_are_tokenized_off_the_event_loop(nats_url: str, tokenizer: Tokenizer) -> None:
    async with stack(nats_url, tokenizer) as s:
        pre = s.frontend.preprocessor
        # same ids inline and in the thread (chat: template + special tokens; completion: BOS/EOS)
        text = "Grüße 🚀 <|im_end|> hello\n\n   world " * (TOKENIZE_IN_THREAD_CHARS // 30)
        assert len(text) > TOKENIZE_IN_THREAD_CHARS
        for kind, body in (
            ("chat", chat_body(text[:20_000], max_tokens=4)),
            ("completion", {"model": MODEL, "prompt": text[:20_000], "max_tokens": 4}),
        ):
            data = json.dumps(body).encode()
            inline = pre.prepare(kind, data)  # type: ignore[arg-type]
            threaded = await pre.prepare_async(kind, data)  # type: ignore[arg-type]
            assert threaded.token_ids == inline.token_ids and threaded.block_hashes == inline.block_hashes

        # a prompt near the character limit (too many tokens): the loop keeps running meanwhile
        long = ("the quick brown fox jumps over the lazy dog. " * 20_000)[: pre.max_prompt_chars - 10]
        t0 = time.perf_counter()
        tokenizer.encode(long)
        inline_s = time.perf_counter() - t0
        data = json.dumps({"model": MODEL, "prompt": long}).encode()
        resp, gap = await heartbeat_gap(
            s.client.post("/v1/completions", data=data, headers={"Content-Type": "application/json"})
        )
        assert resp.status == 400
        assert assert_openai_error(await resp.json())["code"] == "context_length_exceeded"
        assert gap < max(0.5 * inline_s, 0.05), (
            f"loop blocked {gap * 1000:.0f} ms (inline {inline_s * 1000:.0f} ms)"
        )
        await s.ok()


# ---- malformed bodies -------------------------------------------------------------------------------------

DEEP = 100_000
MALFORMED: list[tuple[str, bytes]] = [
    (
        "invalid utf-8 in a string",
        b'{"model": "m", "prompt": "\xc3\x28", "messages": [{"role": "user", "content": "\xff"}]}',
    ),
    ("invalid utf-8 first byte", b"\xff\xfe{}"),
    ("nested arrays", b'{"model": "m", "prompt": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
    ("nested objects", b'{"model": "m", "messages": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}"),
    ("nested in stream", b'{"stream": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
    ("unclosed nesting", b"[" * DEEP),
    ("msgpack", msgspec.msgpack.encode({"model": MODEL, "prompt": "hi"})),
    ("msgpack nested", b"\x91" * DEEP + b"\x01"),
    ("top-level array", b"[1, 2, 3]"),
    ("top-level string", b'"hello"'),
    ("NaN literal", b'{"model": "m", "prompt": "a", "temperature": NaN}'),
    ("null", b"null"),
    ("whitespace", b" \n\t "),
]


@pytest.mark.parametrize(("name", "data"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_bodies_get_400_over_http_and_nats(
    nats_url: str, tokenizer: Tokenizer, name: str, data: bytes
) -> None:
    async with stack(nats_url, tokenizer) as s:
        for path, subject in (
            ("/v1/chat/completions", s.subjects.chat_completions),
            ("/v1/completions", s.subjects.completions),
        ):
            resp = await s.client.post(path, data=data, headers={"Content-Type": "application/json"})
            assert resp.status == 400, (name, path, await resp.text())
            assert_openai_error(await resp.json())
            body = await s.nats(subject, data)
            assert body["status"] == 400, (name, subject, body)
            assert_openai_error(body)
        assert not s.router.routes
        await s.ok()


async def test_malformed_streaming_nats_request_still_ends_with_done(
    nats_url: str, tokenizer: Tokenizer
) -> None:
    async with stack(nats_url, tokenizer) as s:
        for data in (
            b'{"stream": true, "model": "m", "messages": [{"role": "user", "content": "\xff"}]}',
            b'{"stream": true, "model": "m", "prompt": ' + b"[" * DEEP + b"]" * DEEP + b"}",
            json.dumps({"stream": True, "model": MODEL, "prompt": "a", "temperature": 9}).encode(),
        ):
            payloads = await s.nats_stream(s.subjects.completions, data)
            assert json.loads(payloads[0])["status"] == 400 and payloads[1:] == [b"[DONE]"], payloads


# ---- sampling validation ----------------------------------------------------------------------------------

BAD_SAMPLING: list[tuple[dict[str, Any], str]] = [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2**31}, "top_k"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": 2**70}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2**63}, "max_tokens"),
    ({"max_completion_tokens": -5}, "max_completion_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "x" * 513}, "stop"),
    ({"stop": [1, 2]}, "stop[0]"),
    ({"n": 2}, "n"),
    ({"n": 0}, "n"),
]


@pytest.mark.parametrize(("extra", "param"), BAD_SAMPLING, ids=[p for _e, p in BAD_SAMPLING])
async def test_sampling_values_are_validated_at_the_edge(
    nats_url: str, tokenizer: Tokenizer, extra: dict[str, Any], param: str
) -> None:
    async with stack(nats_url, tokenizer) as s:
        resp = await s.client.post("/v1/chat/completions", json=chat_body(**extra))
        assert resp.status == 400, await resp.text()
        assert assert_openai_error(await resp.json())["param"] == param
        body = await s.nats(s.subjects.chat_completions, json.dumps(chat_body(**extra)).encode())
        assert body["status"] == 400 and body["error"]["param"] == param
        if "max_completion_tokens" not in extra:  # a chat-only field
            body = await s.nats(
                s.subjects.completions, json.dumps({"model": MODEL, "prompt": "a", **extra}).encode()
            )
            assert body["status"] == 400 and body["error"]["param"] == param
        assert not s.router.routes


async def test_sampling_edge_values_and_greedy_below_1e_5(nats_url: str, tokenizer: Tokenizer) -> None:
    async with stack(nats_url, tokenizer) as s:
        # 1e999 does not fit a float: a 400 naming the parameter, not a 500
        resp = await s.client.post(
            "/v1/chat/completions",
            data=b'{"model": "%s", "messages": [{"role": "user", "content": "a"}], "temperature": 1e999}'
            % MODEL.encode(),
            headers={"Content-Type": "application/json"},
        )
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "temperature"
        for extra, expect in (
            ({"temperature": 1e-6}, {"temperature": 0.0}),
            ({"temperature": 0}, {"temperature": 0.0}),
            ({"temperature": 1e-5}, {"temperature": 1e-5}),
            ({"temperature": 2}, {"temperature": 2.0}),
            ({"seed": 2**63 - 1, "top_k": -1}, {"seed": 2**63 - 1, "top_k": 0}),
            ({"seed": -(2**63), "top_k": 2**31 - 1, "top_p": 1e-9}, {"seed": -(2**63), "top_k": 2**31 - 1}),
            ({"stop": ["x" * 512, "", "b", "c", "d"]}, {}),  # empty strings do not count
        ):
            resp = await s.client.post("/v1/chat/completions", json=chat_body(**extra))
            assert resp.status == 200, (extra, await resp.text())
            sampling = s.router.routes[-1].sampling
            for field, value in expect.items():
                assert getattr(sampling, field) == value, (extra, sampling)


# ---- OpenAPI ----------------------------------------------------------------------------------------------


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


async def test_openapi_document_describes_every_route(nats_url: str, tokenizer: Tokenizer) -> None:
    async with stack(nats_url, tokenizer) as s:
        resp = await s.client.get("/openapi.json")
        assert resp.status == 200 and resp.content_type == "application/json"
        doc = await resp.json()
        assert doc["openapi"].startswith("3.1")
        served = {
            (r.method.lower(), r.resource.canonical)
            for r in s.client.app.router.routes()
            if r.resource is not None and r.method in ("GET", "POST")
        }
        documented = {(m, p) for p, item in doc["paths"].items() for m in item if m in ("get", "post")}
        assert documented == served
        schemas = doc["components"]["schemas"]
        for ref in _refs(doc):
            assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
        chat = schemas["ChatCompletionRequest"]
        assert set(chat["required"]) == {"model", "messages"}
        assert chat["properties"]["model"]["enum"] == [MODEL]
        temp = next(b for b in chat["properties"]["temperature"]["anyOf"] if b["type"] == "number")
        assert (temp["minimum"], temp["maximum"]) == (0, 2)
        post = doc["paths"]["/v1/chat/completions"]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ChatCompletionRequest"
        )
        assert {"application/json", "text/event-stream"} <= set(post["responses"]["200"]["content"])
        assert {"400", "401", "413", "429"} <= set(post["responses"])
        assert "securitySchemes" not in doc["components"]  # no key configured
        for kind in ("ChatCompletion", "Completion", "ModelList", "ErrorResponse"):
            assert kind in schemas
