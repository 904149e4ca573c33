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

Two implementations, same API and results, each in its own module (this one holds the shared
:class:`BaseRadixTree`, :class:`EventGap` and the choice between them, and re-exports both):

* :class:`NativeRadixTree` (:mod:`tandem.kvbm.radix_native`) — the table in C
  (``tandem/kvbm/_radix_native.c``, an optional extension built by ``pip install -e .`` when a C
  compiler is present): an open-addressing hash table of ``[hash, mask words]`` entries, plus a
  strict parser of the indexer's msgpack ``KvEventBatch`` payloads (:meth:`NativeRadixTree.parse`,
  the indexer's fast path). Hashes are u64; an int outside that range (no tandem or Dynamo worker
  sends one) is taken modulo 2**64.
* :class:`PyRadixTree` (:mod:`tandem.kvbm.radix_py`) — pure Python, a ``dict`` of int bitmasks
  (per-block loops inside C builtins); the reference, and the fallback when the extension is not
  built.

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
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter

from tandem.kvbm._wire import FastCleared, FastKvEvent, FastRemoved, FastStored
from tandem.protocol.messages import (
    KvCleared,
    KvEvent,
    KvRemoved,
    KvStored,
    RadixTreeState,
    RadixWorkerState,
)

IMPL_ENV = "TANDEM_RADIX"
# Shared by both implementations (radix_py.py, radix_native.py).
_STORED = (KvStored, FastStored)
_REMOVED = (KvRemoved, FastRemoved)
_CLEARED = (KvCleared, FastCleared)
_block_hash = attrgetter("block_hash")
_U64 = (1 << 64) - 1
#: Most mask words a snapshot may use (the native table's limit: 64 * 16384 - 1 worker slots).
MAX_MASK_WORDS = 16384
_MAX_SLOT = 64 * MAX_MASK_WORDS - 2


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


# The implementations subclass BaseRadixTree, so they are imported once it is defined. The private
# helpers that moved with them stay importable from here.
from tandem.kvbm.radix_native import (  # noqa: E402
    KIND_CLEARED,
    KIND_REMOVED,
    KIND_STORED,
    NATIVE_AVAILABLE,
    NativeRadixTree,
    ParsedEvent,
    _native,
    pack_event,
)
from tandem.kvbm.radix_native import _pack as _pack  # noqa: E402
from tandem.kvbm.radix_py import _NAMES_CACHE_MAX as _NAMES_CACHE_MAX  # noqa: E402
from tandem.kvbm.radix_py import PyRadixTree  # noqa: E402
from tandem.kvbm.radix_py import _pack_le as _pack_le  # noqa: E402
from tandem.kvbm.radix_py import _unpack_le as _unpack_le  # noqa: E402


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
