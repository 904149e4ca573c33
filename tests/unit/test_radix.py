"""RadixTree: KV events → blocks per worker; overlap scores checked against a reference model.
Every tree test runs on both implementations (pure Python and native, see test_radix_native.py)."""

from __future__ import annotations

import importlib
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest

from tandem.kvbm._wire import decode_kv_event_batch
from tandem.kvbm.hashing import compute_block_hashes, compute_local_hashes
from tandem.kvbm.manager import KvCacheManager
from tandem.kvbm.radix import NATIVE_AVAILABLE, BaseRadixTree, EventGap, NativeRadixTree, PyRadixTree
from tandem.protocol.messages import (
    KvCleared,
    KvEvent,
    KvEventBatch,
    KvRemoved,
    KvStored,
    OverlapQuery,
    RadixTreeState,
    StoredBlock,
    decoder,
    encode,
)

PEERS = Path(__file__).resolve().parents[3] / "shared" / "peers"

BS = 4

TreeClass = type[BaseRadixTree]


@pytest.fixture(
    params=[
        pytest.param(PyRadixTree, id="python"),
        pytest.param(
            NativeRadixTree,
            id="native",
            marks=pytest.mark.skipif(
                not NATIVE_AVAILABLE,
                reason="tandem.kvbm._radix_native not built (no C compiler at install time); "
                "test_radix_native.py fails if a compiler exists",
            ),
        ),
    ]
)
def tree_cls(request: pytest.FixtureRequest) -> TreeClass:
    """Every test runs on both implementations: the pure-Python reference and the native one."""
    cls: TreeClass = request.param
    return cls


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


def test_store_match_remove(tree_cls: TreeClass) -> None:
    tree = tree_cls()
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
    assert tree.block_masks() == {}  # everything pruned
    tree.check_integrity()


def test_event_id_gaps_are_reported(tree_cls: TreeClass) -> None:
    tree = tree_cls()
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


def test_unknown_parent_is_attached_detached_then_linked(tree_cls: TreeClass) -> None:
    tree = tree_cls()
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
    assert tree.block_masks() == {} and tree.num_blocks() == 0


def test_unknown_removals_are_counted_not_fatal(tree_cls: TreeClass) -> None:
    tree = tree_cls()
    ev = Events()
    tree.apply("A", ev.removed([1, 2, 3]))
    assert tree.unknown_removed_blocks == 3
    tree.check_integrity()


def test_integrity_check_can_fail(tree_cls: TreeClass) -> None:
    tree = tree_cls()
    tree.apply("A", Events().stored(toks(8)))
    tree._count["A"] += 1
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
def test_random_events_match_reference_model(seed: int, tree_cls: TreeClass) -> None:
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
    tree = tree_cls()
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
    assert tree.num_blocks() == 0 and tree.block_masks() == {}


def test_indexer_agrees_with_workers_caches(tree_cls: TreeClass) -> None:
    """End to end without NATS: several KvCacheManagers run random requests, their events feed
    one tree, and the tree's overlap score for every worker equals what that worker would
    actually hit (lookup_prefix)."""
    rng = random.Random(99)
    managers = {f"w{i}": KvCacheManager(24, BS) for i in range(3)}
    trunks = [[rng.randrange(3) for _ in range(BS * 3)] for _ in range(3)]
    prompts = [
        [*rng.choice(trunks), *(rng.randrange(3) for _ in range(rng.randrange(0, 14)))] for _ in range(15)
    ]
    tree = tree_cls()
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


def test_find_matches_is_fast_on_a_big_tree(tree_cls: TreeClass) -> None:
    import time

    tree = tree_cls()
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


