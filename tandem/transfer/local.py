"""The in-pool KV transport: a worker of role ``both`` decoding a request it prefilled itself.

The "peer" is this very worker: the prefill side pinned blocks of the pool and published their
descriptors through the worker's primary transport (NIXL or simulated); the decode side
allocated other blocks of the same pool. :meth:`LocalTransport.read_blocks` maps the descriptors
back to block ids and copies block to block through the engine (``LLMEngine.copy_blocks``: a
tensor copy for the model, nothing for the mock), then queues the notification for the prefill
side, exactly as a remote READ would. It answers to the primary transport's name and metadata,
so ``kv.agent_name == local.name`` is how a worker tells its own KV from a peer's.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

from tandem.protocol.messages import KvTransferStats
from tandem.transfer.base import BlockDesc, KvTransferError, block_ids_of, pool_descriptors

__all__ = ["CopyBlocks", "LocalTransport"]

CopyBlocks = Callable[[list[int], list[int]], Awaitable[None]]
"""``await copy(src_ids, dst_ids)``: copy block ``src_ids[i]`` to ``dst_ids[i]`` in the pool."""


class LocalTransport:
    """:class:`~tandem.transfer.base.KvTransport` within one pool.

    Args:
        name, metadata: the worker's primary transport's (what its ``KvTransferParams`` carry).
        base_addr: address of block 0 in the primary transport's descriptors (0 for simulated).
        num_blocks, block_nbytes: the pool's geometry.
        copy: the block copy (runs where the engine runs).
    """

    kind = "local"
    poll_interval_s: float | None = None

    def __init__(
        self,
        name: str,
        metadata: bytes,
        base_addr: int,
        num_blocks: int,
        block_nbytes: int,
        copy: CopyBlocks,
    ) -> None:
        self.name = name
        self.metadata = metadata
        self.base_addr = int(base_addr)
        self.num_blocks = int(num_blocks)
        self.block_nbytes = int(block_nbytes)
        self._copy = copy
        self._queue: list[bytes] = []
        self._callback: Callable[[], None] | None = None
        self._inflight = 0
        self._closed = False

    @property
    def pending_transfers(self) -> int:
        """Copies in progress."""
        return self._inflight

    def block_descriptors(self, block_ids: Iterable[int], /) -> list[BlockDesc]:
        """The primary transport's descriptors of these blocks (``IndexError`` out of range)."""
        return pool_descriptors(block_ids, self.base_addr, self.block_nbytes, self.num_blocks)

    def poll_notifs(self) -> list[bytes]:
        """Drain the notifications of finished copies, oldest first."""
        out, self._queue = self._queue, []
        return out

    def set_notif_callback(self, callback: Callable[[], None] | None, /) -> None:
        """``callback()`` runs after each copy's notification is queued."""
        self._callback = callback

    async def connect(self, peer_name: str, peer_metadata: bytes, /) -> None:
        """Nothing to connect."""

    def disconnect(self, peer_name: str, /) -> None:
        """Nothing to forget."""

    async def read_blocks(
        self,
        peer_name: str,
        peer_metadata: bytes,
        remote_descs: Sequence[Sequence[int]],
        local_block_ids: Sequence[int],
        notif: bytes,
        timeout_s: float,
        /,
    ) -> KvTransferStats:
        """Copy the described blocks of this pool into ``local_block_ids``, then queue ``notif``.

        Raises ``KvTransferError`` when ``peer_name`` is not this worker, ``ValueError`` /
        ``IndexError`` for bad descriptors or ids (nothing is copied then).
        """
        self._check_peer(peer_name)
        if len(remote_descs) != len(local_block_ids):
            raise ValueError(f"{len(remote_descs)} remote descriptors, {len(local_block_ids)} local blocks")
        src = block_ids_of(remote_descs, self.base_addr, self.block_nbytes, self.num_blocks)
        self.block_descriptors(local_block_ids)  # IndexError for an id outside the pool
        dst = [int(b) for b in local_block_ids]
        t0 = time.perf_counter()
        self._inflight += 1
        try:
            if src:
                await self._copy(src, dst)
        finally:
            self._inflight -= 1
        self._receive(notif)
        ms = (time.perf_counter() - t0) * 1e3
        return KvTransferStats(blocks=len(src), bytes=len(src) * self.block_nbytes, ms=ms)

    async def notify(self, peer_name: str, peer_metadata: bytes, notif: bytes, /) -> None:
        """Queue ``notif`` for this worker's prefill side."""
        self._check_peer(peer_name)
        self._receive(notif)

    async def aclose(self) -> None:
        """Drop queued notifications (idempotent)."""
        self._closed = True
        self._queue.clear()

    def _check_peer(self, peer_name: str) -> None:
        if self._closed:
            raise KvTransferError("LocalTransport is closed")
        if peer_name != self.name:
            raise KvTransferError(f"{peer_name!r} is not this worker ({self.name!r})")

    def _receive(self, notif: bytes) -> None:
        if self._closed:
            return
        self._queue.append(notif)
        if self._callback is not None:
            self._callback()
