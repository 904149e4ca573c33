"""KvCacheManager: the request life cycle the engine drives, plus the disaggregation hand-offs."""

from __future__ import annotations

import random

import pytest

from tandem.kvbm.hashing import compute_block_hashes, compute_local_hashes
from tandem.kvbm.manager import KvCacheManager, ManagerStats
from tandem.kvbm.pool import PoolIntegrityError
from tandem.protocol.messages import KvCleared, KvEvent, KvRemoved, KvStored, StoredBlock

BS = 4


def toks(n: int, base: int = 0) -> list[int]:
    return [base + i for i in range(n)]


def stored_hashes(events: list[KvEvent]) -> list[int]:
    return [b.block_hash for e in events if isinstance(e.data, KvStored) for b in e.data.blocks]


def run_prefill(m: KvCacheManager, rid: str, tokens: list[int]) -> int:
    """begin + grow + commit the whole prompt, as the engine's prefill does."""
    cached = m.begin(rid, tokens, compute_block_hashes(tokens, BS))
    assert m.grow(rid, len(tokens))
    m.commit(rid, tokens, len(tokens))
    m.check_integrity()
    return cached


def test_begin_grow_commit_free() -> None:
    m = KvCacheManager(16, BS)
    prompt = toks(10)  # 2 full blocks + 2 tokens
    assert m.begin("a", prompt, compute_block_hashes(prompt, BS)) == 0
    assert m.block_table("a") == []
    assert m.num_blocks_needed("a", 10) == 3
    assert m.grow("a", 10)
    assert m.block_table("a") == [0, 1, 2]
    assert m.grow("a", 12)  # still fits in 3 blocks
    assert m.block_table("a") == [0, 1, 2]
    m.commit("a", prompt, 10)
    m.check_integrity()
    [ev] = m.take_events()
    assert ev.event_id == 0
    assert ev.data == KvStored(
        parent_hash=None,
        blocks=[
            *(
                StoredBlock(block_hash=s, tokens_hash=loc)
                for s, loc in zip(
                    compute_block_hashes(prompt, BS), compute_local_hashes(prompt, BS), strict=True
                )
            )
        ],
    )
    assert m.stats() == ManagerStats(16, free=13, cached=0, in_use=3, pinned=0, requests=1)
    m.free("a")
    assert m.stats() == ManagerStats(16, free=14, cached=2, in_use=0, pinned=0)
    m.check_integrity()
    with pytest.raises(KeyError):
        m.block_table("a")


def test_begin_hits_cached_prefix_but_always_computes_the_last_token() -> None:
    m = KvCacheManager(16, BS)
    prompt = toks(12)  # exactly 3 blocks
    run_prefill(m, "a", prompt)
    m.free("a")
    assert m.lookup_prefix(prompt, compute_block_hashes(prompt, BS)) == 3
    assert m.lookup_prefix(prompt) == 3
    assert m.begin("b", prompt) == 8  # capped at len-1 rounded down to a block: 2 blocks
    assert m.block_table("b") == [0, 1]
    assert m.grow("b", 12)
    assert m.block_table("b")[:2] == [0, 1] and len(m.block_table("b")) == 3
    m.check_integrity()
    # Longer prompt sharing the prefix: all 3 blocks hit, and block 2 (of "a") is not reused by
    # "b" (which allocated a fresh one) but still cached.
    longer = [*prompt, 99]
    assert m.begin("c", longer) == 12
    assert m.block_table("c") == [0, 1, 2]
    assert m.stats().in_use == 4
    m.check_integrity()


def test_lookup_prefix_takes_no_references() -> None:
    m = KvCacheManager(8, BS)
    run_prefill(m, "a", toks(9))
    m.free("a")
    before = m.stats()
    assert m.lookup_prefix(toks(9)) == 2
    assert m.lookup_prefix(toks(9, base=1)) == 0
    assert m.stats() == before


