"""The frontend: OpenAI-compatible HTTP API and public NATS subjects in front of the router.

Run: ``python -m tandem.services.frontend --host 127.0.0.1 --port 8000 [--model-dir DIR]``
(plus the common ``--nats-url``, ``--namespace``, ``--log-level``; every other flag is a field
of :class:`~.config.FrontendConfig`; see ``--help``).

Modules, in pipeline order
--------------------------
``config.py``        :class:`FrontendConfig`: the settings; drives the CLI and the launcher
                     (importable without aiohttp, NATS or torch).
``edge.py``          checks before any work, for both entry points: API key, admission bound.
``preprocess.py``    body → :class:`PreparedRequest`: validate, tokenize (cached per piece between
                     special tokens), limits, block hashes.
``token_stream.py``  :class:`TokenStream`: inbox (one wildcard subscription, ``InboxMux``),
                     ``RouteRequest``, reorder, timeout, error mapping, ``Cancel``. The seam a
                     later ``migration.py`` wraps.
``output.py``        :class:`TextOutput`: incremental detokenizer + :class:`StopStringMatcher`.
``generation.py``    :class:`Generation`: token stream → text, plus usage / ``tandem`` accounting.
``render.py``        chat vs completion renderers: response and streaming chunk JSON; :data:`DONE`.
``http.py``          entry point: aiohttp app (:func:`create_app`), SSE, error middleware.
``nats_api.py``      entry point: the public NATS subjects.
``service.py``       :class:`Frontend` (what both entry points share: registry, readiness,
                     the pipeline) and :func:`main`.

HTTP endpoints
--------------
``POST /v1/chat/completions``, ``POST /v1/completions`` (non-streaming JSON, or SSE with
``"stream": true``: ``data: {chunk}\\n\\n`` … ``data: [DONE]\\n\\n``), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /openapi.json`` (OpenAPI 3.1 document of this API, schemas
derived from :mod:`tandem.protocol.openai`), ``GET /health`` and ``GET /live`` (200 while the
process serves) and ``GET /ready`` (200
only when the router and the indexer answer ``HealthRequest`` on ``{ns}.health.router`` /
``{ns}.health.indexer`` and the instances bucket holds at least one prefill-capable (role
``prefill`` or ``both``) and one decode-capable (``decode`` or ``both``) worker; otherwise 503
with an OpenAI error body whose message lists what is missing). Every error, including unknown
routes and oversized bodies, is OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
An error that carries a retry hint from the pipeline (``ErrorReply.retry_after_s``: a busy
router or worker, 429/503) also sets ``Retry-After`` (whole seconds, rounded up, at least 1);
once a stream's headers are out, an error goes into the stream instead (step 8).

Edge checks (``edge.py``, before step 1; over HTTP before the body is read): with
``--api-key`` (or ``$TANDEM_API_KEY``) every route but ``/health`` and ``/live`` (``/ready``
included: it tells what the stack can route to) needs ``Authorization: Bearer <key>`` (401
``invalid_api_key``, constant-time compare); more than ``--max-inflight`` (256) completion
requests in flight, HTTP and NATS together → 429 ``server_busy`` with ``Retry-After: 1`` at once
(never queued; the slot is released on every exit path); a body over ``--max-request-bytes``
(4 MiB) → 413 ``request_too_large``.

Life cycle of one request
-------------------------
1. **Validate** (``preprocess.py``) the JSON body (:mod:`tandem.protocol.openai`): malformed
   JSON (also invalid UTF-8 and nesting too deep to decode), missing or ill-typed fields,
   ``n != 1``, out-of-range sampling values (``temperature`` finite in [0, 2], ``top_p`` in
   (0, 1], ``top_k`` -1 or 0..2³¹-1, ``seed`` int64, at most 4 stop strings of at most 512
   characters) → 400 naming the parameter; a model other than the served one → 404
   ``model_not_found``. A prompt longer in characters than the context could hold
   (``--max-model-len`` × the longest vocabulary entry) → 400 ``context_length_exceeded``
   before tokenizing. A ``temperature`` below 1e-5 samples greedily (sent as 0).
2. **Tokenize** (``preprocess.py``): chat messages go through the model's chat template
   (generation prompt added); completion prompts are text or token ids. A prompt that leaves no
   room in the context (``--max-model-len``, 8192) or ``prompt + max_tokens`` beyond it → 400
   ``context_length_exceeded``. Without ``max_tokens`` a chat request may use the rest of the
   context; a completion request defaults to 16 (OpenAI's legacy default).
3. **Hash** (``preprocess.py``) the prompt's full blocks once
   (:func:`tandem.kvbm.hashing.compute_block_hashes`) with the block size the registered
   workers advertise (``InstanceInfo.block_size``; ``--default-block-size``, 16, without any;
   :meth:`Frontend.block_size` in ``service.py``).
4. **Route** (``token_stream.py``): take a fresh inbox *first* (``_INBOX.<nuid>.<n>`` under the
   frontend's one wildcard subscription, :class:`~.token_stream.InboxMux`), then publish
   ``RouteRequest(reply_to=inbox)`` on ``{ns}.router.generate`` with the trace context in the
   ``traceparent`` header. The message's NATS reply subject is the inbox too, so "no router
   subscribed" (NATS no-responders status) and an ``ErrorReply`` from the router's handler
   arrive there and fail the request at once (503 / the reply's code) instead of waiting for
   the timeout.
5. **Collect** (``token_stream.py``) ``TokenChunk``\\ s on the inbox. Chunk 0 may come from the
   router (first token of a disaggregated request) and the rest from the decode worker, so
   chunks are reordered by ``index`` (duplicates and stale indices dropped). A chunk carries
   one token or several (a mock worker with no simulated time to wait sends a burst of steps'
   tokens as one chunk). The chunk with
   ``finish_reason`` ends the stream. A chunk with ``error`` (or an ``ErrorReply``) fails the
   request with its code, type and retry hint.
6. **Detokenize and stop** (``output.py``, driven by ``generation.py``): token ids are
   detokenized incrementally (UTF-8 safe); stop strings are matched on the text, the output is
   truncated before the match and ``Cancel(reason="stop_string")`` is published on
   ``{ns}.cancel``; text that could still become a stop string is held back while streaming.
   The final chunk's ``RequestMetrics`` fill ``usage.prompt_tokens_details.cached_tokens`` and
   the ``tandem`` extension (workers, KV transfer); ``ttft_ms`` is measured here, from the
   arrival of the request to the first token.
7. **Render** (``render.py``): the chat or completion renderer builds the response JSON, or
   the stream's chunks (role first for chat, the ``finish_reason`` chunk with ``tandem``, then
   the usage chunk if ``stream_options.include_usage``).
8. **Deliver** (``http.py`` / ``nats_api.py``): one JSON body, or SSE events / NATS messages
   ending with ``[DONE]``. The SSE events of every chunk already received go out in one
   write (one event per chunk; ``[DONE]`` with the last ones). An error before the first chunk
   gets a real HTTP status (and ``Retry-After`` when hinted); after it, one
   ``data: {"error": ...}`` event before ``[DONE]``.
9. **Clean up** (``token_stream.py``, always, in ``finally``): release the inbox; if the
   request did not finish (client disconnected, stop string, timeout, error) publish
   ``Cancel``. No in-order progress for ``--chunk-timeout`` seconds (default 120) → 504 and
   ``Cancel(reason="timeout")``. An HTTP client that disconnects cancels the handler (aiohttp
   ``handler_cancellation``) or makes the next write fail; either way the request is cancelled
   and the inbox released.

Resources and their owners: the wildcard inbox subscription belongs to :class:`Frontend`
(subscribed in ``start``, unsubscribed in ``close``); each request's inbox belongs to its
:class:`TokenStream` (released on every exit path, through its :class:`Generation`); HTTP handler
tasks belong to aiohttp; NATS request tasks belong to the service's
:class:`~tandem.services.messaging.TaskTracker` (drained, then cancelled, at shutdown); the
instance registry watcher belongs to :class:`Frontend`. Tracing: one SERVER span per HTTP
request (parent: an incoming ``traceparent`` header) or per public NATS request; the
``RouteRequest`` carries its context downstream.

Public NATS API (queue group ``frontend``)
------------------------------------------
Subjects ``{ns}.v1.chat.completions``, ``{ns}.v1.completions`` and ``{ns}.v1.models``. Payloads
are JSON (UTF-8), exactly the HTTP bodies; a request without a reply subject is dropped.

* **Request**: the OpenAI request body as the message payload (``{ns}.v1.models``: any payload,
  e.g. empty). Answers go to the message's reply subject. With an API key configured, the
  message needs the NATS header ``Authorization: Bearer <key>`` (else a 401 error reply); the
  edge checks and limits are those of HTTP (401 / 413 / 429 with ``"retry_after"``), answered
  before any parsing.
* **Non-streaming** (``"stream"`` absent or false): exactly one reply message. Success: the same
  JSON bytes HTTP returns (``chat.completion`` / ``text_completion`` / model list). Error:
  OpenAI's error body plus a top-level status, ``{"error": {...}, "status": 400}``, where
  ``status`` is the HTTP status code the same request gets over HTTP; with a retry hint also
  ``"retry_after": <seconds>`` (the HTTP ``Retry-After`` value). Use plain NATS request/reply
  (``nc.request``).
* **Streaming** (``"stream": true``): several messages on the reply subject, in order: each
  chunk JSON exactly as it follows ``data: `` in the SSE stream, then a final message whose
  payload is exactly ``[DONE]``. An error (before or during the stream) is one error message
  (the shape above) followed by ``[DONE]``; so a client reads until ``[DONE]`` and treats a
  message with a top-level ``"error"`` as the failure. Subscribe to your own inbox and
  publish with ``reply=inbox`` (``nc.request`` would only see the first message). NATS gives the
  frontend no disconnect signal: an abandoned stream runs to its end (or its ``max_tokens``).

Importing
---------
Every name in ``__all__`` imports from this package. Only :class:`FrontendConfig` and the
``DEFAULT_*`` constants of ``config.py`` are loaded eagerly; the rest load on first use, so
``import tandem.services.frontend.config`` (the launcher) pulls in neither aiohttp nor the
tokenizer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tandem.services.frontend.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CHUNK_TIMEOUT_S,
    DEFAULT_MAX_MODEL_LEN,
    FrontendConfig,
)

if TYPE_CHECKING:
    from tandem.services.frontend.generation import Generation
    from tandem.services.frontend.http import create_app
    from tandem.services.frontend.output import StopStringMatcher, TextOutput
    from tandem.services.frontend.preprocess import DEFAULT_COMPLETION_MAX_TOKENS, PreparedRequest
    from tandem.services.frontend.render import DONE
    from tandem.services.frontend.service import Frontend, main
    from tandem.services.frontend.token_stream import TokenStream

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CHUNK_TIMEOUT_S",
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "DEFAULT_MAX_MODEL_LEN",
    "DONE",
    "Frontend",
    "FrontendConfig",
    "Generation",
    "PreparedRequest",
    "StopStringMatcher",
    "TextOutput",
    "TokenStream",
    "create_app",
    "main",
]

#: Lazily imported names → the submodule defining them.
_LAZY = {
    "DEFAULT_COMPLETION_MAX_TOKENS": "preprocess",
    "DONE": "render",
    "Frontend": "service",
    "Generation": "generation",
    "PreparedRequest": "preprocess",
    "StopStringMatcher": "output",
    "TextOutput": "output",
    "TokenStream": "token_stream",
    "create_app": "http",
    "main": "service",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