def test_slots_are_reused_after_remove_worker(tree_cls: TreeClass) -> None:
    tree = tree_cls()
    p = toks(12)
    h = compute_block_hashes(p, BS)
    gens = {w: Events() for w in ("a", "b", "c")}
    for w in ("a", "b", "c"):
        tree.apply(w, gens[w].stored(p))
    assert tree.find_matches(h) == {"a": 3, "b": 3, "c": 3}
    tree.remove_worker("b")
    assert tree.find_matches(h) == {"a": 3, "c": 3}  # cached names for the old mask not reused
    tree.apply("d", Events().stored(p, 0, 1))  # takes b's bit position
    assert tree._slot["d"] == 1
    assert tree.find_matches(h) == {"a": 3, "c": 3, "d": 1}
    tree.check_integrity()
    assert tree.worker_num_blocks("d") == 1 and tree.worker_num_blocks("b") == 0


def test_duplicates_and_restores_are_idempotent(tree_cls: TreeClass) -> None:
    tree = tree_cls()
    a, b = Events(), Events()
    p = toks(12)
    h = compute_block_hashes(p, BS)
    tree.apply("A", a.stored(p))
    tree.apply("B", b.stored(p, 0, 1))
    tree.apply("B", b.stored(p, 0, 2))  # block 0 again
    assert tree.worker_num_blocks("B") == 2
    dup = KvEvent(
        event_id=b.next_id,
        data=KvStored(blocks=[StoredBlock(block_hash=h[2], tokens_hash=0)] * 2, parent_hash=h[1]),
    )
    b.next_id += 1
    tree.apply("B", dup)
    assert tree.worker_num_blocks("B") == 3
    assert tree.find_matches(h) == {"A": 3, "B": 3}
    # Removing the sequence start twice in one event: the second is unknown, A keeps it.
    tree.apply("B", b.removed([h[0], h[0]]))
    assert tree.unknown_removed_blocks == 1
    assert tree.find_matches(h) == {"A": 3}
    tree.check_integrity()
    tree.apply("A", a.removed([h[2], h[1], h[0]]))
    assert tree.find_matches(h) == {} and tree.num_blocks() == 2  # B still holds blocks 1, 2
    tree.check_integrity()


def test_many_workers_dropping_out_at_every_depth(tree_cls: TreeClass) -> None:
    """100 workers (masks wider than a machine word); worker i holds the first i % 17 blocks."""
    tree = tree_cls()
    p = toks(BS * 20)
    h = compute_block_hashes(p, BS)
    want = {}
    for i in range(100):
        n = i % 17
        if n:
            tree.apply(f"w{i}", Events().stored(p, 0, n))
            want[f"w{i}"] = n
        else:
            tree.apply(f"w{i}", Events().cleared())
    assert tree.find_matches(h) == want
    assert tree.find_matches(h[:5]) == {w: min(n, 5) for w, n in want.items()}
    tree.check_integrity()


# ---- snapshots ---------------------------------------------------------------------------------

SNAPSHOT_TARGETS = [
    pytest.param(PyRadixTree, id="to-python"),
    pytest.param(
        NativeRadixTree, id="to-native", marks=pytest.mark.skipif(not NATIVE_AVAILABLE, reason="not built")
    ),
]


def _same_tree(a: BaseRadixTree, b: BaseRadixTree, queries: list[list[int]]) -> None:
    """Same content, bookkeeping and answers (slots included: a restored tree keeps them)."""
    assert a.block_masks() == b.block_masks()
    assert a.sequence_starts() == b.sequence_starts()
    assert a.workers() == b.workers()
    assert a._slot == b._slot
    for w in a.workers():
        assert (a.worker_num_blocks(w), a.last_event_id(w)) == (b.worker_num_blocks(w), b.last_event_id(w))
    assert (a.gaps, a.unknown_parent_events, a.unknown_removed_blocks) == (
        b.gaps,
        b.unknown_parent_events,
        b.unknown_removed_blocks,
    )
    for q in queries:
        assert a.find_matches(q) == b.find_matches(q)