def test_input_errors() -> None:
    m = KvCacheManager(8, BS)
    with pytest.raises(ValueError, match="empty"):
        m.begin("a", [])
    with pytest.raises(ValueError, match="block_hashes"):
        m.begin("a", toks(8), [123])
    with pytest.raises(ValueError, match="block_hashes"):  # more hashes than full blocks
        m.begin("a", toks(8), compute_block_hashes(toks(12), BS))
    with pytest.raises(ValueError, match="block_hashes"):  # hashed with another block size
        m.begin("a", toks(16), compute_block_hashes(toks(16), 8))
    assert m.begin("a", toks(8), compute_block_hashes(toks(8), BS)[:1]) == 0  # a prefix is fine
    with pytest.raises(KeyError, match="already"):
        m.begin("a", toks(8))
    with pytest.raises(KeyError, match="unknown"):
        m.grow("nope", 4)
    with pytest.raises(ValueError):
        m.grow("a", -1)
    with pytest.raises(ValueError, match="grow"):
        m.commit("a", toks(8), 8)  # no blocks yet
    assert m.grow("a", 8)
    with pytest.raises(ValueError, match="len"):
        m.commit("a", toks(8), 9)
    with pytest.raises(KeyError):
        m.free("nope")
    with pytest.raises(KeyError):
        m.pin("nope")
    with pytest.raises(KeyError):
        m.unpin("nope")
    m.unpin("nope", missing_ok=True)
    m.check_integrity()


def test_grow_all_or_nothing() -> None:
    m = KvCacheManager(4, BS)
    m.begin("a", toks(5))
    assert m.grow("a", 12)
    m.begin("b", toks(5, base=50))
    assert not m.grow("b", 8)  # needs 2, only 1 left
    assert m.block_table("b") == []
    assert m.grow("b", 4)
    assert m.num_free_blocks() == 0
    assert not m.grow("a", 13)
    assert len(m.block_table("a")) == 3
    m.check_integrity()


def test_commit_extends_hashes_through_generation() -> None:
    m = KvCacheManager(32, BS)
    prompt = toks(6)
    run_prefill(m, "a", prompt)
    events = m.take_events()
    tokens = list(prompt)
    # Decode: one token per step, committed with the full token list each time.
    for step in range(11):
        tokens.append(1000 + step)
        assert m.grow("a", len(tokens))
        m.commit("a", tokens, len(tokens) - 1)  # the newest token's KV is written next step
        m.check_integrity()
        events += m.take_events()
    n_full = (len(tokens) - 1) // BS
    expected = compute_block_hashes(tokens, BS)[:n_full]
    assert stored_hashes(events) == expected
    # Every event's parent is the block before its first block.
    for e in events:
        assert isinstance(e.data, KvStored)
        first = expected.index(e.data.blocks[0].block_hash)
        assert e.data.parent_hash == (expected[first - 1] if first else None)
    m.free("a")
    # The generated text is now a cached prefix too.
    assert m.lookup_prefix(tokens) == n_full


def test_free_is_tail_first_so_deepest_blocks_are_evicted_first() -> None:
    m = KvCacheManager(6, BS)
    prompt = toks(16)
    run_prefill(m, "a", prompt)
    m.free("a")
    hashes = compute_block_hashes(prompt, BS)
    m.take_events()
    m.begin("b", toks(8, base=500))
    assert m.grow("b", 8)  # 2 free blocks exist: no eviction
    assert m.take_events() == []
    m.begin("c", toks(8, base=900))
    assert m.grow("c", 8)  # evicts the deepest two blocks of "a"
    [ev] = m.take_events()
    assert ev.data == KvRemoved(block_hashes=[hashes[3], hashes[2]])
    assert m.lookup_prefix(prompt) == 2
    m.check_integrity()


def test_preemption_free_then_begin_rehits() -> None:
    m = KvCacheManager(16, BS)
    prompt = toks(7)
    run_prefill(m, "a", prompt)
    tokens = [*prompt, 100, 101, 102, 103, 104]  # 12 tokens, 11 computed
    assert m.grow("a", 12)
    m.commit("a", tokens, 11)
    m.free("a")  # preempted
    m.check_integrity()
    # Resume with every token so far: the 2 committed blocks hit (cap = 11 // 4 = 2 blocks).
    assert m.begin("a", tokens, compute_block_hashes(prompt, BS)) == 8
    assert m.grow("a", 12)
    m.commit("a", tokens, 12)
    m.check_integrity()
    assert m.lookup_prefix(tokens) == 3


