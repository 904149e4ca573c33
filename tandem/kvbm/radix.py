"""RadixTree: which workers hold which cached blocks, for the KV indexer and router.

A block is identified by its *sequence hash*, which already encodes the whole prefix before it
(:mod:`tandem.kvbm.hashing`), so the prefix tree needs no explicit nodes: the index is a flat
``dict`` ``sequence hash -> bitmask of the workers holding that block`` (each worker owns one bit
position while it is known; positions are reused after :meth:`RadixTree.remove_worker`). It is
built from the workers' KV events (:mod:`tandem.protocol.messages`):

* ``KvStored{parent_hash, blocks}`` adds the worker to each of ``blocks``; when ``parent_hash`` is
  None, ``blocks[0]`` starts a sequence (a child of the root).
* ``KvRemoved{block_hashes}`` removes the worker from those blocks.
* ``KvCleared`` removes the worker from every block it holds.

A block no worker holds is dropped. A ``KvStored`` whose parent no worker holds (an earlier event
was lost) is still recorded and counted in ``unknown_parent_events``; it is invisible to
:meth:`RadixTree.find_matches` until the worker also holds the blocks before it (a match must be
contiguous from the root), exactly as a detached subtree that gets linked in later.

:meth:`RadixTree.find_matches` gives Dynamo's overlap scores (``RadixTree.find_matches``,
ai-dynamo 1.6.1, ``early_exit=False``): walk the query from the root and score each worker with the
number of leading query blocks it holds, contiguously from the first. The query holds *sequence*
hashes; Dynamo's holds local hashes, its tree keyed by them under each parent, which is the same
walk. Checked equal on the shared peer workload (``scripts/bench_indexer.py --check``) and on
random event streams, except after event anomalies where Dynamo forgets blocks the worker still
holds (it drops a ``KvStored`` whose parent that worker does not hold, and the children of a block
nobody holds any more); tandem keeps them, so its score stays the worker's actual leading run.

Costs (pure Python; the per-block loops run inside C builtins): ``apply`` is one dict operation
per block (plus a second for blocks that other workers already hold), ``find_matches`` one dict
lookup and one int AND per matched query block. ``KvCleared`` and ``remove_worker`` scan every
block.

Event ids: each worker's events count up from 0; :meth:`RadixTree.apply` returns an
:class:`EventGap` when an id is not the previous one + 1 (lost events, or a restarted worker)
so the indexer can log it. Events are applied regardless.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress, filterfalse, repeat
from operator import and_, attrgetter, not_, xor

from tandem.kvbm._wire import FastCleared, FastKvEvent, FastRemoved, FastStored
from tandem.protocol.messages import KvCleared, KvEvent, KvRemoved, KvStored

_STORED = (KvStored, FastStored)
_REMOVED = (KvRemoved, FastRemoved)
_CLEARED = (KvCleared, FastCleared)
_block_hash = attrgetter("block_hash")
_NAMES_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class EventGap:
    """An event id that did not follow the worker's previous one (``expected`` = last + 1, or 0
    for a worker's first event). ``got < expected`` usually means the worker restarted."""

    worker_id: str
    expected: int
    got: int

    @property
    def missed(self) -> int:
        """Events lost between the two (0 for a restart or a replay)."""
        return max(0, self.got - self.expected)