@pytest.mark.parametrize("target", SNAPSHOT_TARGETS)
@pytest.mark.parametrize("workers", [5, 70])
def test_snapshot_restores_the_same_tree_in_either_implementation(
    tree_cls: TreeClass, target: TreeClass, workers: int
) -> None:
    """A tree (stores, removals, a cleared worker, a removed one leaving a free slot, gaps, lost
    parents, hash 0 and 2**64-1; 70 workers: masks of two words) → snapshot → msgpack → restore
    into an empty tree of either implementation: the same tree, and it stays the same under the
    same further events (a new worker takes the free slot, a worker restarts, one clears)."""
    rng = random.Random(workers)
    prompts = [toks(BS * rng.randrange(1, 9), base=1000 * i) for i in range(12)]
    hashes = [compute_block_hashes(p, BS) for p in prompts]
    src = tree_cls()
    gens = {f"w{i}": Events() for i in range(workers)}

    def random_event(w: str) -> KvEvent:
        gen, r = gens[w], rng.random()
        p = rng.choice(prompts)
        n = len(p) // BS
        if r < 0.6:
            start = rng.randrange(n)
            return gen.stored(p, start, rng.randrange(start + 1, n + 1))
        if r < 0.9:
            return gen.removed(rng.sample(compute_block_hashes(p, BS), rng.randrange(1, n + 1)))
        return gen.cleared()

    for _ in range(600):
        w = rng.choice(list(gens))
        src.apply(w, random_event(w))
    src.apply("w1", gens["w1"].cleared())
    src.remove_worker("w2")
    gens["w3"].next_id += 2  # a gap
    src.apply("w3", gens["w3"].stored(prompts[0], 1))  # parent maybe unknown
    edge = KvEvent(
        event_id=gens["w0"].next_id, data=KvStored(blocks=[StoredBlock(block_hash=0, tokens_hash=0)])
    )
    gens["w0"].next_id += 1
    src.apply("w0", edge)
    src.apply(
        "w0",
        gens["w0"]._ev(KvStored(blocks=[StoredBlock(block_hash=2**64 - 1, tokens_hash=0)], parent_hash=0)),
    )
    queries = [*hashes, [0, 2**64 - 1], []]

    state = decoder(RadixTreeState).decode(encode(src.snapshot()))
    dst = target()
    dst.restore(state)
    dst.check_integrity()
    _same_tree(src, dst, queries)

    gens["w2"] = Events()  # w2 comes back: takes its old free slot in both
    for tree in (src, dst):
        tree.apply("new", Events().stored(prompts[1]))
    for _ in range(200):
        w = rng.choice(list(gens))
        ev = random_event(w)
        assert src.apply(w, ev) == dst.apply(w, ev)
    restart = Events().stored(prompts[2])  # w4 restarted: ids from 0
    for tree in (src, dst):
        tree.remove_worker("w4")
        tree.apply("w4", restart)
    src.check_integrity()
    dst.check_integrity()
    _same_tree(src, dst, queries)


def test_snapshot_of_an_empty_tree(tree_cls: TreeClass) -> None:
    state = tree_cls().snapshot()
    assert (state.workers, state.hashes, state.masks, state.roots) == ([], b"", b"", b"")
    for target in (PyRadixTree, *([NativeRadixTree] if NATIVE_AVAILABLE else [])):
        tree = target()
        tree.restore(state)
        assert tree.num_blocks() == 0 and tree.workers() == set()
        tree.apply("a", Events().stored(toks(8)))
        assert tree.find_matches(compute_block_hashes(toks(8), BS)) == {"a": 2}


