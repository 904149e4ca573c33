"""The router-wide tracker, NATS-free: :class:`ActiveTracker` (one
:class:`~.active.ActiveSequences` per worker plus request → worker) and the candidates it builds
for a decision (:class:`Pools`).

What a worker has in flight and when it leaves is :mod:`.active`; this module is about making a
decision cheap over many workers. The request-independent figures of the last ``instances`` seen
are kept column-wise in numpy (:class:`_Layout`, the column layout); before each decision only
the positions whose ``InstanceInfo`` or tracked requests changed are recomputed
(:meth:`ActiveTracker._refresh`, which runs heartbeat reconciliation and the lease), and the
decode and prefill pools are positions into those columns (:meth:`ActiveTracker._pool_masks`,
cached per arguments until a worker's role, busy flag or compat hash changes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import compress, repeat
from operator import is_not
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from tandem.protocol.messages import InstanceInfo

from .active import CLOCK_SKEW_MARGIN_S, DEFAULT_TTL_S, ActiveSequences, BlockHolders
from .policy import (
    BLOCK_SIZE,
    NEW_BLOCKS,
    OVERLAP_BLOCKS,
    BusyThresholds,
    Candidates,
    WorkerState,
    over_thresholds,
)


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
        if seqs:  # (nothing to expire otherwise)
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
            n, own_blocks, own_prefill = seqs.figures()
            if n:  # the larger of the report and this router's own figures
                if own_blocks > blocks:
                    blocks = own_blocks
                if own_prefill > prefill:
                    prefill = own_prefill
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


__all__ = ["ActiveTracker", "Pools"]
