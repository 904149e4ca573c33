"""The frontend against a real nats-server, with a fake router written here.

The fake router subscribes to ``{ns}.router.generate`` and answers each ``RouteRequest`` by
publishing ``TokenChunk``\\ s to its ``reply_to`` (the frontend's inbox), the way the real router
(chunk 0) and decode worker (the rest) do. Each test picks the router's behaviour.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tandem.config import cli_fields, flag_name, to_argv
from tandem.engine.tokenizer import Tokenizer
from tandem.kvbm.hashing import compute_block_hashes
from tandem.protocol import Subjects
from tandem.protocol.messages import (
    Cancel,
    ErrorReply,
    Health,
    HealthRequest,
    InstanceInfo,
    KvTransferStats,
    RequestMetrics,
    RouteRequest,
    SamplingParams,
    TokenChunk,
    encode,
)
from tandem.services import observability
from tandem.services.discovery import InstanceRegistry
from tandem.services.frontend import (
    Frontend,
    FrontendConfig,
    StopStringMatcher,
    TextOutput,
    TokenStream,
    create_app,
)
from tandem.services.frontend.preprocess import PromptEncoder
from tandem.services.frontend.render import DONE, renderer_for, stream_batches
from tandem.services.frontend.service import parse_args
from tandem.services.messaging import TaskTracker, serve, sync_with_server
from tandem.services.runtime import connect, ensure_jetstream
from tests.conftest import free_port

MODEL = "smollm2-135m-instruct"
REPLY_TEXT = "Hello world! Ünïcødé ✓ and emoji 🚀 — done."
CHUNK_TIMEOUT_S = 3.0

# ---- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from tandem.engine.weights import prepare_model

    return prepare_model()


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer(model_dir)


Behavior = Callable[["FakeRouter", RouteRequest], Coroutine[Any, Any, None]]


@dataclass
class FakeRouter:
    """Answers RouteRequests with TokenChunks; records requests, headers and Cancels."""

    nc: NatsClient
    subjects: Subjects
    tokenizer: Tokenizer
    routes: list[RouteRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    cancels: list[Cancel] = field(default_factory=list)
    behavior: Behavior | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _cancel_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        await self.nc.subscribe(self.subjects.router_generate, queue="router", cb=self._on_route)
        await self.nc.subscribe(self.subjects.cancel, cb=self._on_cancel)
        await sync_with_server(self.nc)  # nc.flush() alone can return before the SUBs arrive

    async def _on_route(self, msg: NatsMsg) -> None:
        route = msgspec.msgpack.decode(msg.data, type=RouteRequest)
        self.routes.append(route)
        self.headers.append(dict(msg.headers or {}))
        behavior = self.behavior or FakeRouter.normal
        task = asyncio.create_task(behavior(self, route))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _on_cancel(self, msg: NatsMsg) -> None:
        self.cancels.append(msgspec.msgpack.decode(msg.data, type=Cancel))
        self._cancel_event.set()

    async def wait_cancel(self, request_id: str, within: float = 5.0) -> Cancel:
        async with asyncio.timeout(within):
            while True:
                for c in self.cancels:
                    if c.request_id == request_id:
                        return c
                self._cancel_event.clear()
                await self._cancel_event.wait()

    def reply_tokens(self, text: str = REPLY_TEXT) -> list[int]:
        return self.tokenizer.encode(text)

    def chunks(
        self, route: RouteRequest, token_ids: list[int], *, per_chunk: int = 2, finish: str = "stop"
    ) -> list[TokenChunk]:
        """Chunk 0 = one token from the "prefill" side, then ``per_chunk`` tokens per chunk, eos last."""
        eos = self.tokenizer.eos_token_id
        ids = [*token_ids, eos] if finish == "stop" and eos is not None else list(token_ids)
        groups = [ids[:1]] + [ids[i : i + per_chunk] for i in range(1, len(ids), per_chunk)]
        out = []
        for i, g in enumerate(groups):
            last = i == len(groups) - 1
            out.append(
                TokenChunk(
                    request_id=route.request_id,
                    index=i,
                    token_ids=g,
                    worker_id="prefill-1" if i == 0 else "decode-1",
                    finish_reason=finish if last else None,  # type: ignore[arg-type]
                    metrics=self.metrics() if last else None,
                )
            )
        return out

    @staticmethod
    def metrics() -> RequestMetrics:
        return RequestMetrics(
            prefill_worker="prefill-1",
            decode_worker="decode-1",
            cached_tokens=32,
            prefill_ms=7.5,
            kv_transfer=KvTransferStats(blocks=3, bytes=3 * 4096, ms=1.25, reused_blocks=2),
        )

    async def send(self, route: RouteRequest, chunks: list[TokenChunk], delay: float = 0.0) -> None:
        for c in chunks:
            await self.nc.publish(route.reply_to, encode(c))
            if delay:
                await asyncio.sleep(delay)
        await self.nc.flush()

    async def normal(self, route: RouteRequest) -> None:
        await self.send(route, self.chunks(route, self.reply_tokens()))


@dataclass
class Env:
    nc: NatsClient
    subjects: Subjects
    frontend: Frontend
    router: FakeRouter
    client: TestClient[web.Request, web.Application]
    tokenizer: Tokenizer
    spans: InMemorySpanExporter


async def _start_frontend(
    nats_url: str, ns: str, tokenizer: Tokenizer
) -> tuple[NatsClient, Frontend, TestClient[web.Request, web.Application]]:
    nc = await connect(nats_url, f"frontend-{ns}")
    subjects = Subjects(ns)
    fe = Frontend(
        nc,
        subjects,
        tokenizer,
        FrontendConfig(model_name=MODEL, chunk_timeout_s=CHUNK_TIMEOUT_S, health_timeout_s=0.5),
        tracker=TaskTracker(),
    )
    await fe.start()
    client = TestClient(TestServer(create_app(fe), handler_cancellation=True))
    await client.start_server()
    return nc, fe, client


async def _stop_frontend(nc: NatsClient, fe: Frontend, client: TestClient[Any, Any]) -> None:
    await client.close()
    await fe.close()
    await fe.tracker.drain(2.0)
    await nc.close()


@pytest.fixture(scope="module")
async def module_env(nats_url: str, tokenizer: Tokenizer) -> AsyncIterator[Env]:
    ns = f"fe{uuid.uuid4().hex[:8]}"
    spans = InMemorySpanExporter()
    observability.setup_tracing("test-frontend", exporter=spans)
    nc, fe, client = await _start_frontend(nats_url, ns, tokenizer)
    router_nc = await connect(nats_url, "fake-router")
    router = FakeRouter(router_nc, Subjects(ns), tokenizer)
    await router.start()
    try:
        yield Env(nc, Subjects(ns), fe, router, client, tokenizer, spans)
    finally:
        observability.setup_tracing("test-frontend")  # stop recording into this exporter
        for t in list(router.tasks):
            t.cancel()
        await router_nc.close()
        await _stop_frontend(nc, fe, client)


@pytest.fixture
def env(module_env: Env) -> Env:
    """The module's frontend, with the fake router back to its normal behaviour."""
    module_env.router.behavior = None
    return module_env


