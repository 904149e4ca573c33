"""KV-cache block transfer between workers: the :class:`~tandem.transfer.base.KvTransport` seam
and its implementations — NIXL (:mod:`tandem.transfer.nixl`), an in-pool copy
(:mod:`tandem.transfer.local`) and a simulated one for the mock engine
(:mod:`tandem.transfer.simulated`). Importing this package loads neither torch nor nixl.
"""

from tandem.transfer.base import (
    KV_LAYOUT,
    BlockDesc,
    KvTransferError,
    KvTransport,
    TransportKind,
    block_ids_of,
    compat_hash,
    pool_descriptors,
)
from tandem.transfer.nixl import (
    KvTransferAgent,
    NixlTransport,
    NixlUnavailableError,
    alloc_kv_cache,
    coalesce_descriptors,
    split_chunks,
)

__all__ = [
    "KV_LAYOUT",
    "BlockDesc",
    "KvTransferAgent",
    "KvTransferError",
    "KvTransport",
    "NixlTransport",
    "NixlUnavailableError",
    "TransportKind",
    "alloc_kv_cache",
    "block_ids_of",
    "coalesce_descriptors",
    "compat_hash",
    "pool_descriptors",
    "split_chunks",
]
