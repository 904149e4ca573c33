"""KV-cache block transfer between workers (NIXL). See :mod:`tandem.transfer.nixl`."""

from tandem.transfer.nixl import (
    KV_LAYOUT,
    BlockDesc,
    KvTransferAgent,
    KvTransferError,
    NixlUnavailableError,
    alloc_kv_cache,
    coalesce_descriptors,
    compat_hash,
    split_chunks,
)

__all__ = [
    "KV_LAYOUT",
    "BlockDesc",
    "KvTransferAgent",
    "KvTransferError",
    "NixlUnavailableError",
    "alloc_kv_cache",
    "coalesce_descriptors",
    "compat_hash",
    "split_chunks",
]
