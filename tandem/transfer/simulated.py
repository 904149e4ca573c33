"""A KV transport that moves no bytes and takes the time the bytes would: the mock engine's.

Like Dynamo mocker's ``--kv-transfer-bandwidth``: a READ of ``n`` blocks sleeps
``n * block_nbytes / (bandwidth_gbps * 1e9)`` seconds, rounded up to whole milliseconds (the
event loop's timer resolution; no sleep for bandwidth 0), then delivers
the notification to the owner, which frees its pinned blocks exactly as after a NIXL READ.
Notifications reach the owner

* in process, when the owner is a :class:`SimulatedTransport` of this same process (many mock
  workers per process): straight into its queue;
* over NATS otherwise: the owner subscribes to its own ``notify_subject`` (:meth:`start`) and
  advertises it in its :attr:`SimulatedTransport.metadata`, the reader publishes the raw
  notification bytes there.

Descriptors are ``(block_id * block_nbytes, block_nbytes, 0)``: addresses in a pool that does not
exist, so sizes and counts are checked exactly as for NIXL. Notifications are pushed
(``poll_interval_s is None``): the owner's callback fires when one arrives, nothing polls.
No torch, no nixl.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from tandem.protocol.messages import KvTransferStats
from tandem.transfer.base import BlockDesc, KvTransferError, pool_descriptors

__all__ = ["PROCESS_TOKEN", "SimulatedTransport", "transfer_seconds"]

log = logging.getLogger(__name__)

PROCESS_TOKEN = uuid.uuid4().hex
"""Identifies this process in metadata: a peer with the same token is reached in process."""

#: Transports of this process by name (what in-process delivery looks up).
_HOSTED: dict[str, SimulatedTransport] = {}


class _PeerAddress(msgspec.Struct, frozen=True):
    """What :attr:`SimulatedTransport.metadata` encodes (msgpack)."""

    transport: str
    process: str
    notify_subject: str = ""


_encode = msgspec.msgpack.Encoder().encode
_decode_address = msgspec.msgpack.Decoder(_PeerAddress).decode


def transfer_seconds(nbytes: int, bandwidth_gbps: float) -> float:
    """Seconds ``nbytes`` take at ``bandwidth_gbps`` (1 GB = 1e9 B); 0 for a bandwidth of 0."""
    return nbytes / (bandwidth_gbps * 1e9) if bandwidth_gbps > 0 else 0.0


async def _sleep_at_least(seconds: float) -> None:
    """Sleep ``seconds`` rounded up to whole milliseconds: event-loop timers are whole ms (uvloop
    rounds to the nearest, so a 0.3 ms transfer would take no time at all; tokio, under Dynamo's
    mocker, rounds up too), and a transfer must never be faster than its bytes allow."""
    await asyncio.sleep(math.ceil(seconds * 1e3 - 1e-9) / 1e3)


class SimulatedTransport:
    """The simulated :class:`~tandem.transfer.base.KvTransport` of one mock worker.

    Args:
        name: unique in this process and among peers (e.g. ``tandem-<instance id>``).
        num_blocks: blocks of the (virtual) local pool.
        block_nbytes: bytes one block would hold (sizes the simulated time).
        bandwidth_gbps: simulated bandwidth (GB/s, 1e9 B/s; 0 = instant).
        nc: NATS connection to publish notifications to owners in other processes, and (with
            ``notify_subject``) to receive them; None = in-process peers only.
        notify_subject: where this transport receives notifications from other processes
            (subscribed by :meth:`start`).

    Raises:
        ValueError: a bad size or bandwidth, or ``name`` is already taken in this process.
    """

    kind = "simulated"
    poll_interval_s: float | None = None

    def __init__(
        self,
        name: str,
        num_blocks: int,
        block_nbytes: int,
        bandwidth_gbps: float,
        *,
        nc: Any = None,
        notify_subject: str = "",
    ) -> None:
        if num_blocks <= 0 or block_nbytes <= 0:
            raise ValueError(f"need positive num_blocks and block_nbytes, got {num_blocks}, {block_nbytes}")
        if not bandwidth_gbps >= 0:
            raise ValueError(f"bandwidth_gbps must be >= 0, got {bandwidth_gbps}")
        if name in _HOSTED:
            raise ValueError(f"a simulated transport named {name!r} already exists in this process")
        self.name = name
        self.num_blocks = int(num_blocks)
        self.block_nbytes = int(block_nbytes)
        self.bandwidth_gbps = float(bandwidth_gbps)
        self.metadata: bytes = _encode(
            _PeerAddress(transport=self.kind, process=PROCESS_TOKEN, notify_subject=notify_subject)
        )
        self._nc = nc
        self._notify_subject = notify_subject
        self._sub: Any = None
        self._queue: list[bytes] = []
        self._callback: Callable[[], None] | None = None
        self._inflight = 0
        self._closed = False
        _HOSTED[name] = self

    async def start(self) -> None:
        """Subscribe to ``notify_subject`` (if set) for notifications from other processes."""
        if self._nc is None or not self._notify_subject or self._sub is not None:
            return

        async def on_msg(msg: Any) -> None:
            self._receive(bytes(msg.data))

        self._sub = await self._nc.subscribe(self._notify_subject, cb=on_msg)

    # ---- owner side ----

    def block_descriptors(self, block_ids: Iterable[int], /) -> list[BlockDesc]:
        """``(id * block_nbytes, block_nbytes, 0)`` per block (``IndexError`` out of range)."""
        return pool_descriptors(block_ids, 0, self.block_nbytes, self.num_blocks)

    def poll_notifs(self) -> list[bytes]:
        """Drain the notifications received so far, oldest first."""
        out, self._queue = self._queue, []
        return out

    def set_notif_callback(self, callback: Callable[[], None] | None, /) -> None:
        """``callback()`` runs (on the loop) whenever a notification arrives."""
        self._callback = callback

    def _receive(self, notif: bytes) -> None:
        if self._closed:
            return
        self._queue.append(notif)
        if self._callback is not None:
            self._callback()

    # ---- reader side ----

    @property
    def pending_transfers(self) -> int:
        """Simulated READs in progress."""
        return self._inflight

    async def connect(self, peer_name: str, peer_metadata: bytes, /) -> None:
        """Nothing to set up; checks that the metadata is a simulated peer's."""
        self._address(peer_name, peer_metadata)

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
        """Sleep ``bytes / bandwidth``, then deliver ``notif`` to the owner. See
        :meth:`tandem.transfer.base.KvTransport.read_blocks` for the contract."""
        self._check_open()
        if len(remote_descs) != len(local_block_ids):
            raise ValueError(f"{len(remote_descs)} remote descriptors, {len(local_block_ids)} local blocks")
        for d in remote_descs:
            if int(d[1]) != self.block_nbytes:
                raise ValueError(f"remote block is {d[1]} B, local blocks are {self.block_nbytes} B")
        self.block_descriptors(local_block_ids)  # IndexError for a bad local id
        address = self._address(peer_name, peer_metadata)
        t0 = time.perf_counter()
        nbytes = len(local_block_ids) * self.block_nbytes
        seconds = transfer_seconds(nbytes, self.bandwidth_gbps)
        self._inflight += 1
        try:
            if seconds > timeout_s:
                await asyncio.sleep(timeout_s)
                raise KvTransferError(
                    f"simulated READ of {nbytes} B from {peer_name!r} takes {seconds:.3f} s "
                    f"> timeout {timeout_s} s"
                )
            if seconds > 0:
                await _sleep_at_least(seconds)
            self._check_open()
            await self._deliver(peer_name, address, notif)
        finally:
            self._inflight -= 1
        ms = (time.perf_counter() - t0) * 1e3
        return KvTransferStats(blocks=len(local_block_ids), bytes=nbytes, ms=ms)

    async def notify(self, peer_name: str, peer_metadata: bytes, notif: bytes, /) -> None:
        """Deliver ``notif`` to the owner now (``KvTransferError`` if it cannot be reached)."""
        self._check_open()
        await self._deliver(peer_name, self._address(peer_name, peer_metadata), notif)

    # ---- life cycle ----

    async def aclose(self) -> None:
        """Stop receiving, leave this process's table (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if _HOSTED.get(self.name) is self:
            del _HOSTED[self.name]
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                log.debug("unsubscribe %s failed: %s", self._notify_subject, exc)

    def __repr__(self) -> str:
        return (
            f"SimulatedTransport(name={self.name!r}, blocks={self.num_blocks}, "
            f"block_nbytes={self.block_nbytes}, {self.bandwidth_gbps:g} GB/s, closed={self._closed})"
        )

    # ---- internals ----

    def _check_open(self) -> None:
        if self._closed:
            raise KvTransferError(f"SimulatedTransport {self.name!r} is closed")

    def _address(self, peer_name: str, peer_metadata: bytes) -> _PeerAddress:
        try:
            address = _decode_address(peer_metadata)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise KvTransferError(f"{peer_name!r}: not a simulated transport's metadata ({exc})") from None
        if address.transport != self.kind:
            raise KvTransferError(f"{peer_name!r} is a {address.transport!r} transport, not simulated")
        return address

    async def _deliver(self, peer_name: str, address: _PeerAddress, notif: bytes) -> None:
        if address.process == PROCESS_TOKEN:
            peer = _HOSTED.get(peer_name)
            if peer is None:
                raise KvTransferError(f"simulated peer {peer_name!r} is gone")
            peer._receive(notif)
            return
        if self._nc is None or not address.notify_subject:
            raise KvTransferError(f"simulated peer {peer_name!r} is in another process and there is no NATS")
        try:
            await self._nc.publish(address.notify_subject, notif)
        except Exception as exc:
            raise KvTransferError(f"notification to {peer_name!r} failed: {exc}") from exc
