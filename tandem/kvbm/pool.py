"""The block pool: refcounted KV blocks, an LRU of cached blocks, the prefix cache, KV events.

Every block id ``0..num_blocks-1`` is in exactly one of three states:

* **free** — refcount 0, no hash: holds nothing useful; allocated first.
* **cached** — refcount 0 but registered in the prefix cache under its sequence hash: its KV is
  still valid and a later request with the same prefix can take it back (a *hit*). Cached blocks
  sit in an LRU and are evicted oldest-first when allocation runs out of free blocks.
* **in use** — refcount > 0 (held by one or more requests, or pinned for a transfer). It may
  also be registered (a computed full block), in which case other requests can share it.

This follows vLLM v1's ``BlockPool``/``FreeKVCacheBlockQueue`` design (LRU eviction, touch on
hit, release tail first) with two differences: free and cached blocks live in separate O(1)
queues (so stats can tell them apart), and a prefix-cache hit also compares the block's token
ids, so a 64-bit hash collision can never hand a request someone else's KV.

KV events (Dynamo-compatible, :mod:`tandem.protocol.messages`) describe the registered set:
``KvStored`` when blocks get registered (one event per run of consecutive blocks of a
sequence, with ``parent_hash``), ``KvRemoved`` when a cached block is evicted or dropped,
``KvCleared`` on :meth:`BlockPool.clear`. ``event_id`` counts up from 0. Callers drain them with
:meth:`BlockPool.take_events`; if nobody does, the oldest are dropped past
``max_pending_events`` (ids keep counting, so the indexer sees the gap).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tandem.protocol.messages import KvCleared, KvEvent, KvEventData, KvRemoved, KvStored, StoredBlock


class PoolIntegrityError(RuntimeError):
    """An internal invariant of the pool (or of the manager above it) does not hold."""


class NoFreeBlocksError(RuntimeError):
    """More blocks were requested than are free or evictable (check ``num_free_blocks`` first)."""


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Block counts (blocks, not tokens). ``free + cached + in_use == num_blocks``."""

    num_blocks: int
    free: int
    cached: int
    in_use: int


