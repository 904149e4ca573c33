"""KV-cache block transfer between worker processes through NIXL (UCX backend).

The NIXL implementation of :class:`tandem.transfer.base.KvTransport` (``kind="nixl"``). Each
worker owns one KV tensor laid out block-major,
``(num_blocks, num_layers, 2, block_size, kv_heads, head_dim)``, so block ``i`` is the byte range
``[base + i * block_nbytes, base + (i + 1) * block_nbytes)``. A :class:`KvTransferAgent`
registers that tensor once with NIXL and then:

* as the *owner* (prefill side) publishes :attr:`KvTransferAgent.metadata` and
  :meth:`KvTransferAgent.block_descriptors`, and calls :meth:`KvTransferAgent.poll_notifs`
  regularly (about every 1 ms while transfers may be outstanding): NIXL's progress thread is off,
  so READs against this agent only advance when the owner calls into NIXL;
* as the *reader* (decode side) connects to owners ahead of time
  (:meth:`KvTransferAgent.connect`, when they register: the UCX set-up then happens before the
  first READ, which runs at full speed) and pulls remote blocks into its own blocks with
  :meth:`KvTransferAgent.read_blocks`, which also delivers a notification (the request id) to
  the owner once the data has landed.

Thread safety: the NIXL agent is created without locking (``NIXL_THREAD_SYNC_NONE``): every call
on one :class:`KvTransferAgent` must come from one thread at a time — in tandem, the asyncio loop
thread. ``nixl`` and ``torch`` are imported lazily: importing this module never fails and does
not load torch; constructing an agent raises :class:`NixlUnavailableError` when NIXL or its UCX
backend cannot load.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from tandem.protocol.messages import KvTransferStats
from tandem.transfer.base import KV_LAYOUT, BlockDesc, KvTransferError, compat_hash, pool_descriptors

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MAX_CHUNK_BYTES",
    "KV_LAYOUT",
    "WARMUP_NOTIF",
    "BlockDesc",
    "KvTransferAgent",
    "KvTransferError",
    "NixlTransport",
    "NixlUnavailableError",
    "alloc_kv_cache",
    "coalesce_descriptors",
    "compat_hash",
    "split_chunks",
]

# NIXL's Python logger reads NIXL_LOG_LEVEL when nixl is first imported; default it to WARN so
# every agent creation does not print INFO lines. An explicit setting wins.
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

log = logging.getLogger(__name__)

_INSTALL_HINT = (
    "install the CPU torch wheel first (pip install torch==2.13.0), then pip install nixl; "
    "a bare `pip install nixl` on a machine without torch pulls the CUDA torch build"
)

# Poll schedule while a READ is in flight: yield-only polling for the first _SPIN_S seconds
# (small reads finish in tens of microseconds), then sleep _POLL_SLEEP_S between polls.
_SPIN_S = 0.002
_POLL_SLEEP_S = 0.0005
# A notification to a peer this agent has not talked to yet waits for UCX connection set-up,
# which only advances while *this* agent calls into NIXL: after such a send, keep progressing the
# worker from a background task for this long (set-up takes ~15 ms on a loaded 2-core box).
_LINGER_S = 0.5
_LINGER_POLL_S = 0.001

#: What :meth:`KvTransferAgent.connect` sends a new peer; :meth:`KvTransferAgent.poll_notifs` drops it.
WARMUP_NOTIF = b"\x00tandem-warmup"

#: How often an owner must call :meth:`KvTransferAgent.poll_notifs` while its blocks may be read (s).
POLL_INTERVAL_S = 0.001

DEFAULT_MAX_CHUNK_BYTES = 32 << 20
"""Default upper bound of one NIXL READ request (bytes); see :meth:`KvTransferAgent.read_blocks`."""

_HUGE_PAGE = 2 << 20


class NixlUnavailableError(RuntimeError):
    """NIXL, or its UCX backend, could not be loaded on this machine."""


# ---- pure helpers ---------------------------------------------------------------------------------


def coalesce_descriptors(
    local: Sequence[BlockDesc], remote: Sequence[BlockDesc]
) -> tuple[list[BlockDesc], list[BlockDesc]]:
    """Merge runs of descriptor pairs that are contiguous on *both* sides.

    Pair ``i`` and pair ``i + 1`` merge when ``local[i]`` ends where ``local[i + 1]`` starts,
    ``remote[i]`` ends where ``remote[i + 1]`` starts and the device ids match on each side.
    Order is kept; the total byte count is unchanged.

    Args:
        local, remote: equally long lists of ``(addr, nbytes, dev_id)``; pair ``i`` copies
            ``remote[i]`` into ``local[i]``, so ``local[i]`` and ``remote[i]`` have the same
            ``nbytes``.

    Returns:
        ``(local, remote)`` merged lists, equally long (empty for empty input).

    Raises:
        ValueError: lengths differ, or a pair's byte counts differ or are not positive.
    """
    if len(local) != len(remote):
        raise ValueError(f"{len(local)} local descriptors but {len(remote)} remote descriptors")
    out_local: list[BlockDesc] = []
    out_remote: list[BlockDesc] = []
    for (l_addr, l_len, l_dev), (r_addr, r_len, r_dev) in zip(local, remote, strict=True):
        if l_len != r_len or l_len <= 0:
            raise ValueError(f"descriptor pair sizes differ or are empty: local {l_len} B, remote {r_len} B")
        if out_local:
            pl_addr, pl_len, pl_dev = out_local[-1]
            pr_addr, pr_len, pr_dev = out_remote[-1]
            if (
                pl_addr + pl_len == l_addr
                and pr_addr + pr_len == r_addr
                and pl_dev == l_dev
                and pr_dev == r_dev
            ):
                out_local[-1] = (pl_addr, pl_len + l_len, pl_dev)
                out_remote[-1] = (pr_addr, pr_len + r_len, pr_dev)
                continue
        out_local.append((int(l_addr), int(l_len), int(l_dev)))
        out_remote.append((int(r_addr), int(r_len), int(r_dev)))
    return out_local, out_remote


def split_chunks(
    local: Sequence[BlockDesc],
    remote: Sequence[BlockDesc],
    block_nbytes: int,
    max_chunk_bytes: int,
) -> list[tuple[list[BlockDesc], list[BlockDesc]]]:
    """Group (coalesced) descriptor pairs into requests of at most ``max_chunk_bytes`` each.

    Pairs larger than the limit are cut at block boundaries; a chunk always holds at least one
    block, so a block larger than ``max_chunk_bytes`` gets a chunk of its own. Order is kept.

    Args:
        local, remote: equally long ``(addr, nbytes, dev_id)`` lists with equal ``nbytes`` per
            pair, each ``nbytes`` a multiple of ``block_nbytes`` (as from
            :func:`coalesce_descriptors` over whole blocks).
        block_nbytes: bytes of one block.
        max_chunk_bytes: upper bound of a chunk's bytes.

    Returns:
        ``[(local_descs, remote_descs), ...]``; empty for empty input.

    Raises:
        ValueError: a pair's sizes differ or are not a positive multiple of ``block_nbytes``.
    """
    per_piece = max(1, max_chunk_bytes // block_nbytes) * block_nbytes
    chunks: list[tuple[list[BlockDesc], list[BlockDesc]]] = []
    cur_l: list[BlockDesc] = []
    cur_r: list[BlockDesc] = []
    cur_bytes = 0
    for (l_addr, l_len, l_dev), (r_addr, r_len, r_dev) in zip(local, remote, strict=True):
        if l_len != r_len or l_len <= 0 or l_len % block_nbytes:
            raise ValueError(f"pair of {l_len} B / {r_len} B is not whole blocks of {block_nbytes} B")
        off = 0
        while off < l_len:
            n = min(per_piece, l_len - off)
            if cur_l and cur_bytes + n > max_chunk_bytes:
                chunks.append((cur_l, cur_r))
                cur_l, cur_r, cur_bytes = [], [], 0
            cur_l.append((l_addr + off, n, l_dev))
            cur_r.append((r_addr + off, n, r_dev))
            cur_bytes += n
            off += n
    if cur_l:
        chunks.append((cur_l, cur_r))
    return chunks


def alloc_kv_cache(
    shape: Sequence[int], dtype: torch.dtype | None = None, *, prefault: bool = True
) -> torch.Tensor:
    """A zeroed CPU tensor for a KV cache, backed by 2 MiB-aligned memory advised for huge pages.

    Transparent huge pages matter for NIXL over UCX/cma: with the kernel's THP mode ``madvise``
    (common), ``torch.empty`` memory uses 4 KiB pages, and a cross-process READ of it measured
    2-5x slower than between huge-page buffers (see ``scripts/bench_kv_transfer.py``).

    Args:
        shape: tensor shape, e.g. ``(num_blocks, num_layers, 2, block_size, kv_heads, head_dim)``.
        dtype: element type (default ``torch.bfloat16``).
        prefault: write every page now, so memory is committed up front rather than during the
            first transfers.

    Returns:
        A contiguous tensor of ``shape``; it keeps its mapping alive. Where ``madvise`` or huge
        pages are unavailable the memory is still valid, just with normal pages.
    """
    import mmap

    import torch

    if dtype is None:
        dtype = torch.bfloat16
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    size = max(_HUGE_PAGE, -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE)
    # Anonymous mappings are page-aligned; map one huge page more and start at a 2 MiB boundary.
    mm = mmap.mmap(-1, size + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(mm, dtype=torch.uint8)  # holds a reference to `mm`
    skip = -raw.data_ptr() % _HUGE_PAGE
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE, skip, size)
        except OSError as exc:  # THP disabled in this kernel
            log.debug("madvise(MADV_HUGEPAGE) failed: %s", exc)
    out = raw[skip : skip + nbytes].view(dtype).view(tuple(shape))
    if prefault:
        out.view(torch.uint8).view(-1)[::4096].zero_()  # one write per 4 KiB page
    return out


def _load_nixl() -> tuple[Any, Any]:
    """``(nixl_agent, nixl_agent_config)`` classes, or :class:`NixlUnavailableError`."""
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except Exception as exc:  # ImportError, OSError from the native libs, CUDA detection...
        raise NixlUnavailableError(
            f"cannot import NIXL ({type(exc).__name__}: {exc}); {_INSTALL_HINT}"
        ) from exc
    return nixl_agent, nixl_agent_config


# ---- the agent ---------------------------------------------------------------------------------


class KvTransferAgent:
    """One NIXL agent over one worker's whole KV tensor: the NIXL :class:`~tandem.transfer.base.KvTransport`.

    Args:
        name: agent name, unique among all agents that talk to each other (e.g. the worker id).
        kv_cache: the worker's KV tensor, contiguous, on CPU (registered as NIXL ``DRAM``) or on a
            CUDA device (``VRAM``); block-major, shape ``(num_blocks, ...)`` with every block
            ``block_nbytes`` bytes. It must outlive the agent (the agent keeps a reference).
        block_nbytes: bytes of one block (all layers, K and V), e.g. 368,640 for SmolLM2-135M
            bf16 with 16-token blocks.

    Raises:
        NixlUnavailableError: NIXL or its UCX backend cannot be loaded or created.
        ValueError: ``kv_cache`` is not contiguous, or its size is not a positive multiple of
            ``block_nbytes``.
        KvTransferError: NIXL refused to register the tensor.

    Creating an agent takes a few hundred ms (UCX set-up); do it once per worker.
    """

    kind = "nixl"
    poll_interval_s: float | None = POLL_INTERVAL_S

    def __init__(self, name: str, kv_cache: torch.Tensor, block_nbytes: int) -> None:
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be contiguous")
        total = kv_cache.numel() * kv_cache.element_size()
        if block_nbytes <= 0 or total == 0 or total % block_nbytes:
            raise ValueError(f"kv_cache is {total} B, not a positive multiple of block_nbytes={block_nbytes}")
        if kv_cache.device.type == "cpu":
            self._mem_type = "DRAM"
            self._dev_id = 0
        elif kv_cache.device.type == "cuda":
            self._mem_type = "VRAM"
            self._dev_id = int(kv_cache.device.index or 0)
        else:
            raise ValueError(f"unsupported kv_cache device {kv_cache.device}")

        self.name = name
        self.block_nbytes = int(block_nbytes)
        self.num_blocks = total // self.block_nbytes
        self._kv = kv_cache
        self._base = int(kv_cache.data_ptr())
        self._remotes: dict[str, bytes] = {}  # remote agent name -> metadata it was loaded from
        self._backlog: list[bytes] = []  # notifications drained outside poll_notifs()
        # xfer handles whose release failed, with the future a caller waits on; retried later
        self._stuck: list[tuple[Any, asyncio.Future[None]]] = []
        self._inflight = 0
        self._inflight_peers: dict[str, int] = {}  # peer -> READs in flight to it
        self._connected: set[str] = set()  # peers a transfer or a lingered notif went through to
        self._lingers: set[asyncio.Task[None]] = set()
        self._closed = False

        agent_cls, config_cls = _load_nixl()
        try:
            # The UCX backend is created by the constructor from `backends`; a missing plugin
            # only logs a warning there, hence the explicit check below.
            self._agent = agent_cls(name, config_cls(enable_prog_thread=False, backends=["UCX"]))
        except Exception as exc:
            raise NixlUnavailableError(
                f"cannot create a NIXL agent with the UCX backend ({type(exc).__name__}: {exc}); "
                f"{_INSTALL_HINT}"
            ) from exc
        if "UCX" not in self._agent.backends:
            plugins = self._agent.get_plugin_list()
            raise NixlUnavailableError(f"NIXL UCX plugin not available (plugins: {plugins}); {_INSTALL_HINT}")
        try:
            self._reg = self._agent.register_memory([(self._base, total, self._dev_id, "")], self._mem_type)
        except Exception as exc:
            raise KvTransferError(f"NIXL could not register the KV tensor ({total} B): {exc}") from exc
        self.metadata: bytes = self._agent.get_agent_metadata()
        """Agent metadata (about 0.5 KB): what a reader needs to reach this agent."""

    @property
    def base_addr(self) -> int:
        """Address of block 0 (what :meth:`block_descriptors` counts from)."""
        return self._base

    # ---- owner side ----

    def block_descriptors(self, block_ids: Iterable[int]) -> list[BlockDesc]:
        """``(addr, nbytes, dev_id)`` of each block, in the given order; ``nbytes == block_nbytes``.

        Raises:
            IndexError: a block id is outside ``[0, num_blocks)``.
        """
        return pool_descriptors(block_ids, self._base, self.block_nbytes, self.num_blocks, self._dev_id)

    def set_notif_callback(self, callback: Callable[[], None] | None) -> None:
        """Nothing to do: NIXL notifications are polled (:attr:`poll_interval_s`)."""

    def poll_notifs(self) -> list[bytes]:
        """Drain the notifications received since the last call (e.g. request ids), oldest first.

        Also progresses this agent's UCX worker: an owner must call it regularly (about every
        1 ms while any of its blocks may be read), or remote READs against it stall.
        """
        self._check_open()
        self._retry_stuck()
        out, self._backlog = self._backlog, []
        for msgs in self._agent.get_new_notifs().values():
            out.extend(bytes(m) for m in msgs)
        return [m for m in out if m != WARMUP_NOTIF]

    # ---- reader side ----

    async def connect(self, peer_name: str, peer_metadata: bytes) -> None:
        """Connect to an owner ahead of the first READ, so that READ runs at full speed.

        Loads the owner's metadata, asks NIXL to connect and sends the owner one
        :data:`WARMUP_NOTIF` (its :meth:`poll_notifs` drops it): UCX sets up the connection's
        active-message path on the first notification, which is otherwise paid by the first
        READ. A background task then progresses this agent for a while so the set-up completes
        without waiting for a request. Measured on a 2-core box (``scripts/bench_kv_transfer.py
        --first-reads``, 1008 tokens = 23 MB, contiguous): the first READ of a fresh reader runs
        at 1.0-1.3 GB/s cold, 3.5-4 GB/s after the connection alone, and 6-7 GB/s (0.7-0.9x
        memcpy, like every later READ) after connection + notification. Idempotent per peer.

        Raises:
            KvTransferError: the metadata cannot be loaded or NIXL refuses the connection.
        """
        self._check_open()
        self._ensure_remote(peer_name, peer_metadata)
        if peer_name in self._connected:
            return
        try:
            self._agent.make_connection(peer_name)
        except Exception as exc:
            raise KvTransferError(f"cannot connect to NIXL agent {peer_name!r}: {exc}") from exc
        self.send_notif(peer_name, WARMUP_NOTIF)

    def disconnect(self, peer_name: str) -> None:
        """Forget a peer (it left the registry): unload its metadata unless a READ to it is in
        flight. A later READ loads it again. Never raises."""
        if self._closed or peer_name not in self._remotes or self._inflight_peers.get(peer_name):
            return
        self._remotes.pop(peer_name, None)
        self._connected.discard(peer_name)
        try:
            self._agent.remove_remote_agent(peer_name)
        except Exception as exc:
            log.warning("NIXL remove_remote_agent(%s) failed: %s", peer_name, exc)

    async def notify(self, peer_name: str, peer_metadata: bytes, notif: bytes) -> None:
        """Deliver ``notif`` to the owner without reading (loads its metadata if needed).

        Raises:
            KvTransferError: the metadata cannot be loaded or NIXL cannot send.
        """
        self._check_open()
        self._ensure_remote(peer_name, peer_metadata)
        self.send_notif(peer_name, notif)

    def send_notif(self, remote_name: str, msg: bytes) -> None:
        """Send a standalone notification to an already added remote agent.

        The send is queued, not awaited. On a connection this agent has not used yet it only goes
        out once UCX finishes connecting, which needs this agent to call into NIXL: when called
        from a running event loop, a background task keeps progressing it for up to 0.5 s;
        otherwise the caller must keep calling :meth:`poll_notifs`.

        Raises:
            KvTransferError: the remote agent is unknown or NIXL failed to send.
        """
        self._check_open()
        try:
            self._agent.send_notif(remote_name, msg)
        except Exception as exc:
            raise KvTransferError(f"send_notif to {remote_name!r} failed: {exc}") from exc
        if remote_name not in self._connected:
            self._start_linger(remote_name)

    def _start_linger(self, remote_name: str) -> None:
        """Progress this agent from a background task for a while (no-op outside a loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._linger(remote_name))
        self._lingers.add(task)
        task.add_done_callback(self._lingers.discard)

    async def read_blocks(
        self,
        remote_agent_name: str,
        remote_metadata: bytes,
        remote_descs: Sequence[Sequence[int]],
        local_block_ids: Sequence[int],
        notif: bytes,
        timeout_s: float = 10.0,
        *,
        remote_mem_type: str | None = None,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> KvTransferStats:
        """READ remote blocks into local blocks, then notify the owner with ``notif``.

        Args:
            remote_agent_name: the owner's agent name (``KvTransferParams.agent_name``).
            remote_metadata: the owner's :attr:`metadata`; loaded on first use and reloaded when
                it changes (the owner restarted under the same name).
            remote_descs: ``(addr, nbytes, dev_id)`` per remote block; every ``nbytes`` must equal
                this agent's ``block_nbytes``.
            local_block_ids: destination block ids, same length and order as ``remote_descs``.
            notif: message delivered to the owner's :meth:`poll_notifs` after the data has been
                read — also when there is nothing to read (then through :meth:`send_notif`, which
                needs the event loop to keep running for a moment on a first contact).
            timeout_s: seconds before giving up on the transfer.
            remote_mem_type: ``"DRAM"`` or ``"VRAM"`` of the remote tensor; default: same as
                the local one.
            max_chunk_bytes: the READ is issued as sequential NIXL requests of at most this many
                bytes (whole blocks; at least one block each). Over UCX/cma the copy runs inside
                the posting call, so this bounds how long the event loop is blocked at a time.

        Returns:
            ``KvTransferStats(blocks, bytes, ms)`` (``reused_blocks`` left 0 for the caller).

        Raises:
            ValueError: lengths or sizes do not match.
            IndexError: a local block id is out of range.
            KvTransferError: remote metadata cannot be loaded, NIXL rejects the request, the
                transfer ends in ``ERR`` or does not finish within ``timeout_s``. The NIXL
                request is released (or cancelled) in every case.
        """
        self._check_open()
        if len(remote_descs) != len(local_block_ids):
            raise ValueError(
                f"{len(remote_descs)} remote descriptors but {len(local_block_ids)} local blocks"
            )
        remote = [(int(a), int(n), int(d)) for a, n, d in remote_descs]
        for _, n, _ in remote:
            if n != self.block_nbytes:
                raise ValueError(f"remote block is {n} B, local blocks are {self.block_nbytes} B")
        local_c, remote_c = coalesce_descriptors(self.block_descriptors(local_block_ids), remote)

        t0 = time.perf_counter()
        self._ensure_remote(remote_agent_name, remote_metadata)
        if not local_c:
            self.send_notif(remote_agent_name, notif)
            return KvTransferStats(blocks=0, bytes=0, ms=(time.perf_counter() - t0) * 1e3)

        nbytes = len(remote) * self.block_nbytes
        chunks = split_chunks(local_c, remote_c, self.block_nbytes, max_chunk_bytes)
        deadline = t0 + timeout_s
        self._inflight += 1
        self._inflight_peers[remote_agent_name] = self._inflight_peers.get(remote_agent_name, 0) + 1
        try:
            for k, (local_k, remote_k) in enumerate(chunks):
                last = k == len(chunks) - 1
                # Only the last chunk notifies: chunks run one after the other, so the owner
                # hears `notif` only once every byte has landed.
                await self._read_chunk(
                    remote_agent_name,
                    local_k,
                    remote_k,
                    remote_mem_type or self._mem_type,
                    notif if last else b"",
                    deadline,
                    f"READ of {len(remote)} blocks ({nbytes} B) from {remote_agent_name!r}",
                )
            self._connected.add(remote_agent_name)
        finally:
            self._inflight -= 1
            left = self._inflight_peers.pop(remote_agent_name, 1) - 1
            if left:
                self._inflight_peers[remote_agent_name] = left
        ms = (time.perf_counter() - t0) * 1e3
        return KvTransferStats(blocks=len(remote), bytes=nbytes, ms=ms)

    async def _read_chunk(
        self,
        remote_name: str,
        local: list[BlockDesc],
        remote: list[BlockDesc],
        remote_mem_type: str,
        notif: bytes,
        deadline: float,
        what: str,
    ) -> None:
        """One NIXL READ request: set up, post, poll until DONE; the handle is always released."""
        try:
            local_x = self._agent.get_xfer_descs(local, self._mem_type)
            remote_x = self._agent.get_xfer_descs(remote, remote_mem_type)
            handle = self._agent.initialize_xfer("READ", local_x, remote_x, remote_name, notif_msg=notif)
        except Exception as exc:
            raise KvTransferError(f"cannot set up {what}: {exc}") from exc
        released: asyncio.Future[None] | None = None
        try:
            # With UCX over cma the copy itself usually happens inside this call.
            state = self._agent.transfer(handle)
            spin_until = time.perf_counter() + _SPIN_S
            while state == "PROC":
                now = time.perf_counter()
                if now > deadline:
                    raise KvTransferError(f"{what} timed out (is the owner polling its notifications?)")
                await asyncio.sleep(0 if now < spin_until else _POLL_SLEEP_S)
                if self._closed:
                    raise KvTransferError(f"{what}: agent closed during the transfer")
                state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise KvTransferError(f"{what} failed (NIXL state {state})")
        except KvTransferError as exc:
            released = self._release(handle)
            exc.released = released  # the caller keeps the destination blocks until it completes
            raise
        finally:
            if released is None:
                self._release(handle)

    @property
    def pending_transfers(self) -> int:
        """READs started by this agent and not finished yet."""
        return self._inflight

    # ---- life cycle ----

    def close(self) -> None:
        """Forget remote agents and deregister the KV tensor. Idempotent; errors are logged."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._lingers):
            task.cancel()
        self._retry_stuck()
        for remote in list(self._remotes):
            try:
                self._agent.remove_remote_agent(remote)
            except Exception as exc:
                log.warning("NIXL remove_remote_agent(%s) failed: %s", remote, exc)
        self._remotes.clear()
        try:
            self._agent.deregister_memory(self._reg)
        except Exception as exc:
            log.warning("NIXL deregister_memory failed: %s", exc)

    async def aclose(self) -> None:
        """:meth:`close` (the :class:`~tandem.transfer.base.KvTransport` spelling)."""
        self.close()

    def __enter__(self) -> KvTransferAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"KvTransferAgent(name={self.name!r}, {self._mem_type}, blocks={self.num_blocks}, "
            f"block_nbytes={self.block_nbytes}, closed={self._closed})"
        )

    # ---- internals ----

    def _check_open(self) -> None:
        if self._closed:
            raise KvTransferError(f"KvTransferAgent {self.name!r} is closed")

    def _ensure_remote(self, name: str, metadata: bytes) -> None:
        known = self._remotes.get(name)
        if known == metadata:
            return
        try:
            if known is not None:
                # Same name, new metadata: the owner restarted. Drop the stale connection.
                self._remotes.pop(name)
                self._connected.discard(name)
                self._agent.remove_remote_agent(name)
            loaded = self._agent.add_remote_agent(metadata)
        except Exception as exc:
            raise KvTransferError(f"cannot load NIXL metadata of agent {name!r}: {exc}") from exc
        loaded = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        if loaded != name:
            # Wrong metadata for this name: unload it (and forget it if it was cached: loading
            # may have replaced a connection we had under that other name).
            self._remotes.pop(loaded, None)
            self._connected.discard(loaded)
            self._agent.remove_remote_agent(loaded)
            raise KvTransferError(f"metadata is for agent {loaded!r}, expected {name!r}")
        self._remotes[name] = metadata

    async def _linger(self, remote_name: str) -> None:
        """Progress the worker for a while so a queued notification can connect and go out."""
        end = time.perf_counter() + _LINGER_S
        while not self._closed and time.perf_counter() < end:
            for msgs in self._agent.get_new_notifs().values():
                self._backlog.extend(bytes(m) for m in msgs)
            await asyncio.sleep(_LINGER_POLL_S)
        if not self._closed:
            self._connected.add(remote_name)

    def _release(self, handle: Any) -> asyncio.Future[None] | None:
        """Release an xfer handle; None if done, else a future completed once a retry (every
        :meth:`poll_notifs`, and :meth:`close`) released it."""
        try:
            handle.release()
        except Exception as exc:
            # An in-flight request that cannot be cancelled yet; keep it and retry later.
            log.warning("NIXL xfer release failed, will retry: %s", exc)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._stuck.append((handle, fut))
            return fut
        return None

    def _retry_stuck(self) -> None:
        stuck, self._stuck = self._stuck, []
        for handle, fut in stuck:
            try:
                if self._closed or self._agent.check_xfer_state(handle) != "PROC":
                    handle.release()
                    if not fut.done():
                        fut.set_result(None)
                    continue
            except Exception:
                if self._closed and not fut.done():
                    fut.set_result(None)  # the memory is deregistered: nothing lands any more
                    continue
            self._stuck.append((handle, fut))


NixlTransport = KvTransferAgent
"""The NIXL :class:`~tandem.transfer.base.KvTransport` (same class, protocol name)."""
