"""The prefill role: PrefillRequest → first token + pinned KV descriptors, and the pinned KV's fate.

:meth:`PrefillHandler.on_prefill` (subject ``worker_prefill(id)``) adds a ``prefill_only``
request to the engine and parks until the engine loop hands over its first token
(:meth:`PrefillHandler.on_output`). If the request did not finish there, the engine pinned its
prompt's blocks: the entry moves to PINNED and the reply carries ``KvTransferParams`` (the
transport's name, metadata and block descriptors, ``expires_at``).

:meth:`PrefillHandler.watch` (one task) frees pinned blocks when the decode side's notification
arrives (the request id, delivered by the transport after its READ), when ``expires_at`` passes
(``--kv-ttl-s``; a warning) — and :meth:`PrefillHandler.release` when a Cancel comes. How it
waits depends on the transport: NIXL must be polled about every millisecond while blocks may be
read (its progress thread is off), a push transport (simulated, local) wakes it, and otherwise
it sleeps until the next expiry — an idle mock worker's watcher costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import TYPE_CHECKING

from nats.aio.msg import Msg as NatsMsg

from tandem.protocol.messages import ErrorReply, KvTransferParams, PrefillRequest, PrefillResult
from tandem.services.worker.requests import Phase, PinnedKv, WorkerRequest, finish_reason
from tandem.transfer.base import KvTransferError

if TYPE_CHECKING:
    from tandem.engine.engine import RequestOutput
    from tandem.services.worker.service import Worker

__all__ = ["IDLE_POLL_S", "Aborted", "PrefillHandler"]

#: A polled transport (NIXL) with nothing pinned is still drained this often (stray
#: notifications, connection progress) (s).
IDLE_POLL_S = 0.05


class Aborted(Exception):
    """A prefill was cancelled (or the worker stopped) before its first token."""


class PrefillHandler:
    """The prefill side of one worker."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self._wake = asyncio.Event()

    # ---- PrefillRequest ---------------------------------------------------------------------------

    async def on_prefill(self, req: PrefillRequest, _msg: NatsMsg) -> PrefillResult | ErrorReply:
        """PrefillRequest → PrefillResult (first token + pinned KV descriptors) or ErrorReply."""
        w, rid = self.w, req.request_id
        if w.draining or not w.engine.started:
            return ErrorReply(code=503, message="worker is shutting down", request_id=rid, type="unavailable")
        if rid in w.table:
            return ErrorReply(code=409, message="duplicate request_id", request_id=rid, type="conflict")
        fut: asyncio.Future[RequestOutput] = asyncio.get_running_loop().create_future()
        entry = w.table.add(
            WorkerRequest(rid, Phase.PREFILLING, num_prompt_tokens=len(req.token_ids), first_token=fut)
        )
        try:
            out = await self._first_token(entry, req, fut)
        except _Reply as reply:
            self._forget(entry)
            return reply.error
        # The entry stayed in the table all along, so a Cancel either marked it (checked here)
        # or, from now on, finds it PINNED.
        pinned = out.pinned_block_ids
        if entry.cancelled or not out.new_token_ids or out.finish_reason == "abort":
            if pinned is not None:
                await self._release_unowned(entry, len(pinned))
            self._forget(entry)
            if entry.cancelled or out.finish_reason == "abort":
                return ErrorReply(code=499, message="cancelled", request_id=rid, type="aborted")
            if out.finish_reason == "error":  # this request alone failed in the engine step
                msg = f"prefill failed: {out.error or 'engine error'}"
                return ErrorReply(code=500, message=msg, request_id=rid, type="internal_error")
            return ErrorReply(code=500, message="prefill produced no token", request_id=rid)
        result = PrefillResult(
            request_id=rid,
            worker_id=w.id,
            first_token=int(out.new_token_ids[0]),
            cached_tokens=int(out.num_cached_tokens or 0),
            prefill_ms=float(out.prefill_ms or 0.0),
        )
        if pinned is None:  # finished at the first token: nothing pinned, nothing to transfer
            result.finish_reason = finish_reason(out.finish_reason or "stop")
            self._forget(entry)
            return result
        expected = math.ceil(len(req.token_ids) / w.block_size)
        if len(pinned) != expected:
            w.log.error("unexpected_pinned_blocks", request_id=rid, pinned=len(pinned), expected=expected)
            await self._release_unowned(entry, len(pinned))
            self._forget(entry)
            return ErrorReply(code=500, message="inconsistent pinned blocks", request_id=rid)
        transport = w.transport
        expires_at = time.time() + w.config.kv_ttl_s
        result.kv = KvTransferParams(
            agent_name=transport.name,
            agent_metadata=transport.metadata,
            block_ids=list(pinned),
            descriptors=transport.block_descriptors(pinned),
            block_nbytes=w.block_nbytes,
            num_tokens=len(req.token_ids),
            block_hashes=list(req.block_hashes),
            compat_hash=w.compat_hash,
            expires_at=expires_at,
        )
        entry.pinned = PinnedKv(num_blocks=len(pinned), expires_at=expires_at)
        entry.first_token = None
        entry.move(Phase.PINNED)
        self._wake.set()
        return result

    async def _first_token(
        self, entry: WorkerRequest, req: PrefillRequest, fut: asyncio.Future[RequestOutput]
    ) -> RequestOutput:
        """Add the request and wait for its first-token output; :class:`_Reply` on failure."""
        w, rid = self.w, req.request_id
        try:
            await w.engine.call(
                w.engine.engine.add_request,
                rid,
                list(req.token_ids),
                req.sampling,
                block_hashes=list(req.block_hashes) or None,
                prefill_only=True,
            )
        except ValueError as exc:
            raise _Reply(ErrorReply(code=400, message=str(exc), request_id=rid)) from None
        w.engine.wake()
        try:
            return await asyncio.wait_for(fut, w.config.first_token_timeout_s)
        except Aborted:
            raise _Reply(ErrorReply(code=499, message="cancelled", request_id=rid, type="aborted")) from None
        except TimeoutError:
            await w.engine.abort(rid)
            err = ErrorReply(code=504, message="prefill timed out", request_id=rid, type="timeout")
            raise _Reply(err) from None

    def on_output(self, entry: WorkerRequest, out: RequestOutput) -> bool:
        """Engine loop: an output for a PREFILLING request (its first token, or its abort).

        Returns False if nobody waits for it any more (cancelled or failed meanwhile): the
        caller then frees whatever the output pinned.
        """
        fut = entry.first_token
        if fut is None or fut.done():
            return False
        if out.new_token_ids or out.finish_reason is not None:
            fut.set_result(out)
        return True

    def abort_waiter(self, entry: WorkerRequest, exc: BaseException | None = None) -> None:
        """Make a PREFILLING request's :meth:`on_prefill` return (cancel, shutdown, failure)."""
        fut = entry.first_token
        if fut is not None and not fut.done():
            fut.set_exception(exc or Aborted())

    def _forget(self, entry: WorkerRequest) -> None:
        entry.first_token = None
        entry.move(Phase.FINISHED)
        self.w.table.retire(entry)

    async def _release_unowned(self, entry: WorkerRequest, num_blocks: int) -> None:
        """Free blocks the engine pinned for a request that will not be transferred."""
        entry.pinned = PinnedKv(num_blocks=num_blocks, expires_at=0.0)
        await self.release(entry, "not_transferred")

    # ---- pinned KV --------------------------------------------------------------------------------

    async def release(self, entry: WorkerRequest, why: str) -> None:
        """Free ``entry``'s pinned blocks (once; errors are logged); it leaves the table if done."""
        pinned = entry.pinned
        if pinned is None or pinned.releasing:
            return
        pinned.releasing = True
        w = self.w
        w.log.debug(
            "pinned_kv_released",
            request_id=entry.request_id,
            why=why,
            blocks=pinned.num_blocks,
            held_ms=round((time.monotonic() - pinned.since) * 1e3, 2),
        )
        try:
            await w.engine.release_pinned(entry.request_id)
        finally:
            entry.pinned = None
            if entry.phase is Phase.PINNED:
                entry.move(Phase.FINISHED)
            w.table.retire(entry)

    def notified(self) -> None:
        """A push transport has notifications: wake :meth:`watch`."""
        self._wake.set()

    async def watch(self) -> None:
        """Free pinned blocks on transfer notifications and at expiry (runs until cancelled)."""
        w = self.w
        transports = w.notif_sources()
        polled = [t for t in transports if t.poll_interval_s is not None]
        while True:
            self._wake.clear()
            for transport in transports:
                try:
                    notifs = transport.poll_notifs()
                except KvTransferError:
                    return  # closed (shutdown): nothing more will arrive
                except Exception as exc:  # NIXL trouble: keep serving expiry
                    w.log.exception("poll_notifs_failed", transport=transport.kind, error=repr(exc))
                    notifs = []
                for raw in notifs:
                    self._on_notif(raw.decode("utf-8", errors="replace"))
            next_expiry = self._expire()
            timeout = None if next_expiry is None else max(0.0, next_expiry - time.time())
            if polled:
                if next_expiry is not None or any(t.pending_transfers for t in transports):
                    # Blocks may be read (or we read): poll as often as the transport needs.
                    interval = min(t.poll_interval_s or IDLE_POLL_S for t in polled)
                    await asyncio.sleep(interval if timeout is None else min(interval, timeout))
                    continue
                timeout = IDLE_POLL_S
            if timeout is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)

    def _on_notif(self, request_id: str) -> None:
        entry = self.w.table.get(request_id)
        if entry is None or entry.pinned is None:
            self.w.log.debug("stray_kv_notification", request_id=request_id)
            return
        self.w.spawn(self.release(entry, "transferred"), f"release:{request_id}")

    def _expire(self) -> float | None:
        """Release expired pinned KV; the earliest ``expires_at`` still pending (or None)."""
        now = time.time()
        earliest: float | None = None
        for entry in self.w.table.pinned():
            pinned = entry.pinned
            if pinned is None or pinned.releasing:
                continue
            if now >= pinned.expires_at:
                self.w.log.warning("pinned_kv_expired", request_id=entry.request_id, blocks=pinned.num_blocks)
                self.w.spawn(self.release(entry, "expired"), f"expire:{entry.request_id}")
            elif earliest is None or pinned.expires_at < earliest:
                earliest = pinned.expires_at
        return earliest


class _Reply(Exception):
    """Internal: end :meth:`PrefillHandler.on_prefill` with this error reply."""

    def __init__(self, error: ErrorReply) -> None:
        super().__init__(error.message)
        self.error = error