def test_pin_and_unpin() -> None:
    m = KvCacheManager(8, BS)
    prompt = toks(10)
    run_prefill(m, "a", prompt)
    table = m.block_table("a")
    assert m.pin("a") == table
    assert not m.has_request("a") and m.is_pinned("a")
    with pytest.raises(KeyError):
        m.block_table("a")
    s = m.stats()
    assert (s.in_use, s.pinned, s.requests, s.pinned_requests) == (3, 3, 0, 1)
    m.check_integrity()
    # The pinned full blocks can be shared (prefix hit) while pinned.
    assert m.begin("b", [*prompt, 1]) == 8
    assert m.stats().pinned == 3
    m.check_integrity()
    # The same id can start again (e.g. a retry) while its old blocks are still pinned.
    assert m.begin("a", prompt) == 8
    with pytest.raises(KeyError, match="already pinned"):
        m.pin("a")
    m.free("a")
    m.unpin("a")
    with pytest.raises(KeyError):
        m.unpin("a")
    s = m.stats()
    assert (s.pinned, s.pinned_requests, s.in_use) == (0, 0, 2)
    m.free("b")
    assert m.stats() == ManagerStats(8, free=6, cached=2, in_use=0, pinned=0)
    m.check_integrity()


def test_import_blocks_reuses_cached_prefix() -> None:
    m = KvCacheManager(8, BS)
    prompt = toks(13)  # 3 full blocks + 1 token
    run_prefill(m, "local", prompt[:8])  # 2 blocks of the prompt are cached here
    m.free("local")
    m.take_events()
    got = m.import_blocks("r", prompt, compute_block_hashes(prompt, BS), 13)
    assert got is not None
    table, reused = got
    assert reused == 2 and len(table) == 4 and table[:2] == [0, 1]
    assert m.block_table("r") == table
    m.check_integrity()
    # After the READ the engine commits: the rest of the full blocks get registered.
    m.commit("r", prompt, 13)
    assert stored_hashes(m.take_events()) == compute_block_hashes(prompt, BS)[2:]
    m.check_integrity()
    with pytest.raises(KeyError):
        m.import_blocks("r", prompt, None, 13)
    with pytest.raises(ValueError):
        m.import_blocks("x", prompt, None, 14)
    with pytest.raises(ValueError):
        m.import_blocks("x", prompt, None, 0)


def test_import_blocks_fully_cached_prompt_reuses_every_full_block() -> None:
    m = KvCacheManager(8, BS)
    prompt = toks(8)
    run_prefill(m, "a", prompt)
    m.free("a")
    assert m.import_blocks("r", prompt, None, 8) == ([0, 1], 2)  # no cap: nothing is recomputed
    m.check_integrity()


def test_import_blocks_none_when_full_changes_nothing() -> None:
    m = KvCacheManager(4, BS)
    prompt = toks(12)
    run_prefill(m, "a", prompt[:8])  # blocks 0, 1 registered
    m.free("a")  # free 2 + cached 2
    m.take_events()
    assert m.import_blocks("big", toks(20, base=700), None, 20) is None  # 5 blocks > 4
    m.begin("hog", toks(5, base=300))
    assert m.grow("hog", 4)  # free 1 + cached 2 = 3 allocatable
    before = m.stats()
    # 2 hits + 2 new: 3 look allocatable, but the 2 hits stop being evictable once taken.
    assert m.import_blocks("r", [*prompt, 5, 6, 7, 8], None, 16) is None
    assert m.stats() == before and not m.has_request("r")
    assert m.take_events() == []
    got = m.import_blocks("r", prompt, None, 12)  # 2 hits + 1 new: fits exactly
    assert got is not None
    assert got[0][:2] == [0, 1] and len(got[0]) == 3 and got[1] == 2
    assert m.num_free_blocks() == 0
    m.check_integrity()


def test_clear_and_events() -> None:
    m = KvCacheManager(8, BS)
    run_prefill(m, "a", toks(8))
    run_prefill(m, "b", toks(8, base=100))
    m.free("a")
    m.clear()
    events = m.take_events()
    assert [e.event_id for e in events] == list(range(len(events)))
    assert events[-1].data == KvCleared()
    assert m.lookup_prefix(toks(8)) == 0 and m.lookup_prefix(toks(8, base=100)) == 0
    m.free("b")  # its blocks were unregistered by clear: freed, not cached
    assert m.stats().cached == 0 and m.stats().free == 8
    m.check_integrity()


def test_prefix_caching_disabled() -> None:
    m = KvCacheManager(8, BS, enable_prefix_caching=False)
    for _ in range(2):
        assert m.begin("a", toks(9)) == 0
        assert m.grow("a", 9)
        m.commit("a", toks(9), 9)
        m.free("a")
    assert m.take_events() == []
    assert m.import_blocks("r", toks(9), None, 9) == ([0, 1, 2], 0)
    m.check_integrity()


