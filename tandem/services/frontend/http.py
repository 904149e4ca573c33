"""Entry point: the OpenAI-compatible HTTP API (aiohttp), endpoints listed in the package docstring.

:func:`create_app` builds the application around a
:class:`~tandem.services.frontend.service.Frontend`. A middleware opens one SERVER span per
request (parent: an incoming ``traceparent`` header) and turns every error, including aiohttp's
own (unknown route, wrong method, oversized body), into OpenAI's error body. An error with a
retry hint (a busy pipeline or a full frontend: 429/503) also gets ``Retry-After`` (whole
seconds, rounded up, at least 1). Streaming responses are SSE: the headers go out with the first
chunk, so an error before it gets a real status; after it, the error is one
``data: {"error": ...}`` event before ``data: [DONE]``.

Edge checks, in order, before any work (:mod:`.edge`): the API key (every route but
:data:`OPEN_PATHS`; 401), the admission bound (completion routes; 429 with ``Retry-After``,
before the body is read), the body size (413 from ``Content-Length`` before reading, or while
reading a chunked body). ``GET /openapi.json`` describes the API (:func:`openapi_document`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from tandem.protocol.openai import (
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    SEED_MAX,
    SEED_MIN,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    OpenAIError,
    encode_json,
    error_body,
)
from tandem.services.frontend.config import DEFAULT_MAX_REQUEST_BYTES
from tandem.services.frontend.edge import authorization_error
from tandem.services.frontend.preprocess import PreparedRequest, RequestKind
from tandem.services.frontend.render import DONE
from tandem.services.observability import extract_context, get_logger, get_tracer

if TYPE_CHECKING:
    from tandem.services.frontend.service import Frontend

__all__ = [
    "FRONTEND_KEY",
    "MAX_BODY_BYTES",
    "OPEN_PATHS",
    "SSE_HEADERS",
    "create_app",
    "openapi_document",
]

#: Default largest HTTP request body, bytes (``--max-request-bytes``); larger gets 413.
MAX_BODY_BYTES = DEFAULT_MAX_REQUEST_BYTES

#: Paths served without the API key: the liveness probes. ``/ready`` says what the stack can
#: route to, so it needs the key like the API (the launcher sends it; an orchestrator's probe
#: can send the header, or use ``/health``).
OPEN_PATHS = frozenset({"/health", "/live"})

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}

FRONTEND_KEY: web.AppKey[Frontend] = web.AppKey("frontend")
_OPENAPI_KEY: web.AppKey[bytes] = web.AppKey("openapi")

_log = get_logger("tandem.frontend")


def _json_response(data: bytes, status: int = 200, request_id: str | None = None) -> web.Response:
    headers = {"X-Request-Id": request_id} if request_id else None
    return web.Response(body=data, status=status, content_type="application/json", headers=headers)


def _error_response(err: OpenAIError) -> web.Response:
    """OpenAI's error body with ``err.status``, plus ``Retry-After`` when ``err`` has a hint
    (and ``WWW-Authenticate`` on a 401)."""
    resp = _json_response(error_body(err), err.status)
    retry = err.retry_after()
    if retry is not None:
        resp.headers["Retry-After"] = str(retry)
    if err.status == 401:
        resp.headers["WWW-Authenticate"] = "Bearer"
    return resp


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413, f"Request body too large: at most {limit} bytes are accepted.", code="request_too_large"
    )


@web.middleware
async def _trace_and_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """One SERVER span per request; the API key check; every error becomes an OpenAI error body."""
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
            denied = None
            if request.path not in OPEN_PATHS:
                denied = authorization_error(
                    request.headers.get("Authorization"), request.app[FRONTEND_KEY].api_key
                )
            resp = _error_response(denied) if denied is not None else await handler(request)
        except OpenAIError as e:
            resp = _error_response(e)
        except web.HTTPRequestEntityTooLarge:
            resp = _error_response(_too_large(request.app[FRONTEND_KEY].config.max_request_bytes))
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


async def _openapi(request: web.Request) -> web.Response:
    return _json_response(request.app[_OPENAPI_KEY])


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The request body; 413 at once from ``Content-Length`` (nothing read), else while reading
    (aiohttp's ``client_max_size``, the same limit)."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    return await request.read()


def _generate_handler(kind: RequestKind) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        arrived = time.perf_counter()
        fe = request.app[FRONTEND_KEY]
        # The slot is held until the response is done, and released on every exit (error,
        # client disconnect: aiohttp cancels the handler). A refusal reads no body.
        with fe.admission.slot():
            body = await _read_body(request, fe.config.max_request_bytes)
            try:
                prepared = await fe.prepare_async(kind, body, arrived)
            except OpenAIError as e:
                _log.info("request_rejected", path=request.path, status=e.status, error=e.message)
                return _error_response(e)
            trace.get_current_span().set_attribute("tandem.request_id", prepared.request_id)
            if not prepared.stream:
                try:
                    return _json_response(await fe.complete(prepared), request_id=prepared.request_id)
                except OpenAIError as e:
                    _log.info(
                        "request_failed", request_id=prepared.request_id, status=e.status, error=e.message
                    )
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


# ---- OpenAPI -----------------------------------------------------------------------------------------

#: JSON Schema bounds of the request fields (what :mod:`tandem.protocol.openai` validates),
#: added to the schemas msgspec derives from the request Structs.
_REQUEST_BOUNDS: dict[str, dict[str, Any]] = {
    "max_tokens": {"minimum": 1},
    "max_completion_tokens": {"minimum": 1},
    "temperature": {"minimum": 0, "maximum": MAX_TEMPERATURE},
    "top_p": {"exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"minimum": -1, "maximum": MAX_TOP_K},
    "seed": {"minimum": SEED_MIN, "maximum": SEED_MAX},
    "n": {"minimum": 1, "maximum": 1},
}
_STOP_BOUNDS: dict[str, dict[str, Any]] = {
    "string": {"maxLength": MAX_STOP_CHARS},
    "array": {"maxItems": MAX_STOP_SEQUENCES},
}


def _bound(schema: dict[str, Any], bounds: dict[str, Any]) -> None:
    """Add ``bounds`` to the number/integer branches of a property schema (``anyOf`` or plain)."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") in ("integer", "number"):
            branch.update(bounds)


