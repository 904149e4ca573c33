"""RadixTree: which workers hold which cached blocks, for the KV indexer and router.

Each node is one KV block, identified by its *sequence hash* (which already encodes the whole
prefix), and holds the set of workers that have it cached. A node's children are the blocks
that follow it in some sequence, keyed by their sequence hash; the root stands for the empty
prefix. The tree is built from the workers' KV events (:mod:`tandem.protocol.messages`):

* ``KvStored{parent_hash, blocks}`` attaches the chain ``blocks`` under the node
  ``parent_hash`` (the root when None) and adds the worker to each of them.
* ``KvRemoved{block_hashes}`` removes the worker from those nodes.
* ``KvCleared`` removes the worker from every node.

A node no worker holds and with no children is pruned. A ``KvStored`` whose parent the tree has
never seen (an earlier event was lost) is still recorded: its chain hangs under a *detached*
placeholder for the parent, invisible to :meth:`RadixTree.find_matches` until some worker
stores that parent block (then the subtree is linked in place). Such events are counted in
``unknown_parent_events``.

:meth:`RadixTree.find_matches` walks the query's sequence hashes from the root and scores each
worker with the number of leading blocks it holds (Dynamo's ``find_matches`` / overlap score).

Event ids: each worker's events count up from 0; :meth:`RadixTree.apply` returns an
:class:`EventGap` when an id is not the previous one + 1 (lost events, or a restarted worker)
so the indexer can log it. Events are applied regardless.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tandem.protocol.messages import KvCleared, KvEvent, KvRemoved, KvStored


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


class _Node:
    __slots__ = ("children", "parent", "seq_hash", "workers")

    def __init__(self, seq_hash: int | None, parent: _Node | None) -> None:
        self.seq_hash = seq_hash
        self.parent = parent  # None for the root and for detached placeholders' tops
        self.children: dict[int, _Node] = {}
        self.workers: set[str] = set()


class RadixTree:
    """Blocks (by sequence hash) → workers holding them. Not thread-safe; one owner applies
    events and answers queries."""

    def __init__(self) -> None:
        self._root = _Node(None, None)
        self._nodes: dict[int, _Node] = {}  # every node but the root, linked or detached
        self._worker_blocks: dict[str, set[int]] = {}  # worker -> sequence hashes it holds
        self._last_event_id: dict[str, int] = {}
        self._num_held = 0  # nodes held by at least one worker
        self.unknown_parent_events = 0
        self.unknown_removed_blocks = 0
        self.gaps = 0

    # ---- queries -------------------------------------------------------------------------------

    def num_blocks(self) -> int:
        """Distinct blocks held by at least one worker."""
        return self._num_held

    def workers(self) -> set[str]:
        """Workers the tree has applied events from (and not removed), holding blocks or not."""
        return set(self._worker_blocks)

    def worker_num_blocks(self, worker_id: str) -> int:
        """Blocks the worker holds (0 if unknown)."""
        return len(self._worker_blocks.get(worker_id, ()))

    def last_event_id(self, worker_id: str) -> int | None:
        """Id of the last event applied for the worker, None if none was."""
        return self._last_event_id.get(worker_id)

    def find_matches(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """For each worker, how many leading blocks of ``block_hashes`` (a prompt's sequence
        hashes, in order) it holds. Workers matching 0 blocks are left out. Stops walking as
        soon as no worker holds the next block. O(matched depth × workers dropping out)."""
        scores: dict[str, int] = {}
        node = self._root
        active: set[str] = set()
        depth = 0
        for seq_hash in block_hashes:
            child = node.children.get(seq_hash)
            if child is None or not child.workers:
                break
            if depth == 0:
                active = set(child.workers)
            elif not active <= child.workers:
                still = active & child.workers
                for worker in active - still:
                    scores[worker] = depth
                active = still
                if not active:
                    break
            node = child
            depth += 1
        for worker in active:
            scores[worker] = depth
        return scores

    # ---- updates -------------------------------------------------------------------------------

    def apply(self, worker_id: str, event: KvEvent) -> EventGap | None:
        """Apply one of ``worker_id``'s events. Returns an :class:`EventGap` if its id does not
        follow the last one applied for that worker (the event is applied anyway)."""
        expected = self._last_event_id.get(worker_id, -1) + 1
        gap = None
        if event.event_id != expected:
            gap = EventGap(worker_id, expected, event.event_id)
            self.gaps += 1
        self._last_event_id[worker_id] = event.event_id
        held = self._worker_blocks.setdefault(worker_id, set())
        data = event.data
        if isinstance(data, KvStored):
            self._store(worker_id, held, data)
        elif isinstance(data, KvRemoved):
            for seq_hash in data.block_hashes:
                if seq_hash in held:
                    self._drop(worker_id, held, seq_hash)
                else:
                    self.unknown_removed_blocks += 1
        elif isinstance(data, KvCleared):
            for seq_hash in list(held):
                self._drop(worker_id, held, seq_hash)
        else:  # pragma: no cover - the protocol union has exactly three members
            raise TypeError(f"unknown KV event data {type(data).__name__}")
        return gap

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker: its blocks and its event-id history. Unknown workers are ignored."""
        held = self._worker_blocks.pop(worker_id, set())
        self._last_event_id.pop(worker_id, None)
        for seq_hash in list(held):
            self._drop(worker_id, held, seq_hash)

    def _store(self, worker_id: str, held: set[int], data: KvStored) -> None:
        if data.parent_hash is None:
            parent = self._root
        else:
            maybe = self._nodes.get(data.parent_hash)
            if maybe is None:
                self.unknown_parent_events += 1
                maybe = self._nodes[data.parent_hash] = _Node(data.parent_hash, None)
            parent = maybe
        for block in data.blocks:
            node = self._nodes.get(block.block_hash)
            if node is None:
                node = self._nodes[block.block_hash] = _Node(block.block_hash, parent)
                parent.children[block.block_hash] = node
            elif node.parent is None and not self._is_ancestor(node, parent):
                # A detached placeholder now learns where it belongs.
                node.parent = parent
                parent.children[block.block_hash] = node
            if worker_id not in node.workers:
                if not node.workers:
                    self._num_held += 1
                node.workers.add(worker_id)
                held.add(block.block_hash)
            parent = node

    @staticmethod
    def _is_ancestor(node: _Node, of: _Node) -> bool:
        """True if ``node`` is ``of`` or above it (linking would make a cycle)."""
        walk: _Node | None = of
        while walk is not None:
            if walk is node:
                return True
            walk = walk.parent
        return False

    def _drop(self, worker_id: str, held: set[int], seq_hash: int) -> None:
        held.discard(seq_hash)
        node: _Node | None = self._nodes.get(seq_hash)
        if node is None or worker_id not in node.workers:
            return
        node.workers.discard(worker_id)
        if not node.workers:
            self._num_held -= 1
        # Prune upwards: nodes nobody holds and with no children.
        while node is not None and node is not self._root and not node.workers and not node.children:
            parent = node.parent
            assert node.seq_hash is not None
            del self._nodes[node.seq_hash]
            if parent is not None:
                del parent.children[node.seq_hash]
            node = parent

    # ---- integrity (tests) ---------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise ``RuntimeError`` unless nodes, parent links, worker sets and the per-worker
        indexes agree and nothing prunable is left. O(tree size)."""
        errors: list[str] = []
        held = 0
        for seq_hash, node in self._nodes.items():
            if node.seq_hash != seq_hash:
                errors.append(f"node {seq_hash:#x} stored under another hash")
            if node.workers:
                held += 1
            elif not node.children:
                errors.append(f"node {seq_hash:#x} is empty and childless but not pruned")
            if node.parent is None:
                if node.workers:
                    errors.append(f"detached placeholder {seq_hash:#x} is held by workers")
            elif node.parent.children.get(seq_hash) is not node:
                errors.append(f"node {seq_hash:#x} is not among its parent's children")
            for worker in node.workers:
                if seq_hash not in self._worker_blocks.get(worker, ()):
                    errors.append(f"node {seq_hash:#x} lists {worker!r}, which does not list it")
        for worker, hashes in self._worker_blocks.items():
            for seq_hash in hashes:
                found = self._nodes.get(seq_hash)
                if found is None or worker not in found.workers:
                    errors.append(f"worker {worker!r} lists {seq_hash:#x}, which does not list it")
        if held != self._num_held:
            errors.append(f"held counter {self._num_held} != {held}")
        if errors:
            raise RuntimeError("; ".join(errors[:20]))


__all__ = ["EventGap", "RadixTree"]
