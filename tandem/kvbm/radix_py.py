"""The pure-Python radix tree, :class:`PyRadixTree`: a ``dict`` of int bitmasks, the reference
implementation and the fallback when the C extension is not built, with the snapshot's
little-endian u64 packing (``_pack_le`` / ``_unpack_le``; only this tree uses them, the native one
packs in C). Import it from :mod:`tandem.kvbm.radix`, which holds the shared base class, the event
semantics and the choice of implementation."""

from __future__ import annotations

import sys
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import compress, filterfalse, repeat
from operator import and_, not_, xor

from tandem.kvbm._wire import FastKvEvent
from tandem.kvbm.radix import _CLEARED, _REMOVED, _STORED, _U64, BaseRadixTree, EventGap, _block_hash
from tandem.protocol.messages import KvEvent, RadixTreeState

_NAMES_CACHE_MAX = 4096


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


__all__ = ["PyRadixTree"]
