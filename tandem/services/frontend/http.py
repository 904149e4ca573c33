"""Entry point: the OpenAI-compatible HTTP API (aiohttp), endpoints listed in the package docstring.

:func:`create_app` builds the application around a
:class:`~tandem.services.frontend.service.Frontend`. A middleware opens one SERVER span per
request (parent: an incoming ``traceparent`` header) and turns every error, including aiohttp's
own (unknown route, wrong method, oversized body), into OpenAI's error body. An error with a
retry hint (a busy pipeline: 429/503) also gets ``Retry-After`` (whole seconds, rounded up, at
least 1). Streaming responses are SSE: the headers go out with the first chunk, so an error
before it gets a real status; after it, the error is one ``data: {"error": ...}`` event before
``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from tandem.protocol.openai import OpenAIError, encode_json, error_body
from tandem.services.frontend.preprocess import PreparedRequest, RequestKind
from tandem.services.frontend.render import DONE
from tandem.services.runtime import extract_context, get_logger, get_tracer

if TYPE_CHECKING:
    from tandem.services.frontend.service import Frontend

__all__ = ["FRONTEND_KEY", "MAX_BODY_BYTES", "SSE_HEADERS", "create_app"]

#: HTTP request bodies larger than this get 413.
MAX_BODY_BYTES = 16 * 1024 * 1024

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}

FRONTEND_KEY: web.AppKey[Frontend] = web.AppKey("frontend")

_log = get_logger("tandem.frontend")


def _json_response(data: bytes, status: int = 200, request_id: str | None = None) -> web.Response:
    headers = {"X-Request-Id": request_id} if request_id else None
    return web.Response(body=data, status=status, content_type="application/json", headers=headers)


def _error_response(err: OpenAIError) -> web.Response:
    """OpenAI's error body with ``err.status``, plus ``Retry-After`` when ``err`` has a hint."""
    resp = _json_response(error_body(err), err.status)
    retry = err.retry_after()
    if retry is not None:
        resp.headers["Retry-After"] = str(retry)
    return resp


@web.middleware
async def _trace_and_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """One SERVER span per request; every error becomes an OpenAI error body."""
    route = request.match_info.route.resource
    name = f"{request.method} {route.canonical if route is not None else request.path}"
    tracer = get_tracer("tandem.frontend")
    with tracer.start_as_current_span(
        name,
        context=extract_context(request.headers),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": request.method, "url.path": request.path},
    ) as span:
        try:
            resp = await handler(request)
        except web.HTTPException as e:
            msg = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
            resp = _error_response(OpenAIError(e.status, msg or e.reason))
        except Exception as e:
            _log.exception("http_handler_failed", path=request.path, error=repr(e))
            span.record_exception(e)
            resp = _error_response(OpenAIError(500, f"Internal error: {type(e).__name__}"))
        span.set_attribute("http.response.status_code", resp.status)
        if resp.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        return resp


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    fe = request.app[FRONTEND_KEY]
    ready, problems = await fe.readiness()
    if ready:
        return web.json_response({"status": "ready", "workers": len(fe.registry.instances)})
    return _error_response(OpenAIError(503, "Not ready: " + "; ".join(problems) + ".", code="not_ready"))


async def _models(request: web.Request) -> web.Response:
    return _json_response(encode_json(request.app[FRONTEND_KEY].models()))


async def _model(request: web.Request) -> web.Response:
    fe = request.app[FRONTEND_KEY]
    model_id = request.match_info["model"]
    for card in fe.models().data:
        if card.id == model_id:
            return _json_response(encode_json(card))
    raise web.HTTPNotFound(text=f"The model '{model_id}' does not exist.")


def _generate_handler(kind: RequestKind) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        arrived = time.perf_counter()
        fe = request.app[FRONTEND_KEY]
        body = await request.read()
        try:
            prepared = fe.prepare(kind, body, arrived)
        except OpenAIError as e:
            _log.info("request_rejected", path=request.path, status=e.status, error=e.message)
            return _error_response(e)
        trace.get_current_span().set_attribute("tandem.request_id", prepared.request_id)
        if not prepared.stream:
            try:
                return _json_response(await fe.complete(prepared), request_id=prepared.request_id)
            except OpenAIError as e:
                _log.info("request_failed", request_id=prepared.request_id, status=e.status, error=e.message)
                return _error_response(e)
        return await _stream_sse(request, fe, prepared)

    return handler


def _sse(batch: list[bytes]) -> bytes:
    """SSE events ``data: {chunk}\\n\\n`` for every chunk of ``batch``, as one buffer."""
    parts: list[bytes] = []
    for data in batch:
        parts += (b"data: ", data, b"\n\n")
    return b"".join(parts)


async def _stream_sse(request: web.Request, fe: Frontend, prepared: PreparedRequest) -> web.StreamResponse:
    """SSE: headers go out with the first chunk, so an error before it gets a real status.

    Every chunk already there goes out in one write (the last batch, ``[DONE]`` included, with
    the end of the response). An error after the first chunk is sent as one
    ``data: {"error": ...}`` event, then ``data: [DONE]``.
    """
    rid = prepared.request_id
    resp: web.StreamResponse | None = None
    error: OpenAIError | None = None
    try:
        async with contextlib.aclosing(fe.stream_batches(prepared)) as batches:
            async for batch in batches:
                if resp is None:
                    resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
                    resp.headers["X-Request-Id"] = rid
                    await resp.prepare(request)
                if batch[-1] is DONE:
                    await resp.write_eof(_sse(batch))
                    return resp
                await resp.write(_sse(batch))
    except OpenAIError as e:
        error = e
    except asyncio.CancelledError:
        # aiohttp cancelled the handler (client went away): aclosing closed the generation
        # (Cancel published, inbox released).
        _log.info("client_disconnected", request_id=rid, how="cancelled")
        raise
    except ConnectionError:
        # A write failed (client went away): same cleanup through aclosing.
        _log.info("client_disconnected", request_id=rid, how="write_failed")
        return resp if resp is not None else web.Response(status=499)
    except Exception as e:
        if resp is None:
            raise  # the middleware answers 500 with an OpenAI error body
        _log.exception("stream_failed", request_id=rid, error=repr(e))
        error = OpenAIError(500, f"Internal error: {type(e).__name__}")
    if error is not None:
        _log.info("request_failed", request_id=rid, status=error.status, error=error.message)
        if resp is None:
            return _error_response(error)
    if resp is None:  # cannot happen: a finished stream yields at least its final chunk
        raise RuntimeError("stream ended without any chunk")
    try:
        await resp.write_eof(_sse([error_body(error), DONE] if error is not None else [DONE]))
    except ConnectionError:
        _log.info("client_disconnected", request_id=rid, how="write_failed")
    return resp


def create_app(frontend: Frontend) -> web.Application:
    """The aiohttp application serving ``frontend``.

    Run it with ``handler_cancellation=True`` (``AppRunner``/``TestServer`` kwarg) so a client
    that disconnects cancels its request promptly.
    """
    app = web.Application(middlewares=[_trace_and_errors], client_max_size=MAX_BODY_BYTES)
    app[FRONTEND_KEY] = frontend
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model}", _model)
    app.router.add_post("/v1/chat/completions", _generate_handler("chat"))
    app.router.add_post("/v1/completions", _generate_handler("completion"))
    return app
