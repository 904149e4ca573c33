"""KV block manager: Dynamo-compatible block hashing, the refcounted block pool with its LRU
prefix cache and KV events, the per-request :class:`KvCacheManager` the engine uses, and the
:class:`RadixTree` the KV indexer keeps of every worker's cached blocks. No torch, no NATS."""

from tandem.kvbm.hashing import (
    BLOCK_HASH_SEED,
    compute_block_hashes,
    compute_local_hashes,
    compute_sequence_hashes,
    lora_seed,
)
from tandem.kvbm.manager import KvCacheManager, ManagerStats
from tandem.kvbm.pool import BlockPool, NoFreeBlocksError, PoolIntegrityError, PoolStats
from tandem.kvbm.radix import EventGap, RadixTree

__all__ = [
    "BLOCK_HASH_SEED",
    "BlockPool",
    "EventGap",
    "KvCacheManager",
    "ManagerStats",
    "NoFreeBlocksError",
    "PoolIntegrityError",
    "PoolStats",
    "RadixTree",
    "compute_block_hashes",
    "compute_local_hashes",
    "compute_sequence_hashes",
    "lora_seed",
]
