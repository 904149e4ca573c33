"""Every request a worker holds, in one table, each in one explicit :class:`Phase`.

A request's state is its :class:`WorkerRequest` entry — not which of several dicts and sets its
id sits in — so cancel, drain, fail-all and stats are loops over one table. The phases, in the
vocabulary of the field (SGLang ``KVPoll``, vLLM ``RequestStatus``):

=============  ===================================================================================
PREFILLING     prefill role: queued or computing its prompt; ``first_token`` (a future) is
               resolved by the engine loop.
PINNED         prefill role: first token replied; the prompt's blocks are pinned
               (``pinned``) until the decode side's transfer notification or ``expires_at``
               (SGLang's sender in ``WaitingForInput``/``Transferring``).
IMPORTING      decode role: blocks allocated, the KV READ in progress (vLLM
               ``WAITING_FOR_REMOTE_KVS``, engine ``SequenceStatus.IMPORTING``).
RUNNING        decode role: in the engine's batch (local prefill or after the import);
               ``stream`` sends its TokenChunks.
FINISHED       nothing left but, possibly, pinned blocks being released; leaves the table once
               ``pinned`` is gone.
=============  ===================================================================================

Allowed moves: PREFILLING → PINNED | FINISHED; PINNED → IMPORTING (role ``both``: the decode
request for KV this worker prefilled itself) | FINISHED; IMPORTING → RUNNING | FINISHED;
RUNNING → FINISHED. ``pinned`` is orthogonal to the phase: a ``both`` worker importing its own
prefill holds the pinned blocks (prefill side) while IMPORTING (decode side) until the local copy
notifies.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tandem.protocol.messages import FinishReason, RequestMetrics

if TYPE_CHECKING:
    from tandem.engine.engine import RequestOutput

__all__ = ["DecodeStream", "Phase", "PinnedKv", "RequestTable", "WorkerRequest", "finish_reason"]

_FINISH_REASONS: dict[str, FinishReason] = {r: r for r in ("stop", "length", "abort", "error")}


def finish_reason(engine_reason: str) -> FinishReason:
    """The protocol's finish reason for an engine one (anything unknown is an ``"error"``)."""
    return _FINISH_REASONS.get(engine_reason, "error")


class Phase(enum.Enum):
    """Where a request is in this worker (see the module docstring)."""

    PREFILLING = "prefilling"
    PINNED = "pinned"
    IMPORTING = "importing"
    RUNNING = "running"
    FINISHED = "finished"


_MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.PREFILLING: frozenset({Phase.PINNED, Phase.FINISHED}),
    Phase.PINNED: frozenset({Phase.IMPORTING, Phase.FINISHED}),
    Phase.IMPORTING: frozenset({Phase.RUNNING, Phase.FINISHED}),
    Phase.RUNNING: frozenset({Phase.FINISHED}),
    Phase.FINISHED: frozenset(),
}


@dataclass
class PinnedKv:
    """Prefilled blocks held for a decode worker's READ."""

    num_blocks: int
    expires_at: float  # Unix seconds, as sent in KvTransferParams
    since: float = field(default_factory=time.monotonic)
    releasing: bool = False  # engine.release_pinned is under way


@dataclass
class DecodeStream:
    """Where a decode request's TokenChunks go.

    ``unsent``: tokens sampled but not published yet; they go out as one chunk when the engine
    loop flushes (after every step it waits out, or at the end of a burst of steps run back to
    back) or with the final chunk.
    """

    reply_to: str
    next_index: int
    metrics: RequestMetrics
    saw_first_output: bool = False
    unsent: list[int] = field(default_factory=list)


@dataclass
class WorkerRequest:
    """One request in this worker.

    Attributes:
        request_id: the request.
        phase: see :class:`Phase`; change it with :meth:`move`.
        num_prompt_tokens: prompt length (tokens).
        first_token: PREFILLING: resolved with the engine output that carries the first token.
        pinned: blocks pinned for a transfer (prefill side), until notified/expired/cancelled.
        stream: decode side: chunk destination and metrics.
        cancelled: a Cancel (or shutdown) arrived; whoever owns the next step aborts.
    """

    request_id: str
    phase: Phase
    num_prompt_tokens: int = 0
    first_token: asyncio.Future[RequestOutput] | None = None
    pinned: PinnedKv | None = None
    stream: DecodeStream | None = None
    cancelled: bool = False
    created: float = field(default_factory=time.monotonic)

    def move(self, phase: Phase) -> None:
        """Go to ``phase``; ``RuntimeError`` for a move the life cycle does not have."""
        if phase is self.phase:
            return
        if phase not in _MOVES[self.phase]:
            raise RuntimeError(f"request {self.request_id}: {self.phase.name} -> {phase.name} is not allowed")
        self.phase = phase

    @property
    def done(self) -> bool:
        """Finished and holding no pinned blocks: ready to leave the table."""
        return self.phase is Phase.FINISHED and self.pinned is None


class RequestTable:
    """``request_id -> WorkerRequest`` for one worker (event-loop thread only)."""

    def __init__(self) -> None:
        self._reqs: dict[str, WorkerRequest] = {}

    def get(self, request_id: str) -> WorkerRequest | None:
        return self._reqs.get(request_id)

    def add(self, req: WorkerRequest) -> WorkerRequest:
        """Insert ``req``; ``KeyError`` if its id is already here."""
        if req.request_id in self._reqs:
            raise KeyError(req.request_id)
        self._reqs[req.request_id] = req
        return req

    def retire(self, req: WorkerRequest) -> None:
        """Drop ``req`` if it is :attr:`~WorkerRequest.done` (and still the entry for its id)."""
        if req.done and self._reqs.get(req.request_id) is req:
            del self._reqs[req.request_id]

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._reqs

    def __len__(self) -> int:
        return len(self._reqs)

    def __iter__(self) -> Iterator[WorkerRequest]:
        """A snapshot: safe to change the table while iterating."""
        return iter(list(self._reqs.values()))

    def in_phase(self, *phases: Phase) -> list[WorkerRequest]:
        """Entries in any of ``phases``."""
        return [r for r in self._reqs.values() if r.phase in phases]

    def count(self, *phases: Phase) -> int:
        return sum(1 for r in self._reqs.values() if r.phase in phases)

    def pinned(self) -> list[WorkerRequest]:
        """Entries holding pinned blocks."""
        return [r for r in self._reqs.values() if r.pinned is not None]

    @property
    def has_pinned(self) -> bool:
        return any(r.pinned is not None for r in self._reqs.values())