def chat_body(content: str = "Say hello.", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def read_sse(resp: Any) -> list[str]:
    """The ``data:`` payloads of an SSE response, in order (up to and including ``[DONE]``)."""
    out = []
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            out.append(line[len("data: ") :])
            if out[-1] == "[DONE]":
                break
    return out


def expected_text(tokenizer: Tokenizer, text: str = REPLY_TEXT) -> str:
    return tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True)


# ---- tests ----------------------------------------------------------------------------------------------


async def test_chat_non_streaming(env: Env) -> None:
    resp = await env.client.post("/v1/chat/completions", json=chat_body(max_tokens=100, seed=7))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert body["id"].startswith("chatcmpl-")
    assert resp.headers["X-Request-Id"] == body["id"]
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected_text(env.tokenizer)}
    assert choice["finish_reason"] == "stop"

    route = env.router.routes[-1]
    assert route.request_id == body["id"]
    assert route.model == MODEL
    assert route.block_hashes == compute_block_hashes(route.token_ids, 16)
    assert len(route.block_hashes) == len(route.token_ids) // 16
    assert route.sampling.max_tokens == 100
    assert route.sampling.seed == 7
    assert route.sampling.stop_token_ids == [env.tokenizer.eos_token_id]
    assert route.reply_to.startswith("_INBOX.")
    prompt = env.tokenizer.decode(route.token_ids)
    assert "Say hello." in prompt and prompt.endswith("<|im_start|>assistant\n")

    n_tokens = len(env.router.reply_tokens()) + 1  # + eos
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(route.token_ids)
    assert usage["completion_tokens"] == n_tokens
    assert usage["total_tokens"] == len(route.token_ids) + n_tokens
    assert usage["prompt_tokens_details"] == {"cached_tokens": 32}
    ext = body["tandem"]
    assert ext["request_id"] == body["id"]
    assert ext["prefill_worker"] == "prefill-1"
    assert ext["decode_worker"] == "decode-1"
    assert ext["cached_tokens"] == 32
    assert ext["kv_transfer"] == {"blocks": 3, "bytes": 3 * 4096, "ms": 1.25, "reused_blocks": 2}
    assert ext["ttft_ms"] > 0
    assert not [c for c in env.router.cancels if c.request_id == body["id"]]  # finished: no Cancel


async def test_chat_streaming(env: Env) -> None:
    resp = await env.client.post(
        "/v1/chat/completions", json=chat_body(stream=True, stream_options={"include_usage": True})
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == expected_text(env.tokenizer)
    assert len(chunks) > 4  # really streamed, not one blob
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "stop"
    assert finish[0]["tandem"]["decode_worker"] == "decode-1"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 32


async def test_completions_text_and_token_ids(env: Env) -> None:
    resp = await env.client.post("/v1/completions", json={"model": MODEL, "prompt": "Once upon a time"})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected_text(env.tokenizer)
    route = env.router.routes[-1]
    assert route.token_ids == env.tokenizer.encode("Once upon a time")
    assert route.sampling.max_tokens == 16  # OpenAI's legacy default
    assert "token_ids" not in body["choices"][0]  # only when asked for

    resp = await env.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "Once upon a time", "return_token_ids": True}
    )
    choice = (await resp.json())["choices"][0]
    eos = env.tokenizer.eos_token_id
    assert choice["token_ids"] == [*env.router.reply_tokens(), eos]
    resp = await env.client.post("/v1/chat/completions", json={**chat_body(), "return_token_ids": True})
    assert (await resp.json())["choices"][0]["token_ids"] == [*env.router.reply_tokens(), eos]

    resp = await env.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": [[1, 2, 3]], "stream": True, "max_tokens": 5}
    )
    events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == expected_text(env.tokenizer)
    assert env.router.routes[-1].token_ids == [1, 2, 3]


