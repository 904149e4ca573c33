"""BlockPool: allocation, refcounts, prefix cache (with token check), LRU eviction, KV events."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from tandem.kvbm.hashing import compute_local_hashes, compute_sequence_hashes
from tandem.kvbm.pool import BlockPool, NoFreeBlocksError, PoolIntegrityError, PoolStats
from tandem.protocol.messages import KvCleared, KvEvent, KvRemoved, KvStored, StoredBlock

BS = 4


def chain(tokens: list[int]) -> tuple[list[int], list[int]]:
    local = compute_local_hashes(tokens, BS)
    return compute_sequence_hashes(local), local


def register(pool: BlockPool, block_ids: list[int], tokens: list[int], start: int = 0) -> list[int]:
    """Register block_ids as blocks start.. of the sequence `tokens`; returns their seq hashes."""
    seq, local = chain(tokens)
    n = len(block_ids)
    pool.cache_blocks(
        block_ids,
        seq[start : start + n],
        local[start : start + n],
        tokens[start * BS : (start + n) * BS],
        seq[start - 1] if start else None,
    )
    pool.check_integrity()
    return seq[start : start + n]


def test_fresh_pool_and_contiguous_allocation() -> None:
    pool = BlockPool(8, BS)
    assert pool.stats() == PoolStats(num_blocks=8, free=8, cached=0, in_use=0)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(0) == []
    assert pool.stats() == PoolStats(8, 5, 0, 3)
    assert [pool.ref_count(b) for b in range(4)] == [1, 1, 1, 0]
    pool.release([0, 1, 2])
    assert pool.stats() == PoolStats(8, 8, 0, 0)
    pool.check_integrity()
    assert pool.take_events() == []  # nothing registered, nothing to tell


def test_allocate_too_many_changes_nothing() -> None:
    pool = BlockPool(4, BS)
    pool.allocate(3)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.stats() == PoolStats(4, 1, 0, 3)
    with pytest.raises(ValueError):
        pool.allocate(-1)
    pool.check_integrity()


def test_bad_releases_and_ids_raise_without_changes() -> None:
    pool = BlockPool(4, BS)
    a = pool.allocate(2)
    with pytest.raises(ValueError, match="more often"):
        pool.release([a[0], a[0]])
    with pytest.raises(ValueError, match="more often"):
        pool.release([a[1], 3])
    with pytest.raises(ValueError, match="out of range"):
        pool.release([-1])
    with pytest.raises(ValueError, match="out of range"):
        pool.touch([4])
    with pytest.raises(ValueError, match="free"):
        pool.touch([3])
    assert [pool.ref_count(b) for b in a] == [1, 1]
    pool.check_integrity()
    with pytest.raises(ValueError, match="not in use"):
        pool.cache_blocks([3], [1], [1], [0] * BS, None)
    with pytest.raises(ValueError, match="tokens"):
        pool.cache_blocks([a[0]], [1], [1], [0] * (BS - 1), None)
    pool.check_integrity()


def test_prefix_hit_and_refcounts() -> None:
    pool = BlockPool(8, BS)
    tokens = list(range(3 * BS))
    blocks = pool.allocate(3)
    seq = register(pool, blocks, tokens)
    pool.release(blocks)
    assert pool.stats() == PoolStats(8, 5, 3, 0)
    for i, h in enumerate(seq):
        assert pool.get_cached(h, tokens[i * BS : (i + 1) * BS]) == blocks[i]
    pool.touch(blocks[:2])  # a new request hits the first two blocks
    pool.touch(blocks[:1])  # and another one the first
    assert [pool.ref_count(b) for b in blocks] == [2, 1, 0]
    assert pool.stats() == PoolStats(8, 5, 1, 2)
    pool.check_integrity()
    pool.release(blocks[:2])
    pool.release(blocks[:1])
    assert pool.stats() == PoolStats(8, 5, 3, 0)
    pool.check_integrity()


def test_hash_hit_with_different_tokens_is_a_miss() -> None:
    pool = BlockPool(4, BS)
    [b] = pool.allocate(1)
    fake_hash = 0xDEADBEEF
    pool.cache_blocks([b], [fake_hash], [fake_hash], [1, 2, 3, 4], None)
    assert pool.get_cached(fake_hash, [1, 2, 3, 4]) == b
    assert pool.get_cached(fake_hash, [1, 2, 3, 5]) is None  # a collision must not be served
    assert pool.get_cached(fake_hash, [1, 2, 3]) is None
    assert pool.get_cached(fake_hash + 1, [1, 2, 3, 4]) is None
    # The colliding block cannot be registered twice either: it stays unregistered and is freed.
    [c] = pool.allocate(1)
    assert pool.cache_blocks([c], [fake_hash], [7], [1, 2, 3, 5], None) == 0
    pool.release([b, c])
    assert pool.stats() == PoolStats(4, 3, 1, 0)
    pool.check_integrity()


def test_lru_evicts_oldest_and_deepest_first() -> None:
    pool = BlockPool(6, BS)
    a_tokens, b_tokens = list(range(3 * BS)), list(range(100, 100 + 2 * BS))
    a = pool.allocate(3)
    a_seq = register(pool, a, a_tokens)
    b = pool.allocate(2)
    b_seq = register(pool, b, b_tokens)
    pool.take_events()
    pool.release(a)  # cached, tail first: a2, a1, a0
    pool.release(b)  # then b1, b0
    assert pool.stats() == PoolStats(6, 1, 5, 0)
    # A hit refreshes a0: it becomes the most recently used.
    pool.touch([a[0]])
    pool.release([a[0]])
    got = pool.allocate(4)  # 1 free block, then evict a2, a1, b1
    assert got[0] == 5
    assert got[1:] == [a[2], a[1], b[1]]
    assert pool.take_events() == [
        KvEvent(event_id=2, data=KvRemoved(block_hashes=[a_seq[2], a_seq[1], b_seq[1]]))
    ]
    assert pool.get_cached(a_seq[2], a_tokens[2 * BS :]) is None
    assert pool.get_cached(b_seq[0], b_tokens[:BS]) == b[0]
    assert pool.is_evictable(b[0]) and pool.is_evictable(a[0])
    pool.allocate(2)  # b0, then a0 (refreshed last)
    assert pool.take_events()[0].data == KvRemoved(block_hashes=[b_seq[0], a_seq[0]])
    pool.check_integrity()


def test_stored_events_coalesce_and_carry_parents() -> None:
    pool = BlockPool(16, BS)
    tokens = list(range(5 * BS))
    seq, local = chain(tokens)
    blocks = pool.allocate(5)
    register(pool, blocks[:2], tokens)
    register(pool, blocks[2:3], tokens, start=2)  # continues the pending event
    events = pool.take_events()
    assert events == [
        KvEvent(
            event_id=0,
            data=KvStored(
                parent_hash=None,
                blocks=[StoredBlock(block_hash=seq[i], tokens_hash=local[i]) for i in range(3)],
            ),
        )
    ]
    register(pool, blocks[3:5], tokens, start=3)  # events were taken: a new event with a parent
    [ev] = pool.take_events()
    assert ev.event_id == 1
    assert ev.data == KvStored(
        parent_hash=seq[2], blocks=[StoredBlock(block_hash=seq[i], tokens_hash=local[i]) for i in (3, 4)]
    )
    assert pool.next_event_id == 2


def test_duplicate_blocks_are_skipped_and_split_the_event() -> None:
    pool = BlockPool(16, BS)
    tokens = list(range(4 * BS))
    seq, local = chain(tokens)
    first = pool.allocate(2)
    register(pool, first[1:2], tokens, start=1)  # only block 1 registered by request one
    second = pool.allocate(4)
    pool.take_events()
    assert pool.cache_blocks(second, seq, local, tokens, None) == 3
    events = pool.take_events()
    assert [e.event_id for e in events] == [1, 2]
    assert events[0].data == KvStored(
        parent_hash=None, blocks=[StoredBlock(block_hash=seq[0], tokens_hash=local[0])]
    )
    assert events[1].data == KvStored(
        parent_hash=seq[1], blocks=[StoredBlock(block_hash=seq[i], tokens_hash=local[i]) for i in (2, 3)]
    )
    pool.release(second)  # second[1] was a duplicate: freed, not cached
    assert pool.block_hash(second[1]) is None
    assert pool.stats() == PoolStats(16, 11, 3, 2)
    pool.check_integrity()


def test_clear_unregisters_everything_and_emits_cleared() -> None:
    pool = BlockPool(8, BS)
    tokens = list(range(4 * BS))
    blocks = pool.allocate(4)
    seq = register(pool, blocks, tokens)
    pool.release(blocks[2:])  # blocks 2, 3 cached; 0, 1 still in use
    pool.clear()
    pool.check_integrity()
    assert pool.stats() == PoolStats(8, 6, 0, 2)
    assert all(pool.get_cached(h, tokens[i * BS : (i + 1) * BS]) is None for i, h in enumerate(seq))
    pool.release(blocks[:2])  # unregistered now: they become free, not cached
    assert pool.stats() == PoolStats(8, 8, 0, 0)
    events = pool.take_events()
    assert [e.event_id for e in events] == [0, 1]
    assert isinstance(events[0].data, KvStored) and events[1].data == KvCleared()
    pool.check_integrity()


def test_uncache_blocks_unregisters_and_emits_removed() -> None:
    """A registration taken back (its step failed): a cached block becomes free, an in-use one
    stays with its holder unregistered (freed, not cached, on release); KvRemoved says so."""
    pool = BlockPool(8, BS)
    tokens = list(range(12))
    ids = pool.allocate(3)
    seq = register(pool, ids, tokens)
    pool.release([ids[2]])  # block 2: cached (refcount 0); blocks 0, 1: in use
    pool.take_events()
    with pytest.raises(ValueError, match="not registered"):
        pool.uncache_blocks([ids[1], pool.allocate(1)[0]])
    with pytest.raises(ValueError, match="twice"):
        pool.uncache_blocks([ids[1], ids[1]])
    assert pool.block_hash(ids[1]) == seq[1]  # nothing changed
    pool.uncache_blocks([ids[1], ids[2]])
    assert pool.take_events() == [KvEvent(event_id=1, data=KvRemoved(block_hashes=[seq[1], seq[2]]))]
    assert pool.get_cached(seq[1], tokens[4:8]) is None and pool.get_cached(seq[2], tokens[8:12]) is None
    assert pool.stats() == PoolStats(8, 5, 0, 3)  # block 2 free; blocks 0, 1 and the probe in use
    pool.check_integrity()
    pool.release([ids[1]])
    assert pool.stats().cached == 0  # unregistered: freed, not cached
    pool.check_integrity()


def test_disabled_prefix_caching_registers_nothing() -> None:
    pool = BlockPool(4, BS, enable_prefix_caching=False)
    blocks = pool.allocate(2)
    assert register(pool, blocks, list(range(2 * BS)))
    pool.release(blocks)
    pool.clear()
    assert pool.stats() == PoolStats(4, 4, 0, 0)
    assert pool.take_events() == []
    pool.check_integrity()


def test_pending_events_are_bounded_and_ids_keep_counting() -> None:
    pool = BlockPool(8, BS, max_pending_events=2)
    for _ in range(4):
        pool.clear()
    events = pool.take_events()
    assert [e.event_id for e in events] == [2, 3]
    assert pool.events_dropped == 2


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda p: setattr(p.blocks[0], "ref_cnt", -1),
        lambda p: p._free.pop(3),
        lambda p: p._lru.__setitem__(0, None),  # in use and cached
        lambda p: p._cached.__setitem__(12345, 1),
        lambda p: setattr(p.blocks[1], "token_ids", None),
        lambda p: setattr(p.blocks[5], "ref_cnt", 1),
        lambda p: setattr(p, "_num_in_use", 0),
    ],
)
def test_integrity_check_catches_corruption(corrupt: Callable[[BlockPool], object]) -> None:
    pool = BlockPool(8, BS)
    blocks = pool.allocate(3)
    register(pool, blocks, list(range(3 * BS)))
    pool.release(blocks[1:])
    pool.check_integrity()
    corrupt(pool)
    with pytest.raises(PoolIntegrityError):
        pool.check_integrity()


def test_randomized_operations_keep_invariants_and_events_match_the_cache() -> None:
    """Random allocate/register/touch/release/clear; after each op the pool is consistent and
    replaying its events gives exactly the set of registered hashes."""
    rng = random.Random(7)
    pool = BlockPool(24, BS)
    prompts = [[rng.randrange(5) for _ in range(rng.randrange(1, 7) * BS)] for _ in range(6)]
    held: list[list[int]] = []  # block lists held by fake requests
    replay: set[int] = set()
    last_id = -1
    for _ in range(3000):
        op = rng.random()
        if op < 0.4 and pool.num_free_blocks() > 0:
            tokens = rng.choice(prompts)
            seq, local = chain(tokens)
            hits: list[int] = []
            for i, h in enumerate(seq):
                b = pool.get_cached(h, tokens[i * BS : (i + 1) * BS])
                if b is None:
                    break
                hits.append(b)
            pool.touch(hits)
            n_new = min(len(seq) - len(hits), pool.num_free_blocks())
            new = pool.allocate(n_new)
            if rng.random() < 0.8:
                k = len(hits)
                pool.cache_blocks(
                    new, seq[k : k + n_new], local[k : k + n_new], tokens[k * BS : (k + n_new) * BS],
                    seq[k - 1] if k else None,
                )  # fmt: skip
            held.append(hits + new)
        elif op < 0.8 and held:
            pool.release(held.pop(rng.randrange(len(held))))
        elif op < 0.82:
            pool.clear()
        pool.check_integrity()
        for ev in pool.take_events():
            assert ev.event_id == last_id + 1
            last_id = ev.event_id
            if isinstance(ev.data, KvStored):
                replay.update(b.block_hash for b in ev.data.blocks)
            elif isinstance(ev.data, KvRemoved):
                assert set(ev.data.block_hashes) <= replay
                replay.difference_update(ev.data.block_hashes)
            else:
                replay.clear()
        assert replay == set(pool._cached)
    assert last_id > 100
