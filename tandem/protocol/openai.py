"""The public, OpenAI-shaped JSON formats served by the frontend (HTTP and NATS ``{ns}.v1.*``).

Requests decode with :func:`decode_chat_request` / :func:`decode_completion_request`, which raise
:class:`OpenAIError` (an exception carrying the HTTP status and OpenAI's error body) with a clear
message on malformed JSON, wrong types or out-of-range values. Unknown request fields are
ignored, as OpenAI-compatible servers commonly do. Responses encode with :func:`encode_json`.

Extensions beyond OpenAI's schema:

* request: ``top_k`` (0 or -1 = off), ``ignore_eos`` and ``return_token_ids`` (as in vLLM:
  non-streaming choices then carry ``token_ids``, the generated token ids, before any
  stop-string truncation of the text);
* response: a ``tandem`` object (:class:`TandemInfo`) saying where the request ran (prefill and
  decode worker), how much KV moved between them, how many prompt tokens were served from the
  prefix cache and the time to first token measured at the frontend;
* NATS error replies: the error body plus a top-level ``"status"`` (the HTTP status code that
  the same error gets over HTTP) and, for a busy pipeline (429/503 with a hint), ``"retry_after"``
  (whole seconds, what HTTP sends as the ``Retry-After`` header), see :func:`error_body`.

Fields that are ``UNSET`` are omitted from the JSON; fields that are ``None`` encode as
``null`` where OpenAI sends ``null`` (e.g. ``finish_reason`` of a streaming chunk).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

# ---- errors --------------------------------------------------------------------------------------


class ErrorDetail(msgspec.Struct):
    """OpenAI's ``error`` object. ``param`` names the offending request field, if any."""

    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``.

    ``status`` and ``retry_after`` are set only on NATS replies (HTTP carries them in the status
    line and the ``Retry-After`` header).
    """

    error: ErrorDetail
    status: int | UnsetType = UNSET
    retry_after: int | UnsetType = UNSET


class OpenAIError(Exception):
    """An error to return to the client: HTTP ``status`` plus OpenAI's error fields.

    ``retry_after_s``: for a busy pipeline (429/503), seconds after which a retry may succeed
    (sent as ``Retry-After``, see :func:`retry_after_seconds`); None = no hint.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _default_error_type(status)
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def retry_after(self) -> int | None:
        """The ``Retry-After`` value in whole seconds, or None without a hint."""
        return retry_after_seconds(self.retry_after_s)

    def detail(self) -> ErrorDetail:
        """The ``error`` object of the body."""
        return ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)

    def body(self, *, with_status: bool = False) -> bytes:
        """JSON error body; ``with_status`` adds the top-level ``"status"`` used on NATS."""
        return error_body(self, with_status=with_status)


def _default_error_type(status: int) -> str:
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status == 503:
        return "service_unavailable_error"
    if status == 504:
        return "timeout_error"
    if status >= 500:
        return "internal_server_error"
    return "invalid_request_error"


def retry_after_seconds(seconds: float | None) -> int | None:
    """A retry hint as HTTP ``Retry-After`` wants it: whole seconds, rounded up, at least 1."""
    if seconds is None or not math.isfinite(seconds):
        return None
    return max(1, math.ceil(seconds))


def error_body(err: OpenAIError, *, with_status: bool = False) -> bytes:
    """Encode ``err`` as OpenAI's error JSON.

    ``with_status`` (NATS replies) adds ``"status": <code>`` and, when ``err`` carries a retry
    hint, ``"retry_after": <whole seconds>``.
    """
    retry = err.retry_after() if with_status else None
    return encode_json(
        ErrorResponse(
            error=err.detail(),
            status=err.status if with_status else UNSET,
            retry_after=retry if retry is not None else UNSET,
        )
    )


# ---- requests ------------------------------------------------------------------------------------


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of a message's content list. Only ``{"type": "text", "text": ...}`` is served."""

    type: str
    text: str | None = None


ChatRole = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(msgspec.Struct, kw_only=True):
    """A chat message. ``content`` is a string, a list of text parts, or null (assistant)."""

    role: ChatRole
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text: the string, or the text parts joined by newlines."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)


