"""RadixTree: which workers hold which cached blocks, for the KV indexer and router.

A block is identified by its *sequence hash*, which already encodes the whole prefix before it
(:mod:`tandem.kvbm.hashing`), so the prefix tree needs no explicit nodes: the index is a flat
table ``sequence hash -> bitmask of the workers holding that block`` (each worker owns one bit
position, its *slot*, while it is known; slots are reused after :meth:`~BaseRadixTree.remove_worker`).
It is built from the workers' KV events (:mod:`tandem.protocol.messages`):

* ``KvStored{parent_hash, blocks}`` adds the worker to each of ``blocks``; when ``parent_hash`` is
  None, ``blocks[0]`` starts a sequence (a child of the root).
* ``KvRemoved{block_hashes}`` removes the worker from those blocks.
* ``KvCleared`` removes the worker from every block it holds.

A block no worker holds is dropped. A ``KvStored`` whose parent no worker holds (an earlier event
was lost) is still recorded and counted in ``unknown_parent_events``; it is invisible to
``find_matches`` until the worker also holds the blocks before it (a match must be contiguous
from the root), exactly as a detached subtree that gets linked in later.

``find_matches`` gives Dynamo's overlap scores (``RadixTree.find_matches``, ai-dynamo 1.6.1,
``early_exit=False``): walk the query from the root and score each worker with the number of
leading query blocks it holds, contiguously from the first. The query holds *sequence* hashes;
Dynamo's holds local hashes, its tree keyed by them under each parent, which is the same walk.
Checked equal on the shared peer workload (``scripts/bench_indexer.py --check``) and on random
event streams, except after event anomalies where Dynamo forgets blocks the worker still holds (it
drops a ``KvStored`` whose parent that worker does not hold, and the children of a block nobody
holds any more); tandem keeps them, so its score stays the worker's actual leading run.

Two implementations, same API and results:

* :class:`NativeRadixTree` — the table in C (``tandem/kvbm/_radix_native.c``, an optional
  extension built by ``pip install -e .`` when a C compiler is present): an open-addressing hash
  table of ``[hash, mask words]`` entries, plus a strict parser of the indexer's msgpack
  ``KvEventBatch`` payloads (:meth:`NativeRadixTree.parse`, the indexer's fast path). Hashes are
  u64; an int outside that range (no tandem or Dynamo worker sends one) is taken modulo 2**64.
* :class:`PyRadixTree` — pure Python, a ``dict`` of int bitmasks (per-block loops inside C
  builtins); the reference, and the fallback when the extension is not built.

:data:`RadixTree` is the one in use: the native one when the extension is importable, unless the
environment sets ``TANDEM_RADIX=python`` (``native`` makes :func:`make_radix_tree` fail without the
extension; default ``auto``). :data:`NATIVE` tells which.

Costs: ``apply`` is one table operation per block, ``find_matches`` one lookup and a mask AND per
matched query block. ``KvCleared`` and ``remove_worker`` scan every block.

Event ids: each worker's events count up from 0; ``apply`` returns an :class:`EventGap` when an id
is not the previous one + 1 (lost events, or a restarted worker) so the indexer can log it.
Events are applied regardless.

Snapshots: ``snapshot()`` gives the whole state (blocks, worker slots and block counts, last event
ids, counters) as a :class:`~tandem.protocol.messages.RadixTreeState`, the same format for both
implementations; ``restore()`` rebuilds an empty tree of either implementation from it, which then
answers and applies further events exactly as the tree it was taken from (O(blocks) both ways; the
native tree copies the table in one C call each way). Hashes outside u64 (only from a misbehaving
sender) are stored modulo 2**64, as the native tree keeps them anyway.
"""

from __future__ import annotations

import heapq
import importlib
import os
import sys
from abc import ABC, abstractmethod
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import compress, filterfalse, repeat
from operator import and_, attrgetter, not_, xor
from types import ModuleType
from typing import Any

from tandem.kvbm._wire import FastCleared, FastKvEvent, FastRemoved, FastStored
from tandem.protocol.messages import (
    KvCleared,
    KvEvent,
    KvRemoved,
    KvStored,
    RadixTreeState,
    RadixWorkerState,
)