def test_restore_rejects_inconsistent_states_and_leaves_the_tree_empty(tree_cls: TreeClass) -> None:
    src = PyRadixTree()
    ga, gb = Events(), Events()
    src.apply("a", ga.stored(toks(16)))
    src.apply("b", gb.stored(toks(8)))
    good = src.snapshot()
    n = len(good.hashes) // 8
    assert n == 4 and good.mask_words == 1
    le = lambda *xs: b"".join(x.to_bytes(8, "little") for x in xs)  # noqa: E731
    h0 = good.hashes[:8]
    bad = {
        "hashes length": msgspec.structs.replace(good, hashes=good.hashes[:-1]),
        "masks length": msgspec.structs.replace(good, masks=good.masks[:-8]),
        "roots length": msgspec.structs.replace(good, roots=good.roots + b"\0"),
        "mask words": msgspec.structs.replace(good, mask_words=0),
        "mask 0": msgspec.structs.replace(good, masks=le(0) + good.masks[8:]),
        "unknown slot": msgspec.structs.replace(good, masks=le(0b100) + good.masks[8:]),
        "counts": msgspec.structs.replace(good, masks=le(0b11) * n),
        "repeated hash": msgspec.structs.replace(good, hashes=h0 * n),
        "root not a block": msgspec.structs.replace(good, roots=le(123456789)),
        "repeated slot": msgspec.structs.replace(
            good, workers=[good.workers[0], msgspec.structs.replace(good.workers[1], slot=0)]
        ),
        "repeated worker": msgspec.structs.replace(
            good, workers=[good.workers[0], msgspec.structs.replace(good.workers[1], worker_id="a")]
        ),
        "slot range": msgspec.structs.replace(
            good, workers=[good.workers[0], msgspec.structs.replace(good.workers[1], slot=64)]
        ),
        "negative count": msgspec.structs.replace(
            good, workers=[good.workers[0], msgspec.structs.replace(good.workers[1], num_blocks=-1)]
        ),
    }
    for what, state in bad.items():
        tree = tree_cls()
        with pytest.raises(ValueError):
            tree.restore(state)
        assert tree.num_blocks() == 0 and tree.workers() == set() and tree.block_masks() == {}, what
        tree.restore(good)  # still empty and usable
        tree.check_integrity()
        assert tree.block_masks() == src.block_masks()
    full = tree_cls()
    full.apply("c", Events().stored(toks(4)))
    with pytest.raises(ValueError, match="empty"):
        full.restore(good)
    assert full.workers() == {"c"}


def test_fast_decoder_agrees_with_protocol_decoder(tree_cls: TreeClass) -> None:
    """The indexer's gc-free mirrors decode exactly what the protocol decoder does and reject
    the same payloads."""
    ev = Events()
    p = toks(16)
    batch = KvEventBatch(
        worker_id="w",
        events=[ev.stored(p), ev.stored(p, 2), ev.removed([1, 2**64 - 1]), ev.cleared()],
    )
    data = encode(batch)
    fast = decode_kv_event_batch(data)
    assert msgspec.to_builtins(fast) == msgspec.to_builtins(decoder(KvEventBatch).decode(data))
    tree, ref = tree_cls(), tree_cls()
    for a, b in zip(fast.events, batch.events, strict=True):
        assert tree.apply("w", a) == ref.apply("w", b)
    assert tree.block_masks() == ref.block_masks()
    raw = msgspec.to_builtins(batch)
    bad: list[Any] = [
        b"\xc1",
        b"\x83\xa4kind\xa9kv_events\xa9worker_id\xa2\xff\xff\xa6events\x90",  # worker id not UTF-8
        encode(OverlapQuery(request_id="x", block_hashes=[1])),
        {**raw, "worker_id": 3},
        {
            **raw,
            "events": [
                {
                    "kind": "KvEvent",
                    "event_id": 0,
                    "data": {"kind": "stored", "blocks": [{"kind": "StoredBlock", "block_hash": 1}]},
                }
            ],
        },  # tokens_hash missing
        {**raw, "events": [{"kind": "KvEvent", "event_id": 0, "data": {"kind": "evicted"}}]},
        {**raw, "events": [{"kind": "KvEvent", "event_id": "0", "data": {"kind": "cleared"}}]},
    ]
    for b in bad:
        payload = b if isinstance(b, bytes) else msgspec.msgpack.encode(b)
        with pytest.raises((msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)):
            decoder(KvEventBatch).decode(payload)
        with pytest.raises((msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)):
            decode_kv_event_batch(payload)


def _peers_workload() -> ModuleType:
    if not (PEERS / "workload.py").is_file():
        pytest.skip(f"peer harness not found at {PEERS}")
    sys.path.insert(0, str(PEERS))
    try:
        return importlib.import_module("workload")
    finally:
        sys.path.remove(str(PEERS))


