"""One request through stages 2 and 3: :class:`TokenStream` → :class:`TextOutput`, plus accounting.

:class:`Generation` pulls in-order chunks from its token stream, turns them into text deltas,
ends the stream on a stop string (``Cancel(reason="stop_string")``) and records what the
response needs: generated token ids, finish reason, the final chunk's
:class:`~tandem.protocol.messages.RequestMetrics`, the workers that sent chunks and the time to
first token. :meth:`Generation.usage` and :meth:`Generation.tandem_info` build the response's
``usage`` and ``tandem`` objects; :mod:`.render` turns all of it into JSON.
"""

from __future__ import annotations

import time
from typing import Any

from tandem.protocol.messages import RequestMetrics, TokenChunk
from tandem.protocol.openai import KvTransferInfo, OpenAIError, PromptTokensDetails, TandemInfo, Usage
from tandem.services.frontend.migration import MigratingStream
from tandem.services.frontend.output import TextOutput
from tandem.services.frontend.preprocess import PreparedRequest
from tandem.services.frontend.token_stream import TokenStream

__all__ = ["Generation"]


class Generation:
    """Owns one routed request from the first chunk to the last piece of text.

    Use as ``async with Generation(...) as gen:`` then call :meth:`next_text` until it returns
    None (:meth:`poll_text` takes what is already here without waiting). Entering starts the
    token stream; leaving closes it (inbox released; ``Cancel`` unless the pipeline finished the
    request).
    """

    def __init__(
        self, prepared: PreparedRequest, stream: TokenStream | MigratingStream, output: TextOutput
    ) -> None:
        self.prepared = prepared
        self.stream = stream
        self._output = output
        #: Set when the request ended for us (stop string, final chunk, error or timeout).
        self.done = False
        self.finish_reason: str | None = None
        #: Generated token ids in order (before stop-string truncation of the text).
        self.token_ids: list[int] = []
        self.metrics: RequestMetrics | None = None
        self.ttft_ms: float | None = None
        self.first_worker = ""
        self.last_worker = ""

    @property
    def remote_finished(self) -> bool:
        """The pipeline finished the request itself (no Cancel needed)."""
        return self.stream.finished

    async def __aenter__(self) -> Generation:
        await self.stream.start()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self.stream.close()

    async def next_text(self) -> str | None:
        """The next non-empty piece of output text, or None once the request has ended.

        Raises :class:`OpenAIError` as :meth:`TokenStream.next_chunk` does.
        """
        while not self.done:
            try:
                chunk = await self.stream.next_chunk()
            except OpenAIError:
                self.done = True
                self.finish_reason = "error"
                raise
            if chunk is None:
                self.done = True
                break
            text = self._consume(chunk)
            if text:
                return text
        return None

    def poll_text(self) -> str | None:
        """:meth:`next_text` without waiting: the next piece of text the chunks already here make,
        else None (:attr:`done` tells whether the request ended or more is to come).

        Raises :class:`OpenAIError` as :meth:`TokenStream.next_chunk` does.
        """
        stream = self.stream
        while not self.done:
            try:
                chunk = stream.poll_chunk()
            except OpenAIError:
                self.done = True
                self.finish_reason = "error"
                raise
            if chunk is None:
                if stream.ended:
                    self.done = True
                return None
            text = self._consume(chunk)
            if text:
                return text
        return None

    def _consume(self, chunk: TokenChunk) -> str:
        if chunk.worker_id:
            if not self.first_worker:
                self.first_worker = chunk.worker_id
            self.last_worker = chunk.worker_id
        if chunk.token_ids and self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.prepared.arrived) * 1000.0
        self.token_ids.extend(chunk.token_ids)
        final = chunk.finish_reason is not None
        if final:
            self.metrics = chunk.metrics
        delta = self._output.feed(chunk.token_ids, final=final)
        if delta.stopped:
            self.done = True
            self.finish_reason = "stop"
            self.stream.stop("stop_string")  # Cancel on close, unless this was the final chunk
        elif final:
            self.done = True
            self.finish_reason = chunk.finish_reason
        return delta.text

    def tandem_info(self) -> TandemInfo:
        """The ``tandem`` extension: from the final chunk's metrics, else from chunk senders."""
        m = self.metrics
        kv = None
        if m is not None and m.kv_transfer is not None:
            t = m.kv_transfer
            kv = KvTransferInfo(blocks=t.blocks, bytes=t.bytes, ms=t.ms, reused_blocks=t.reused_blocks)
        ttft = round(self.ttft_ms, 3) if self.ttft_ms is not None else None
        return TandemInfo(
            request_id=self.prepared.request_id,
            prefill_worker=(m.prefill_worker if m and m.prefill_worker else self.first_worker),
            decode_worker=(m.decode_worker if m and m.decode_worker else self.last_worker),
            kv_transfer=kv,
            cached_tokens=m.cached_tokens if m else 0,
            ttft_ms=ttft,
            prefill_ms=round(m.prefill_ms, 3) if m else None,
        )

    def usage(self) -> Usage:
        """Token counts (``cached_tokens`` from the final chunk's metrics)."""
        prompt = len(self.prepared.token_ids)
        cached = self.metrics.cached_tokens if self.metrics else 0
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=len(self.token_ids),
            total_tokens=prompt + len(self.token_ids),
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )
