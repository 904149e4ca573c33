"""What this router has in flight on each worker (Dynamo's ``ActiveSequences``), NATS-free.

Source: ``ai-dynamo/dynamo`` ``lib/llm/src/kv_router/sequence.rs`` (``ActiveSequences``: a
request's block hashes are reference-counted per worker so a prefix shared by requests in flight
counts once; ``prefill_tokens`` leave on ``mark_prefill_completed``; everything leaves on
``free``; stale requests are force-expired after a fixed time).

Each router replica tracks only the requests *it* dispatched. :meth:`ActiveTracker.pools` merges
that exact, fresh view with the worker's own report from its last heartbeat
(:class:`~tandem.protocol.messages.WorkerLoad`, which covers every replica's requests but is up
to a heartbeat old) by taking the larger of the two figures.

When requests leave (the completion signal)
-------------------------------------------
The decode worker streams chunks straight to the frontend, so the router never sees a request
end. Three layers, cheapest and most exact first:

1. **Exact**: a prefill entry is freed when the ``PrefillResult`` (or error) comes back through
   the router. A decode entry is freed on ``RequestFinished`` (published by the decode worker
   when the stream ends, any reason; every replica subscribes, only the one tracking it acts)
   and on the broadcast ``Cancel`` (the worker frees the request on it).
2. **Heartbeat reconciliation** (:meth:`ActiveSequences.on_heartbeat`): a worker registers a
   stream before it acks, so a heartbeat stamped after the ack (plus a clock-skew margin)
   accounts for the request. Then (a) a locally prefilled request's prompt tokens leave this
   router's count (the worker's ``waiting_prefill_tokens`` carries them if still queued) and
   (b) if more acked requests are tracked than the worker reports running + waiting, the oldest
   excess ones are freed — they cannot all be there.
3. **Lease**: an entry older than ``ttl_s`` is dropped whatever happened (Dynamo: 300 s).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from tandem.protocol.messages import InstanceInfo

from .policy import BusyThresholds, WorkerState, is_busy

#: Heartbeat stamps vs this router's clock: how much skew to allow (seconds).
CLOCK_SKEW_MARGIN_S = 0.1
#: Default lease of a tracked request (seconds; Dynamo's EXPIRY_DURATION).
DEFAULT_TTL_S = 300.0


def _blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size) if num_tokens > 0 else 0


class _Entry:
    __slots__ = (
        "added_at",
        "confirmed_at",
        "extra_blocks",
        "hashes",
        "prefill_tokens",
        "prefill_until_heartbeat",
    )

    def __init__(
        self, hashes: Sequence[int], extra_blocks: int, prefill_tokens: int, added_at: float, until_hb: bool
    ) -> None:
        self.hashes = hashes
        self.extra_blocks = extra_blocks
        self.prefill_tokens = prefill_tokens
        self.added_at = added_at
        self.confirmed_at: float | None = None
        self.prefill_until_heartbeat = until_hb


class ActiveSequences:
    """One worker's requests in flight from this router.

    ``active_blocks`` = distinct block hashes of the requests (refcounted: a shared prefix counts
    once) + each request's partial last block (its own). ``prefill_tokens`` = prompt tokens of
    the requests whose prefill is not known to be done. Times are Unix seconds passed in by the
    caller (``now``), so the class is deterministic under test.
    """

    __slots__ = (
        "_entries",
        "_extra_blocks",
        "_prefill_tokens",
        "_refs",
        "block_size",
        "heartbeat_at",
        "version",
    )

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be > 0")
        self.block_size = block_size
        self._entries: dict[str, _Entry] = {}
        self._refs: dict[int, int] = {}
        self._extra_blocks = 0
        self._prefill_tokens = 0
        #: ``heartbeat_at`` of the last heartbeat :meth:`on_heartbeat` processed.
        self.heartbeat_at = 0.0
        #: Bumped on every change of the figures (lets callers cache what they derive).
        self.version = 0

    # -- figures
    @property
    def active_blocks(self) -> int:
        return len(self._refs) + self._extra_blocks

    @property
    def prefill_tokens(self) -> int:
        return self._prefill_tokens

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def request_ids(self) -> Iterator[str]:
        return iter(list(self._entries))

    def shared_prefix_blocks(self, block_hashes: Sequence[int]) -> int:
        """Leading blocks of ``block_hashes`` already active here.

        Block hashes are *sequence* hashes (each one commits to the whole prefix), so a request
        holding block ``i`` holds blocks ``0..i`` too and the active set is prefix-closed along
        any hash chain: a binary search finds the shared prefix in ``O(log n)`` lookups.
        """
        refs = self._refs
        n = len(block_hashes)
        if not refs or n == 0 or block_hashes[0] not in refs:
            return 0
        if block_hashes[-1] in refs:
            return n
        lo, hi = 1, n - 1  # block_hashes[lo - 1] is active, block_hashes[hi] is not
        while lo < hi:
            mid = (lo + hi) // 2
            if block_hashes[mid] in refs:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def new_blocks(self, block_hashes: Sequence[int], num_tokens: int) -> int:
        """Blocks a request of ``num_tokens`` tokens would add here (Dynamo's ``new_blocks``)."""
        return _blocks(num_tokens, self.block_size) - self.shared_prefix_blocks(block_hashes)

    # -- life cycle
    def add(
        self,
        request_id: str,
        block_hashes: Sequence[int],
        num_tokens: int,
        prefill_tokens: int,
        *,
        now: float,
        prefill_until_heartbeat: bool = False,
    ) -> None:
        """Track a request dispatched here (a duplicate id replaces the old entry).

        ``block_hashes``: its full blocks' sequence hashes; ``num_tokens``: its length (the
        partial last block counts as its own block); ``prefill_tokens``: prompt tokens still to
        compute here (0 when the KV comes from a prefill worker). ``prefill_until_heartbeat``:
        nobody will report the end of its prefill; drop the tokens at the first heartbeat that
        accounts for the request (see the module docstring).
        """
        if request_id in self._entries:
            self.free(request_id)
        refs = self._refs
        for h in block_hashes:
            refs[h] = refs.get(h, 0) + 1
        extra = max(0, _blocks(num_tokens, self.block_size) - len(block_hashes))
        self._extra_blocks += extra
        prefill_tokens = max(0, prefill_tokens)
        self._prefill_tokens += prefill_tokens
        self._entries[request_id] = _Entry(block_hashes, extra, prefill_tokens, now, prefill_until_heartbeat)
        self.version += 1

    def confirm(self, request_id: str, now: float) -> None:
        """The worker accepted the request at ``now``: its heartbeats after that account for it."""
        e = self._entries.get(request_id)
        if e is not None:
            e.confirmed_at = now

    def mark_prefill_done(self, request_id: str) -> bool:
        """The request's prompt tokens leave the prefill count (its blocks stay)."""
        e = self._entries.get(request_id)
        if e is None or e.prefill_tokens == 0:
            return False
        self._prefill_tokens -= e.prefill_tokens
        e.prefill_tokens = 0
        self.version += 1
        return True

    def free(self, request_id: str) -> bool:
        """Forget the request (False if it was not tracked)."""
        e = self._entries.pop(request_id, None)
        if e is None:
            return False
        refs = self._refs
        for h in e.hashes:
            n = refs.get(h, 0) - 1
            if n > 0:
                refs[h] = n
            else:
                refs.pop(h, None)
        self._extra_blocks -= e.extra_blocks
        self._prefill_tokens -= e.prefill_tokens
        self.version += 1
        return True

    def on_heartbeat(self, heartbeat_at: float, reported_requests: int, margin_s: float) -> list[str]:
        """Reconcile with a new heartbeat (module docstring, layer 2); returns the freed ids."""
        self.heartbeat_at = heartbeat_at
        self.version += 1
        cutoff = heartbeat_at - margin_s
        accounted: list[str] = []
        for rid, e in self._entries.items():
            if e.confirmed_at is not None and e.confirmed_at <= cutoff:
                accounted.append(rid)
                if e.prefill_until_heartbeat and e.prefill_tokens:
                    self._prefill_tokens -= e.prefill_tokens
                    e.prefill_tokens = 0
        excess = len(accounted) - max(0, reported_requests)
        freed = accounted[:excess] if excess > 0 else []  # oldest first (insertion order)
        for rid in freed:
            self.free(rid)
        return freed

    def expire(self, now: float, ttl_s: float) -> list[str]:
        """Drop entries added more than ``ttl_s`` ago (module docstring, layer 3)."""
        old = [rid for rid, e in self._entries.items() if now - e.added_at > ttl_s]
        for rid in old:
            self.free(rid)
        return old


class Pools(NamedTuple):
    """The candidates of one decision, as :class:`~.policy.WorkerState` values (input order)."""

    #: Decode-capable (role ``decode`` / ``both``) workers that are not busy.
    decode: list[WorkerState]
    #: Prefill-capable (role ``prefill`` / ``both``) workers that are not busy.
    prefill: list[WorkerState]
    #: How many decode-capable / prefill-capable workers were busy.
    decode_busy: int
    prefill_busy: int
    #: Some worker has role ``prefill`` (disaggregation is possible at all).
    has_prefill_role: bool


_ROLE_CODE = {"decode": 0, "prefill": 1, "both": 2}


class ActiveTracker:
    """:class:`ActiveSequences` per worker plus request → worker, for one router.

    Builds the :class:`~.policy.WorkerState` values the policies rank (:meth:`pools`,
    :meth:`state`), merging this router's view with the worker's heartbeat report (the larger
    figure wins) and applying the busy thresholds. The request-independent part of each state is
    cached per worker until its ``InstanceInfo`` (a heartbeat) or its tracked requests change, so
    a decision over hundreds of workers costs little more than one tuple per worker.
    """

    def __init__(
        self,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        margin_s: float = CLOCK_SKEW_MARGIN_S,
        thresholds: BusyThresholds | None = None,
    ) -> None:
        self.ttl_s = ttl_s
        self.margin_s = margin_s
        self.thresholds = thresholds or BusyThresholds()
        self._workers: dict[str, ActiveSequences] = {}
        self._owner: dict[str, str] = {}
        # worker id -> (info, seqs, seqs version, busy, role code, block size, num blocks,
        #               active decode blocks, active prefill tokens, active requests, refs)
        self._base: dict[str, tuple[Any, ...]] = {}
        #: Requests dropped by reconciliation or lease (not by an exact signal), for stats.
        self.reconciled = 0
        self.expired = 0

    def get(self, worker_id: str) -> ActiveSequences | None:
        return self._workers.get(worker_id)

    def owner(self, request_id: str) -> str | None:
        """The worker this router tracks ``request_id`` on, if any."""
        return self._owner.get(request_id)

    def __len__(self) -> int:
        return len(self._owner)

    def _sync(self, seqs: ActiveSequences, info: InstanceInfo, now: float) -> None:
        load = info.load
        for rid in seqs.on_heartbeat(info.heartbeat_at, load.num_running + load.num_waiting, self.margin_s):
            self._owner.pop(rid, None)
            self.reconciled += 1
        for rid in seqs.expire(now, self.ttl_s):
            self._owner.pop(rid, None)
            self.expired += 1

    def _make_base(self, info: InstanceInfo, seqs: ActiveSequences | None, now: float) -> tuple[Any, ...]:
        load = info.load
        blocks = load.used_blocks + load.pinned_blocks
        prefill = load.waiting_prefill_tokens
        requests = load.num_running + load.num_waiting
        refs = None
        if seqs is not None:
            if info.heartbeat_at != seqs.heartbeat_at:
                self._sync(seqs, info, now)
            if seqs:
                blocks = max(blocks, seqs.active_blocks)
                prefill = max(prefill, seqs.prefill_tokens)
                requests = max(requests, len(seqs))
                refs = seqs._refs
        bs = info.block_size if info.block_size > 0 else 1
        th = self.thresholds
        busy = th.enabled and is_busy(
            WorkerState(info.instance_id, bs, info.num_blocks, 0, blocks, prefill, requests, 0), th
        )
        base = (
            info,
            seqs,
            seqs.version if seqs is not None else -1,
            busy,
            _ROLE_CODE.get(info.role, 2),
            bs,
            info.num_blocks,
            blocks,
            prefill,
            requests,
            refs,  # block refs when this router has requests there (None = none)
        )
        self._base[info.instance_id] = base
        return base

    def pools(
        self,
        instances: Iterable[InstanceInfo],
        overlap: Mapping[str, int],
        block_hashes: Sequence[int],
        num_tokens: int,
        now: float,
        *,
        decode_only: bool = False,
        ignore_busy: bool = False,
    ) -> Pools:
        """Every worker of ``instances`` as a candidate for a request of ``num_tokens`` tokens
        (``overlap``: leading prompt blocks cached per worker id, from the indexer).
        ``decode_only`` skips the prefill pool; ``ignore_busy`` keeps busy workers in.

        The hot loop of a decision: one cached-base lookup, at most one ``O(log n)`` shared
        prefix search and one tuple per worker.
        """
        decode: list[WorkerState] = []
        prefill: list[WorkerState] = []
        add_d, add_p = decode.append, prefill.append
        n_busy_d = n_busy_p = 0
        has_prefill_role = False
        base_of = self._base.get
        ov = overlap.get
        first = block_hashes[0] if block_hashes else None
        make = tuple.__new__
        ws = WorkerState
        full_bs, full = 0, 0
        n_hashes, last_k = len(block_hashes), 0
        for info in instances:
            wid = info.instance_id
            b = base_of(wid)
            if b is None or b[0] is not info or (b[1] is not None and b[1].version != b[2]):
                b = self._make_base(info, self._workers.get(wid), now)
            role = b[4]
            if role == 1:
                has_prefill_role = True
                if decode_only:
                    continue
            if b[3] and not ignore_busy:
                if role != 1:
                    n_busy_d += 1
                if role != 0:
                    n_busy_p += 1
                continue
            bs = b[5]
            if bs != full_bs:
                full_bs, full = bs, -(-num_tokens // bs)
            refs = b[10]
            if refs is not None and first in refs:
                # Workers mostly share the same prefix with a request (a system prompt): try the
                # previous worker's answer (two lookups) before a binary search.
                k = last_k
                if not (k and (k == n_hashes or block_hashes[k] not in refs) and block_hashes[k - 1] in refs):
                    k = last_k = b[1].shared_prefix_blocks(block_hashes)
                st = make(ws, (wid, bs, b[6], ov(wid, 0), b[7], b[8], b[9], full - k))
            else:
                st = make(ws, (wid, bs, b[6], ov(wid, 0), b[7], b[8], b[9], full))
            if role != 1:
                add_d(st)
            if role != 0 and not decode_only:
                add_p(st)
        return Pools(decode, prefill, n_busy_d, n_busy_p, has_prefill_role)

    def state(
        self,
        info: InstanceInfo,
        overlap_blocks: int,
        block_hashes: Sequence[int],
        num_tokens: int,
        now: float,
    ) -> WorkerState:
        """``info`` as a policy candidate for a request of ``num_tokens`` tokens (busy or not)."""
        seqs = self._workers.get(info.instance_id)
        b = self._make_base(info, seqs, now)
        bs = b[5]
        new = -(-num_tokens // bs)
        if seqs is not None:
            new -= seqs.shared_prefix_blocks(block_hashes)
        return WorkerState(info.instance_id, bs, b[6], overlap_blocks, b[7], b[8], b[9], new)

    # -- bookkeeping
    def add(
        self,
        info: InstanceInfo,
        request_id: str,
        block_hashes: Sequence[int],
        num_tokens: int,
        prefill_tokens: int,
        *,
        now: float,
        prefill_until_heartbeat: bool = False,
    ) -> None:
        """Track ``request_id`` on worker ``info`` (see :meth:`ActiveSequences.add`)."""
        prev = self._owner.get(request_id)
        if prev is not None and prev != info.instance_id:
            self.free(request_id)
        seqs = self._workers.get(info.instance_id)
        if seqs is None:
            seqs = self._workers[info.instance_id] = ActiveSequences(max(1, info.block_size))
            seqs.heartbeat_at = info.heartbeat_at
            self._base.pop(info.instance_id, None)
        seqs.add(
            request_id,
            block_hashes,
            num_tokens,
            prefill_tokens,
            now=now,
            prefill_until_heartbeat=prefill_until_heartbeat,
        )
        self._owner[request_id] = info.instance_id

    def confirm(self, request_id: str, now: float) -> None:
        """The worker acked ``request_id`` at ``now``."""
        worker = self._owner.get(request_id)
        if worker is not None:
            self._workers[worker].confirm(request_id, now)

    def mark_prefill_done(self, request_id: str) -> bool:
        worker = self._owner.get(request_id)
        return worker is not None and self._workers[worker].mark_prefill_done(request_id)

    def free(self, request_id: str, worker_id: str | None = None) -> bool:
        """Stop tracking ``request_id`` (only if it is on ``worker_id``, when given)."""
        worker = self._owner.get(request_id)
        if worker is None or (worker_id is not None and worker_id != worker):
            return False
        del self._owner[request_id]
        seqs = self._workers.get(worker)
        return seqs is not None and seqs.free(request_id)

    def remove_worker(self, worker_id: str) -> None:
        """The worker is gone: forget everything tracked on it."""
        self._base.pop(worker_id, None)
        seqs = self._workers.pop(worker_id, None)
        if seqs is not None:
            for rid in seqs.request_ids():
                self._owner.pop(rid, None)


__all__ = ["CLOCK_SKEW_MARGIN_S", "DEFAULT_TTL_S", "ActiveSequences", "ActiveTracker", "Pools"]
