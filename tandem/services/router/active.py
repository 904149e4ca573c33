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

from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from itertools import compress, repeat
from operator import is_not
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from tandem.protocol.messages import InstanceInfo

from .policy import (
    BLOCK_SIZE,
    NEW_BLOCKS,
    OVERLAP_BLOCKS,
    BusyThresholds,
    Candidates,
    WorkerState,
    over_thresholds,
)

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
    ``worker_id`` joins on every change of the figures (how :class:`ActiveTracker` learns which
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


class Pools(NamedTuple):
    """The candidates of one decision (input order), column-wise: each pool is a
    :class:`~.policy.Candidates`, a sequence of :class:`~.policy.WorkerState` values."""

    #: Decode-capable (role ``decode`` / ``both``) workers that are not busy.
    decode: Candidates
    #: Prefill-capable (role ``prefill`` / ``both``) workers that are not busy.
    prefill: Candidates
    #: How many decode-capable / prefill-capable workers were busy.
    decode_busy: int
    prefill_busy: int
    #: Some worker has role ``prefill`` (disaggregation is possible at all).
    has_prefill_role: bool


_ROLE_CODE = {"decode": 0, "prefill": 1, "both": 2}
IntPositions = npt.NDArray[np.intp]
_PoolMasks = tuple[IntPositions, IntPositions, int, int, bool]
_PoolKey = tuple[bool, bool, str | None, str | None]


class _Layout:
    """The workers of the last ``instances`` the tracker saw, column-wise, in that order.

    ``cols`` (int64, one row per :class:`~.policy.WorkerState` field after the id): the
    request-independent rows are kept up to date as workers change; ``overlap`` and ``new`` are
    filled per request. ``infos[k]`` is the ``InstanceInfo`` position ``k`` was computed from
    (None: not yet): a position whose info is not the caller's any more is recomputed.
    ``pools``: the pools' positions and counts per :meth:`ActiveTracker.pools` arguments, until
    a worker's role, busy flag or compat hash changes.
    """

    __slots__ = (
        "busy",
        "cols",
        "compat",
        "dups",
        "id_arr",
        "ids",
        "infos",
        "keys",
        "n",
        "pools",
        "pos",
        "role",
        "slot",
    )

    def __init__(self, infos: Sequence[InstanceInfo]) -> None:
        n = self.n = len(infos)
        self.ids = [i.instance_id for i in infos]
        self.id_arr = np.empty(n, dtype=object)
        self.id_arr[:] = self.ids
        self.pos = {wid: k for k, wid in enumerate(self.ids)}
        self.dups = len(self.pos) != n  # the same id twice (a list, not the registry's dict)
        self.infos: list[InstanceInfo | None] = [None] * n
        self.cols: npt.NDArray[np.int64] = np.zeros((7, n), dtype=np.int64)
        self.cols[BLOCK_SIZE] = 1  # positions not computed yet divide by something
        self.role = np.zeros(n, dtype=np.int8)
        self.busy = np.zeros(n, dtype=np.bool_)
        self.compat = np.zeros(n, dtype=np.int32)
        self.slot = np.zeros(n, dtype=np.intp)  # BlockHolders slot (0: none)
        self.keys: list[tuple[bool, int, int] | None] = [None] * n  # (busy, role, compat) as set
        self.pools: dict[_PoolKey, _PoolMasks] = {}


class ActiveTracker:
    """:class:`ActiveSequences` per worker plus request → worker, for one router.

    Builds the candidates the policies rank (:meth:`pools`, :meth:`state`), merging this
    router's view with the worker's heartbeat report (the larger figure wins) and applying the
    busy thresholds. The request-independent figures of every worker are kept column-wise
    (numpy) between decisions. A worker whose tracked requests change is brought up to date by
    the bookkeeping call itself (:meth:`_settle`); one whose ``InstanceInfo`` changed (a
    heartbeat) is recomputed by the next decision — its heartbeat reconciliation and lease run
    then, as they always did — in bulk for the workers with nothing tracked. Each worker's shared
    prefix with the request comes from one index of every worker's active blocks
    (:class:`BlockHolders`). A decision thus costs a C-level identity scan of the instances, the
    workers that heartbeat since, a few dict lookups and a few array operations over all
    workers; no Python object is built per worker except for the ranked candidates.
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
        #               active decode blocks, active prefill tokens, active requests, has refs)
        self._base: dict[str, tuple[Any, ...]] = {}
        #: Workers whose tracked requests changed since the layout last looked at them.
        self._changed: set[str] = set()
        self._holders = BlockHolders()
        self._layout: _Layout | None = None
        self._compat_codes: dict[str, int] = {}
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
        freed = seqs.on_heartbeat(info.heartbeat_at, load.num_running + load.num_waiting, self.margin_s)
        for rid in freed:
            self._owner.pop(rid, None)
        self.reconciled += len(freed)
        if seqs._entries:  # (nothing to expire otherwise)
            expired = seqs.expire(now, self.ttl_s)
            for rid in expired:
                self._owner.pop(rid, None)
            self.expired += len(expired)

    def _make_base(self, info: InstanceInfo, seqs: ActiveSequences | None, now: float) -> tuple[Any, ...]:
        load = info.load
        blocks = load.used_blocks + load.pinned_blocks
        prefill = load.waiting_prefill_tokens
        requests = load.num_running + load.num_waiting
        tracked = False
        if seqs is not None:
            if info.heartbeat_at != seqs.heartbeat_at:
                self._sync(seqs, info, now)
            n = len(seqs._entries)
            if n:  # the larger of the report and this router's own figures
                own = len(seqs._refs) + seqs._extra_blocks  # seqs.active_blocks
                if own > blocks:
                    blocks = own
                if seqs._prefill_tokens > prefill:
                    prefill = seqs._prefill_tokens
                if n > requests:
                    requests = n
                tracked = True
        bs = info.block_size if info.block_size > 0 else 1
        th = self.thresholds
        busy = th.enabled and over_thresholds(th, info.num_blocks, blocks, prefill)
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
            tracked,  # this router has requests there (their blocks count for the shared prefix)
        )
        self._base[info.instance_id] = base
        return base

    def _compat_code(self, compat_hash: str) -> int:
        code = self._compat_codes.get(compat_hash)
        if code is None:
            code = self._compat_codes[compat_hash] = len(self._compat_codes) + 1
        return code

    def _refresh(
        self, infos: list[InstanceInfo], now: float, compat_hash: str | None, exclude: str | None
    ) -> tuple[_Layout, list[int]]:
        """The layout of ``infos``, brought up to date; returns it and the positions left stale
        that ``compat_hash`` rules out (the layout may not know yet that it does).

        A position is recomputed when its ``InstanceInfo`` is not the one it was computed from or
        its worker's tracked requests changed (heartbeat reconciliation and the lease run then,
        as part of computing it). With ``compat_hash`` / ``exclude`` only the workers of that
        ``compat_hash`` other than ``exclude`` are (the others are left as they were, and
        stale, exactly as if the caller had passed only the former)."""
        lay = self._layout
        n = len(infos)
        if lay is None or lay.n != n:
            lay = self._layout = _Layout(infos)
        todo = list(compress(range(n), map(is_not, infos, lay.infos)))
        ids = lay.ids
        for k in todo:
            if infos[k].instance_id != ids[k]:  # another order or other workers: start over
                lay = self._layout = _Layout(infos)
                ids = lay.ids
                todo = list(range(n))
                break
        changed = self._changed
        if lay.dups:
            todo = list(range(n))
        elif changed:
            todo.extend(k for k in map(lay.pos.get, changed) if k is not None)
            todo = list(dict.fromkeys(todo))
        stale: list[int] = []  # ruled out by compat_hash, not recomputed
        excluded: list[int] = []  # ``exclude``, not recomputed
        if not todo:
            return lay, stale
        base_of, workers = self._base.get, self._workers.get
        done: list[int] = []
        bases: list[tuple[Any, ...]] = []
        quiet: list[int] = []  # no request tracked there: the figures are the worker's report
        for k in todo:
            info = infos[k]
            wid = info.instance_id
            if compat_hash is not None and info.compat_hash != compat_hash:
                stale.append(k)
                continue
            if wid == exclude:
                excluded.append(k)
                continue
            b = base_of(wid)
            if b is None or b[0] is not info or (b[1] is not None and b[1].version != b[2]):
                seqs = workers(wid)
                if seqs is None or not seqs:
                    if seqs is not None and info.heartbeat_at != seqs.heartbeat_at:
                        self._sync(seqs, info, now)  # nothing to reconcile: takes the stamp
                    quiet.append(k)
                    continue
                b = self._make_base(info, seqs, now)
            done.append(k)
            bases.append(b)
        if done or quiet:
            self._write_rows(lay, infos, done, bases, quiet)
        if changed:
            # Computing a position ran its worker's reconciliation (which reports a change
            # again); what is left to do is the skipped positions' workers.
            left = {ids[k] for k in (*stale, *excluded)}.intersection(changed) if stale or excluded else ()
            changed.clear()
            changed.update(left)
        return lay, stale

    def _write(self, lay: _Layout, k: int, b: tuple[Any, ...]) -> None:
        """Position ``k`` of ``lay`` from the base ``b`` (see :meth:`_make_base`)."""
        info = b[0]
        key = (b[3], b[4], self._compat_code(info.compat_hash))
        if lay.keys[k] != key:  # the pools change
            lay.pools.clear()
            lay.keys[k] = key
            lay.busy[k], lay.role[k], lay.compat[k] = key
        lay.cols[:, k] = (b[5], b[6], 0, b[7], b[8], b[9], 0)
        lay.slot[k] = self._holders.slot_of(info.instance_id) if b[10] else 0
        lay.infos[k] = info

    def _write_rows(
        self,
        lay: _Layout,
        infos: list[InstanceInfo],
        done: list[int],
        bases: list[tuple[Any, ...]],
        quiet: list[int],
    ) -> None:
        """Positions ``done`` from their ``bases`` and positions ``quiet`` (no request tracked
        there) from the ``infos`` alone — what :meth:`_make_base` gives for them, column by
        column in bulk (a heartbeat round brings tens of workers at once)."""
        q_infos = [infos[k] for k in quiet]
        loads = [i.load for i in q_infos]
        ks = done + quiet
        row_infos = [b[0] for b in bases] + q_infos
        blocks = [b[7] for b in bases] + [ld.used_blocks + ld.pinned_blocks for ld in loads]
        prefill = [b[8] for b in bases] + [ld.waiting_prefill_tokens for ld in loads]
        requests = [b[9] for b in bases] + [ld.num_running + ld.num_waiting for ld in loads]
        num_blocks = [i.num_blocks for i in row_infos]
        th = self.thresholds
        if th.enabled:
            busy = [b[3] for b in bases] + [
                over_thresholds(th, i.num_blocks, bl, pr)
                for i, bl, pr in zip(q_infos, blocks[len(done) :], prefill[len(done) :], strict=True)
            ]
        else:
            busy = [False] * len(ks)
        roles = [_ROLE_CODE.get(i.role, 2) for i in row_infos]
        code = self._compat_code
        compats = [code(i.compat_hash) for i in row_infos]
        zeros = [0] * len(ks)
        lay.cols[:, ks] = [
            [i.block_size if i.block_size > 0 else 1 for i in row_infos],
            num_blocks,
            zeros,
            blocks,
            prefill,
            requests,
            zeros,
        ]
        slot_of = self._holders.slot_of
        lay.slot[ks] = [slot_of(b[0].instance_id) if b[10] else 0 for b in bases] + [0] * len(quiet)
        keys, new_keys = lay.keys, list(zip(busy, roles, compats, strict=True))
        if any(keys[k] != key for k, key in zip(ks, new_keys, strict=True)):  # the pools change
            lay.pools.clear()
            for k, key in zip(ks, new_keys, strict=True):
                keys[k] = key
            lay.busy[ks], lay.role[ks], lay.compat[ks] = busy, roles, compats
        for k, info in zip(ks, row_infos, strict=True):
            lay.infos[k] = info

    def _settle(self, worker_id: str) -> None:
        """``worker_id``'s tracked requests changed: bring its layout position up to date now
        (out of the next decision's time) when that needs no heartbeat reconciliation — its
        ``InstanceInfo`` there is the one its tracking last reconciled with, so computing it
        is pure and gives what the next decision would compute. Otherwise it is left to that
        decision."""
        lay = self._layout
        if lay is None or lay.dups:
            return
        k = lay.pos.get(worker_id)
        if k is None:
            return
        info = lay.infos[k]
        seqs = self._workers.get(worker_id)
        if info is None or (seqs is not None and seqs.heartbeat_at != info.heartbeat_at):
            return
        self._write(lay, k, self._make_base(info, seqs, 0.0))  # no reconciliation: ``now`` unused
        self._changed.discard(worker_id)

    def _pool_masks(
        self,
        lay: _Layout,
        decode_only: bool,
        ignore_busy: bool,
        compat_hash: str | None,
        exclude: str | None,
        stale: list[int],
    ) -> _PoolMasks:
        """Positions of the decode and prefill pools, busy counts, whether a prefill role is
        among the workers (cached per arguments until a worker's role, busy flag or compat hash
        changes; not while ``compat_hash`` rules out stale positions)."""
        key = (decode_only, ignore_busy, compat_hash, exclude)
        cacheable = not stale and not lay.dups
        if cacheable:
            hit = lay.pools.get(key)
            if hit is not None:
                return hit
        role = lay.role
        is_prefill = role == 1
        decode_mask = ~is_prefill
        prefill_mask = role != 0
        if decode_only:
            prefill_mask &= decode_mask  # only role "both" still counts as busy
        if compat_hash is not None or exclude is not None or stale:
            eligible = np.ones(lay.n, dtype=np.bool_)
            if compat_hash is not None:
                eligible &= lay.compat == self._compat_code(compat_hash)
            if exclude is not None:
                if lay.dups:
                    eligible &= lay.id_arr != exclude
                elif exclude in lay.pos:
                    eligible[lay.pos[exclude]] = False
            eligible[stale] = False
            is_prefill &= eligible
            decode_mask &= eligible
            prefill_mask &= eligible
        n_busy_d = n_busy_p = 0
        if self.thresholds.enabled and not ignore_busy:
            busy = lay.busy
            n_busy_d = int(np.count_nonzero(decode_mask & busy))
            n_busy_p = int(np.count_nonzero(prefill_mask & busy))
            free = ~busy
            decode_mask &= free
            prefill_mask &= free
        out = (
            np.flatnonzero(decode_mask),
            np.flatnonzero(prefill_mask),
            n_busy_d,
            n_busy_p,
            bool(is_prefill.any()),
        )
        if cacheable:
            lay.pools[key] = out
        return out

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
        compat_hash: str | None = None,
        exclude: str | None = None,
    ) -> Pools:
        """Every worker of ``instances`` as a candidate for a request of ``num_tokens`` tokens
        (``overlap``: leading prompt blocks cached per worker id, from the indexer).
        ``decode_only`` skips the prefill pool; ``ignore_busy`` keeps busy workers in;
        ``compat_hash`` / ``exclude``: only the workers of that ``compat_hash``, other than the
        worker ``exclude`` (the same as passing only those, but the layout of ``instances`` is
        reused).

        The hot path of a decision: a C-level identity scan of ``instances`` against the layout,
        the changed workers recomputed, the overlap row from the (sparse) ``overlap``, the new
        blocks row from :meth:`BlockHolders.prefix_lengths` (a few dict lookups for all
        workers), and the pools as views (positions) of this request's columns.
        """
        infos = instances if isinstance(instances, list) else list(instances)
        lay, stale = self._refresh(infos, now, compat_hash, exclude)
        n = lay.n
        cols = lay.cols

        # Overlap row.
        ov = cols[OVERLAP_BLOCKS]
        ov[:] = 0
        if overlap:
            if lay.dups:
                ov[:] = np.fromiter(map(overlap.get, lay.ids, repeat(0)), dtype=np.int64, count=n)
            else:
                where = list(map(lay.pos.get, overlap))
                vals = list(overlap.values())
                if None in where:
                    vals = [v for k, v in zip(where, vals, strict=True) if k is not None]
                    where = [k for k in where if k is not None]
                ov[where] = vals

        # New blocks row: the request's blocks minus the prefix already active on the worker.
        new = cols[NEW_BLOCKS]
        np.negative(np.floor_divide(-num_tokens, cols[BLOCK_SIZE]), out=new)
        if block_hashes and n:
            shared = self._holders.prefix_lengths(block_hashes)
            if shared:
                nbytes = (self._holders.width + 7) // 8
                for workers, k in shared:
                    bits = np.unpackbits(
                        np.frombuffer(workers.to_bytes(nbytes, "little"), dtype=np.uint8), bitorder="little"
                    )
                    np.subtract(new, k, out=new, where=bits.view(np.bool_)[lay.slot])

        d_pos, p_pos, n_busy_d, n_busy_p, has_prefill_role = self._pool_masks(
            lay, decode_only, ignore_busy, compat_hash, exclude, stale
        )
        every = Candidates(lay.id_arr, cols.copy())  # this request's figures, all workers
        decode = Candidates.view(every, d_pos)
        prefill = Candidates.empty() if decode_only else Candidates.view(every, p_pos)
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
        wid = info.instance_id
        seqs = self._workers.get(wid)
        if seqs is None:
            seqs = self._workers[wid] = ActiveSequences(
                max(1, info.block_size), worker_id=wid, changed=self._changed, holders=self._holders
            )
            seqs.heartbeat_at = info.heartbeat_at
            self._base.pop(wid, None)
            self._changed.add(wid)
        seqs.add(
            request_id,
            block_hashes,
            num_tokens,
            prefill_tokens,
            now=now,
            prefill_until_heartbeat=prefill_until_heartbeat,
        )
        self._owner[request_id] = info.instance_id
        self._settle(wid)

    def confirm(self, request_id: str, now: float) -> None:
        """The worker acked ``request_id`` at ``now``."""
        worker = self._owner.get(request_id)
        if worker is not None:
            self._workers[worker].confirm(request_id, now)

    def mark_prefill_done(self, request_id: str) -> bool:
        worker = self._owner.get(request_id)
        if worker is None or not self._workers[worker].mark_prefill_done(request_id):
            return False
        self._settle(worker)
        return True

    def free(self, request_id: str, worker_id: str | None = None) -> bool:
        """Stop tracking ``request_id`` (only if it is on ``worker_id``, when given)."""
        worker = self._owner.get(request_id)
        if worker is None or (worker_id is not None and worker_id != worker):
            return False
        del self._owner[request_id]
        seqs = self._workers.get(worker)
        if seqs is None or not seqs.free(request_id):
            return False
        self._settle(worker)
        return True

    def remove_worker(self, worker_id: str) -> None:
        """The worker is gone: forget everything tracked on it."""
        self._base.pop(worker_id, None)
        self._changed.add(worker_id)
        seqs = self._workers.pop(worker_id, None)
        if seqs is not None:
            seqs.detach()
            for rid in seqs.request_ids():
                self._owner.pop(rid, None)
        self._settle(worker_id)


__all__ = [
    "CLOCK_SKEW_MARGIN_S",
    "DEFAULT_TTL_S",
    "ActiveSequences",
    "ActiveTracker",
    "BlockHolders",
    "Pools",
    "shared_prefix_blocks",
]
