"""Property-based fuzzing of the frontend's edge: HTTP (schemathesis against ``/openapi.json``,
plus hypothesis bytes and wrong-shaped JSON / msgpack) and the public NATS request subjects.

Properties: every answer is a clear 4xx with OpenAI's error body (or a 200 when a generated
request happens to be valid), never a 5xx, a hang or silence; afterwards a valid request still
succeeds and no admission slot is left held.

The frontend runs on its own event loop in a background thread (a real TCP port, a fake router
from ``test_frontend.py``) so that hypothesis drives it from plain synchronous tests. The number
of examples is bounded (a few seconds in all) and the examples are derandomized, so a run is
repeatable.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import msgspec
import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tandem.engine.tokenizer import Tokenizer
from tandem.protocol import Subjects
from tandem.services.frontend import Frontend, FrontendConfig, create_app
from tandem.services.messaging import TaskTracker
from tandem.services.runtime import connect
from tests.conftest import free_port
from tests.service.test_frontend import MODEL, FakeRouter, chat_body

T = TypeVar("T")

#: Small enough that generated bodies rarely hit it, large enough for every valid one here.
MAX_REQUEST_BYTES = 256 * 1024
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from tandem.engine.weights import prepare_model

    return Tokenizer(prepare_model())


class LiveFrontend:
    """A frontend + fake router on a private event loop in a thread; :meth:`run` calls into it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-frontend", daemon=True)
        self.thread.start()
        self.base_url = ""
        self.subjects = Subjects(f"fz{uuid.uuid4().hex[:8]}")
        self.http = requests.Session()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def start(self, nats_url: str, tokenizer: Tokenizer) -> None:
        self.nc = await connect(nats_url, "fuzz-frontend")
        cfg = FrontendConfig(
            model_name=MODEL, chunk_timeout_s=5.0, max_request_bytes=MAX_REQUEST_BYTES, api_key=""
        )
        self.frontend = Frontend(self.nc, self.subjects, tokenizer, cfg, tracker=TaskTracker())
        await self.frontend.start()
        self.peer: NatsClient = await connect(nats_url, "fuzz-peer")
        self.router = FakeRouter(self.peer, self.subjects, tokenizer)
        await self.router.start()
        self.runner = web.AppRunner(create_app(self.frontend), handler_cancellation=True, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.base_url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.frontend.close()
        await self.frontend.tracker.drain(2.0)
        await self.peer.close()
        await self.nc.close()

    async def _request(self, subject: str, data: bytes) -> Any:
        msg = await self.peer.request(subject, data, timeout=10)
        return json.loads(msg.data)

    def nats(self, subject: str, data: bytes) -> Any:
        """One public NATS request/reply (the reply JSON)."""
        return self.run(self._request(subject, data))

    def assert_still_serving(self) -> None:
        """A valid request succeeds over both transports; no admission slot is left held."""
        resp = self.http.post(
            f"{self.base_url}/v1/chat/completions", json=chat_body(max_tokens=8), timeout=10
        )
        assert resp.status_code == 200, resp.text
        body = self.nats(self.subjects.completions, json.dumps({"model": MODEL, "prompt": "Hi"}).encode())
        assert body["object"] == "text_completion", body
        assert self.frontend.admission.inflight == 0
        self.router.routes.clear()
        self.router.headers.clear()


@pytest.fixture(scope="module")
def live(nats_url: str, tokenizer: Tokenizer) -> Iterator[LiveFrontend]:
    fe = LiveFrontend()
    try:
        fe.run(fe.start(nats_url, tokenizer))
        yield fe
        fe.assert_still_serving()
    finally:
        if fe.base_url:
            fe.run(fe.stop())
        fe.loop.call_soon_threadsafe(fe.loop.stop)
        fe.thread.join(5)
        fe.loop.close()
        fe.http.close()


def assert_client_error(status: int, body: Any) -> None:
    """A 4xx with OpenAI's error body."""
    assert 400 <= status < 500, (status, body)
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]