class Block:
    """Book-keeping of one KV block (the KV bytes live in the engine's tensor at ``block_id``).

    ``seq_hash``/``local_hash``/``token_ids`` are set iff the block is registered in the prefix
    cache (a full, computed block).
    """

    __slots__ = ("block_id", "local_hash", "ref_cnt", "seq_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.seq_hash: int | None = None
        self.local_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"Block(id={self.block_id}, ref={self.ref_cnt}, seq_hash={self.seq_hash})"


class BlockPool:
    """Fixed set of ``num_blocks`` KV blocks of ``block_size`` tokens each.

    Not thread-safe: one owner (the engine) calls it. All operations are O(1) per block.
    Errors in arguments raise ``ValueError``; :class:`NoFreeBlocksError` when an allocation
    cannot be served.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        *,
        max_pending_events: int = 100_000,
    ) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if max_pending_events <= 0:
            raise ValueError(f"max_pending_events must be positive, got {max_pending_events}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free (unregistered, refcount 0) block ids, a LIFO stack (top = last). A fresh pool hands
        # out 0, 1, 2, ... and a released table is pushed back so it is handed out again in the
        # same order: block tables stay contiguous (one NIXL descriptor per run).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks - 1, -1, -1))
        # Cached (registered, refcount 0) block ids, least recently used first.
        self._lru: OrderedDict[int, None] = OrderedDict()
        # Prefix cache: sequence hash -> registered block id (in use or cached).
        self._cached: dict[int, int] = {}
        self._num_in_use = 0
        self._events: deque[KvEvent] = deque()
        self._max_pending_events = max_pending_events
        self._next_event_id = 0
        self.events_dropped = 0

    # ---- queries -------------------------------------------------------------------------------

    def num_free_blocks(self) -> int:
        """Blocks allocatable now: free plus cached (evictable)."""
        return len(self._free) + len(self._lru)

    def is_evictable(self, block_id: int) -> bool:
        """True if the block is cached with refcount 0 (counted in :meth:`num_free_blocks`)."""
        return block_id in self._lru

    def ref_count(self, block_id: int) -> int:
        return self._block(block_id).ref_cnt

    def block_hash(self, block_id: int) -> int | None:
        """Sequence hash the block is registered under, or None."""
        return self._block(block_id).seq_hash

    def _block(self, block_id: int) -> Block:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} out of range [0, {self.num_blocks})")
        return self.blocks[block_id]

    def get_cached(self, seq_hash: int, token_ids: Sequence[int]) -> int | None:
        """Block id registered under ``seq_hash`` whose tokens equal ``token_ids``, else None.

        ``token_ids``: exactly the ``block_size`` tokens of that block. Takes no reference and
        does not touch the LRU order (use :meth:`touch`). A hash hit with different tokens (a
        collision) is a miss.
        """
        block_id = self._cached.get(seq_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.token_ids is None or len(token_ids) != self.block_size:
            return None
        if block.token_ids != tuple(token_ids):
            return None
        return block_id

    def stats(self) -> PoolStats:
        return PoolStats(
            num_blocks=self.num_blocks,
            free=len(self._free),
            cached=len(self._lru),
            in_use=self._num_in_use,
        )

    # ---- allocation and references -------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks (refcount 1 each, unregistered) and return their ids.

        Free blocks go first, then cached blocks are evicted least recently used first (each
        eviction unregisters the block and emits ``KvRemoved``). Raises
        :class:`NoFreeBlocksError` (nothing changed) if fewer than ``n`` are available.
        """
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free_blocks():
            raise NoFreeBlocksError(f"need {n} blocks, only {self.num_free_blocks()} free or evictable")
        out: list[int] = []
        evicted: list[int] = []
        for _ in range(n):
            if self._free:
                block_id, _ = self._free.popitem()
                block = self.blocks[block_id]
            else:
                block_id, _ = self._lru.popitem(last=False)
                block = self.blocks[block_id]
                assert block.seq_hash is not None  # invariant: everything in the LRU is registered
                evicted.append(block.seq_hash)
                self._unregister(block)
            block.ref_cnt = 1
            self._num_in_use += 1
            out.append(block_id)
        if evicted:
            self._emit_removed(evicted)
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on each block (a prefix hit, or pinning a shared block).

        A cached block leaves the LRU and becomes in use. Raises ``ValueError`` for a free
        (unregistered, unreferenced) block: its content is garbage.
        """
        block_ids = list(block_ids)
        for block_id in block_ids:
            block = self._block(block_id)
            if block.ref_cnt == 0 and block_id not in self._lru:
                raise ValueError(f"block {block_id} is free; only cached or in-use blocks can be touched")
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._lru[block_id]
                self._num_in_use += 1
            block.ref_cnt += 1

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block, **last block first**.

        Blocks reaching refcount 0 become cached (if registered; appended to the LRU in release
        order, so a sequence's deepest blocks are evicted before its prefix, which other requests
        are likelier to share) or free (if not). Raises ``ValueError`` (nothing changed) if a
        block would go below refcount 0.
        """
        for block_id, n in Counter(block_ids).items():
            if self._block(block_id).ref_cnt < n:
                raise ValueError(f"block {block_id} released more often than referenced")
        freed: list[int] = []
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._num_in_use -= 1
                if block.seq_hash is not None:
                    self._lru[block_id] = None
                else:
                    freed.append(block_id)
        # Pushed tail first, so the table's first block is on top and is handed out first again.
        for block_id in freed:
            self._free[block_id] = None

    # ---- prefix cache --------------------------------------------------------------------------

    def cache_blocks(
        self,
        block_ids: Sequence[int],
        seq_hashes: Sequence[int],
        local_hashes: Sequence[int],
        token_ids: Sequence[int],
        parent_hash: int | None,
    ) -> int:
        """Register consecutive full, computed blocks of one sequence in the prefix cache.

        ``block_ids[i]`` holds the KV of tokens ``token_ids[i*B:(i+1)*B]`` (so ``token_ids`` has
        ``len(block_ids) * block_size`` tokens) whose hashes are ``seq_hashes[i]`` /
        ``local_hashes[i]``; ``parent_hash`` is the sequence hash of the block before
        ``block_ids[0]`` (None at the start of the sequence). Blocks must be in use.

        A block whose sequence hash is already registered (another request computed the same
        prefix concurrently, or a collision) stays unregistered; it is freed, not cached, when
        released. Emits ``KvStored`` for the newly registered blocks (a run broken by such a skip
        continues in a new event with the right parent). Returns how many were registered.
        No-op returning 0 when prefix caching is disabled.
        """
        n = len(block_ids)
        if len(seq_hashes) != n or len(local_hashes) != n or len(token_ids) != n * self.block_size:
            raise ValueError(
                f"cache_blocks: {n} blocks need {n} seq hashes, {n} local hashes and "
                f"{n * self.block_size} tokens; got {len(seq_hashes)}, {len(local_hashes)}, "
                f"{len(token_ids)}"
            )
        for block_id in block_ids:
            block = self._block(block_id)
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block_id} is not in use; only in-use blocks can be cached")
            if block.seq_hash is not None:
                raise ValueError(f"block {block_id} is already registered")
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        registered = 0
        run: list[StoredBlock] = []
        run_parent = parent_hash
        prev = parent_hash
        for i, block_id in enumerate(block_ids):
            seq_hash = seq_hashes[i]
            if seq_hash in self._cached:
                if run:
                    self._emit_stored(run_parent, run)
                    run = []
            else:
                block = self.blocks[block_id]
                block.seq_hash = seq_hash
                block.local_hash = local_hashes[i]
                block.token_ids = tuple(token_ids[i * bs : (i + 1) * bs])
                self._cached[seq_hash] = block_id
                registered += 1
                if not run:
                    run_parent = prev
                run.append(StoredBlock(block_hash=seq_hash, tokens_hash=local_hashes[i]))
            prev = seq_hash
        if run:
            self._emit_stored(run_parent, run)
        return registered

    def uncache_blocks(self, block_ids: Sequence[int]) -> None:
        """Unregister blocks whose KV turned out not to be computed (the step that was to
        compute them failed after :meth:`cache_blocks` registered them at scheduling time).

        Each block must be registered (``ValueError`` otherwise, nothing changed). A cached
        (unreferenced) one becomes free; in-use ones stay with their holders, unregistered.
        Emits ``KvRemoved`` for their hashes, so indexers forget them too.
        """
        for block_id in block_ids:
            if self._block(block_id).seq_hash is None:
                raise ValueError(f"block {block_id} is not registered")
        if len(set(block_ids)) != len(block_ids):
            raise ValueError("uncache_blocks: a block is listed twice")
        removed: list[int] = []
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block.seq_hash is not None  # checked above
            removed.append(block.seq_hash)
            self._unregister(block)
            if block.ref_cnt == 0:
                del self._lru[block_id]
                self._free[block_id] = None
        if removed:
            self._emit_removed(removed)

    def clear(self) -> None:
        """Forget the whole prefix cache and emit ``KvCleared``.

        Cached blocks become free; in-use blocks stay with their owners but are unregistered
        (they will be freed, not cached, when released), so the pool agrees with what an indexer
        that applied ``KvCleared`` believes.
        """
        for block_id in self._lru:
            self._free[block_id] = None
        self._lru.clear()
        for block_id in self._cached.values():
            self._unregister_fields(self.blocks[block_id])
        self._cached.clear()
        if self.enable_prefix_caching:
            self._push_event(KvCleared())

    def _unregister(self, block: Block) -> None:
        assert block.seq_hash is not None
        del self._cached[block.seq_hash]
        self._unregister_fields(block)

    @staticmethod
    def _unregister_fields(block: Block) -> None:
        block.seq_hash = None
        block.local_hash = None
        block.token_ids = None

    # ---- events --------------------------------------------------------------------------------

    def take_events(self) -> list[KvEvent]:
        """Return and forget the pending KV events, oldest first (ids strictly increasing)."""
        events = list(self._events)
        self._events.clear()
        return events

    @property
    def next_event_id(self) -> int:
        """The id the next event will get (= number of events emitted so far)."""
        return self._next_event_id

    def _emit_stored(self, parent_hash: int | None, blocks: list[StoredBlock]) -> None:
        last = self._events[-1] if self._events else None
        # Coalesce with the pending event if it ends exactly where this run starts (e.g. decode
        # filling one block per commit within a step): same meaning, fewer messages.
        if (
            last is not None
            and isinstance(last.data, KvStored)
            and parent_hash is not None
            and last.data.blocks[-1].block_hash == parent_hash
        ):
            last.data.blocks.extend(blocks)
            return
        self._push_event(KvStored(blocks=blocks, parent_hash=parent_hash))

    def _emit_removed(self, seq_hashes: list[int]) -> None:
        last = self._events[-1] if self._events else None
        if last is not None and isinstance(last.data, KvRemoved):
            last.data.block_hashes.extend(seq_hashes)
            return
        self._push_event(KvRemoved(block_hashes=seq_hashes))

    def _push_event(self, data: KvEventData) -> None:
        if len(self._events) >= self._max_pending_events:
            self._events.popleft()
            self.events_dropped += 1
        self._events.append(KvEvent(event_id=self._next_event_id, data=data))
        self._next_event_id += 1

    # ---- integrity -----------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise :class:`PoolIntegrityError` unless every invariant holds. O(num_blocks).

        free + cached + in-use == total; refcounts >= 0; free blocks are unreferenced and
        unregistered; LRU blocks are unreferenced and registered; every registered block is in
        the prefix-cache map under its hash and vice versa; no block is in two states.
        """
        errors: list[str] = []
        overlap = self._free.keys() & self._lru.keys()
        if overlap:
            errors.append(f"blocks both free and cached: {sorted(overlap)[:8]}")
        in_use = 0
        for block in self.blocks:
            bid = block.block_id
            if block.ref_cnt < 0:
                errors.append(f"block {bid} has refcount {block.ref_cnt}")
            elif block.ref_cnt > 0:
                in_use += 1
                if bid in self._free or bid in self._lru:
                    errors.append(f"block {bid} is in use (ref {block.ref_cnt}) but free or cached")
            elif bid not in self._free and bid not in self._lru:
                errors.append(f"block {bid} has refcount 0 but is neither free nor cached")
            registered = block.seq_hash is not None
            if registered != (block.token_ids is not None) or registered != (block.local_hash is not None):
                errors.append(f"block {bid} has a partial registration")
            if registered:
                assert block.seq_hash is not None
                if self._cached.get(block.seq_hash) != bid:
                    errors.append(f"block {bid} registered as {block.seq_hash:#x} but the map disagrees")
                if block.token_ids is not None and len(block.token_ids) != self.block_size:
                    errors.append(f"block {bid} stores {len(block.token_ids)} tokens")
                if bid in self._free:
                    errors.append(f"block {bid} is registered but on the free list")
            elif bid in self._lru:
                errors.append(f"block {bid} is in the LRU but unregistered")
        for seq_hash, bid in self._cached.items():
            if not 0 <= bid < self.num_blocks or self.blocks[bid].seq_hash != seq_hash:
                errors.append(f"prefix cache maps {seq_hash:#x} to block {bid}, which has another hash")
        if in_use != self._num_in_use:
            errors.append(f"in-use counter {self._num_in_use} != {in_use} blocks with refs")
        if len(self._free) + len(self._lru) + in_use != self.num_blocks:
            errors.append(
                f"free {len(self._free)} + cached {len(self._lru)} + in use {in_use} != {self.num_blocks}"
            )
        if not self.enable_prefix_caching and (self._cached or self._lru):
            errors.append("prefix caching is disabled but blocks are registered")
        if errors:
            raise PoolIntegrityError("; ".join(errors))


__all__ = ["Block", "BlockPool", "NoFreeBlocksError", "PoolIntegrityError", "PoolStats"]
