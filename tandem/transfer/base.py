"""The KV transport seam: "move these blocks of that worker into these blocks of mine".

A worker's KV pool is block-major, so block ``i`` of a pool is one byte range
``[base + i * block_nbytes, base + (i + 1) * block_nbytes)``. Every transport describes blocks
the same way, as :data:`BlockDesc` ``(address, nbytes, device_id)``, and moves them the same way:

1. the *owner* (prefill side) creates its transport over its pool (registration) and publishes
   :attr:`KvTransport.name` + :attr:`KvTransport.metadata` (in ``InstanceInfo`` and in every
   ``KvTransferParams``) and :meth:`KvTransport.block_descriptors` of the blocks it pinned;
2. the *reader* (decode side) may :meth:`KvTransport.connect` to an owner ahead of time (when it
   appears in the registry) so the first transfer pays no connection set-up;
3. the reader calls :meth:`KvTransport.read_blocks` — the bytes land in its own blocks, then the
   notification (the request id) is delivered to the owner; :meth:`KvTransport.notify` delivers
   it without reading (nothing to read, or the import failed), so the owner always frees;
4. the owner drains notifications with :meth:`KvTransport.poll_notifs` and frees the pinned
   blocks. ``poll_interval_s`` says how it must poll: a float means "call :meth:`poll_notifs`
   that often while any of your blocks may be read" (NIXL without a progress thread: remote
   READs only advance when the owner calls into NIXL); ``None`` means notifications are pushed
   and the callback given to :meth:`KvTransport.set_notif_callback` fires when some are ready.

Implementations:

* :class:`tandem.transfer.nixl.KvTransferAgent` (``kind="nixl"``) — real bytes between
  processes through NIXL/UCX; the default for the model engine.
* :class:`tandem.transfer.local.LocalTransport` (``kind="local"``) — a worker of role ``both``
  decoding a request it prefilled itself: a block copy inside its own pool.
* :class:`tandem.transfer.simulated.SimulatedTransport` (``kind="simulated"``) — the mock
  engine's: no bytes, the transfer takes ``bytes / bandwidth``, notifications are delivered in
  process (owner hosted by the same process) or over NATS.

Every method is called from the asyncio loop thread. This module imports neither torch nor nixl.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from tandem.protocol.messages import PROTOCOL_VERSION, KvTransferStats

__all__ = [
    "KV_LAYOUT",
    "BlockDesc",
    "KvTransferError",
    "KvTransport",
    "TransportKind",
    "block_ids_of",
    "compat_hash",
    "pool_descriptors",
]

TransportKind = Literal["nixl", "local", "simulated"]

KV_LAYOUT = "block-major:(num_blocks,num_layers,2,block_size,kv_heads,head_dim)"
"""The KV tensor layout every tandem worker uses; part of :func:`compat_hash`."""

BlockDesc = tuple[int, int, int]
"""One memory range: ``(address, nbytes, device_id)``; ``device_id`` is 0 for DRAM, the CUDA
device index for VRAM."""


class KvTransferError(RuntimeError):
    """A KV transfer could not be set up, failed or timed out.

    ``released``: None when nothing may still write the destination blocks (the usual case);
    else a future that completes once the transport let go of the transfer (e.g. NIXL could not
    release a timed-out READ yet). Until then the destination blocks must not be freed or
    reused: the READ may still land in them.
    """

    released: asyncio.Future[None] | None = None


def compat_hash(
    model: str,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: Any,
    block_size: int,
    *,
    layout: str = KV_LAYOUT,
    protocol_version: int = PROTOCOL_VERSION,
) -> str:
    """Fingerprint of everything that must match for raw KV bytes to mean the same on two workers.

    Args:
        model: model name (e.g. ``"smollm2-135m-instruct"``).
        num_layers, num_kv_heads, head_dim: KV geometry of the model.
        dtype: KV element type, as a torch dtype or its name (``torch.bfloat16``, ``"bfloat16"``
            and ``"torch.bfloat16"`` hash the same).
        block_size: tokens per KV block.
        layout: KV tensor layout string (default :data:`KV_LAYOUT`); a mock worker passes its
            own, so a real worker never accepts simulated KV.
        protocol_version: tandem wire protocol version.

    Returns:
        16 lowercase hex characters (64-bit BLAKE2b of a canonical encoding); stable across
        processes, machines and Python versions.
    """
    fields = {
        "model": str(model),
        "num_layers": int(num_layers),
        "num_kv_heads": int(num_kv_heads),
        "head_dim": int(head_dim),
        "dtype": str(dtype).removeprefix("torch."),
        "block_size": int(block_size),
        "layout": str(layout),
        "protocol_version": int(protocol_version),
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(canonical, digest_size=8).hexdigest()


def pool_descriptors(
    block_ids: Iterable[int], base: int, block_nbytes: int, num_blocks: int, dev_id: int = 0
) -> list[BlockDesc]:
    """``(base + id * block_nbytes, block_nbytes, dev_id)`` per block id, in order.

    Raises:
        IndexError: a block id is outside ``[0, num_blocks)``.
    """
    out: list[BlockDesc] = []
    for b in block_ids:
        if not 0 <= b < num_blocks:
            raise IndexError(f"block id {b} outside [0, {num_blocks})")
        out.append((base + b * block_nbytes, block_nbytes, dev_id))
    return out


def block_ids_of(descs: Sequence[Sequence[int]], base: int, block_nbytes: int, num_blocks: int) -> list[int]:
    """The block ids that :func:`pool_descriptors` ``(…, base, block_nbytes, num_blocks)`` maps to
    ``descs`` (the inverse).

    Raises:
        ValueError: a descriptor is not exactly one block of this pool.
    """
    out: list[int] = []
    for addr, nbytes, _dev in descs:
        off = int(addr) - base
        if nbytes != block_nbytes or off % block_nbytes or not 0 <= off // block_nbytes < num_blocks:
            raise ValueError(f"descriptor ({addr}, {nbytes}) is not a block of this pool")
        out.append(off // block_nbytes)
    return out


@runtime_checkable
class KvTransport(Protocol):
    """A worker's view of KV movement; see the module docstring for the life of a transfer.

    Attributes:
        kind: ``"nixl"``, ``"local"`` or ``"simulated"``.
        name: how peers address this transport (``KvTransferParams.agent_name``).
        metadata: what a peer needs to reach it (``KvTransferParams.agent_metadata``).
        block_nbytes: bytes of one block of the local pool.
        poll_interval_s: how often the owner must call :meth:`poll_notifs` while any of its
            blocks may be read (s); ``None``: notifications are pushed (see
            :meth:`set_notif_callback`) and nothing needs polling.
    """

    kind: str
    name: str
    metadata: bytes
    block_nbytes: int
    poll_interval_s: float | None

    @property
    def pending_transfers(self) -> int:
        """Transfers started by this side and not finished yet."""
        ...

    def block_descriptors(self, block_ids: Iterable[int], /) -> list[BlockDesc]:
        """Descriptors of local blocks, in the given order (``IndexError`` out of range)."""
        ...

    def poll_notifs(self) -> list[bytes]:
        """Drain the notifications received since the last call, oldest first."""
        ...

    def set_notif_callback(self, callback: Callable[[], None] | None, /) -> None:
        """Call ``callback()`` (on the loop thread) when :meth:`poll_notifs` has something new.

        Push transports only; a polled transport (``poll_interval_s`` set) never calls it.
        """
        ...

    async def connect(self, peer_name: str, peer_metadata: bytes, /) -> None:
        """Set up the connection to an owner ahead of the first transfer (``KvTransferError`` if
        its metadata cannot be loaded). Idempotent."""
        ...

    def disconnect(self, peer_name: str, /) -> None:
        """Forget a peer (it left the registry); a later transfer reconnects. Never raises."""
        ...

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
        """Copy the peer's blocks ``remote_descs[i]`` into local block ``local_block_ids[i]``,
        then deliver ``notif`` to the peer (also when there is nothing to copy).

        Returns ``KvTransferStats(blocks, bytes, ms)`` (``reused_blocks`` is the caller's).

        Raises:
            ValueError: lengths or sizes do not match.
            IndexError: a local block id is out of range.
            KvTransferError: the peer cannot be reached, the transfer failed or timed out.
        """
        ...

    async def notify(self, peer_name: str, peer_metadata: bytes, notif: bytes, /) -> None:
        """Deliver ``notif`` to the peer without reading (``KvTransferError`` on failure)."""
        ...

    async def aclose(self) -> None:
        """Release everything (idempotent; errors are logged, not raised)."""
        ...