# ---- schemathesis against the served OpenAPI document ---------------------------------------------------


@pytest.mark.slow
def test_openapi_schema_fuzzing(live: LiveFrontend) -> None:
    """schemathesis generates requests from ``/openapi.json`` (valid ones and ones violating the
    schema); every response must be no server error, a documented status, the documented
    content type, and match the documented schema."""
    doc = live.http.get(f"{live.base_url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(doc)
    operations = [result.ok() for result in schema.get_all_operations()]
    conformance = [status_code_conformance, content_type_conformance, response_schema_conformance]
    # /ready answers a documented 503 here (no router, indexer or workers): conformance only
    (ready,) = [op for op in operations if op.label == "GET /ready"]
    case = ready.Case()
    response = case.call(base_url=live.base_url, session=live.http, timeout=10)
    assert response.status_code == 503
    case.validate_response(response, checks=conformance)

    strategy = st.one_of(
        [
            op.as_strategy(generation_mode=mode)
            for op in operations
            if op is not ready
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        ]
    )
    checks = [not_a_server_error, *conformance]
    seen: set[str] = set()

    @settings(FUZZ, max_examples=150)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = data.draw(strategy)
        seen.add(case.operation.label)
        response = case.call(base_url=live.base_url, session=live.http, timeout=10)
        case.validate_response(response, checks=checks)

    run()
    assert {"POST /v1/chat/completions", "POST /v1/completions"} <= seen
    live.assert_still_serving()


# ---- hypothesis: bytes and wrong-shaped bodies ------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "ignore_eos",
    "return_token_ids",
    "logprobs",
    "echo",
]
#: Near-valid bodies: the right model and a prompt, then known fields with values of any shape.
BASE = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}
NEAR_VALID = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=5).map(lambda extra: {**BASE, **extra})
DEEP = st.integers(min_value=1, max_value=200_000).map(lambda n: b"[" * n + b"]" * n)
BODIES = st.one_of(
    st.binary(max_size=512),
    JSON.map(lambda v: json.dumps(v).encode()),
    NEAR_VALID.map(lambda v: json.dumps(v).encode()),
    NEAR_VALID.map(lambda v: msgspec.msgpack.encode(v)),
    DEEP.map(lambda d: b'{"model": "%s", "prompt": %s}' % (MODEL.encode(), d)),
    st.binary(min_size=1, max_size=64).map(lambda b: b'{"model": "' + b + b'", "prompt": "x"}'),
)
PATHS = st.sampled_from(["/v1/chat/completions", "/v1/completions"])


@FUZZ
@given(path=PATHS, body=BODIES, stream=st.booleans())
def test_http_fuzzed_bodies_get_clear_errors(
    live: LiveFrontend, path: str, body: bytes, stream: bool
) -> None:
    if stream and body.endswith(b"}"):
        body = body[:-1] + b', "stream": true}'
    resp = live.http.post(
        f"{live.base_url}{path}", data=body, headers={"Content-Type": "application/json"}, timeout=10
    )
    if resp.status_code == 200:  # a generated body that is in fact valid
        assert resp.headers["Content-Type"].startswith(("application/json", "text/event-stream"))
        return
    assert_client_error(resp.status_code, resp.json())


@FUZZ
@given(subject=st.sampled_from(["chat_completions", "completions"]), body=BODIES)
def test_nats_fuzzed_payloads_get_clear_error_replies(live: LiveFrontend, subject: str, body: bytes) -> None:
    reply = live.nats(getattr(live.subjects, subject), body)
    if "error" not in reply:  # a generated body that is in fact valid (or its first stream chunk)
        assert reply["object"] in ("chat.completion", "chat.completion.chunk", "text_completion"), reply
        return
    assert_client_error(reply["status"], reply)


def test_frontend_serves_after_fuzzing(live: LiveFrontend) -> None:
    live.assert_still_serving()
    assert len(live.frontend.tracker) == 0
