"""RadixTree: KV events → blocks per worker; overlap scores checked against a reference model."""

from __future__ import annotations

import random

import pytest

from tandem.kvbm.hashing import compute_block_hashes, compute_local_hashes
from tandem.kvbm.manager import KvCacheManager
from tandem.kvbm.radix import EventGap, RadixTree
from tandem.protocol.messages import KvCleared, KvEvent, KvRemoved, KvStored, StoredBlock

BS = 4


class Events:
    """Builds one worker's events with consecutive ids."""

    def __init__(self) -> None:
        self.next_id = 0

    def _ev(self, data: KvStored | KvRemoved | KvCleared) -> KvEvent:
        ev = KvEvent(event_id=self.next_id, data=data)
        self.next_id += 1
        return ev

    def stored(self, tokens: list[int], start: int = 0, stop: int | None = None) -> KvEvent:
        seq = compute_block_hashes(tokens, BS)
        local = compute_local_hashes(tokens, BS)
        stop = len(seq) if stop is None else stop
        blocks = [StoredBlock(block_hash=seq[i], tokens_hash=local[i]) for i in range(start, stop)]
        return self._ev(KvStored(blocks=blocks, parent_hash=seq[start - 1] if start else None))

    def removed(self, hashes: list[int]) -> KvEvent:
        return self._ev(KvRemoved(block_hashes=hashes))

    def cleared(self) -> KvEvent:
        return self._ev(KvCleared())


def toks(n: int, base: int = 0) -> list[int]:
    return [base + i for i in range(n)]


def test_store_match_remove() -> None:
    tree = RadixTree()
    a, b = Events(), Events()
    p = toks(20)  # 5 blocks
    h = compute_block_hashes(p, BS)
    assert tree.apply("A", a.stored(p)) is None
    assert tree.apply("B", b.stored(p, 0, 2)) is None
    tree.check_integrity()
    assert tree.num_blocks() == 5
    assert tree.workers() == {"A", "B"}
    assert tree.find_matches(h) == {"A": 5, "B": 2}
    assert tree.find_matches(h[:3]) == {"A": 3, "B": 2}
    assert tree.find_matches(h[1:]) == {}  # not a prefix from the root
    assert tree.find_matches([]) == {}
    assert tree.find_matches(compute_block_hashes(toks(20, base=1), BS)) == {}
    # Diverging sequence sharing the first 2 blocks.
    q = [*p[:8], *toks(8, base=500)]
    tree.apply("B", b.stored(q, 2))
    assert tree.find_matches(compute_block_hashes(q, BS)) == {"B": 4, "A": 2}
    assert tree.num_blocks() == 7
    # A evicts its deepest two blocks.
    tree.apply("A", a.removed([h[4], h[3]]))
    assert tree.find_matches(h) == {"A": 3, "B": 2}
    assert tree.num_blocks() == 5  # h[3], h[4] pruned: nobody holds them
    assert tree.worker_num_blocks("A") == 3
    tree.check_integrity()
    # A removes a middle block: its leading run stops there.
    tree.apply("A", a.removed([h[1]]))
    assert tree.find_matches(h) == {"A": 1, "B": 2}
    tree.check_integrity()
    tree.apply("B", b.cleared())
    assert tree.find_matches(h) == {"A": 1}
    assert tree.workers() == {"A", "B"}  # cleared, but still known
    tree.remove_worker("A")
    assert tree.find_matches(h) == {}
    assert tree.num_blocks() == 0 and tree.workers() == {"B"}
    assert tree._nodes == {}  # everything pruned
    tree.check_integrity()


def test_event_id_gaps_are_reported() -> None:
    tree = RadixTree()
    ev = Events()
    p = toks(8)
    assert tree.last_event_id("W") is None
    assert tree.apply("W", ev.stored(p, 0, 1)) is None
    assert tree.last_event_id("W") == 0
    ev.next_id = 5  # events 1..4 lost
    gap = tree.apply("W", ev.stored(p, 1, 2))
    assert gap == EventGap("W", expected=1, got=5) and gap.missed == 4
    assert tree.last_event_id("W") == 5
    ev.next_id = 0  # worker restarted
    gap = tree.apply("W", ev.cleared())
    assert gap is not None and gap.missed == 0 and gap.expected == 6
    assert tree.gaps == 2
    # A first event that is not 0 is a gap too (events before the indexer started).
    late = Events()
    late.next_id = 3
    assert tree.apply("X", late.cleared()) == EventGap("X", 0, 3)
    tree.remove_worker("W")
    assert tree.last_event_id("W") is None


def test_unknown_parent_is_attached_detached_then_linked() -> None:
    tree = RadixTree()
    a, b = Events(), Events()
    p = toks(16)
    h = compute_block_hashes(p, BS)
    tree.apply("A", a.stored(p, 2))  # blocks 2, 3; parent h[1] never seen
    assert tree.unknown_parent_events == 1
    assert tree.num_blocks() == 2
    assert tree.find_matches(h) == {}  # not reachable from the root
    tree.check_integrity()
    tree.apply("B", b.stored(p, 0, 2))  # someone stores blocks 0, 1: the subtree links in
    assert tree.find_matches(h) == {"B": 2}  # A lacks blocks 0, 1 so its leading run is 0
    tree.apply("A", a.stored(p, 0, 2))
    assert tree.find_matches(h) == {"A": 4, "B": 2}
    tree.check_integrity()
    tree.remove_worker("A")
    tree.remove_worker("B")
    assert tree._nodes == {} and tree.num_blocks() == 0


def test_unknown_removals_are_counted_not_fatal() -> None:
    tree = RadixTree()
    ev = Events()
    tree.apply("A", ev.removed([1, 2, 3]))
    assert tree.unknown_removed_blocks == 3
    tree.check_integrity()