async def test_out_of_order_chunks_are_reordered(env: Env) -> None:
    async def shuffled(router: FakeRouter, route: RouteRequest) -> None:
        chunks = router.chunks(route, router.reply_tokens(), per_chunk=1)
        random.Random(1).shuffle(chunks)
        chunks.append(chunks[0])  # a duplicate is dropped
        await router.send(route, chunks)

    env.router.behavior = shuffled
    resp = await env.client.post("/v1/chat/completions", json=chat_body())
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == expected_text(env.tokenizer)
    assert body["usage"]["completion_tokens"] == len(env.router.reply_tokens()) + 1

    resp = await env.client.post("/v1/chat/completions", json=chat_body(stream=True))
    events = await read_sse(resp)
    content = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert content == expected_text(env.tokenizer)


async def test_stop_string_truncates_and_cancels(env: Env) -> None:
    text = "The answer is 42. STOP and ignore this."

    async def slow(router: FakeRouter, route: RouteRequest) -> None:
        await router.send(route, router.chunks(route, router.reply_tokens(text), per_chunk=1), delay=0.01)

    env.router.behavior = slow
    resp = await env.client.post("/v1/chat/completions", json=chat_body(stop=["STOP", "never"]))
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "The answer is 42. "
    assert body["choices"][0]["finish_reason"] == "stop"
    cancel = await env.router.wait_cancel(body["id"])
    assert cancel.reason == "stop_string"
    assert body["tandem"]["prefill_worker"] == "prefill-1"  # known from the chunks themselves

    # streaming: text that might start a stop string is held back, never emitted
    resp = await env.client.post("/v1/chat/completions", json=chat_body(stop="42. ST", stream=True))
    events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == "The answer is "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    await env.router.wait_cancel(chunks[0]["id"])


def test_stop_string_matcher() -> None:
    m = StopStringMatcher(["abc", "xy"])
    assert m.feed("hello a") == ("hello ", False)
    assert m.feed("b") == ("", False)
    assert m.feed("d x") == ("abd ", False)
    assert m.feed("z") == ("xz", False)
    assert m.feed("..x") == ("..", False)
    assert m.feed("y tail") == ("", True)
    m = StopStringMatcher(["END"])
    assert m.feed("no match E") == ("no match ", False)
    assert m.flush() == "E"
    assert StopStringMatcher([]).feed("abc") == ("abc", False)


def test_text_output_detokenizes_and_stops(tokenizer: Tokenizer) -> None:
    out = TextOutput(tokenizer, ["STOP"])
    pieces = []
    for t in tokenizer.encode("Grüße 🚀 from the STOP sign"):  # one token at a time
        delta = out.feed([t])
        pieces.append(delta.text)
        if delta.stopped:
            break
    assert delta.stopped
    assert "".join(pieces) == "Grüße 🚀 from the "
    assert not any("\ufffd" in p for p in pieces)  # never half a character

    out = TextOutput(tokenizer, ["never"])
    held = "".join(out.feed([t]).text for t in tokenizer.encode("ends with nev"))
    assert held == "ends with "  # "nev" may still become "never"
    eos = tokenizer.eos_token_id
    assert eos is not None
    assert out.feed([eos], final=True) == ("nev", False)  # eos is no text


BAD_REQUESTS: list[tuple[str, bytes | dict[str, Any], int, str | None, str | None]] = [
    # path, body, status, param, code
    ("/v1/chat/completions", b'{"model": "x", "messages": [', 400, None, "invalid_json"),
    ("/v1/chat/completions", b"", 400, None, None),
    ("/v1/chat/completions", chat_body() | {"model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", None),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"content": "hi"}]},
        400,
        "messages[0].role",
        None,
    ),
    ("/v1/chat/completions", chat_body(max_tokens=-1), 400, "max_tokens", None),
    ("/v1/chat/completions", chat_body(max_tokens=0), 400, "max_tokens", None),
    ("/v1/chat/completions", chat_body(max_tokens=10**12), 400, "max_tokens", "context_length_exceeded"),
    (
        "/v1/chat/completions",
        chat_body(max_completion_tokens=9000),
        400,
        "max_completion_tokens",
        "context_length_exceeded",
    ),
    ("/v1/chat/completions", chat_body(max_tokens="many"), 400, "max_tokens", None),
    ("/v1/chat/completions", chat_body(n=2), 400, "n", None),
    ("/v1/chat/completions", chat_body(temperature=-0.5), 400, "temperature", None),
    ("/v1/chat/completions", chat_body("word " * 9000), 400, "messages", "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 8192}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", None),
    ("/v1/nope", {}, 404, None, None),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), BAD_REQUESTS)
