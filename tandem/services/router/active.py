"""What this router has in flight on each worker (Dynamo's ``ActiveSequences``), NATS-free.

Source: ``ai-dynamo/dynamo`` ``lib/llm/src/kv_router/sequence.rs`` (``ActiveSequences``: a
request's block hashes are reference-counted per worker so a prefix shared by requests in flight
counts once; ``prefill_tokens`` leave on ``mark_prefill_completed``; everything leaves on
``free``; stale requests are force-expired after a fixed time).

Each router replica tracks only the requests *it* dispatched.
:meth:`~.tracker.ActiveTracker.pools` merges that exact, fresh view with the worker's own report
from its last heartbeat (:class:`~tandem.protocol.messages.WorkerLoad`, which covers every
replica's requests but is up to a heartbeat old) by taking the larger of the two figures.

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

from collections.abc import Container, Iterable, Iterator, Sequence

#: Heartbeat stamps vs this router's clock: how much skew to allow (seconds).
CLOCK_SKEW_MARGIN_S = 0.1
#: Default lease of a tracked request (seconds; Dynamo's EXPIRY_DURATION).
DEFAULT_TTL_S = 300.0


def _blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size) if num_tokens > 0 else 0


def shared_prefix_blocks(refs: Container[int], block_hashes: Sequence[int]) -> int:
    """Leading blocks of ``block_hashes`` in ``refs`` (a worker's active block hashes).

    Block hashes are *sequence* hashes (each one commits to the whole prefix), so a request
    holding block ``i`` holds blocks ``0..i`` too and the active set is prefix-closed along any
    hash chain: a binary search finds the shared prefix in ``O(log n)`` lookups.
    """
    n = len(block_hashes)
    if n == 0 or block_hashes[0] not in refs:
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


class BlockHolders:
    """Which workers have each block hash active: hash → bitmask of worker slots (an inverted
    index of every worker's :class:`ActiveSequences` refs, kept by them as blocks come and go).

    Because the active sets are prefix-closed along a hash chain (see
    :func:`shared_prefix_blocks`), the holders of a request's blocks shrink along the chain, and
    every worker's shared prefix with the request follows from a few binary searches over this
    one dict (:meth:`prefix_lengths`) instead of lookups in every worker's own refs.

    ``shards[h & SHARD_MASK]`` holds hash ``h``: hundreds of thousands of blocks can be active
    at once, and one dict that size is rebuilt now and then as blocks come and go (tens of ms,
    in one go); shards of a few thousand entries rebuild in microseconds.
    """

    SHARD_MASK = 255

    __slots__ = ("_free", "_next", "_slots", "shards")

    def __init__(self) -> None:
        self.shards: list[dict[int, int]] = [{} for _ in range(self.SHARD_MASK + 1)]
        self._slots: dict[str, int] = {}
        self._free: list[int] = []
        self._next = 1  # slot 0 is never handed out: "no slot"

    @property
    def width(self) -> int:
        """Slots handed out so far (every slot is below this)."""
        return self._next

    def slot(self, worker_id: str) -> int:
        """``worker_id``'s slot (assigned on first use), 0 if none."""
        s = self._slots.get(worker_id)
        if s is None:
            s = self._free.pop() if self._free else self._next
            self._next = max(self._next, s + 1)
            self._slots[worker_id] = s
        return s

    def slot_of(self, worker_id: str) -> int:
        return self._slots.get(worker_id, 0)

    def release(self, worker_id: str, hashes: Iterable[int]) -> None:
        """``worker_id`` is gone: clear its bit from ``hashes`` (its active blocks), free its slot."""
        s = self._slots.pop(worker_id, None)
        if s is None:
            return
        keep, shards, sm = ~(1 << s), self.shards, self.SHARD_MASK
        for h in hashes:
            d = shards[h & sm]
            m = d.get(h, 0) & keep
            if m:
                d[h] = m
            else:
                d.pop(h, None)
        self._free.append(s)

    def prefix_lengths(self, block_hashes: Sequence[int]) -> list[tuple[int, int]]:
        """``(workers, k)`` pairs: the workers (a slot bitmask) whose shared prefix with
        ``block_hashes`` is ``k`` blocks, for every ``k > 0`` that occurs.

        The holders of block ``j`` include those of block ``j + 1`` (prefix closure); the last
        block with the same holders as the current one is found by binary search, its holders
        minus the next block's have that prefix, and the search continues with the next block's
        holders. For each worker, ``k`` is what :func:`shared_prefix_blocks` finds in its refs.
        """
        shards, sm = self.shards, self.SHARD_MASK

        def get(h: int, default: int) -> int:
            return shards[h & sm].get(h, default)

        n = len(block_hashes)
        cur = get(block_hashes[0], 0) if n else 0
        out: list[tuple[int, int]] = []
        lo = 0  # holders of block lo are ``cur``
        while cur:
            if get(block_hashes[n - 1], 0) == cur:
                j = n - 1
            else:
                a, b = lo, n - 1  # block a's holders are ``cur``, block b's are fewer
                while b - a > 1:
                    mid = (a + b) // 2
                    if get(block_hashes[mid], 0) == cur:
                        a = mid
                    else:
                        b = mid
                j = a
            nxt = get(block_hashes[j + 1], 0) if j + 1 < n else 0
            out.append((cur & ~nxt, j + 1))
            cur, lo = nxt, j + 1
        return out


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
    caller (``now``), so the class is deterministic under test. ``changed``: a set that
    ``worker_id`` joins on every change of the figures (how :class:`~.tracker.ActiveTracker` learns which
    workers to look at again, without scanning them all); ``holders``: the index this worker's
    active blocks are kept in, under the slot ``worker_id`` has there.
    """

    __slots__ = (
        "_bit",
        "_changed",
        "_entries",
        "_extra_blocks",
        "_holders",
        "_prefill_tokens",
        "_refs",
        "block_size",
        "heartbeat_at",
        "version",
        "worker_id",
    )

    def __init__(
        self,
        block_size: int,
        *,
        worker_id: str = "",
        changed: set[str] | None = None,
        holders: BlockHolders | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be > 0")
        self.block_size = block_size
        self.worker_id = worker_id
        self._changed = changed
        self._holders = holders
        self._bit = 1 << holders.slot(worker_id) if holders is not None else 0
        self._entries: dict[str, _Entry] = {}
        self._refs: dict[int, int] = {}
        self._extra_blocks = 0
        self._prefill_tokens = 0
        #: ``heartbeat_at`` of the last heartbeat :meth:`on_heartbeat` processed.
        self.heartbeat_at = 0.0
        #: Bumped on every change of the figures (lets callers cache what they derive).
        self.version = 0

    def _bump(self) -> None:
        self.version += 1
        if self._changed is not None:
            self._changed.add(self.worker_id)

    # -- figures
    @property
    def active_blocks(self) -> int:
        return len(self._refs) + self._extra_blocks

    @property
    def prefill_tokens(self) -> int:
        return self._prefill_tokens

    def figures(self) -> tuple[int, int, int]:
        """``(requests, active blocks, prefill tokens)`` in one call: ``len(self)``,
        :attr:`active_blocks` (blocks) and :attr:`prefill_tokens` (tokens), for the tracker's
        per-worker loop (one call instead of three lookups per worker and decision)."""
        return len(self._entries), len(self._refs) + self._extra_blocks, self._prefill_tokens

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def request_ids(self) -> Iterator[str]:
        return iter(list(self._entries))

    def shared_prefix_blocks(self, block_hashes: Sequence[int]) -> int:
        """Leading blocks of ``block_hashes`` already active here (:func:`shared_prefix_blocks`)."""
        return shared_prefix_blocks(self._refs, block_hashes)

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
        if self._holders is None:
            for h in block_hashes:
                refs[h] = refs.get(h, 0) + 1
        else:  # a block new here: this worker joins its holders
            get, shards, sm, bit = refs.get, self._holders.shards, BlockHolders.SHARD_MASK, self._bit
            for h in block_hashes:
                c = get(h)
                if c is None:
                    refs[h] = 1
                    d = shards[h & sm]
                    m = d.get(h)
                    d[h] = bit if m is None else m | bit
                else:
                    refs[h] = c + 1
        extra = max(0, _blocks(num_tokens, self.block_size) - len(block_hashes))
        self._extra_blocks += extra
        prefill_tokens = max(0, prefill_tokens)
        self._prefill_tokens += prefill_tokens
        self._entries[request_id] = _Entry(block_hashes, extra, prefill_tokens, now, prefill_until_heartbeat)
        self._bump()

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
        self._bump()
        return True

    def free(self, request_id: str) -> bool:
        """Forget the request (False if it was not tracked)."""
        e = self._entries.pop(request_id, None)
        if e is None:
            return False
        refs = self._refs
        get, pop = refs.get, refs.pop
        if self._holders is None:
            for h in e.hashes:
                n = get(h, 0) - 1
                if n > 0:
                    refs[h] = n
                else:
                    pop(h, None)
        else:  # the last request here with a block: this worker leaves its holders
            shards, sm, bit = self._holders.shards, BlockHolders.SHARD_MASK, self._bit
            for h in e.hashes:
                n = get(h, 0) - 1
                if n > 0:
                    refs[h] = n
                else:
                    pop(h, None)
                    d = shards[h & sm]
                    m = d.get(h, 0)
                    if m == bit:
                        del d[h]
                    elif m:
                        d[h] = m & ~bit
        self._extra_blocks -= e.extra_blocks
        self._prefill_tokens -= e.prefill_tokens
        self._bump()
        return True

    def detach(self) -> None:
        """Leave the holders index (the worker is gone; see :meth:`BlockHolders.release`)."""
        if self._holders is not None:
            self._holders.release(self.worker_id, self._refs)
            self._holders = None
            self._bit = 0

    def on_heartbeat(self, heartbeat_at: float, reported_requests: int, margin_s: float) -> list[str]:
        """Reconcile with a new heartbeat (module docstring, layer 2); returns the freed ids."""
        self.heartbeat_at = heartbeat_at
        self._bump()
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


__all__ = [
    "CLOCK_SKEW_MARGIN_S",
    "DEFAULT_TTL_S",
    "ActiveSequences",
    "BlockHolders",
    "shared_prefix_blocks",
]
