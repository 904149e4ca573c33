"""Stage 4 of the pipeline: a generation's text and accounting → OpenAI response JSON.

One :class:`Renderer` per request kind (:data:`RENDERERS`): :class:`ChatRenderer`
(``chat.completion`` / ``chat.completion.chunk``) and :class:`CompletionRenderer`
(``text_completion``). They build the JSON bytes for both transports: the HTTP layer frames a
chunk as SSE ``data: {chunk}``, the NATS layer sends it as one message; both end a stream with
:data:`DONE`. :func:`stream_batches` is the streaming sequence shared by both kinds (in batches
of what is already there, for one write each); :func:`stream_chunks` is the same one chunk at a
time.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator

import msgspec
from msgspec import UNSET, UnsetType

from tandem.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    OpenAIError,
    TandemInfo,
    Usage,
    encode_json,
)
from tandem.services.frontend.generation import Generation
from tandem.services.frontend.preprocess import PreparedRequest, RequestKind

__all__ = [
    "DONE",
    "RENDERERS",
    "ChatRenderer",
    "CompletionRenderer",
    "Renderer",
    "renderer_for",
    "stream_batches",
    "stream_chunks",
]

#: Terminal message of a stream (SSE ``data: [DONE]``; NATS payload ``[DONE]``).
DONE = b"[DONE]"


class Renderer(ABC):
    """Builds one request kind's response JSON (non-streaming body and streaming chunks)."""

    @abstractmethod
    def response(self, p: PreparedRequest, content: str, gen: Generation) -> bytes:
        """The non-streaming response: the whole ``content`` plus usage and ``tandem``."""

    def opening(self, p: PreparedRequest) -> bytes | None:
        """The chunk that opens a stream before any text (None: the kind has none)."""
        return None

    @abstractmethod
    def delta(self, p: PreparedRequest, text: str) -> bytes:
        """A streaming chunk carrying ``text``."""

    @abstractmethod
    def closing(self, p: PreparedRequest, finish_reason: str | None, info: TandemInfo) -> bytes:
        """The streaming chunk with ``finish_reason`` and the ``tandem`` extension."""

    @abstractmethod
    def usage(self, p: PreparedRequest, usage: Usage) -> bytes:
        """The extra last chunk of ``stream_options.include_usage``: no choices, only usage."""

    @staticmethod
    def _chunk_usage(p: PreparedRequest) -> Usage | UnsetType | None:
        # With include_usage every chunk carries "usage": null until the usage chunk (OpenAI).
        return None if p.include_usage else UNSET


class ChatRenderer(Renderer):
    """``chat.completion`` and ``chat.completion.chunk`` (the first chunk carries the role)."""

    def response(self, p: PreparedRequest, content: str, gen: Generation) -> bytes:
        return encode_json(
            ChatCompletion(
                id=p.request_id,
                created=p.created,
                model=p.model,
                choices=[
                    ChatChoice(
                        index=0,
                        message=AssistantMessage(content=content),
                        finish_reason=gen.finish_reason,
                        token_ids=list(gen.token_ids) if p.return_token_ids else UNSET,
                    )
                ],
                usage=gen.usage(),
                tandem=gen.tandem_info(),
            )
        )

    def opening(self, p: PreparedRequest) -> bytes:
        return self._chunk(p, ChatDelta(role="assistant", content=""))

    def delta(self, p: PreparedRequest, text: str) -> bytes:
        return self._chunk(p, ChatDelta(content=text))

    def closing(self, p: PreparedRequest, finish_reason: str | None, info: TandemInfo) -> bytes:
        return self._chunk(p, ChatDelta(), finish=finish_reason, info=info)

    def usage(self, p: PreparedRequest, usage: Usage) -> bytes:
        return encode_json(
            ChatCompletionChunk(id=p.request_id, created=p.created, model=p.model, choices=[], usage=usage)
        )

    def _chunk(
        self,
        p: PreparedRequest,
        delta: ChatDelta,
        *,
        finish: str | None = None,
        info: TandemInfo | None = None,
    ) -> bytes:
        return encode_json(
            ChatCompletionChunk(
                id=p.request_id,
                created=p.created,
                model=p.model,
                choices=[ChatChunkChoice(index=0, delta=delta, finish_reason=finish)],
                usage=self._chunk_usage(p),
                tandem=info if info is not None else msgspec.UNSET,
            )
        )