def test_integrity_check_can_fail() -> None:
    tree = RadixTree()
    tree.apply("A", Events().stored(toks(8)))
    tree._worker_blocks["A"].add(42)
    with pytest.raises(RuntimeError):
        tree.check_integrity()


def _reference_matches(held: dict[str, set[int]], query: list[int]) -> dict[str, int]:
    """Reference model: a worker's score is the length of the leading run it holds."""
    out = {}
    for w, hashes in held.items():
        n = 0
        while n < len(query) and query[n] in hashes:
            n += 1
        if n:
            out[w] = n
    return out


@pytest.mark.parametrize("seed", range(5))
def test_random_events_match_reference_model(seed: int) -> None:
    """Random stores / removals / clears / worker removals from several workers over sequences
    with shared prefixes, some events lost (the reference model never sees them either, exactly
    like the tree): find_matches always equals the leading-run reference."""
    rng = random.Random(seed)
    workers = [f"w{i}" for i in range(4)]
    # A small universe of sequences sharing prefixes (tokens from a tiny alphabet).
    trunks = [[rng.randrange(2) for _ in range(BS * rng.randrange(1, 4))] for _ in range(3)]
    seqs = [
        [*rng.choice(trunks), *(rng.randrange(2) for _ in range(BS * rng.randrange(0, 4)))] for _ in range(12)
    ]
    tree = RadixTree()
    gens = {w: Events() for w in workers}
    held: dict[str, set[int]] = {}
    for _ in range(1500):
        w = rng.choice(workers)
        r = rng.random()
        if r < 0.55:
            s = rng.choice(seqs)
            n = len(s) // BS
            if n == 0:
                continue
            start = rng.randrange(n)
            stop = rng.randrange(start + 1, n + 1)
            ev = gens[w].stored(s, start, stop)
            assert isinstance(ev.data, KvStored)
            new = {b.block_hash for b in ev.data.blocks}
        elif r < 0.85:
            mine = sorted(held.get(w, ()))
            if not mine:
                continue
            gone = rng.sample(mine, rng.randrange(1, min(4, len(mine)) + 1))
            ev = gens[w].removed(gone)
        elif r < 0.9:
            ev = gens[w].cleared()
        else:
            tree.remove_worker(w)
            held.pop(w, None)
            gens[w] = Events()
            continue
        if rng.random() < 0.05:
            continue  # event lost in transit: neither the tree nor the reference sees it
        tree.apply(w, ev)
        data = ev.data
        if isinstance(data, KvStored):
            held.setdefault(w, set()).update(new)
        elif isinstance(data, KvRemoved):
            held.setdefault(w, set()).difference_update(data.block_hashes)
        else:
            held[w] = set()
        tree.check_integrity()
        for s in rng.sample(seqs, 3):
            q = compute_block_hashes(s, BS)
            assert tree.find_matches(q) == _reference_matches(held, q)
        assert tree.num_blocks() == len(set().union(set(), *held.values()))
    assert tree.unknown_parent_events > 0  # the detached-subtree path was exercised
    for w in workers:
        tree.remove_worker(w)
    assert tree.num_blocks() == 0 and tree._nodes == {}


def test_indexer_agrees_with_workers_caches() -> None:
    """End to end without NATS: several KvCacheManagers run random requests, their events feed
    one tree, and the tree's overlap score for every worker equals what that worker would
    actually hit (lookup_prefix)."""
    rng = random.Random(99)
    managers = {f"w{i}": KvCacheManager(24, BS) for i in range(3)}
    trunks = [[rng.randrange(3) for _ in range(BS * 3)] for _ in range(3)]
    prompts = [
        [*rng.choice(trunks), *(rng.randrange(3) for _ in range(rng.randrange(0, 14)))] for _ in range(15)
    ]
    tree = RadixTree()
    running: dict[str, list[str]] = {w: [] for w in managers}
    for step in range(1500):
        w = rng.choice(list(managers))
        m = managers[w]
        if rng.random() < 0.5 or not running[w]:
            rid = f"{w}-{step}"
            p = rng.choice(prompts)
            m.begin(rid, p, compute_block_hashes(p, BS))
            if m.grow(rid, len(p)):
                m.commit(rid, p, len(p))
                running[w].append(rid)
            else:
                m.free(rid)
        else:
            m.free(running[w].pop(rng.randrange(len(running[w]))))
        if rng.random() < 0.003:
            m.clear()
        for e in m.take_events():
            assert tree.apply(w, e) is None  # no gaps: every event delivered in order
        q = compute_block_hashes(rng.choice(prompts), BS)
        want = {name: mm.lookup_prefix(prompt_of(q, prompts)) for name, mm in managers.items()}
        assert tree.find_matches(q) == {k: v for k, v in want.items() if v}
    tree.check_integrity()


def prompt_of(hashes: list[int], prompts: list[list[int]]) -> list[int]:
    for p in prompts:
        if compute_block_hashes(p, BS) == hashes:
            return p
    raise AssertionError("unknown prompt")


def test_find_matches_is_fast_on_a_big_tree() -> None:
    import time

    tree = RadixTree()
    for w in range(8):
        ev = Events()
        for i in range(200):
            tree.apply(f"w{w}", ev.stored(toks(BS * 64, base=i * 1000 + w % 2)))
    q = compute_block_hashes(toks(BS * 64, base=5000), BS)
    t0 = time.perf_counter()
    for _ in range(200):
        res = tree.find_matches(q)
    per = (time.perf_counter() - t0) / 200
    assert res == {"w0": 64, "w2": 64, "w4": 64, "w6": 64}
    assert per < 0.005, f"find_matches over 64 blocks took {per * 1e3:.2f} ms"
