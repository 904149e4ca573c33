"""BatchEncoder: the new text of concurrent requests tokenized together, off the event loop.

Tokenizing is the frontend's largest CPU cost per request (SmolLM2's byte-level BPE: ~4 ms for
a 1.3k-token prompt on this CPU). Done inline, a burst of N requests is tokenized one after the
other on the event loop, and the last waits for all the others (N = 8: ~32 ms before its
request even reaches the router). Here, texts queued during one turn of the event loop go to a
worker thread as ONE batch call (Rust, the GIL released); while it runs, the next batch gathers,
and the loop keeps serving meanwhile. The same 8 prompts were ready together after ~14 ms on 2
cores with the Hugging Face ``encode_batch``; with the checked tiktoken encoder
(:mod:`tandem.engine.fast_bpe`, for callers that split out the added tokens: ``ordinary``) the
batch takes a third of the time on one core.

Ids are exactly ``tokenizer.encode(text)``'s (no BOS/EOS added); a text that several callers
sent in one batch is encoded once (each caller gets its own list). A tokenizer without batch
calls is called text by text, still in the thread. An exception of the batch call is raised to
every caller whose text was in that batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from tandem.engine.tokenizer import Tokenizer

__all__ = ["BatchEncoder"]


def encode_texts(tokenizer: Tokenizer, texts: list[str], *, ordinary: bool = False) -> list[list[int]]:
    """``[tokenizer.encode(t) for t in texts]`` (no BOS/EOS) by the tokenizer's batch call
    (:meth:`~tandem.engine.tokenizer.Tokenizer.encode_batch`; with ``ordinary``, texts holding
    no added-token strings, :meth:`~tandem.engine.tokenizer.Tokenizer.encode_ordinary_batch`),
    or text by text for a tokenizer without one. For a worker thread."""
    batch = getattr(tokenizer, "encode_ordinary_batch" if ordinary else "encode_batch", None)
    if batch is None:
        return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    return [list(ids) for ids in batch(texts)]


class BatchEncoder:
    """Tokenizes texts of concurrent callers in shared batches (see the module docstring).

    Args:
        tokenizer: the tokenizer (used from one worker thread at a time by this object).
        max_batch_chars: a batch holds at most about this many characters (more waits for the
            next batch), so one huge prompt does not hold a batch of small ones for long.
        ordinary: callers send only text holding no added-token strings (pieces between special
            tokens), so the tokenizer's ``encode_ordinary_batch`` may encode it.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, max_batch_chars: int = 1 << 20, ordinary: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.ordinary = ordinary
        self.max_batch_chars = max_batch_chars
        self._queue: list[tuple[list[str], asyncio.Future[list[list[int]]]]] = []
        self._task: asyncio.Task[None] | None = None
        #: Batch calls made, and distinct texts encoded (for tests and stats).
        self.batches = 0
        self.texts = 0

    async def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids of each of ``texts``, in order."""
        if not texts:
            return []
        fut: asyncio.Future[list[list[int]]] = asyncio.get_running_loop().create_future()
        self._queue.append((list(texts), fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="batch-encode")
        return await fut

    async def _drain(self) -> None:
        while self._queue:
            await asyncio.sleep(0)  # the requests that arrived in the same loop turn join in
            batch: list[tuple[list[str], asyncio.Future[list[list[int]]]]] = []
            chars = 0
            while self._queue and (not batch or chars < self.max_batch_chars):
                item = self._queue.pop(0)
                batch.append(item)
                chars += sum(map(len, item[0]))
            flat = [t for texts, _ in batch for t in texts]
            # A text several callers sent (requests sharing a system prompt that is not cached
            # yet, e.g. a burst of new sessions) is encoded once.
            unique = list(dict.fromkeys(flat))
            try:
                ids = await asyncio.to_thread(encode_texts, self.tokenizer, unique, ordinary=self.ordinary)
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            by_text = dict(zip(unique, ids, strict=True))
            encoded = [list(by_text[t]) for t in flat]
            self.batches += 1
            self.texts += len(unique)
            at = 0
            for texts, fut in batch:
                if not fut.done():  # a caller that gave up (cancelled) is skipped
                    fut.set_result(encoded[at : at + len(texts)])
                at += len(texts)