class CompletionRenderer(Renderer):
    """``text_completion``, streamed as ``text_completion`` objects too (OpenAI's legacy API)."""

    def response(self, p: PreparedRequest, content: str, gen: Generation) -> bytes:
        return encode_json(
            Completion(
                id=p.request_id,
                created=p.created,
                model=p.model,
                choices=[
                    CompletionChoice(
                        index=0,
                        text=content,
                        finish_reason=gen.finish_reason,
                        token_ids=list(gen.token_ids) if p.return_token_ids else UNSET,
                    )
                ],
                usage=gen.usage(),
                tandem=gen.tandem_info(),
            )
        )

    def delta(self, p: PreparedRequest, text: str) -> bytes:
        return self._chunk(p, text)

    def closing(self, p: PreparedRequest, finish_reason: str | None, info: TandemInfo) -> bytes:
        return self._chunk(p, "", finish=finish_reason, info=info)

    def usage(self, p: PreparedRequest, usage: Usage) -> bytes:
        return encode_json(
            Completion(id=p.request_id, created=p.created, model=p.model, choices=[], usage=usage)
        )

    def _chunk(
        self, p: PreparedRequest, text: str, *, finish: str | None = None, info: TandemInfo | None = None
    ) -> bytes:
        return encode_json(
            Completion(
                id=p.request_id,
                created=p.created,
                model=p.model,
                choices=[CompletionChoice(index=0, text=text, finish_reason=finish)],
                usage=self._chunk_usage(p),
                tandem=info if info is not None else msgspec.UNSET,
            )
        )


RENDERERS: dict[RequestKind, Renderer] = {"chat": ChatRenderer(), "completion": CompletionRenderer()}


def renderer_for(kind: RequestKind) -> Renderer:
    """The renderer of a request kind."""
    return RENDERERS[kind]


async def stream_batches(gen: Generation, renderer: Renderer) -> AsyncGenerator[list[bytes], None]:
    """A streaming response's chunk JSONs for a started ``gen``, in batches, ending with :data:`DONE`.

    A batch holds every chunk the token chunks already received make (at least one); it is
    yielded when the next one would have to wait, so a transport can send it in one write. The
    last batch ends with :data:`DONE` (the object itself). The opening chunk goes out with the
    first text (so an error before any text still gets a real HTTP status), or before the
    closing chunk if there is no text at all. On an error the batch gathered so far is yielded
    first, then the :class:`~tandem.protocol.openai.OpenAIError` is raised (no ``DONE``).
    """
    p = gen.prepared
    opened = False
    batch: list[bytes] = []
    while True:
        try:
            text = gen.poll_text() if batch else await gen.next_text()
        except OpenAIError:
            if batch:
                yield batch
            raise
        if text is None:
            if gen.done:
                break
            yield batch  # the next text has to wait: send what is here
            batch = []
            continue
        if not opened:
            opened = True
            if (first := renderer.opening(p)) is not None:
                batch.append(first)
        batch.append(renderer.delta(p, text))
    if not opened and (first := renderer.opening(p)) is not None:
        batch.append(first)
    batch.append(renderer.closing(p, gen.finish_reason, gen.tandem_info()))
    if p.include_usage:
        batch.append(renderer.usage(p, gen.usage()))
    batch.append(DONE)
    yield batch


async def stream_chunks(gen: Generation, renderer: Renderer) -> AsyncGenerator[bytes, None]:
    """:func:`stream_batches` one chunk JSON at a time, without :data:`DONE`."""
    async with contextlib.aclosing(stream_batches(gen, renderer)) as batches:
        async for batch in batches:
            for data in batch:
                if data is not DONE:
                    yield data