_native: ModuleType | None
try:
    _native = importlib.import_module("tandem.kvbm._radix_native")
except ImportError:  # not built (no C compiler at install time): pure Python only
    _native = None

NATIVE_AVAILABLE: bool = _native is not None
"""The C extension ``tandem.kvbm._radix_native`` is built and importable."""

IMPL_ENV = "TANDEM_RADIX"
_STORED = (KvStored, FastStored)
_REMOVED = (KvRemoved, FastRemoved)
_CLEARED = (KvCleared, FastCleared)
_block_hash = attrgetter("block_hash")
_NAMES_CACHE_MAX = 4096
_U64 = (1 << 64) - 1
#: Most mask words a snapshot may use (the native table's limit: 64 * 16384 - 1 worker slots).
MAX_MASK_WORDS = 16384
_MAX_SLOT = 64 * MAX_MASK_WORDS - 2

# Event kinds of a parsed event (NativeRadixTree.parse / apply_parsed).
KIND_STORED, KIND_REMOVED, KIND_CLEARED = 0, 1, 2
ParsedEvent = tuple[int, int, int | None, bytes]
"""``(event_id, kind, parent_hash, packed)``: ``packed`` holds the event's block hashes as
native-order u64 (``array("Q")`` bytes), empty for ``KvCleared``."""


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


