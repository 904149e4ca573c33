"""Continuous batching with chunked prefill, prefix-cache reuse and preemption by recompute.

Life cycle of a request
-----------------------
::

    add() ──▶ WAITING ──admit──▶ RUNNING ──last token──▶ FINISHED (blocks freed, or pinned)
                 ▲                  │
                 └──── PREEMPTED ◀──┘  (out of blocks: blocks freed, recomputed later)

    add_imported() ──▶ IMPORTING ──activate()──▶ WAITING (owns its blocks) ──admit──▶ RUNNING

* ``waiting`` (a deque, FCFS): new requests at the back; preempted and freshly activated
  imported requests at the front, since they were already admitted once. A waiting request
  owns no KV blocks, except an activated imported one (``has_blocks``).
* ``running`` (a list, in admission order): requests that own blocks and get tokens scheduled
  each step: a decode token (1), or the next chunk of their prompt (chunked prefill).
* ``importing`` (a dict): remotely prefilled requests whose blocks are allocated and are being
  filled by a NIXL READ; never scheduled until :meth:`Scheduler.activate`.
* FINISHED requests leave every queue; their blocks are freed, or pinned for a transfer
  (``prefill_only``).

One step (:meth:`Scheduler.schedule`) spends a budget of ``max_num_batched_tokens`` tokens over
at most ``max_num_seqs`` running sequences: decode tokens of running sequences first, then the
prefill chunks of running sequences, then new admissions from ``waiting`` (each admission first
takes the cached prefix of its prompt through ``kv.begin``; those tokens are never computed).
The blocks a step fills are registered in the prefix cache as it is scheduled, before the
admissions (vLLM v1 caches in ``allocate_slots`` too): requests sharing a prefix that arrive
together compute it once, the first computing it and the others reading it in the same pass.
When a running sequence cannot get the blocks it needs, the most recently admitted running
sequence is preempted: its blocks are freed (they stay in the prefix cache until evicted) and it
goes back to the front of ``waiting`` to be recomputed. Admissions stop for the step once anyone
was preempted. A request that could not run even with the whole pool to itself is refused by
:meth:`Scheduler.add`, so the oldest running sequence can always finish: no deadlock.
"""

from __future__ import annotations

import contextlib
import enum
import math
import time
from collections import deque
from dataclasses import dataclass, field

from tandem.kvbm.manager import KvCacheManager
from tandem.protocol import SamplingParams