def test_manager_integrity_catches_a_leaked_reference() -> None:
    m = KvCacheManager(8, BS)
    run_prefill(m, "a", toks(8))
    m.pool.touch([0])  # a reference nobody owns
    with pytest.raises(PoolIntegrityError, match="refcount"):
        m.check_integrity()


def test_randomized_engine_workload() -> None:
    """Scheduler-like random workload: admit (begin+grow), decode (grow+commit), preempt
    (free), finish (free or pin then unpin), import. Invariants after every operation; events
    replay to the pool's registered set; a cache hit never changes what a request computes."""
    rng = random.Random(1234)
    m = KvCacheManager(40, BS)
    bases = [[rng.randrange(3) for _ in range(rng.randrange(1, 20))] for _ in range(5)]
    running: dict[str, list[int]] = {}  # rid -> tokens
    pinned: list[str] = []
    registered: set[int] = set()
    next_id = 0
    for _ in range(4000):
        op = rng.random()
        if op < 0.2:
            rid = f"r{next_id}"
            next_id += 1
            tokens = [*rng.choice(bases), *(rng.randrange(3) for _ in range(rng.randrange(0, 6)))]
            if rng.random() < 0.2:
                got = m.import_blocks(rid, tokens, compute_block_hashes(tokens, BS), len(tokens))
                if got is not None:
                    table, reused = got
                    assert reused <= len(tokens) // BS and len(table) == -(-len(tokens) // BS)
                    m.commit(rid, tokens, len(tokens))
                    running[rid] = tokens
            else:
                cached = m.begin(rid, tokens, compute_block_hashes(tokens, BS))
                assert cached % BS == 0 and cached <= len(tokens) - 1
                if m.grow(rid, len(tokens)):
                    m.commit(rid, tokens, len(tokens))
                    running[rid] = tokens
                else:
                    m.free(rid)
        elif op < 0.75 and running:
            rid = rng.choice(list(running))
            tokens = running[rid]
            tokens.append(rng.randrange(3))
            if m.grow(rid, len(tokens)):
                m.commit(rid, tokens, len(tokens) - 1)
            else:  # preempt, as vLLM does when a step cannot get blocks
                m.free(rid)
                del running[rid]
        elif op < 0.9 and running:
            rid = rng.choice(list(running))
            del running[rid]
            if rng.random() < 0.5:
                m.pin(rid)
                pinned.append(rid)
            else:
                m.free(rid)
        elif pinned:
            m.unpin(pinned.pop(rng.randrange(len(pinned))))
        if rng.random() < 0.005:
            m.clear()
        m.check_integrity()
        for e in m.take_events():
            if isinstance(e.data, KvStored):
                registered.update(b.block_hash for b in e.data.blocks)
            elif isinstance(e.data, KvRemoved):
                registered.difference_update(e.data.block_hashes)
            else:
                registered.clear()
        assert registered == set(m.pool._cached)
        # Every registered block holds the tokens its hash says (no corruption by reuse).
        for h, b in m.pool._cached.items():
            assert m.pool.blocks[b].seq_hash == h and m.pool.blocks[b].token_ids is not None
    for rid in list(running):
        m.free(rid)
    for rid in pinned:
        m.unpin(rid)
    m.check_integrity()
    s = m.stats()
    assert s.in_use == 0 and s.free + s.cached == 40
    assert next_id > 500


def test_begin_with_the_callers_local_hashes_hashes_only_past_them() -> None:
    """The engine hashes a prompt once at add_request and hands both hash lists to begin: the
    same hits and the same KV events as hashing here, also for a resumed request whose
    generated tokens filled blocks past the prompt's."""
    prompt = toks(14, 50)  # 3 full blocks
    resumed = [*prompt, *toks(7, 900)]  # 5 full blocks after generation
    local = compute_local_hashes(prompt, BS)
    seq = compute_block_hashes(prompt, BS)
    results = []
    for kw in ({}, {"local_hashes": local}):
        m = KvCacheManager(32, BS)
        run_prefill(m, "warm", resumed)
        m.free("warm")
        m.take_events()
        hit = m.begin("r", resumed, seq, **kw)  # type: ignore[arg-type]
        assert m.grow("r", len(resumed) + 3)
        m.commit("r", [*resumed, 1, 2, 3], len(resumed) + 3)
        m.check_integrity()
        results.append((hit, m.block_table("r"), m.take_events()))
    assert results[0] == results[1]
    assert results[0][0] == 5 * BS  # the generated blocks hit too: their hashes were extended