async def test_bad_requests_get_openai_errors(
    env: Env, path: str, body: bytes | dict[str, Any], status: int, param: str | None, code: str | None
) -> None:
    n_routes = len(env.router.routes)
    if isinstance(body, bytes):
        resp = await env.client.post(path, data=body, headers={"Content-Type": "application/json"})
    else:
        resp = await env.client.post(path, json=body)
    assert resp.status == status
    err = (await resp.json())["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    assert err["param"] == param
    assert err["code"] == code
    assert len(env.router.routes) == n_routes  # nothing was routed
    ok = await env.client.post("/v1/chat/completions", json=chat_body())
    assert ok.status == 200  # still serving


async def test_method_not_allowed_is_openai_error(env: Env) -> None:
    resp = await env.client.get("/v1/chat/completions")
    assert resp.status == 405
    assert "error" in await resp.json()


async def test_models_and_health(env: Env) -> None:
    resp = await env.client.get("/v1/models")
    body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert (await env.client.get(f"/v1/models/{MODEL}")).status == 200
    assert (await env.client.get("/v1/models/other")).status == 404
    assert (await env.client.get("/health")).status == 200


async def test_pipeline_error_chunk_maps_to_status(env: Env) -> None:
    async def failing(router: FakeRouter, route: RouteRequest) -> None:
        err = ErrorReply(
            code=503, message="no decode worker", request_id=route.request_id, type="unavailable"
        )
        await router.send(
            route,
            [
                TokenChunk(
                    request_id=route.request_id, index=0, token_ids=[], finish_reason="error", error=err
                )
            ],
        )

    env.router.behavior = failing
    resp = await env.client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 503
    assert (await resp.json())["error"]["message"] == "no decode worker"

    async def reply_error(router: FakeRouter, route: RouteRequest) -> None:  # like serve() on a bad payload
        await router.nc.publish(route.reply_to, encode(ErrorReply(code=400, message="bad RouteRequest")))

    env.router.behavior = reply_error
    resp = await env.client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 400  # error before the first chunk: a real status, not an SSE body
    assert (await resp.json())["error"]["message"] == "bad RouteRequest"

    async def fail_midway(router: FakeRouter, route: RouteRequest) -> None:
        chunks = router.chunks(route, router.reply_tokens())[:3]
        err = ErrorReply(code=500, message="decode worker died")
        chunks.append(
            TokenChunk(request_id=route.request_id, index=3, token_ids=[], finish_reason="error", error=err)
        )
        await router.send(route, chunks)

    env.router.behavior = fail_midway
    resp = await env.client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 200
    events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"] == "decode worker died"


BUSY_MESSAGE = "all decode workers are busy"


def busy_chunk(route: RouteRequest, index: int, retry_after_s: float | None = 2.5) -> TokenChunk:
    """The error chunk a busy pipeline sends: 503 with a retry hint."""
    err = ErrorReply(
        code=503,
        message=BUSY_MESSAGE,
        request_id=route.request_id,
        type="unavailable",
        retry_after_s=retry_after_s,
    )
    return TokenChunk(
        request_id=route.request_id, index=index, token_ids=[], finish_reason="error", error=err
    )


async def nats_stream(nc: NatsClient, subject: str, body: dict[str, Any]) -> list[bytes]:
    """The payloads a public streaming NATS request gets, up to and including ``[DONE]``."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, json.dumps(body).encode(), reply=inbox)
        payloads: list[bytes] = []
        while not payloads or payloads[-1] != b"[DONE]":
            payloads.append((await sub.next_msg(timeout=5)).data)
        return payloads
    finally:
        await sub.unsubscribe()


async def test_busy_pipeline_sets_retry_after(env: Env) -> None:
    async def busy(router: FakeRouter, route: RouteRequest) -> None:
        await router.send(route, [busy_chunk(route, 0)])

    env.router.behavior = busy
    resp = await env.client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "3"  # 2.5 s, rounded up
    body = await resp.json()
    assert body == {"error": {"message": BUSY_MESSAGE, "type": "unavailable", "param": None, "code": None}}

    # streaming, failing before the first chunk: a real status, so the header too
    resp = await env.client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "3"
    assert (await resp.json())["error"]["message"] == BUSY_MESSAGE

    # NATS: the hint rides in the error body, next to the status
    nc = env.router.nc
    msg = await nc.request(env.subjects.chat_completions, json.dumps(chat_body()).encode(), timeout=5)
    assert json.loads(msg.data) == {**body, "status": 503, "retry_after": 3}
    payloads = await nats_stream(
        nc, env.subjects.completions, {"model": MODEL, "prompt": "Hi", "stream": True}
    )
    assert [json.loads(p) for p in payloads[:-1]] == [{**body, "status": 503, "retry_after": 3}]

    # 429 as an ErrorReply on the inbox (what serve() sends for a ServiceError); < 1 s → 1
    async def rate_limited(router: FakeRouter, route: RouteRequest) -> None:
        err = ErrorReply(code=429, message="slow down", type="rate_limit_error", retry_after_s=0.2)
        await router.nc.publish(route.reply_to, encode(err))

    env.router.behavior = rate_limited
    resp = await env.client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"})
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1"
    assert (await resp.json())["error"]["type"] == "rate_limit_error"
    cancel = await env.router.wait_cancel(env.router.routes[-1].request_id)
    assert cancel.reason == "error"

    # once the SSE headers are out, the error goes into the stream as before (no hint there)
    async def busy_midway(router: FakeRouter, route: RouteRequest) -> None:
        await router.send(route, [*router.chunks(route, router.reply_tokens())[:2], busy_chunk(route, 2)])

    env.router.behavior = busy_midway
    resp = await env.client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 200
    assert "Retry-After" not in resp.headers
    events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2]) == body

    # no hint: no header, no retry_after
    async def busy_no_hint(router: FakeRouter, route: RouteRequest) -> None:
        await router.send(route, [busy_chunk(route, 0, retry_after_s=None)])

    env.router.behavior = busy_no_hint
    resp = await env.client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 503
    assert "Retry-After" not in resp.headers
    msg = await nc.request(env.subjects.chat_completions, json.dumps(chat_body()).encode(), timeout=5)
    assert json.loads(msg.data) == {**body, "status": 503}


async def test_timeout_gives_504_and_cancel(env: Env) -> None:
    async def silent(router: FakeRouter, route: RouteRequest) -> None:
        await router.send(route, router.chunks(route, router.reply_tokens())[:1])  # then nothing

    env.router.behavior = silent
    resp = await env.client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "timeout"
    cancel = await env.router.wait_cancel(env.router.routes[-1].request_id)
    assert cancel.reason == "timeout"


async def _assert_inbox_released(env: Env, inbox: str) -> None:
    """The frontend routes nothing to ``inbox`` any more (its inbox mux dropped it), while the
    mux's wildcard subscription itself stays (one per frontend, not one per request)."""
    mux = env.frontend.inbox
    assert inbox.startswith(mux.prefix + ".")
    for _ in range(50):
        if inbox not in mux:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"{inbox} still routed")
    assert mux.started
    # what still arrives there is dropped, and the next request works
    await env.router.nc.publish(inbox, b"late")
    await env.router.nc.flush()