class SequenceStatus(enum.Enum):
    """Where a request is in its life cycle (see the module docstring)."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in ``waiting`` after losing its blocks
    IMPORTING = "importing"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """State of one request.

    ``token_ids`` is prompt + generated tokens. ``num_computed_tokens`` tokens have KV in the
    cache (the first ``num_cached_tokens`` of them came from the prefix cache, or were imported
    from a prefill worker); the rest are *pending* and get computed in later steps. ``sampling``
    always has a seed (the engine assigns one when the request had none). ``stop_token_ids``:
    tokens that finish the request (eos unless ``ignore_eos``, plus the request's own).
    ``block_hashes`` / ``local_hashes``: sequence and local hashes of the prompt's full blocks,
    computed once from ``token_ids`` when the request was added (``local_hashes`` empty: the
    block manager hashes the tokens itself).
    """

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    block_hashes: list[int]
    prefill_only: bool = False
    stop_token_ids: frozenset[int] = frozenset()
    num_prompt_tokens: int = -1
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    has_blocks: bool = False
    num_preemptions: int = 0
    finish_reason: str | None = None
    prefill_ms: float = 0.0
    arrival_time: float = field(default_factory=time.monotonic)
    local_hashes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose KV is not computed yet (1 for a decoding sequence)."""
        return len(self.token_ids) - self.num_computed_tokens


@dataclass(frozen=True)
class ScheduledSeq:
    """``num_tokens`` tokens of ``seq`` computed this step: positions ``start .. start+num_tokens-1``.

    ``samples`` is True when the chunk reaches the end of the sequence's tokens (as they were
    when scheduled), i.e. the step samples the sequence's next token.
    """

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool


@dataclass
class SchedulerOutput:
    """What one step computes: ``scheduled`` in batch order, and who got preempted for it."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class _StepPlan:
    """Scratch state of one :meth:`Scheduler.schedule` call."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.scheduled: dict[str, ScheduledSeq] = {}
        self.preempted: list[Sequence] = []

    def add(self, seq: Sequence, num_tokens: int) -> None:
        start = seq.num_computed_tokens
        samples = start + num_tokens == seq.num_tokens
        self.scheduled[seq.request_id] = ScheduledSeq(seq, start, num_tokens, samples)
        self.budget -= num_tokens

    def drop(self, seq: Sequence) -> None:
        item = self.scheduled.pop(seq.request_id, None)
        if item is not None:
            self.budget += item.num_tokens


class Scheduler:
    """Decides, step by step, which tokens of which requests the model computes.

    Owns the request queues and every ``begin``/``grow``/``free``/``pin`` call on the
    :class:`KvCacheManager`; the engine calls :meth:`commit` after each step and :meth:`finish`
    when a request is done. Single-threaded.

    Args:
        kv: the block manager of the engine's KV cache.
        max_num_seqs: most running sequences (sequences).
        max_num_batched_tokens: most tokens computed per step (tokens).
        max_model_len: longest sequence, prompt + output (tokens).
    """

    def __init__(
        self, kv: KvCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or max_model_len < 2:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1, max_model_len >= 2")
        self.kv = kv
        self.block_size = kv.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.importing: dict[str, Sequence] = {}
        self._requests: dict[str, Sequence] = {}  # every unfinished request, any queue

    # ---- admission -------------------------------------------------------------------------------

    def check_fits(self, num_prompt_tokens: int, max_tokens: int, prefill_only: bool = False) -> None:
        """Raise ``ValueError`` if a request could never run on this engine.

        A prompt must be shorter than ``max_model_len`` (tokens) and the request's largest KV
        footprint (prompt + ``max_tokens`` - 1 tokens, capped by ``max_model_len`` - 1; just the
        prompt for ``prefill_only``) must fit in the whole pool (blocks).
        """
        if num_prompt_tokens < 1:
            raise ValueError("prompt is empty")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt of {num_prompt_tokens} tokens does not fit max_model_len={self.max_model_len} "
                "(at least one token must be generated)"
            )
        kv_tokens = min(num_prompt_tokens + max_tokens, self.max_model_len) - 1
        if prefill_only:
            kv_tokens = num_prompt_tokens
        need = math.ceil(kv_tokens / self.block_size)
        if need > self.kv.num_blocks:
            raise ValueError(
                f"request needs up to {need} KV blocks ({kv_tokens} tokens) but the pool has "
                f"{self.kv.num_blocks} blocks of {self.block_size} tokens"
            )

    def add(self, seq: Sequence) -> None:
        """Queue a new request at the back of ``waiting``.

        Raises ``ValueError`` if the request id is in use or the request can never fit
        (:meth:`check_fits`).
        """
        if seq.request_id in self._requests:
            raise ValueError(f"request {seq.request_id!r} already exists")
        self.check_fits(seq.num_prompt_tokens, seq.sampling.max_tokens, seq.prefill_only)
        seq.status = SequenceStatus.WAITING
        self._requests[seq.request_id] = seq
        self.waiting.append(seq)

    def add_imported(self, seq: Sequence) -> tuple[list[int], int] | None:
        """Allocate blocks for the prompt of a remotely prefilled request and park it in ``importing``.

        ``seq.token_ids`` is the prompt. Returns ``(block_table, num_reused_blocks)`` (the first
        ``num_reused_blocks`` blocks already hold the right KV from the prefix cache), or None if
        there are not enough free blocks now (nothing changed). Raises ``ValueError`` like
        :meth:`add`.
        """
        if seq.request_id in self._requests:
            raise ValueError(f"request {seq.request_id!r} already exists")
        self.check_fits(seq.num_prompt_tokens, seq.sampling.max_tokens)
        got = self.kv.import_blocks(seq.request_id, seq.token_ids, seq.block_hashes, seq.num_prompt_tokens)
        if got is None:
            return None
        seq.has_blocks = True
        seq.status = SequenceStatus.IMPORTING
        self.importing[seq.request_id] = seq
        self._requests[seq.request_id] = seq
        return got

    def activate(self, request_id: str, first_token: int) -> Sequence:
        """The KV of an importing request has arrived: append ``first_token`` and queue it.

        The prompt counts as computed and cached (``num_cached_tokens`` = prompt length); the
        request goes to the front of ``waiting`` holding its blocks, and its first scheduled step
        is a decode. Raises ``KeyError`` if the request is not importing.
        """
        seq = self.importing.pop(request_id)
        seq.token_ids.append(first_token)
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.num_cached_tokens = seq.num_prompt_tokens
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        return seq

    # ---- one step --------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick the tokens to compute this step (see the module docstring for the policy).

        Takes the blocks they need (``kv.begin``/``kv.grow``); may preempt running sequences.
        An empty output means nothing can run now (idle, or waiting for blocks held by pinned
        or importing requests).
        """
        plan = _StepPlan(self.max_num_batched_tokens)
        decodes = [s for s in self.running if s.num_pending_tokens == 1]
        prefills = [s for s in self.running if s.num_pending_tokens > 1]
        for seq in decodes + prefills:
            if plan.budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this step
                continue
            num_tokens = self._reserve(seq, min(seq.num_pending_tokens, plan.budget), plan)
            if num_tokens:
                plan.add(seq, num_tokens)
        # Nobody is preempted after this point: register the blocks this step fills, so that
        # the admissions below (and the indexers) see them at once (see :meth:`_register`).
        for item in plan.scheduled.values():
            self._register(item.seq, item.start + item.num_tokens)
        if not plan.preempted:
            self._admit(plan)
        return SchedulerOutput(list(plan.scheduled.values()), plan.preempted)

    def _register(self, seq: Sequence, num_tokens: int) -> None:
        """Register in the prefix cache the blocks ``seq`` fills up to ``num_tokens`` tokens in
        the step being scheduled (``kv.commit`` at scheduling time, like vLLM v1's
        ``allocate_slots``): a request admitted after it in the same step reuses that prefix
        instead of computing it again — the model writes every layer's K/V of the whole batch
        before attention reads the cache, and the mock charges only the tokens computed. The
        engine takes the registration back if the step fails for ``seq``
        (:meth:`rollback_item`). A registration that raises here is left to :meth:`commit_item`
        after the step, where the failure is that request's alone."""
        if not seq.has_blocks:
            return
        with contextlib.suppress(Exception):  # retried by commit_item, which fails the request
            self.kv.commit(seq.request_id, seq.token_ids, num_tokens)

    def rollback_item(self, item: ScheduledSeq) -> list[str]:
        """The step failed for ``item``: unregister the blocks it registered when scheduled (their
        KV was not computed). Returns the other requests that took any of them as a prefix hit
        in this step; their KV is invalid too (the engine fails them as well)."""
        seq = item.seq
        if not seq.has_blocks or not self.kv.has_request(seq.request_id):
            return []
        return self.kv.uncommit(seq.request_id, item.start)

    def _reserve(self, seq: Sequence, num_tokens: int, plan: _StepPlan) -> int:
        """Grow ``seq``'s blocks for ``num_tokens`` more tokens; returns the tokens granted (0 = none).

        A prefill chunk shrinks to what the free blocks hold before anyone is preempted.
        """
        while True:
            if self.kv.grow(seq.request_id, seq.num_computed_tokens + num_tokens):
                return num_tokens
            if num_tokens > 1:
                owned = len(self.kv.block_table(seq.request_id))
                fit = (owned + self.kv.num_free_blocks()) * self.block_size - seq.num_computed_tokens
                if 0 < fit < num_tokens:
                    num_tokens = fit
                    continue
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:
                return 0  # alone and still short: blocks are pinned/importing; wait for them
            plan.drop(victim)
            self._preempt(victim)
            plan.preempted.append(victim)
            if victim is seq:
                return 0

    def _admit(self, plan: _StepPlan) -> None:
        """Move requests from the front of ``waiting`` to ``running`` while budget and blocks last."""
        while self.waiting and plan.budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            began = False
            if not seq.has_blocks:
                cached = self.kv.begin(
                    seq.request_id, seq.token_ids, seq.block_hashes, local_hashes=seq.local_hashes or None
                )
                seq.num_computed_tokens = cached
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = cached
                seq.has_blocks = began = True
            num_tokens = min(seq.num_pending_tokens, plan.budget)
            if not self.kv.grow(seq.request_id, seq.num_computed_tokens + num_tokens):
                if began:  # give the prefix back; retry from scratch next step (FCFS: no skipping)
                    self.kv.free(seq.request_id)
                    seq.has_blocks = False
                    seq.num_computed_tokens = 0
                return
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            plan.add(seq, num_tokens)
            self._register(seq, seq.num_computed_tokens + num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.request_id)
        seq.has_blocks = False
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.PREEMPTED
        self.waiting.appendleft(seq)

    # ---- after a step ----------------------------------------------------------------------------

    def commit(self, output: SchedulerOutput) -> None:
        """Advance ``num_computed_tokens`` of every scheduled sequence and make sure the blocks it
        filled are registered in the prefix cache (``kv.commit``, which emits KV events; normally
        already done when the step was scheduled). Call once per step after the model ran and
        sampled tokens were appended, for the items that did not fail."""
        for item in output.scheduled:
            self.commit_item(item)

    def commit_item(self, item: ScheduledSeq) -> None:
        """:meth:`commit` for one scheduled item (the engine commits item by item, so that a
        failure is that request's alone)."""
        seq = item.seq
        seq.num_computed_tokens = item.start + item.num_tokens
        if seq.has_blocks:
            self.kv.commit(seq.request_id, seq.token_ids, seq.num_computed_tokens)

    def finish(self, seq: Sequence, reason: str | None, pin: bool = False) -> list[int] | None:
        """Take a running request out of the queues; free its blocks, or pin them and return them.

        ``reason`` is the finish reason (None for a prefill-only request handing its KV over).
        """
        self.running.remove(seq)
        self._requests.pop(seq.request_id, None)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.has_blocks = False
        if pin:
            return self.kv.pin(seq.request_id)
        self.kv.free(seq.request_id)
        return None

    def abort(self, request_id: str, reason: str = "abort") -> Sequence | None:
        """Remove a request from whichever queue holds it and free its blocks; None if unknown.

        ``reason`` becomes its ``finish_reason`` (``"abort"``, or ``"error"`` for a request that
        failed on its own).
        """
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.IMPORTING:
            del self.importing[request_id]
        else:
            self.waiting.remove(seq)
        if seq.has_blocks:
            self.kv.free(request_id)
            seq.has_blocks = False
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        return seq

    # ---- queries ---------------------------------------------------------------------------------

    def get(self, request_id: str) -> Sequence | None:
        """The unfinished request ``request_id``, in any queue."""
        return self._requests.get(request_id)

    def has_work(self) -> bool:
        """True if some request is waiting or running (importing ones are not schedulable)."""
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)