class StreamOptions(msgspec.Struct, kw_only=True):
    """``include_usage``: send a final chunk with ``usage`` (and empty ``choices``)."""

    include_usage: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True):
    """Fields shared by both request kinds."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False
    return_token_ids: bool = False
    user: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    """``POST /v1/chat/completions``. ``max_completion_tokens`` wins over ``max_tokens``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False

    def effective_max_tokens(self) -> int | None:
        """The requested new-token limit, or None for "as many as the context allows"."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields, kw_only=True):
    """``POST /v1/completions``. ``prompt``: a string, token ids, or a one-element list of either.

    Batched prompts (more than one) are refused with 400.
    """

    prompt: str | list[Any]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def effective_max_tokens(self) -> int | None:
        """The requested new-token limit (OpenAI's legacy default is 16, applied by the caller)."""
        return self.max_tokens


#: Most stop strings one request may give (OpenAI's limit).
MAX_STOP_SEQUENCES = 4
#: Longest stop string, characters (the stop matcher's work per token grows with it).
MAX_STOP_CHARS = 512
#: Largest ``top_k`` (the sampler clamps to the vocabulary anyway; this keeps it an int32).
MAX_TOP_K = 2**31 - 1
#: ``seed`` range: a signed 64-bit integer, as OpenAI documents it.
SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1
#: Largest ``max_tokens`` / ``max_completion_tokens`` that validates (the context limit applies
#: after tokenizing; this only keeps the value a signed 64-bit integer).
MAX_TOKENS_LIMIT = 2**63 - 1
#: Largest ``temperature`` (OpenAI's range is 0..2).
MAX_TEMPERATURE = 2.0


def _field_from_path(message: str) -> str | None:
    """``"... - at `$.messages[0].role`"`` → ``"messages[0].role"``."""
    m = re.search(r"at `\$\.?([^`]*)`", message)
    return m.group(1) or None if m else None


def _decode(data: bytes, tp: type[Any]) -> Any:
    """Decode ``data`` as JSON into ``tp``; every failure is a 400 :class:`OpenAIError`.

    Besides msgspec's own errors this covers what a hostile body can make a decoder raise:
    invalid UTF-8 inside a string (``UnicodeDecodeError``) and nesting deeper than the decoder's
    recursion limit (``RecursionError``, e.g. 100k nested arrays). Both are cheap to detect:
    msgspec stops at the first bad byte or the limit depth.
    """
    if not data.strip():
        raise OpenAIError(400, "Request body is empty; expected a JSON object.")
    try:
        return msgspec.json.decode(data, type=tp)
    except RecursionError:
        raise OpenAIError(400, "Malformed JSON body: nested too deeply.", code="invalid_json") from None
    except UnicodeDecodeError as e:
        raise OpenAIError(
            400, f"Malformed JSON body: not valid UTF-8 (byte {e.start}).", code="invalid_json"
        ) from None
    except msgspec.ValidationError as e:
        text = str(e)
        param = _field_from_path(text)
        if text.startswith("Object missing required field"):
            field = re.search(r"`([^`]+)`", text)
            name = field.group(1) if field else ""
            full = f"{param}.{name}" if param else name
            raise OpenAIError(400, f"Missing required parameter: '{full}'.", param=full) from None
        raise OpenAIError(400, f"Invalid request: {text}", param=param) from None
    except msgspec.DecodeError as e:
        raise OpenAIError(400, f"Malformed JSON body: {e}", code="invalid_json") from None


def _check_common(req: _SamplingFields, max_tokens: int | None, max_tokens_param: str) -> None:
    """Range checks shared by both request kinds; raises 400 naming the offending parameter.

    ``temperature`` finite in [0, 2]; ``top_p`` in (0, 1]; ``top_k`` -1 (off), 0 (off) or up to
    :data:`MAX_TOP_K`; ``seed`` a signed 64-bit integer; ``max_tokens`` at least 1 (and a
    64-bit integer); at most :data:`MAX_STOP_SEQUENCES` stop strings of at most
    :data:`MAX_STOP_CHARS` characters each; ``n`` 1.
    """
    if not req.model:
        raise OpenAIError(400, "'model' must be a non-empty string.", param="model")
    if req.n != 1:
        raise OpenAIError(400, f"Only n=1 is supported (got n={req.n}).", param="n")
    if max_tokens is not None and max_tokens < 1:
        raise OpenAIError(
            400, f"'{max_tokens_param}' must be at least 1 (got {max_tokens}).", param=max_tokens_param
        )
    if max_tokens is not None and max_tokens > MAX_TOKENS_LIMIT:
        raise OpenAIError(
            400, f"'{max_tokens_param}' must fit in a signed 64-bit integer.", param=max_tokens_param
        )
    t = req.temperature
    if t is not None and not (math.isfinite(t) and 0.0 <= t <= MAX_TEMPERATURE):
        raise OpenAIError(400, f"'temperature' must be between 0 and 2 (got {t}).", param="temperature")
    if req.top_p is not None and not (math.isfinite(req.top_p) and 0.0 < req.top_p <= 1.0):
        raise OpenAIError(400, f"'top_p' must be in (0, 1] (got {req.top_p}).", param="top_p")
    if req.top_k is not None and not -1 <= req.top_k <= MAX_TOP_K:
        raise OpenAIError(
            400,
            f"'top_k' must be >= 0 (at most {MAX_TOP_K}), or -1 to disable (got {req.top_k}).",
            param="top_k",
        )
    if req.seed is not None and not SEED_MIN <= req.seed <= SEED_MAX:
        raise OpenAIError(400, "'seed' must fit in a signed 64-bit integer.", param="seed")
    stops = stop_list(req.stop)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise OpenAIError(
            400,
            f"At most {MAX_STOP_SEQUENCES} stop sequences are supported (got {len(stops)}).",
            param="stop",
        )
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise OpenAIError(
            400, f"Stop sequences must be at most {MAX_STOP_CHARS} characters long.", param="stop"
        )
    if req.stream_options is not None and not req.stream:
        raise OpenAIError(
            400, "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
        )


def stop_list(stop: str | list[str] | None) -> list[str]:
    """The request's stop strings as a list, without empty strings."""
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    return [s for s in items if s]


def decode_chat_request(data: bytes) -> ChatCompletionRequest:
    """Parse and validate a chat completions body; raises :class:`OpenAIError` (400)."""
    req: ChatCompletionRequest = _decode(data, ChatCompletionRequest)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    _check_common(req, req.effective_max_tokens(), param)
    if not req.messages:
        raise OpenAIError(400, "'messages' must contain at least one message.", param="messages")
    for i, msg in enumerate(req.messages):
        if isinstance(msg.content, list):
            for j, part in enumerate(msg.content):
                if part.type != "text" or part.text is None:
                    raise OpenAIError(
                        400,
                        f"Only text content parts are supported (messages[{i}].content[{j}] has type "
                        f"'{part.type}').",
                        param=f"messages[{i}].content[{j}]",
                    )
    if req.logprobs:
        raise OpenAIError(400, "'logprobs' is not supported.", param="logprobs")
    return req


def decode_completion_request(data: bytes) -> CompletionRequest:
    """Parse and validate a completions body; raises :class:`OpenAIError` (400)."""
    req: CompletionRequest = _decode(data, CompletionRequest)
    _check_common(req, req.max_tokens, "max_tokens")
    if req.echo:
        raise OpenAIError(400, "'echo' is not supported.", param="echo")
    if req.logprobs is not None:
        raise OpenAIError(400, "'logprobs' is not supported.", param="logprobs")
    if req.suffix:
        raise OpenAIError(400, "'suffix' is not supported.", param="suffix")
    completion_prompt(req)  # validates the prompt's shape
    return req


_TokenIds = list[Annotated[int, msgspec.Meta(ge=0, lt=2**32)]]


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The single prompt of a completions request: text, or token ids.

    Accepts ``"text"``, ``["text"]``, ``[1, 2, 3]`` and ``[[1, 2, 3]]``; raises 400 otherwise.
    """
    prompt: Any = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise OpenAIError(400, "'prompt' must not be empty.", param="prompt")
        return prompt
    if isinstance(prompt, list):
        if not prompt:
            raise OpenAIError(400, "'prompt' must not be empty.", param="prompt")
        try:  # checked in C (a 4 MiB body holds ~2M ids): ints (not bools) in [0, 2**32)
            ids: list[int] = msgspec.convert(prompt, _TokenIds)
            return ids
        except msgspec.ValidationError:
            pass
        if all(isinstance(p, str | list) for p in prompt):
            raise OpenAIError(400, "Batched prompts are not supported; send one prompt.", param="prompt")
    raise OpenAIError(
        400,
        "'prompt' must be a string, a list of token ids, or a one-element list of either.",
        param="prompt",
    )


# ---- responses -----------------------------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct):
    """``cached_tokens``: prompt tokens whose KV came from the prefix cache (no recompute)."""

    cached_tokens: int = 0


class Usage(msgspec.Struct):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = msgspec.field(default_factory=PromptTokensDetails)


class KvTransferInfo(msgspec.Struct):
    """KV moved from the prefill to the decode worker (after reuse of blocks decode held)."""

    blocks: int = 0
    bytes: int = 0
    ms: float = 0.0
    reused_blocks: int = 0


class TandemInfo(msgspec.Struct):
    """The ``tandem`` extension object: where and how the request ran.

    ``prefill_worker`` is the worker that computed the prompt (equal to ``decode_worker`` when
    one worker did both); ``kv_transfer`` is null when no KV moved; ``ttft_ms`` is measured at
    the frontend, from receiving the request to the first token arriving; ``prefill_ms`` is the
    engine's own time for the steps that computed the prompt (on the prefill worker), so
    ``ttft_ms - prefill_ms`` is what the serving path added.
    """

    request_id: str
    prefill_worker: str = ""
    decode_worker: str = ""
    kv_transfer: KvTransferInfo | None = None
    cached_tokens: int = 0
    ttft_ms: float | None = None
    prefill_ms: float | None = None


class AssistantMessage(msgspec.Struct):
    """The generated message of a chat completion."""

    content: str
    role: str = "assistant"


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None
    token_ids: list[int] | UnsetType = UNSET


class ChatCompletion(msgspec.Struct):
    """Non-streaming chat completions response (``object = "chat.completion"``)."""

    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None
    tandem: TandemInfo | UnsetType = UNSET


class ChatDelta(msgspec.Struct):
    """The new text of a streaming chunk; ``role`` only on the first chunk."""

    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct):
    """One streamed chat chunk (``object = "chat.completion.chunk"``).

    ``usage`` is present (null) on every chunk only when ``stream_options.include_usage``; the
    extra last chunk then has empty ``choices`` and the usage. ``tandem`` rides on the chunk
    that carries ``finish_reason``.
    """

    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: Usage | UnsetType | None = UNSET
    tandem: TandemInfo | UnsetType = UNSET


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None
    token_ids: list[int] | UnsetType = UNSET


class Completion(msgspec.Struct):
    """Completions response and streamed chunk alike (``object = "text_completion"``)."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    system_fingerprint: str | None = None
    usage: Usage | UnsetType | None = UNSET
    tandem: TandemInfo | UnsetType = UNSET


class ModelCard(msgspec.Struct):
    id: str
    created: int
    object: str = "model"
    owned_by: str = "tandem"
    max_model_len: int | UnsetType = UNSET


class ModelList(msgspec.Struct):
    """``GET /v1/models``."""

    data: list[ModelCard]
    object: str = "list"


_json_encoder = msgspec.json.Encoder()


def encode_json(obj: Any) -> bytes:
    """Compact JSON bytes of a response Struct."""
    return _json_encoder.encode(obj)


__all__ = [
    "MAX_STOP_CHARS",
    "MAX_STOP_SEQUENCES",
    "MAX_TEMPERATURE",
    "MAX_TOKENS_LIMIT",
    "MAX_TOP_K",
    "SEED_MAX",
    "SEED_MIN",
    "AssistantMessage",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatDelta",
    "ChatMessage",
    "Completion",
    "CompletionChoice",
    "CompletionRequest",
    "ContentPart",
    "ErrorDetail",
    "ErrorResponse",
    "KvTransferInfo",
    "ModelCard",
    "ModelList",
    "OpenAIError",
    "PromptTokensDetails",
    "StreamOptions",
    "TandemInfo",
    "Usage",
    "completion_prompt",
    "decode_chat_request",
    "decode_completion_request",
    "encode_json",
    "error_body",
    "retry_after_seconds",
    "stop_list",
]