class RadixTree:
    """Blocks (by sequence hash) → workers holding them. Not thread-safe; one owner applies
    events and answers queries.

    Counters: ``gaps`` (events whose id did not follow), ``unknown_parent_events`` (``KvStored``
    whose parent no worker held), ``unknown_removed_blocks`` (removals of blocks the worker did not
    hold; ignored).

    Memory: one dict entry per distinct block (its hash and a bitmask int). Per-worker work is
    proportional to the event's blocks, except ``KvCleared`` and :meth:`remove_worker`, which scan
    every block (C-level, rare: a worker clears its cache, restarts or leaves).
    """

    def __init__(self) -> None:
        self._blocks: dict[int, int] = {}  # sequence hash -> mask of worker bits (never 0)
        self._roots: set[int] = set()  # blocks stored with parent None (all in _blocks)
        self._bit: dict[str, int] = {}  # worker -> 1 << its bit position
        self._count: dict[str, int] = {}  # worker -> blocks it holds
        self._slot_names: list[str | None] = []  # bit position -> worker (None: free)
        self._free_slots: list[int] = []  # heap of free bit positions
        self._names: dict[int, tuple[str, ...]] = {}  # mask -> worker names (cache)
        self._live = 0  # OR of the known workers' bits
        self._last_event_id: dict[str, int] = {}
        self.unknown_parent_events = 0
        self.unknown_removed_blocks = 0
        self.gaps = 0

    # ---- queries -------------------------------------------------------------------------------

    def num_blocks(self) -> int:
        """Distinct blocks held by at least one worker."""
        return len(self._blocks)

    def workers(self) -> set[str]:
        """Workers the tree has applied events from (and not removed), holding blocks or not."""
        return set(self._bit)

    def worker_num_blocks(self, worker_id: str) -> int:
        """Blocks the worker holds (0 if unknown)."""
        return self._count.get(worker_id, 0)

    def last_event_id(self, worker_id: str) -> int | None:
        """Id of the last event applied for the worker, None if none was."""
        return self._last_event_id.get(worker_id)

    def find_matches(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Overlap scores: for each worker, how many leading blocks of ``block_hashes`` (a
        prompt's *sequence* hashes, in order, unsigned 64-bit) it holds, contiguously from the
        first, which must start a sequence (stored with parent None). Workers matching 0 blocks
        are left out; an empty or unknown query gives ``{}``. Same scores as Dynamo's
        ``find_matches(local_hashes, early_exit=False)`` (module docstring: where they differ).
        Stops at the first block no still-matching worker holds: one dict lookup per matched
        block, about 8 us for 64 blocks on the shared 2-core test machine."""
        if not block_hashes or block_hashes[0] not in self._roots:
            return {}
        get = self._blocks.get
        cur = self._live  # workers holding every block before `depth`
        drops: list[tuple[int, int]] = []  # (score, workers whose run ends there)
        for depth, seq_hash in enumerate(block_hashes):
            nxt = cur & get(seq_hash, 0)
            if nxt != cur:
                if depth:
                    drops.append((depth, cur ^ nxt))
                if not nxt:
                    break
                cur = nxt
        else:
            drops.append((len(block_hashes), cur))
        names_of = self._names_of
        if len(drops) == 1:
            return dict.fromkeys(names_of(drops[0][1]), drops[0][0])
        scores: dict[str, int] = {}
        for score, mask in drops:
            scores.update(dict.fromkeys(names_of(mask), score))
        return scores

    def _names_of(self, mask: int) -> tuple[str, ...]:
        names = self._names.get(mask)
        if names is None:
            slot_names = self._slot_names
            out: list[str] = []
            m = mask
            while m:
                low = m & -m
                name = slot_names[low.bit_length() - 1]
                assert name is not None
                out.append(name)
                m ^= low
            names = tuple(out)
            if len(self._names) >= _NAMES_CACHE_MAX:
                self._names.clear()
            self._names[mask] = names
        return names

    # ---- updates -------------------------------------------------------------------------------

    def apply(self, worker_id: str, event: KvEvent | FastKvEvent) -> EventGap | None:
        """Apply one of ``worker_id``'s events (a :class:`~tandem.protocol.messages.KvEvent`, or
        the same event decoded by :func:`tandem.kvbm._wire.decode_kv_event_batch`). Returns an
        :class:`EventGap` if its id does not follow the last one applied for that worker (the
        event is applied anyway). ``TypeError`` for an unknown event kind."""
        event_id = event.event_id
        last = self._last_event_id.get(worker_id)
        gap = None
        if last is None:
            if event_id != 0:
                gap = EventGap(worker_id, 0, event_id)
        elif event_id != last + 1:
            gap = EventGap(worker_id, last + 1, event_id)
        if gap is not None:
            self.gaps += 1
        self._last_event_id[worker_id] = event_id
        bit = self._bit.get(worker_id)
        if bit is None:
            bit = self._add_worker(worker_id)
        data = event.data
        if isinstance(data, _STORED):
            added = self._store(bit, data.parent_hash, list(map(_block_hash, data.blocks)))
        elif isinstance(data, _REMOVED):
            added = -self._remove(bit, data.block_hashes)
        elif isinstance(data, _CLEARED):
            added = -self._remove(bit, self._held_by(bit))
        else:
            raise TypeError(f"unknown KV event data {type(data).__name__}")
        if added:
            self._count[worker_id] += added
        return gap

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker: its blocks and its event-id history. Unknown workers are ignored.
        Scans every block (C-level)."""
        self._last_event_id.pop(worker_id, None)
        bit = self._bit.pop(worker_id, None)
        if bit is None:
            return
        if self._count.pop(worker_id):
            self._remove(bit, self._held_by(bit))
        slot = bit.bit_length() - 1
        self._slot_names[slot] = None
        heapq.heappush(self._free_slots, slot)
        self._live &= ~bit
        self._names.clear()  # the bit may name another worker from now on

    def _add_worker(self, worker_id: str) -> int:
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
            self._slot_names[slot] = worker_id
        else:
            slot = len(self._slot_names)
            self._slot_names.append(worker_id)
        bit = self._bit[worker_id] = 1 << slot
        self._count[worker_id] = 0
        self._live |= bit
        return bit

    def _held_by(self, bit: int) -> list[int]:
        """Hashes of every block whose mask has ``bit``."""
        blocks = self._blocks
        return list(compress(blocks.keys(), map(and_, blocks.values(), repeat(bit))))

    def _store(self, bit: int, parent_hash: int | None, hashes: list[int]) -> int:
        """Add ``bit`` to ``hashes``; returns how many did not have it."""
        if not hashes:
            return 0
        blocks = self._blocks
        if parent_hash is None:
            self._roots.add(hashes[0])
        elif parent_hash not in blocks:
            self.unknown_parent_events += 1
        before = len(blocks)
        old = list(map(blocks.setdefault, hashes, repeat(bit)))  # new blocks get just this bit
        added = len(blocks) - before
        if added != len(hashes):
            # Some were known already: add this worker where its bit is missing (once each).
            missing = dict.fromkeys(compress(hashes, map(not_, map(and_, old, repeat(bit)))))
            for h in missing:
                blocks[h] |= bit
            added += len(missing)
        return added

    def _remove(self, bit: int, hashes: Sequence[int]) -> int:
        """Remove ``bit`` from ``hashes``; returns how many had it (the rest are counted in
        ``unknown_removed_blocks``). Blocks left with no worker are dropped."""
        blocks = self._blocks
        old = list(map(blocks.pop, hashes, repeat(0)))
        had = list(map(and_, old, repeat(bit)))
        unknown = had.count(0)
        rest = list(map(xor, old, had))
        blocks.update(compress(zip(hashes, rest, strict=True), rest))  # put back blocks others still hold
        # Sequence starts nobody holds any more (the roots set is small: look there first).
        gone_roots = self._roots.intersection(compress(hashes, map(not_, rest)))
        if gone_roots:
            self._roots.difference_update(filterfalse(blocks.__contains__, gone_roots))
        self.unknown_removed_blocks += unknown
        return len(had) - unknown

    # ---- integrity (tests) ---------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise ``RuntimeError`` unless the block masks, the per-worker block counts, the worker
        bit positions and the sequence starts agree. O(blocks x workers)."""
        errors: list[str] = []
        live = 0
        for worker, bit in self._bit.items():
            slot = bit.bit_length() - 1
            if bit != 1 << slot or slot >= len(self._slot_names) or self._slot_names[slot] != worker:
                errors.append(f"worker {worker!r} has bit {bit:#x} not mapped to it")
            live |= bit
            held = len(self._held_by(bit))
            if self._count.get(worker) != held:
                errors.append(f"worker {worker!r} counted {self._count.get(worker)} blocks, holds {held}")
        if self._count.keys() != self._bit.keys():
            errors.append("counted workers differ from known workers")
        if live != self._live:
            errors.append(f"live mask {self._live:#x} != {live:#x}")
        for slot, name in enumerate(self._slot_names):
            if (name is None) != (slot in self._free_slots):
                errors.append(f"slot {slot} is {'free' if name is None else 'used'} but listed otherwise")
        for seq_hash, mask in self._blocks.items():
            if not mask:
                errors.append(f"block {seq_hash:#x} is held by nobody but not dropped")
            if mask & ~live:
                errors.append(f"block {seq_hash:#x} lists unknown worker bits {mask & ~live:#x}")
        if not self._roots <= self._blocks.keys():
            errors.append(f"{len(self._roots - self._blocks.keys())} sequence starts not held by anyone")
        if errors:
            raise RuntimeError("; ".join(errors[:20]))


__all__ = ["EventGap", "RadixTree"]
