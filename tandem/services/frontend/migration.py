"""Request migration: one client stream over several pipeline attempts when a worker is lost.

:class:`MigratingStream` is NVIDIA Dynamo's ``Migration`` operator (``lib/llm/src/migration.rs``)
for tandem: it hands out the chunks of a :class:`~.token_stream.TokenStream` and, when that
attempt fails in a way another worker can fix, opens a new attempt for the same client request
and keeps handing out chunks as if nothing happened.

Life cycle of a client request
------------------------------
1. ``attempt 0``: a :class:`TokenStream` with the prepared prompt (``request_id``).
2. Chunks are handed out in order; their token ids are remembered (``generated``).
3. The attempt fails *retryably* — :func:`is_retryable`: the holder of the request was lost
   (``code="worker_lost"``, from the stream's liveness probe), the pipeline answered 502 (e.g. a
   KV transfer from a dead prefill worker), 503 without a ``Retry-After`` hint (no worker
   answered; a *busy* 503 carries a hint and is the client's to retry) or 504.
4. If ``attempts < migration_limit`` (Dynamo's ``--migration-limit``) and the request is not
   finished: the failed attempt is closed (its ``Cancel`` frees whatever is left of it), and
   attempt ``n`` starts with ``request_id = f"{id}.m{n}"`` (so the old attempt's ``Cancel``
   cannot reach it), ``token_ids = prompt + generated``, fresh block hashes for those tokens,
   ``sampling.max_tokens`` reduced by ``len(generated)`` and ``index_base`` = the next client
   chunk index. The router routes it like any request (prefix-cache overlap included, so a
   worker that holds the prompt's KV prefills only the tail).
5. Otherwise the error reaches the client (the last attempt's error).

No router answering (``code="no_router"``: no responders on ``router.generate``, or the publish
failed — a NATS reconnect, a router restart) is not a migration: nothing accepted the request.
The same attempt is re-sent with back-off (0.1 s doubling to 1 s) for up to ``NO_ROUTER_WAIT_S``
seconds, not counted against the limit.

The client sees one uninterrupted stream. With greedy sampling (or a fixed seed, whose draws
are keyed by position) the tokens equal a fault-free run's wherever the engine computes the same
logits for a prompt prefilled in one go as for the same tokens decoded one by one — exactly so
with ``--deterministic`` workers.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import msgspec

from tandem.protocol.messages import SamplingParams, TokenChunk
from tandem.protocol.openai import OpenAIError
from tandem.services.frontend.token_stream import TokenStream
from tandem.services.observability import get_logger

__all__ = ["DEFAULT_MIGRATION_LIMIT", "AttemptFactory", "MigratingStream", "is_retryable"]

#: Dynamo's default ``--migration-limit``.
DEFAULT_MIGRATION_LIMIT = 3
#: How long a request waits for a router to answer (a reconnect, a restart), seconds.
NO_ROUTER_WAIT_S = 10.0

#: ``factory(request_id, token_ids, sampling, index_base)`` → a new (not started) attempt.
AttemptFactory = Callable[[str, list[int], SamplingParams, int], TokenStream]

_log = get_logger("tandem.frontend")


def is_retryable(err: OpenAIError) -> bool:
    """Whether another attempt on other workers may succeed where this one failed (see the module
    docstring, step 3)."""
    if err.code == "worker_lost":
        return True
    if err.status == 503:
        return err.retry_after_s is None
    return err.status in (502, 504)


class MigratingStream:
    """The :class:`TokenStream` interface over successive attempts of one client request.

    ``first`` is attempt 0 (not started); ``factory`` builds the follow-up attempts;
    ``migration_limit`` is the most follow-ups (0 = never migrate). Exposes what
    :class:`~.generation.Generation` uses: :meth:`start`, :meth:`close`, :meth:`next_chunk`,
    :meth:`poll_chunk`, :meth:`stop`, :attr:`finished`, :attr:`ended`, :attr:`request_id`.
    """

    def __init__(self, first: TokenStream, factory: AttemptFactory, migration_limit: int) -> None:
        if migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0, got {migration_limit}")
        self.stream = first
        self.factory = factory
        self.migration_limit = migration_limit
        self.request_id = first.request_id
        self.prompt: list[int] = list(first.token_ids)
        if first.sampling.seed is None:
            # One seed for every attempt, so a sampled stream continues with the same draws.
            first.sampling = msgspec.structs.replace(first.sampling, seed=random.getrandbits(32))
        self.sampling = first.sampling
        #: Token ids handed out so far, over all attempts.
        self.generated: list[int] = []
        #: Follow-up attempts started so far.
        self.migrations = 0
        #: Re-sends because no router answered (not migrations).
        self.resends = 0
        self._no_router_since: float | None = None

    # -- the TokenStream interface
    @property
    def finished(self) -> bool:
        return self.stream.finished

    @property
    def ended(self) -> bool:
        return self._deferred is None and self.stream.ended

    @property
    def next_index(self) -> int:
        return self.stream.next_index

    async def start(self) -> None:
        """Start attempt 0 (re-sent while no router answers, see the module docstring).

        Raises :class:`OpenAIError` as :meth:`TokenStream.start` does."""
        while True:
            try:
                await self.stream.start()
                return
            except OpenAIError as err:
                await self._migrate_or_raise(err)
                return

    def stop(self, reason: str) -> None:
        self.stream.stop(reason)

    async def close(self) -> None:
        await self.stream.close()

    async def __aenter__(self) -> MigratingStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def next_chunk(self) -> TokenChunk | None:
        """The next chunk of the client request, migrating on a retryable failure.

        Raises :class:`OpenAIError` once the failure is not retryable or the limit is reached.
        """
        if self._deferred is not None:
            err, self._deferred = self._deferred, None
            await self._migrate_or_raise(err)
        while True:
            try:
                chunk = await self.stream.next_chunk()
            except OpenAIError as err:
                await self._migrate_or_raise(err)
                continue
            return self._record(chunk)

    def poll_chunk(self) -> TokenChunk | None:
        """A chunk already here, else None. A retryable failure is not raised here: the stream
        reports :attr:`ended` False so the caller waits in :meth:`next_chunk`, which migrates."""
        try:
            chunk = self.stream.poll_chunk()
        except OpenAIError as err:
            if self._can_migrate(err):
                self._deferred = err  # next_chunk migrates
                return None
            raise
        return self._record(chunk)

    # -- internals
    _deferred: OpenAIError | None = None

    def _record(self, chunk: TokenChunk | None) -> TokenChunk | None:
        if chunk is not None and chunk.token_ids:
            self.generated.extend(chunk.token_ids)
        return chunk

    def _can_migrate(self, err: OpenAIError) -> bool:
        if err.code == "no_router":
            return True  # decided in _migrate_or_raise (time budget)
        remaining = self.sampling.max_tokens - len(self.generated)
        return self.migrations < self.migration_limit and remaining > 0 and is_retryable(err)

    async def _migrate_or_raise(self, err: OpenAIError) -> None:
        if err.code == "no_router":
            await self._resend(err)
            return
        self._no_router_since = None
        if not self._can_migrate(err):
            raise err
        old = self.stream
        await old.close()  # Cancel: frees what the failed attempt still holds anywhere
        self.migrations += 1
        n = self.migrations
        sampling = msgspec.structs.replace(
            self.sampling, max_tokens=self.sampling.max_tokens - len(self.generated)
        )
        new = self.factory(f"{self.request_id}.m{n}", self.prompt + self.generated, sampling, old.next_index)
        _log.warning(
            "request_migrating",
            request_id=self.request_id,
            attempt=n,
            error=err.message,
            status=err.status,
            generated=len(self.generated),
            holder=old.holder[1] if old.holder else None,
        )
        self.stream = new
        await new.start()

    async def _resend(self, err: OpenAIError) -> None:
        """Re-send the current attempt after a back-off, within ``NO_ROUTER_WAIT_S``."""
        now = time.monotonic()
        if self._no_router_since is None:
            self._no_router_since = now
        if now - self._no_router_since >= NO_ROUTER_WAIT_S:
            raise err
        old = self.stream
        if old.next_index > old.index_base:
            raise err  # chunks came, so a router had it: not a resend case
        await old.close()
        await asyncio.sleep(min(1.0, 0.1 * 2**self.resends))
        self.resends += 1
        new = self.factory(f"{self.request_id}.r{self.resends}", old.token_ids, old.sampling, old.next_index)
        self.stream = new
        try:
            await new.start()
        except OpenAIError as e:
            await self._migrate_or_raise(e)