async def test_client_disconnect_mid_stream_cancels(env: Env) -> None:
    started = asyncio.Event()

    async def first_then_wait(router: FakeRouter, route: RouteRequest) -> None:
        # one chunk, then silence: only the disconnect itself can end this request
        await router.send(route, router.chunks(route, router.reply_tokens())[:1])
        started.set()

    env.router.behavior = first_then_wait
    async with ClientSession() as session:
        resp = await session.post(env.client.make_url("/v1/chat/completions"), json=chat_body(stream=True))
        assert resp.status == 200
        line = await resp.content.readline()
        assert line.startswith(b"data: ")
        await started.wait()
        resp.close()  # drop the connection mid-stream
    route = env.router.routes[-1]
    cancel = await env.router.wait_cancel(route.request_id)
    assert cancel.reason == "client"
    await _assert_inbox_released(env, route.reply_to)
    env.router.behavior = None
    ok = await env.client.post("/v1/chat/completions", json=chat_body())
    assert ok.status == 200


async def test_nats_public_subjects(env: Env) -> None:
    nc = env.router.nc
    http = await (await env.client.post("/v1/chat/completions", json=chat_body(seed=1))).json()
    msg = await nc.request(env.subjects.chat_completions, json.dumps(chat_body(seed=1)).encode(), timeout=5)
    body = json.loads(msg.data)
    assert body["object"] == "chat.completion"
    assert body["choices"] == http["choices"]
    assert body["usage"] == http["usage"]
    assert set(body) == set(http)

    msg = await nc.request(
        env.subjects.completions, json.dumps({"model": MODEL, "prompt": "Hi"}).encode(), timeout=5
    )
    assert json.loads(msg.data)["choices"][0]["text"] == expected_text(env.tokenizer)

    msg = await nc.request(env.subjects.models, b"", timeout=5)
    assert json.loads(msg.data)["data"][0]["id"] == MODEL

    # errors: the OpenAI error body plus the HTTP status
    msg = await nc.request(
        env.subjects.chat_completions, json.dumps(chat_body(model="nope")).encode(), timeout=5
    )
    err = json.loads(msg.data)
    assert err["status"] == 404
    assert err["error"]["code"] == "model_not_found"
    msg = await nc.request(env.subjects.chat_completions, b"{not json", timeout=5)
    assert json.loads(msg.data)["status"] == 400

    # streaming: chunk JSONs then [DONE] on the reply subject
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(env.subjects.chat_completions, json.dumps(chat_body(stream=True)).encode(), reply=inbox)
    payloads = []
    while True:
        m = await sub.next_msg(timeout=5)
        payloads.append(m.data)
        if m.data == b"[DONE]":
            break
    chunks = [json.loads(p) for p in payloads[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == expected_text(env.tokenizer)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    # a streaming request that fails validation: error (with status) then [DONE]
    await nc.publish(
        env.subjects.chat_completions, json.dumps(chat_body(stream=True, n=3)).encode(), reply=inbox
    )
    first = await sub.next_msg(timeout=5)
    assert json.loads(first.data)["status"] == 400
    assert (await sub.next_msg(timeout=5)).data == b"[DONE]"
    await sub.unsubscribe()


def token_stream(env: Env, **extra: Any) -> TokenStream:
    return TokenStream(
        env.nc,
        env.subjects,
        request_id=f"ts-{uuid.uuid4().hex}",
        model=MODEL,
        token_ids=env.tokenizer.encode("Hi there"),
        block_hashes=[],
        sampling=SamplingParams(max_tokens=64),
        chunk_timeout_s=CHUNK_TIMEOUT_S,
        **extra,
    )


async def test_token_stream_continues_indices_from_index_base(env: Env) -> None:
    """The migration seam: a follow-up stream continues the client-visible chunk indices."""
    stream = token_stream(env, index_base=7)
    chunks = []
    async with stream:
        while (chunk := await stream.next_chunk()) is not None:
            chunks.append(chunk)
        assert await stream.next_chunk() is None  # stays ended
    assert [c.index for c in chunks] == list(range(7, 7 + len(chunks)))
    assert [t for c in chunks for t in c.token_ids] == [
        *env.router.reply_tokens(),
        env.tokenizer.eos_token_id,
    ]
    assert chunks[-1].finish_reason == "stop"
    assert stream.finished
    assert stream.next_index == 7 + len(chunks)
    route = env.router.routes[-1]
    assert route.request_id == stream.request_id
    assert route.token_ids == env.tokenizer.encode("Hi there")
    await env.nc.flush()
    await env.router.nc.flush()
    assert not [c for c in env.router.cancels if c.request_id == stream.request_id]  # finished


async def test_token_stream_stop_cancels_with_its_reason(env: Env) -> None:
    async def first_then_wait(router: FakeRouter, route: RouteRequest) -> None:
        await router.send(route, router.chunks(route, router.reply_tokens())[:1])

    env.router.behavior = first_then_wait
    stream = token_stream(env)
    async with stream:
        first = await stream.next_chunk()
        assert first is not None and first.index == 0
        stream.stop("migrated")
        assert await stream.next_chunk() is None
    assert not stream.finished
    cancel = await env.router.wait_cancel(stream.request_id)
    assert cancel.reason == "migrated"
    await _assert_inbox_released(env, env.router.routes[-1].reply_to)


async def test_one_inbox_subscription_serves_concurrent_streams(env: Env) -> None:
    """Every request's inbox is ``<mux prefix>.<n>`` under one wildcard subscription; interleaved
    chunks of concurrent requests reach the right stream; released inboxes are forgotten."""

    async def interleaved(router: FakeRouter, route: RouteRequest) -> None:
        chunks = router.chunks(route, router.reply_tokens(), per_chunk=1)
        for c in chunks:  # one at a time, so the streams' chunks interleave on the wire
            await router.send(route, [c])
            await asyncio.sleep(0)

    env.router.behavior = interleaved
    mux = env.frontend.inbox
    before = len(env.router.routes)
    bodies = [chat_body(stream=i % 2 == 0) for i in range(12)]
    resps = await asyncio.gather(*(env.client.post("/v1/chat/completions", json=b) for b in bodies))
    for body, resp in zip(bodies, resps, strict=True):
        assert resp.status == 200
        if body["stream"]:
            events = await read_sse(resp)
            content = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
        else:
            content = (await resp.json())["choices"][0]["message"]["content"]
        assert content == expected_text(env.tokenizer)
    inboxes = [r.reply_to for r in env.router.routes[before:]]
    assert len(set(inboxes)) == len(bodies)
    assert all(i.rsplit(".", 1)[0] == mux.prefix for i in inboxes)
    assert not [i for i in inboxes if i in mux]


async def test_chunks_already_here_go_out_in_one_batch(env: Env) -> None:
    """``stream_batches`` renders every chunk already received in one batch (one SSE write),
    ending with ``[DONE]``; the SSE events are the same as one per chunk."""

    async def all_at_once(router: FakeRouter, route: RouteRequest) -> None:
        await router.send(route, router.chunks(route, router.reply_tokens(), per_chunk=1))

    env.router.behavior = all_at_once
    prepared = env.frontend.prepare("chat", json.dumps(chat_body(stream=True)).encode())
    n_chunks = len(env.router.reply_tokens()) + 1
    async with env.frontend.generation(prepared) as gen:
        async with asyncio.timeout(5):
            while len(gen.stream.stream._queue) < n_chunks:  # noqa: ASYNC110 (every chunk here, none read)
                await asyncio.sleep(0.01)
        batches = [b async for b in stream_batches(gen, renderer_for("chat"))]
    assert len(batches) == 1 and batches[0][-1] is DONE
    chunks = [json.loads(c) for c in batches[0][:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected_text(
        env.tokenizer
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    # over HTTP: the same events as before, whatever the batching
    resp = await env.client.post("/v1/chat/completions", json=chat_body(stream=True))
    events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    content = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert content == expected_text(env.tokenizer)


async def test_token_stream_poll_chunk_does_not_wait(env: Env) -> None:
    started = asyncio.Event()

    async def first_then_rest(router: FakeRouter, route: RouteRequest) -> None:
        chunks = router.chunks(route, router.reply_tokens())
        await router.send(route, chunks[:1])
        await started.wait()
        await router.send(route, chunks[1:])

    env.router.behavior = first_then_rest
    stream = token_stream(env)
    async with stream:
        assert stream.poll_chunk() is None and not stream.ended  # nothing here yet
        first = await stream.next_chunk()
        assert first is not None and first.index == 0
        assert stream.poll_chunk() is None and not stream.ended
        started.set()
        rest = [c for c in [await stream.next_chunk()] if c is not None]
        while (c := stream.poll_chunk()) is not None or not stream.ended:
            if c is None:
                c = await stream.next_chunk()
            if c is not None:
                rest.append(c)
        assert stream.ended and stream.finished
    assert [c.index for c in [first, *rest]] == list(range(len(rest) + 1))
    assert rest[-1].finish_reason == "stop"


def test_prompt_encoder_matches_the_tokenizer(tokenizer: Tokenizer) -> None:
    """Encoding piece by piece between special tokens (cached) gives exactly the tokenizer's ids."""
    enc = PromptEncoder(tokenizer)
    assert enc.caching  # SmolLM2: every added token matches its literal text
    rnd = random.Random(7)
    words = [
        "Hello",
        " world",
        "\n",
        "  ",
        "12345",
        " é",
        "🚀",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    ]
    words += ["<", "|", "im_start", "<|im_", " <|im_end|>", "\t", "The capital of France", ".", " ?!"]
    for _ in range(500):
        text = "".join(rnd.choice(words) for _ in range(rnd.randint(0, 40)))
        assert enc.encode(text) == tokenizer.encode(text), text
    system = {"role": "system", "content": "You are a helpful assistant. " * 20}
    chat: list[dict[str, str]] = [system]
    for turn in range(4):
        chat.append({"role": "user", "content": f"Question {turn}: what is {turn} + {turn}? " * 5})
        text = tokenizer.apply_chat_template(chat)
        hits = enc.hits
        assert enc.encode(text) == tokenizer.encode(text)
        if turn:
            assert enc.hits > hits  # the system prompt and earlier turns came from the cache
        chat.append({"role": "assistant", "content": f"It is {2 * turn}."})


FRONTEND_FLAGS = [
    "--host",
    "--port",
    "--model-dir",
    "--model-name",
    "--max-model-len",
    "--chunk-timeout",
    "--health-timeout",
    "--migration-limit",
    "--liveness-interval",
    "--default-block-size",
    "--max-inflight",
    "--api-key",
    "--max-request-bytes",
    "--tokenizer-backend",
]


async def test_frontend_config_drives_the_cli(env: Env) -> None:
    assert [flag_name(f) for f in cli_fields(FrontendConfig)] == FRONTEND_FLAGS
    _args, default = parse_args([])
    assert default == FrontendConfig(created=default.created)
    assert to_argv(default) == []  # nothing to pass on

    custom = FrontendConfig(
        host="0.0.0.0",
        port=8123,
        model_dir="/models/m",
        model_name="m",
        max_model_len=4096,
        chunk_timeout_s=2.5,
        health_timeout_s=0.25,
        migration_limit=1,
        liveness_interval_s=0.5,
        default_block_size=32,
        max_inflight=8,
        api_key="k",
        max_request_bytes=65536,
        tokenizer_backend="tokenizers",
    )
    argv = to_argv(custom)  # what the launcher passes on
    assert argv[::2] == FRONTEND_FLAGS
    args, back = parse_args(["--nats-url", "nats://h:4222", *argv])
    assert back == dataclasses.replace(custom, created=back.created)
    assert args.nats_url == "nats://h:4222"

    for bad in (
        ["--chunk-timeout", "0"],
        ["--port", "70000"],
        ["--max-model-len", "1"],
        ["--tokenizer-backend", "sentencepiece"],
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)
    with pytest.raises(ValueError, match="model_name"):
        Frontend(env.nc, env.subjects, env.tokenizer, FrontendConfig())  # main() derives it


def test_frontend_config_imports_without_aiohttp_or_torch() -> None:
    """The launcher imports the config; that must not pull in the HTTP server or the model."""
    code = (
        "import sys, tandem.services.frontend.config; "
        "heavy = {'aiohttp', 'torch', 'tokenizers', 'nats'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_ready_needs_router_indexer_and_workers(nats_url: str, tokenizer: Tokenizer) -> None:
    ns = f"rd{uuid.uuid4().hex[:8]}"
    nc, fe, client = await _start_frontend(nats_url, ns, tokenizer)
    peer = await connect(nats_url, "ready-peers")
    subjects = Subjects(ns)
    try:
        resp = await client.get("/ready")
        assert resp.status == 503
        err = (await resp.json())["error"]
        assert "router" in err["message"] and "prefill-capable" in err["message"]
        assert (await client.get("/health")).status == 200

        # with no router at all, a request fails fast with 503 (NATS no-responders)
        resp = await client.post("/v1/chat/completions", json=chat_body())
        assert resp.status == 503

        def health(service: str) -> Callable[[HealthRequest, NatsMsg], Awaitable[Health]]:
            async def handler(_req: HealthRequest, _msg: NatsMsg) -> Health:
                return Health(service=service, instance_id=f"{service}-1")

            return handler

        tracker = TaskTracker()
        for service in ("router", "indexer"):
            await serve(
                peer, subjects.health(service), HealthRequest, health(service), queue=service, tracker=tracker
            )
        resp = await client.get("/ready")
        assert resp.status == 503
        assert "worker" in (await resp.json())["error"]["message"]

        kv = await ensure_jetstream(peer.jetstream(), subjects)

        def info(iid: str, role: str) -> InstanceInfo:
            return InstanceInfo(
                instance_id=iid,
                role=role,  # type: ignore[arg-type]
                model=MODEL,
                block_size=32,
                num_blocks=100,
                block_nbytes=4096,
                compat_hash="x",
                nixl_agent_name=iid,
                nixl_metadata=b"",
                heartbeat_at=time.time(),
            )

        await kv.put("p1", encode(info("p1", "prefill")))
        await fe.registry.wait_for(lambda i: "p1" in i, timeout=5)
        assert (await client.get("/ready")).status == 503  # no decode-capable worker yet
        await kv.put("d1", encode(info("d1", "decode")))
        await fe.registry.wait_for(lambda i: "d1" in i, timeout=5)
        resp = await client.get("/ready")
        assert resp.status == 200, await resp.text()
        assert fe.block_size() == 32  # hashing follows the workers' block size
    finally:
        await peer.close()
        await _stop_frontend(nc, fe, client)


async def test_registry_passed_in_is_not_stopped(nats_url: str, tokenizer: Tokenizer) -> None:
    ns = f"rg{uuid.uuid4().hex[:8]}"
    nc = await connect(nats_url, "fe-registry")
    try:
        registry = InstanceRegistry(nc.jetstream(), Subjects(ns))
        await registry.start()
        fe = Frontend(nc, Subjects(ns), tokenizer, FrontendConfig(model_name=MODEL), registry=registry)
        await fe.start()
        assert fe.block_size() == 16  # default without workers
        await fe.close()
        assert fe.registry is registry
        await registry.stop()
    finally:
        await nc.close()


async def test_start_warms_up_and_a_failed_warm_up_does_not_stop_it(
    nats_url: str, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = f"wu{uuid.uuid4().hex[:8]}"
    nc = await connect(nats_url, "fe-warm-up")
    try:
        fe = Frontend(nc, Subjects(ns), tokenizer, FrontendConfig(model_name=MODEL))
        await fe.start()
        assert fe.preprocessor.batcher.batches == 1  # the warm-up ran the batch call
        assert fe.nats_api._subs
        await fe.close()

        async def broken() -> float:
            raise RuntimeError("tokenizer thread pool unavailable")

        fe = Frontend(nc, Subjects(ns), tokenizer, FrontendConfig(model_name=MODEL))
        monkeypatch.setattr(fe.preprocessor, "warm_up", broken)
        await fe.start()  # logged, not raised: requests report their own errors
        assert fe.nats_api._subs  # the start went on: the public NATS subjects are served
        await fe.close()
    finally:
        await nc.close()


async def test_trace_context_reaches_the_router(env: Env) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    env.spans.clear()
    resp = await env.client.post(
        "/v1/chat/completions",
        json=chat_body(),
        headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    assert resp.status == 200
    traceparent = env.router.headers[-1]["traceparent"]
    assert traceparent.split("-")[1] == trace_id  # the caller's trace continues downstream
    server = [s for s in env.spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert any(s.name == "POST /v1/chat/completions" for s in server)
    span = next(s for s in server if s.name == "POST /v1/chat/completions")
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["tandem.request_id"] == env.router.routes[-1].request_id


async def test_process_serves_and_stops_cleanly(nats_url: str, model_dir: Path) -> None:
    """``python -m tandem.services.frontend``: ready log line, /health, /ready 503, SIGTERM → 0."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tandem.services.frontend",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model-dir",
        str(model_dir),
        "--nats-url",
        nats_url,
        "--namespace",
        f"pr{uuid.uuid4().hex[:8]}",
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(60):
            while True:
                line = await proc.stderr.readline()
                assert line, "frontend exited before it was ready"
                if json.loads(line).get("event") == "ready":
                    break
        async with ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                assert resp.status == 200
            async with session.get(f"http://127.0.0.1:{port}/ready") as resp:
                assert resp.status == 503
                assert "error" in await resp.json()
            async with session.get(f"http://127.0.0.1:{port}/v1/models") as resp:
                assert (await resp.json())["data"][0]["id"] == MODEL
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await proc.stderr.read()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_prompt_encoder_falls_back_to_the_tokenizer() -> None:
    """Added tokens that do not match their literal text (here ``lstrip``), or a tokenizer that
    is not a wrapped Hugging Face one: no piece cache, every call is ``tokenizer.encode``."""

    @dataclass
    class Added:
        content: str
        lstrip: bool = False
        rstrip: bool = False
        single_word: bool = False
        normalized: bool = False

    class Hf:
        normalizer = None

        def get_added_tokens_decoder(self) -> dict[int, Added]:
            return {0: Added("<s>", lstrip=True)}

    class Plain:
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [len(text)]

    class Fake(Plain):
        _tk = Hf()

    for tok in (Fake(), Plain()):
        enc = PromptEncoder(tok)  # type: ignore[arg-type]
        assert not enc.caching
        assert enc.encode("a <s> b") == [7]