def _bound_request(schema: dict[str, Any], model_name: str) -> None:
    props: dict[str, Any] = schema["properties"]
    props["model"] = {"type": "string", "enum": [model_name], "description": "the served model id"}
    for name, bounds in _REQUEST_BOUNDS.items():
        if name in props:
            _bound(props[name], bounds)
    for branch in props["stop"].get("anyOf", []):
        branch.update(_STOP_BOUNDS.get(branch.get("type"), {}))
        if branch.get("type") == "array":
            branch["items"] = {"type": "string", "maxLength": MAX_STOP_CHARS}


def _json_content(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _errors(*statuses: int) -> dict[str, Any]:
    """Error responses: OpenAI's error body, for each status and as the default."""
    text = {
        400: "invalid request (malformed JSON, wrong type, out-of-range value, prompt too long)",
        401: "missing or wrong API key",
        404: "unknown model or route",
        413: "request body too large",
        429: "too many requests in flight; retry after Retry-After seconds",
        503: "no worker can take the request now (Retry-After when hinted)",
        504: "no token progress within --chunk-timeout",
    }
    out: dict[str, Any] = {
        str(s): {"description": text.get(s, "error"), "content": _json_content("ErrorResponse")}
        for s in statuses
    }
    out["default"] = {"description": "error", "content": _json_content("ErrorResponse")}
    return out


def _sse_content(chunk: str) -> dict[str, Any]:
    """``text/event-stream``: the schema of one event (OpenAPI 3.1 reads a stream's ``schema``
    per event): ``data`` is a chunk's JSON, an error body's JSON, or ``[DONE]`` (the last)."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {
            "anyOf": [
                {"$ref": f"#/components/schemas/{chunk}"},
                {"$ref": "#/components/schemas/ErrorResponse"},
            ]
        },
    }
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}},
        "description": "with \"stream\": true: one 'data: <chunk JSON>' event per chunk, then "
        "'data: [DONE]'; an error after the first chunk is one 'data: <error JSON>' event before it",
    }
    return {"text/event-stream": {"schema": event}}


def openapi_document(
    model_name: str, *, api_key: bool = False, max_request_bytes: int = MAX_BODY_BYTES
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP API (what ``GET /openapi.json`` serves).

    The request and response schemas are derived from the msgspec Structs of
    :mod:`tandem.protocol.openai` (:func:`msgspec.json.schema_components`), plus the bounds the
    frontend validates (``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``n``) and the
    served ``model`` id. ``api_key``: declare bearer authentication on every route but
    :data:`OPEN_PATHS`.
    """
    structs = [
        ChatCompletionRequest,
        CompletionRequest,
        ChatCompletion,
        ChatCompletionChunk,
        Completion,
        ModelList,
        ModelCard,
        ErrorResponse,
    ]
    _refs, components = msgspec.json.schema_components(structs, ref_template="#/components/schemas/{name}")
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        _bound_request(components[name], model_name)
    secured: list[dict[str, list[str]]] = [{"bearer": []}] if api_key else []

    def generate(summary: str, request: str, response: str, chunk: str) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "security": secured,
                "requestBody": {
                    "required": True,
                    "content": _json_content(request),
                    "description": f"JSON, at most {max_request_bytes} bytes",
                },
                "responses": {
                    "200": {
                        "description": f"the completion ({response}), or an SSE stream of {chunk}",
                        "content": {**_json_content(response), **_sse_content(chunk)},
                    },
                    **_errors(400, 401, 404, 413, 429, 503, 504),
                },
            }
        }

    def get(summary: str, ref: str | None, *statuses: int, open_path: bool = False) -> dict[str, Any]:
        ok: dict[str, Any] = {"description": "OK"}
        ok["content"] = _json_content(ref) if ref else {"application/json": {"schema": {"type": "object"}}}
        return {
            "get": {
                "summary": summary,
                "security": [] if open_path else secured,
                "responses": {"200": ok, **_errors(*statuses)},
            }
        }

    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "tandem",
            "version": "1",
            "description": "OpenAI-compatible completions served by tandem (disaggregated prefill and "
            "decode over NATS). The same requests are served on the public NATS subjects "
            "{ns}.v1.chat.completions, {ns}.v1.completions and {ns}.v1.models.",
        },
        "paths": {
            "/v1/chat/completions": generate(
                "Chat completion", "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"
            ),
            "/v1/completions": generate("Text completion", "CompletionRequest", "Completion", "Completion"),
            "/v1/models": get("The served models", "ModelList", 401),
            "/v1/models/{model}": {
                **get("One model card", "ModelCard", 401, 404),
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            },
            "/health": get("Liveness: 200 while the process serves", None, open_path=True),
            "/live": get("Liveness (same as /health)", None, open_path=True),
            "/ready": get(
                "Readiness: router, indexer and prefill/decode-capable workers answer",
                None,
                503,
                open_path=True,
            ),
            "/openapi.json": get("This document", None, 401),
        },
        "components": {"schemas": components},
    }
    if api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def create_app(frontend: Frontend) -> web.Application:
    """The aiohttp application serving ``frontend``.

    Run it with ``handler_cancellation=True`` (``AppRunner``/``TestServer`` kwarg) so a client
    that disconnects cancels its request promptly.
    """
    cfg = frontend.config
    app = web.Application(middlewares=[_trace_and_errors], client_max_size=cfg.max_request_bytes)
    app[FRONTEND_KEY] = frontend
    doc = openapi_document(
        frontend.model_name, api_key=frontend.api_key is not None, max_request_bytes=cfg.max_request_bytes
    )
    app[_OPENAPI_KEY] = msgspec.json.encode(doc)
    app.router.add_get("/health", _health)
    app.router.add_get("/live", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/openapi.json", _openapi)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model}", _model)
    app.router.add_post("/v1/chat/completions", _generate_handler("chat"))
    app.router.add_post("/v1/completions", _generate_handler("completion"))
    return app