class DynamoModel:
    """Dynamo 1.6.1's ``RadixTree`` (``dynamo.llm``) rebuilt as a small reference: each node's
    children are keyed by *local* block hash, each worker maps sequence hash -> node; a stored
    event whose parent the worker does not hold is dropped; a removed block loses the worker (and
    its children once nobody holds it); ``find_matches(early_exit=False)`` walks the query's local
    hashes from the root, a worker's score fixed at the depth where it first misses. On the
    ``workload.py`` workloads below it gives exactly the real binding's scores (checked with
    ai-dynamo 1.6.1: 0 differences over 1,200 queries)."""

    def __init__(self) -> None:
        self.root: tuple[dict[int, Any], set[int]] = ({}, set())
        self.lookup: dict[int, dict[int, Any]] = {}

    def apply(self, w: Any, e: Any) -> None:
        lk = self.lookup.setdefault(e.worker_id, {})
        if isinstance(e, w.StoredEvent):
            cur = self.root if e.parent_hash is None else lk.get(e.parent_hash)
            if cur is None:
                return
            for seq, local in e.blocks:
                node = cur[0].get(local)
                if node is None:
                    node = cur[0][local] = lk.get(seq) or ({}, set())
                node[1].add(e.worker_id)
                lk[seq] = cur = node
        else:
            for seq in e.block_hashes:
                node = lk.pop(seq, None)
                if node is not None:
                    node[1].discard(e.worker_id)
                    if not node[1]:
                        node[0].clear()

    def find_matches(self, local_hashes: list[int]) -> dict[int, int]:
        scores: dict[int, int] = {}
        cur = self.root
        active: set[int] | None = None
        depth = 0
        for h in local_hashes:
            node = cur[0].get(h)
            if node is None:
                break
            if active is None:
                active = set(node[1])
            else:
                for worker in active - node[1]:
                    scores[worker] = depth
                active &= node[1]
            if not active:
                break
            depth += 1
            cur = node
        for worker in active or ():
            scores[worker] = depth
        return scores


@pytest.mark.parametrize("seed", range(3))
def test_shared_workload_scores_equal_dynamo_model(seed: int, tree_cls: TreeClass) -> None:
    """A small ``../shared/peers/workload.py kv`` workload (Zipf-shared prefixes, LRU eviction),
    fed as msgpack KvEventBatch payloads through the indexer's decoder: every query's scores
    equal Dynamo's semantics (the full-size check against the real binding is
    ``scripts/bench_indexer.py --check``)."""
    w = _peers_workload()
    params = w.KvParams(
        workers=6,
        seqs=600,
        blocks=16,
        groups=12,
        prefix_min=2,
        prefix_max=10,
        capacity=160,
        queries=400,
        query_blocks=16,
        seed=seed,
    )
    wl = w.build_kv_workload(params)
    assert wl.stats["removed_events"] > 0
    tree, model = tree_cls(), DynamoModel()
    for e in wl.events:
        if isinstance(e, w.StoredEvent):
            blocks = [StoredBlock(block_hash=s, tokens_hash=lh) for s, lh in e.blocks]
            data: KvStored | KvRemoved = KvStored(blocks=blocks, parent_hash=e.parent_hash)
        else:
            data = KvRemoved(block_hashes=e.block_hashes)
        payload = encode(
            KvEventBatch(worker_id=str(e.worker_id), events=[KvEvent(event_id=e.event_id, data=data)])
        )
        batch = decode_kv_event_batch(payload)
        for event in batch.events:
            assert tree.apply(batch.worker_id, event) is None
        model.apply(w, e)
    tree.check_integrity()
    assert tree.num_blocks() == len({h for lk in model.lookup.values() for h in lk})
    matched = 0
    for q in wl.queries:
        want = {str(k): v for k, v in model.find_matches(q).items()}
        assert tree.find_matches(w.seq_hashes(q)) == want
        matched += bool(want)
    assert matched > len(wl.queries) // 2
