"""The radix tree over the C extension ``tandem.kvbm._radix_native`` (``_radix_native.c``):
:class:`NativeRadixTree`, the extension probe (:data:`NATIVE_AVAILABLE`), the parsed-event form
(:data:`ParsedEvent`, ``KIND_*``) and :func:`pack_event`, which packs a decoded event into it. Import
them from :mod:`tandem.kvbm.radix`, which holds the shared base class, the event semantics and the
choice of implementation. (This module imports without the extension; constructing a
:class:`NativeRadixTree` then raises ``RuntimeError``.)"""

from __future__ import annotations

import importlib
import os
from array import array
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any

from tandem.kvbm._wire import FastKvEvent
from tandem.kvbm.radix import _CLEARED, _REMOVED, _STORED, _U64, BaseRadixTree, EventGap, _block_hash
from tandem.protocol.messages import KvEvent, RadixTreeState

_native: ModuleType | None
try:
    _native = importlib.import_module("tandem.kvbm._radix_native")
except ImportError:  # not built (no C compiler at install time): pure Python only
    _native = None

NATIVE_AVAILABLE: bool = _native is not None
"""The C extension ``tandem.kvbm._radix_native`` is built and importable."""

# Event kinds of a parsed event (NativeRadixTree.parse / apply_parsed).
KIND_STORED, KIND_REMOVED, KIND_CLEARED = 0, 1, 2
ParsedEvent = tuple[int, int, int | None, bytes]
"""``(event_id, kind, parent_hash, packed)``: ``packed`` holds the event's block hashes as
native-order u64 (``array("Q")`` bytes), empty for ``KvCleared``."""


def _pack(hashes: Iterable[int]) -> bytes:
    """Block hashes as native-order u64 bytes (ints outside u64 taken modulo 2**64)."""
    values = list(hashes)
    try:
        return array("Q", values).tobytes()
    except OverflowError:  # a negative or huge hash: only from a misbehaving sender
        return array("Q", [h & _U64 for h in values]).tobytes()


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


__all__ = [
    "KIND_CLEARED",
    "KIND_REMOVED",
    "KIND_STORED",
    "NATIVE_AVAILABLE",
    "NativeRadixTree",
    "ParsedEvent",
    "pack_event",
]