class BaseRadixTree(ABC):
    """Blocks (by sequence hash) → workers holding them: the API both implementations share, and
    their per-worker bookkeeping (slots, block counts, event ids). Not thread-safe; one owner
    applies events and answers queries.

    Counters: ``gaps`` (events whose id did not follow), ``unknown_parent_events`` (``KvStored``
    whose parent no worker held), ``unknown_removed_blocks`` (removals of blocks the worker did not
    hold; ignored).
    """

    IMPL: str = ""  # "python" or "native"

    def __init__(self) -> None:
        self._slot: dict[str, int] = {}  # worker -> its bit position
        self._slot_names: list[str | None] = []  # bit position -> worker (None: free)
        self._free_slots: list[int] = []  # heap of free bit positions
        self._count: dict[str, int] = {}  # worker -> blocks it holds
        self._last_event_id: dict[str, int] = {}
        self.unknown_parent_events = 0
        self.unknown_removed_blocks = 0
        self.gaps = 0

    # ---- queries -------------------------------------------------------------------------------

    @abstractmethod
    def num_blocks(self) -> int:
        """Distinct blocks held by at least one worker."""

    @abstractmethod
    def find_matches(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Overlap scores: for each worker, how many leading blocks of ``block_hashes`` (a
        prompt's *sequence* hashes, in order, unsigned 64-bit) it holds, contiguously from the
        first, which must start a sequence (stored with parent None). Workers matching 0 blocks
        are left out; an empty or unknown query gives ``{}``. Same scores as Dynamo's
        ``find_matches(local_hashes, early_exit=False)`` (module docstring: where they differ).
        Stops at the first block no still-matching worker holds."""

    def workers(self) -> set[str]:
        """Workers the tree has applied events from (and not removed), holding blocks or not."""
        return set(self._slot)

    def worker_num_blocks(self, worker_id: str) -> int:
        """Blocks the worker holds (0 if unknown)."""
        return self._count.get(worker_id, 0)

    def last_event_id(self, worker_id: str) -> int | None:
        """Id of the last event applied for the worker, None if none was."""
        return self._last_event_id.get(worker_id)

    @abstractmethod
    def block_masks(self) -> dict[int, int]:
        """``{sequence hash: bitmask of the slots holding it}`` for every block (tests, debugging;
        O(blocks))."""

    @abstractmethod
    def sequence_starts(self) -> set[int]:
        """Blocks that start a sequence (stored with parent None); all are held (O(blocks))."""

    def block_holders(self) -> dict[int, frozenset[str]]:
        """``{sequence hash: the workers holding it}`` for every block: the tree's content whatever
        the slots (tests comparing trees, debugging; O(blocks x workers))."""
        names = {slot: worker for worker, slot in self._slot.items()}
        out: dict[int, frozenset[str]] = {}
        for h, mask in self.block_masks().items():
            held: list[str] = []
            m = mask
            while m:
                low = m & -m
                held.append(names[low.bit_length() - 1])
                m ^= low
            out[h] = frozenset(held)
        return out

    # ---- snapshots -----------------------------------------------------------------------------

    @abstractmethod
    def snapshot(self) -> RadixTreeState:
        """The whole state (module docstring, *Snapshots*); O(blocks). The tree is unchanged."""

    @abstractmethod
    def restore(self, state: RadixTreeState) -> None:
        """Rebuild this tree, which must be empty (no worker known), from ``state`` (of either
        implementation). ``ValueError`` if the tree is not empty or ``state`` is inconsistent
        (lengths, slots, a block nobody holds or held by an unknown slot, block counts that differ
        from the masks, a sequence start that is not a block, a repeated hash): the tree is then
        left empty. O(blocks)."""

    # ---- updates -------------------------------------------------------------------------------

    @abstractmethod
    def apply(self, worker_id: str, event: KvEvent | FastKvEvent) -> EventGap | None:
        """Apply one of ``worker_id``'s events (a :class:`~tandem.protocol.messages.KvEvent`, or
        the same event decoded by :func:`tandem.kvbm._wire.decode_kv_event_batch`). Returns an
        :class:`EventGap` if its id does not follow the last one applied for that worker (the
        event is applied anyway). ``TypeError`` for an unknown event kind."""

    @abstractmethod
    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker: its blocks and its event-id history. Unknown workers are ignored.
        Scans every block."""

    @abstractmethod
    def check_integrity(self) -> None:
        """Raise ``RuntimeError`` unless the block masks, the per-worker block counts, the worker
        slots and the sequence starts agree. O(blocks x workers)."""

    # ---- shared bookkeeping --------------------------------------------------------------------

    def _note_event_id(self, worker_id: str, event_id: int) -> EventGap | None:
        last = self._last_event_id.get(worker_id)
        self._last_event_id[worker_id] = event_id
        if last is None:
            if event_id == 0:
                return None
            gap = EventGap(worker_id, 0, event_id)
        elif event_id == last + 1:
            return None
        else:
            gap = EventGap(worker_id, last + 1, event_id)
        self.gaps += 1
        return gap

    def _next_slot(self) -> int:
        """The slot the next new worker gets (lowest free one)."""
        return self._free_slots[0] if self._free_slots else len(self._slot_names)

    def _take_slot(self, worker_id: str) -> int:
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
            self._slot_names[slot] = worker_id
        else:
            slot = len(self._slot_names)
            self._slot_names.append(worker_id)
        self._slot[worker_id] = slot
        self._count[worker_id] = 0
        return slot

    def _release_slot(self, worker_id: str) -> int | None:
        """Forget the worker's slot, event ids and count; returns the slot (None if unknown)."""
        self._last_event_id.pop(worker_id, None)
        slot = self._slot.pop(worker_id, None)
        if slot is None:
            return None
        self._count.pop(worker_id, None)
        self._slot_names[slot] = None
        heapq.heappush(self._free_slots, slot)
        return slot

    def _worker_states(self) -> list[RadixWorkerState]:
        return [
            RadixWorkerState(
                worker_id=w, slot=slot, num_blocks=self._count[w], last_event_id=self._last_event_id.get(w)
            )
            for w, slot in self._slot.items()
        ]

    def _check_state(self, state: RadixTreeState) -> int:
        """Check what :meth:`restore` can check before touching the blocks; returns the highest
        slot (-1 without workers). ``ValueError`` if the tree is not empty or the state is off."""
        if self._slot or self.num_blocks():
            raise ValueError("restore() needs an empty tree")
        if not 1 <= state.mask_words <= MAX_MASK_WORDS:
            raise ValueError(f"mask_words {state.mask_words} is not 1..{MAX_MASK_WORDS}")
        n, rest = divmod(len(state.hashes), 8)
        if rest or len(state.roots) % 8 or len(state.masks) != 8 * state.mask_words * n:
            raise ValueError("hashes, masks or roots: lengths do not fit")
        slots = [w.slot for w in state.workers]
        if len(set(slots)) != len(slots) or len({w.worker_id for w in state.workers}) != len(slots):
            raise ValueError("a worker or a slot repeats")
        if slots and not (min(slots) >= 0 and max(slots) <= min(_MAX_SLOT, 64 * state.mask_words - 1)):
            raise ValueError("a worker slot is out of range")
        for w in state.workers:
            if w.num_blocks < 0 or (w.last_event_id is not None and w.last_event_id < 0):
                raise ValueError(f"worker {w.worker_id!r}: negative block count or event id")
        return max(slots, default=-1)

    def _restore_workers(self, state: RadixTreeState, top_slot: int) -> None:
        """Take over the workers, slots, event ids and counters of a checked ``state``."""
        self._slot_names = [None] * (top_slot + 1)
        for w in state.workers:
            self._slot[w.worker_id] = w.slot
            self._slot_names[w.slot] = w.worker_id
            self._count[w.worker_id] = w.num_blocks
            if w.last_event_id is not None:
                self._last_event_id[w.worker_id] = w.last_event_id
        self._free_slots = [slot for slot, name in enumerate(self._slot_names) if name is None]
        heapq.heapify(self._free_slots)
        self.gaps = state.gaps
        self.unknown_parent_events = state.unknown_parent_events
        self.unknown_removed_blocks = state.unknown_removed_blocks

    def _check_counts(self, state: RadixTreeState, counts: Sequence[int]) -> None:
        """``counts[slot]`` (blocks per slot, from the masks) must be each worker's block count,
        and 0 for every other slot."""
        want = [0] * max(len(counts), 1 + max((w.slot for w in state.workers), default=-1))
        for w in state.workers:
            want[w.slot] = w.num_blocks
        have = [*counts, *([0] * (len(want) - len(counts)))]
        if have != want:
            raise ValueError("the block masks do not agree with the workers' block counts")

    def _slot_errors(self) -> list[str]:
        errors: list[str] = []
        for worker, slot in self._slot.items():
            if slot >= len(self._slot_names) or self._slot_names[slot] != worker:
                errors.append(f"worker {worker!r} has slot {slot} not mapped to it")
        if self._count.keys() != self._slot.keys():
            errors.append("counted workers differ from known workers")
        for slot, name in enumerate(self._slot_names):
            if (name is None) != (slot in self._free_slots):
                errors.append(f"slot {slot} is {'free' if name is None else 'used'} but listed otherwise")
        return errors

    def _count_errors(self, masks: Iterable[int]) -> list[str]:
        """Check the block masks against the known slots and the per-worker counts."""
        errors: list[str] = []
        live = 0
        for slot in self._slot.values():
            live |= 1 << slot
        held = [0] * len(self._slot_names)
        for mask in masks:
            if not mask:
                errors.append("a block is held by nobody but not dropped")
            if mask & ~live:
                errors.append(f"a block lists unknown worker bits {mask & ~live:#x}")
                continue
            m = mask
            while m:
                low = m & -m
                held[low.bit_length() - 1] += 1
                m ^= low
        for worker, slot in self._slot.items():
            if self._count.get(worker) != held[slot]:
                errors.append(
                    f"worker {worker!r} counted {self._count.get(worker)} blocks, holds {held[slot]}"
                )
        return errors


class PyRadixTree(BaseRadixTree):
    """The pure-Python tree: a ``dict`` ``sequence hash -> int bitmask`` (the reference, and the
    fallback without the C extension).

    Memory: one dict entry per distinct block (its hash and a bitmask int). Per-worker work is
    proportional to the event's blocks, except ``KvCleared`` and :meth:`remove_worker`, which scan
    every block (C-level, rare: a worker clears its cache, restarts or leaves). ``find_matches``
    takes about 8 us for 64 matched blocks on the shared 2-core test machine.
    """

    IMPL = "python"

    def __init__(self) -> None:
        super().__init__()
        self._blocks: dict[int, int] = {}  # sequence hash -> mask of worker bits (never 0)
        self._roots: set[int] = set()  # blocks stored with parent None (all in _blocks)
        self._names: dict[int, tuple[str, ...]] = {}  # mask -> worker names (cache)
        self._live = 0  # OR of the known workers' bits

    # ---- queries -------------------------------------------------------------------------------

    def num_blocks(self) -> int:
        return len(self._blocks)

    def block_masks(self) -> dict[int, int]:
        return dict(self._blocks)

    def sequence_starts(self) -> set[int]:
        return set(self._roots)

    # ---- snapshots -----------------------------------------------------------------------------

    def snapshot(self) -> RadixTreeState:
        blocks = self._blocks
        words = max(1, (len(self._slot_names) + 63) // 64)
        if words == 1:
            masks = _pack_le(blocks.values())
        else:
            masks = b"".join(m.to_bytes(8 * words, "little") for m in blocks.values())
        return RadixTreeState(
            workers=self._worker_states(),
            mask_words=words,
            hashes=_pack_le(blocks.keys()),
            masks=masks,
            roots=_pack_le(self._roots),
            gaps=self.gaps,
            unknown_parent_events=self.unknown_parent_events,
            unknown_removed_blocks=self.unknown_removed_blocks,
        )

    def restore(self, state: RadixTreeState) -> None:
        top_slot = self._check_state(state)
        hashes = _unpack_le(state.hashes)
        words = state.mask_words
        if words == 1:
            masks = _unpack_le(state.masks)
        else:
            mv, step = memoryview(state.masks), 8 * words
            masks = [int.from_bytes(mv[i : i + step], "little") for i in range(0, len(mv), step)]
        blocks = dict(zip(hashes, masks, strict=True))
        if len(blocks) != len(hashes):
            raise ValueError("a block hash repeats")
        live = 0
        for w in state.workers:
            live |= 1 << w.slot
        counts = [0] * (top_slot + 1)
        for mask, n in Counter(masks).items():  # few distinct masks: count per mask, then per bit
            if not mask or mask & ~live:
                raise ValueError("a block is held by no slot or by an unknown one")
            m = mask
            while m:
                low = m & -m
                counts[low.bit_length() - 1] += n
                m ^= low
        self._check_counts(state, counts)
        roots = set(_unpack_le(state.roots))
        if not roots <= blocks.keys():
            raise ValueError("a sequence start is not one of the blocks")
        self._restore_workers(state, top_slot)
        self._blocks = blocks
        self._roots = roots
        self._live = live
        self._names.clear()

    def find_matches(self, block_hashes: Sequence[int]) -> dict[str, int]:
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
        gap = self._note_event_id(worker_id, event.event_id)
        slot = self._slot.get(worker_id)
        if slot is None:
            slot = self._take_slot(worker_id)
            self._live |= 1 << slot
        bit = 1 << slot
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
        held = self._count.get(worker_id)
        slot = self._release_slot(worker_id)
        if slot is None:
            return
        bit = 1 << slot
        if held:
            self._remove(bit, self._held_by(bit))
        self._live &= ~bit
        self._names.clear()  # the bit may name another worker from now on

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
        errors = self._slot_errors()
        live = 0
        for slot in self._slot.values():
            live |= 1 << slot
        if live != self._live:
            errors.append(f"live mask {self._live:#x} != {live:#x}")
        errors += self._count_errors(self._blocks.values())
        if not self._roots <= self._blocks.keys():
            errors.append(f"{len(self._roots - self._blocks.keys())} sequence starts not held by anyone")
        if errors:
            raise RuntimeError("; ".join(errors[:20]))


def _pack(hashes: Iterable[int]) -> bytes:
    """Block hashes as native-order u64 bytes (ints outside u64 taken modulo 2**64)."""
    values = list(hashes)
    try:
        return array("Q", values).tobytes()
    except OverflowError:  # a negative or huge hash: only from a misbehaving sender
        return array("Q", [h & _U64 for h in values]).tobytes()


def _pack_le(hashes: Iterable[int]) -> bytes:
    """Ints as little-endian u64 bytes (the snapshot format; outside u64: modulo 2**64)."""
    values = list(hashes)
    try:
        packed = array("Q", values)
    except OverflowError:
        packed = array("Q", [h & _U64 for h in values])
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def _unpack_le(data: bytes) -> list[int]:
    """Little-endian u64 bytes as ints (length a multiple of 8)."""
    packed = array("Q")
    packed.frombytes(data)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tolist()


class NativeRadixTree(BaseRadixTree):
    """The tree over the C table of ``tandem.kvbm._radix_native`` (``RuntimeError`` if it is not
    built). Worker bookkeeping stays in Python; the per-block work, the overlap walk and the
    payload parser run in C.

    Memory: one entry of ``8 x (1 + W)`` bytes per block at a load factor of 1/4 .. 1/2, W = mask
    words (1 up to 63 workers, one more per 64). Worker slots are limited only by memory: a table
    of W words holds ``64 W - 1`` slots and grows by a word when the next worker needs it.
    """

    IMPL = "native"

    def __init__(self) -> None:
        if _native is None:
            raise RuntimeError(
                "tandem.kvbm._radix_native is not built (reinstall with a C compiler present: "
                "pip install -e .); use PyRadixTree or TANDEM_RADIX=python"
            )
        super().__init__()
        self._t: Any = _native.Table(1, int.from_bytes(os.urandom(8), "little"))
        self.parse: Callable[[bytes | bytearray | memoryview], tuple[str, list[ParsedEvent]] | None]
        self.parse = _native.parse
        """``parse(payload) -> (worker_id, [ParsedEvent]) | None``: the strict parser of the
        msgpack ``KvEventBatch`` that tandem's encoder writes; None for any other payload (decode
        it with :func:`tandem.kvbm._wire.decode_kv_event_batch`, which accepts or rejects it).
        Whatever it accepts, msgspec decodes to the same values. Raises only ``MemoryError``."""

    # ---- queries -------------------------------------------------------------------------------

    def num_blocks(self) -> int:
        n: int = self._t.size()
        return n

    def find_matches(self, block_hashes: Sequence[int]) -> dict[str, int]:
        scores: dict[str, int] = self._t.find(block_hashes)
        return scores

    def block_masks(self) -> dict[int, int]:
        return {h: int.from_bytes(m, "little") for h, m, _ in self._t.items()}

    def sequence_starts(self) -> set[int]:
        return {h for h, _, root in self._t.items() if root}

    # ---- snapshots -----------------------------------------------------------------------------

    def snapshot(self) -> RadixTreeState:
        hashes, masks, roots = self._t.dump()
        return RadixTreeState(
            workers=self._worker_states(),
            mask_words=self._t.words(),
            hashes=hashes,
            masks=masks,
            roots=roots,
            gaps=self.gaps,
            unknown_parent_events=self.unknown_parent_events,
            unknown_removed_blocks=self.unknown_removed_blocks,
        )

    def restore(self, state: RadixTreeState) -> None:
        assert _native is not None  # __init__ checked
        top_slot = self._check_state(state)
        # A table of W words holds slots 0 .. 64 W - 2 (see _add_worker).
        table = _native.Table(max(1, (top_slot + 65) // 64), int.from_bytes(os.urandom(8), "little"))
        counts = table.load(state.hashes, state.masks, state.mask_words, state.roots)  # ValueError
        self._check_counts(state, counts)
        for w in state.workers:
            table.set_name(w.slot, w.worker_id)
        self._restore_workers(state, top_slot)
        self._t = table

    # ---- updates -------------------------------------------------------------------------------

    def apply_parsed(
        self, worker_id: str, event_id: int, kind: int, parent_hash: int | None, packed: bytes
    ) -> EventGap | None:
        """:meth:`apply` for one event of :meth:`parse`'s result (or of :func:`pack_event`)."""
        # The indexer's hot path: _note_event_id inlined.
        last = self._last_event_id.get(worker_id)
        self._last_event_id[worker_id] = event_id
        gap = None
        if (event_id != last + 1) if last is not None else (event_id != 0):
            gap = EventGap(worker_id, 0 if last is None else last + 1, event_id)
            self.gaps += 1
        slot = self._slot.get(worker_id)
        if slot is None:
            slot = self._add_worker(worker_id)
        if kind == KIND_STORED:
            if packed:
                added, parent_known = self._t.store(slot, packed, parent_hash is None, parent_hash)
                if not parent_known:
                    self.unknown_parent_events += 1
                self._count[worker_id] += added
        elif kind == KIND_REMOVED:
            removed = self._t.remove(slot, packed)
            self.unknown_removed_blocks += len(packed) // 8 - removed
            self._count[worker_id] -= removed
        elif kind == KIND_CLEARED:
            self._t.clear_slot(slot)
            self._count[worker_id] = 0
        else:
            raise ValueError(f"unknown parsed event kind {kind!r}")
        return gap

    def apply(self, worker_id: str, event: KvEvent | FastKvEvent) -> EventGap | None:
        return self.apply_parsed(worker_id, *pack_event(event))

    def remove_worker(self, worker_id: str) -> None:
        held = self._count.get(worker_id)
        slot = self._release_slot(worker_id)
        if slot is None:
            return
        if held:
            self._t.clear_slot(slot)
        self._t.set_name(slot, None)

    def _add_worker(self, worker_id: str) -> int:
        # A table of W words holds slots 0 .. 64 W - 2 (bit 63 of its last word is the
        # sequence-start flag).
        words = (self._next_slot() + 65) // 64
        if words > self._t.words():
            self._t.widen(words)  # before any bookkeeping changes: it may raise MemoryError
        slot = self._take_slot(worker_id)
        self._t.set_name(slot, worker_id)
        return slot

    # ---- integrity (tests) ---------------------------------------------------------------------

    def check_integrity(self) -> None:
        errors = self._slot_errors()
        items = self._t.items()
        if len(items) != self._t.size():
            errors.append(f"table lists {len(items)} blocks, counts {self._t.size()}")
        errors += self._count_errors(int.from_bytes(m, "little") for _, m, _ in items)
        names = self._t.names()
        want = [*self._slot_names, *([None] * (len(names) - len(self._slot_names)))]
        if names != want:
            errors.append("the table's slot names differ from the workers' slots")
        if errors:
            raise RuntimeError("; ".join(errors[:20]))


def pack_event(event: KvEvent | FastKvEvent) -> ParsedEvent:
    """A decoded event in :meth:`NativeRadixTree.parse`'s form (``TypeError`` for an unknown
    event kind)."""
    data = event.data
    if isinstance(data, _STORED):
        return event.event_id, KIND_STORED, data.parent_hash, _pack(map(_block_hash, data.blocks))
    if isinstance(data, _REMOVED):
        return event.event_id, KIND_REMOVED, None, _pack(data.block_hashes)
    if isinstance(data, _CLEARED):
        return event.event_id, KIND_CLEARED, None, b""
    raise TypeError(f"unknown KV event data {type(data).__name__}")


def _choose(impl: str | None) -> type[BaseRadixTree]:
    impl = (impl or os.environ.get(IMPL_ENV) or "auto").strip().lower()
    if impl == "python":
        return PyRadixTree
    if impl == "native":
        if _native is None:
            raise RuntimeError(f"{IMPL_ENV}=native but tandem.kvbm._radix_native is not built")
        return NativeRadixTree
    if impl != "auto":
        raise ValueError(f"{IMPL_ENV} must be auto, native or python, not {impl!r}")
    return NativeRadixTree if _native is not None else PyRadixTree


def make_radix_tree(impl: str | None = None) -> BaseRadixTree:
    """A new tree: ``impl`` ``"native"``, ``"python"`` or ``"auto"`` (the native one when built);
    default: the ``TANDEM_RADIX`` environment variable, else ``auto``."""
    return _choose(impl)()


try:
    RadixTree: type[BaseRadixTree] = _choose(None)
except (ValueError, RuntimeError):  # bad TANDEM_RADIX: make_radix_tree() raises; importing works
    RadixTree = NativeRadixTree if _native is not None else PyRadixTree
"""The implementation in use (chosen at import: ``TANDEM_RADIX``, else native when built)."""

NATIVE: bool = RadixTree is NativeRadixTree
""":data:`RadixTree` is the native implementation."""


__all__ = [
    "IMPL_ENV",
    "KIND_CLEARED",
    "KIND_REMOVED",
    "KIND_STORED",
    "MAX_MASK_WORDS",
    "NATIVE",
    "NATIVE_AVAILABLE",
    "BaseRadixTree",
    "EventGap",
    "NativeRadixTree",
    "ParsedEvent",
    "PyRadixTree",
    "RadixTree",
    "make_radix_tree",
    "pack_event",
]
