"""The decode role: DecodeRequest → Ack, then TokenChunks to ``reply_to``.

:meth:`DecodeHandler.on_generate` (subject ``worker_generate(id)``) validates the request and
answers ``Ack`` at once; the rest runs in a task:

* without ``kv``: the prompt is prefilled here (``engine.add_request``), phase RUNNING, first
  chunk ``index`` 0;
* with ``kv``: phase IMPORTING — ``engine.import_request`` allocates blocks (reusing cached
  prefix blocks), the transport READs the rest (``blocks[num_reused:]``) from the same positions
  of the prefill worker's descriptors and notifies it (also when nothing is read, so it always
  frees); then ``engine.activate_imported`` and phase RUNNING, chunks from ``index`` 1 (the
  router sent chunk 0 with the first token). The transport is the worker's own
  (:class:`~tandem.transfer.local.LocalTransport`) when the KV is its own (role ``both``), else
  its primary one (NIXL or simulated).

The engine loop hands every output of a RUNNING request to :meth:`DecodeHandler.on_output`,
which adds its tokens to the stream's ``unsent`` ones; :meth:`DecodeHandler.flush` (the engine
loop's ``on_flush``: after every step it waited out, or after a burst of back-to-back mock steps)
publishes them as one chunk per stream, so a chunk carries one step's token or, in a burst, the
burst's tokens, with consecutive indices either way. The final chunk carries whatever was unsent
plus the last token, ``finish_reason`` and ``metrics`` and is followed by ``RequestFinished`` on
``Subjects.request_finished`` (the router's load accounting).

Also here: :meth:`DecodeHandler.warm_up`, the NIXL warm-up against a prefill worker as soon as
it registers (connect, then a one-block READ into a block taken for the purpose).
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from typing import TYPE_CHECKING

import msgspec
from nats.aio.msg import Msg as NatsMsg

from tandem.protocol.messages import (
    Ack,
    DecodeRequest,
    ErrorReply,
    FinishReason,
    InstanceInfo,
    KvTransferParams,
    KvTransferStats,
    PrefillFinished,
    RequestFinished,
    SamplingParams,
    TokenChunk,
)
from tandem.services.worker.requests import DecodeStream, Phase, WorkerRequest, finish_reason
from tandem.transfer.base import KvTransferError

if TYPE_CHECKING:
    from tandem.engine.engine import RequestOutput
    from tandem.services.worker.service import Worker
    from tandem.transfer.base import KvTransport

__all__ = ["DecodeHandler"]

#: Longest the warm-up READ of a new peer's probe block may take (s).
PROBE_TIMEOUT_S = 5.0
#: How long a DecodeRequest waits for its prefill worker to appear in our registry view (s).
PEER_WAIT_S = 1.0


class DecodeHandler:
    """The decode side of one worker."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        #: Streams with unsent tokens, in the order their first unsent token came.
        self._unflushed: list[WorkerRequest] = []

    # ---- DecodeRequest ----------------------------------------------------------------------------

    async def on_generate(self, req: DecodeRequest, _msg: NatsMsg) -> Ack | ErrorReply:
        """DecodeRequest → Ack (chunks follow on ``reply_to``) or ErrorReply (400/409/503)."""
        w, rid, kv = self.w, req.request_id, req.kv
        if w.draining or not w.engine.started:
            return ErrorReply(code=503, message="worker is shutting down", request_id=rid, type="unavailable")
        existing = w.table.get(rid)
        # The one id allowed twice: a `both` worker importing KV it prefilled (and pinned) itself.
        if existing is not None and not (existing.phase is Phase.PINNED and kv is not None):
            return ErrorReply(code=409, message="duplicate request_id", request_id=rid, type="conflict")
        if not req.reply_to:
            return ErrorReply(code=400, message="reply_to is empty", request_id=rid)
        if kv is not None:
            if kv.compat_hash != w.compat_hash:
                msg = f"KV compat hash {kv.compat_hash!r} differs from this worker's {w.compat_hash!r}"
                return ErrorReply(code=409, message=msg, request_id=rid, type="conflict")
            problem = self._check_kv(req, kv)
            if problem:
                return ErrorReply(code=400, message=problem, request_id=rid)
            untrusted = await self._untrusted_source(req, kv)
            if untrusted:
                return ErrorReply(code=403, message=untrusted, request_id=rid, type="permission_denied")
            short = self._short_of_blocks(kv)
            if short:
                # Decline before accepting: the router hands the request to another worker.
                return ErrorReply(code=503, message=short, request_id=rid, type="kv_capacity")
        metrics = msgspec.structs.replace(req.metrics, decode_worker=w.id)
        if kv is not None and not metrics.prefill_worker and req.prefill_worker_id:
            metrics.prefill_worker = req.prefill_worker_id
        stream = DecodeStream(req.reply_to, next_index=0 if kv is None else 1, metrics=metrics)
        if existing is not None:
            existing.stream = stream
            existing.move(Phase.IMPORTING)
            entry = existing
        else:
            phase = Phase.RUNNING if kv is None else Phase.IMPORTING
            entry = w.table.add(
                WorkerRequest(rid, phase, num_prompt_tokens=len(req.token_ids), stream=stream)
            )
        w.spawn(self._run(entry, req), f"decode:{rid}")
        return Ack(request_id=rid, worker_id=w.id)

    async def _untrusted_source(self, req: DecodeRequest, kv: KvTransferParams) -> str:
        """Why the KV source is not trusted ('' if it is): a NIXL READ goes only to a registered
        prefill worker whose agent name, metadata and compat hash are the ones in ``kv``, so a
        forged ``DecodeRequest`` cannot point this worker's READ (and its prefix cache) at
        foreign memory. Own KV (role ``both``) and the simulated transport need no check."""
        w = self.w
        registry = w.peer_registry
        if registry is None or self.transport_for(kv) is not w.transport:
            return ""
        pid = req.prefill_worker_id or ""
        if pid and pid not in registry:  # registered a moment ago: our watch may lag the router's
            with contextlib.suppress(TimeoutError):
                await registry.wait_for(lambda d: pid in d, timeout=PEER_WAIT_S)
        peer = registry.get(pid)
        if peer is None or not peer.can_prefill:
            return f"KV source {req.prefill_worker_id!r} is not a registered prefill worker"
        if (peer.nixl_agent_name, peer.nixl_metadata, peer.compat_hash) != (
            kv.agent_name,
            kv.agent_metadata,
            kv.compat_hash,
        ):
            return f"KV descriptors do not match prefill worker {peer.instance_id!r}'s registration"
        return ""

    def _short_of_blocks(self, kv: KvTransferParams) -> str:
        """Why the import cannot fit now ('' if it may): fewer free-or-evictable KV blocks, as of
        the engine's last step, than the prompt needs plus one for the next token."""
        w = self.w
        stats = w.engine.snapshot.stats
        if stats is None:
            return ""
        need = math.ceil(kv.num_tokens / w.block_size) + 1
        free = int(stats.num_blocks) - int(stats.in_use)
        if free >= need:
            return ""
        return f"not enough free KV blocks: {need} needed, {free} free"

    def _check_kv(self, req: DecodeRequest, kv: KvTransferParams) -> str:
        """Why ``kv`` cannot be imported here ('' if it can)."""
        w = self.w
        if req.first_token is None:
            return "kv is set but first_token is missing"
        if kv.block_nbytes != w.block_nbytes:
            return f"kv.block_nbytes {kv.block_nbytes} != {w.block_nbytes}"
        if kv.num_tokens != len(req.token_ids):
            return f"kv.num_tokens {kv.num_tokens} != prompt length {len(req.token_ids)}"
        n = math.ceil(kv.num_tokens / w.block_size)
        if len(kv.block_ids) != n or len(kv.descriptors) != n:
            return f"expected {n} blocks, got {len(kv.block_ids)} ids and {len(kv.descriptors)} descriptors"
        if any(d[1] != w.block_nbytes for d in kv.descriptors):
            return "a descriptor's size differs from block_nbytes"
        return ""

    async def _run(self, entry: WorkerRequest, req: DecodeRequest) -> None:
        """Add (local prefill) or import + READ the request, then leave it to the engine loop."""
        w, rid = self.w, req.request_id
        try:
            if req.kv is not None:
                await self._import(entry, req, req.kv)
                return
            try:
                await w.engine.call(
                    w.engine.engine.add_request,
                    rid,
                    list(req.token_ids),
                    req.sampling,
                    block_hashes=list(req.block_hashes) or None,
                )
            except ValueError as exc:
                await self.finish(
                    entry, "error", error=ErrorReply(code=400, message=str(exc), request_id=rid)
                )
                return
            if entry.cancelled:  # a Cancel raced the add
                await w.engine.abort(rid)
                await self.finish(entry, "abort")
                return
            w.engine.wake()
        except Exception as exc:
            w.log.exception("decode_setup_failed", request_id=rid, error=repr(exc))
            await w.engine.abort(rid)
            err = ErrorReply(
                code=500, message=f"{type(exc).__name__}: {exc}", request_id=rid, type="internal_error"
            )
            await self.finish(entry, "error", error=err)

    def transport_for(self, kv: KvTransferParams) -> KvTransport:
        """This worker's own pool (role ``both``) or the primary transport."""
        local = self.w.local
        if local is not None and kv.agent_name == local.name:
            return local
        return self.w.transport

    async def _import(self, entry: WorkerRequest, req: DecodeRequest, kv: KvTransferParams) -> None:
        """Allocate blocks (reusing cached ones), READ the rest from the prefill worker, activate."""
        w, rid = self.w, req.request_id
        notif = rid.encode()
        transport = self.transport_for(kv)
        try:
            imported = await w.engine.call(
                w.engine.engine.import_request,
                rid,
                list(req.token_ids),
                int(req.first_token or 0),
                req.sampling,
                list(req.block_hashes),
            )
        except ValueError as exc:
            await self._notify_quietly(transport, kv, notif)
            await self.finish(entry, "error", error=ErrorReply(code=400, message=str(exc), request_id=rid))
            return
        if imported is None:
            await self._notify_quietly(transport, kv, notif)
            err = ErrorReply(
                code=503, message="not enough free KV blocks", request_id=rid, type="unavailable"
            )
            await self.finish(entry, "error", error=err)
            return
        table, reused = imported
        if time.time() >= kv.expires_at:
            await w.engine.abort(rid)
            err = ErrorReply(
                code=504, message="prefilled KV expired before the READ", request_id=rid, type="timeout"
            )
            await self.finish(entry, "error", error=err)
            return
        if len(table) != len(kv.block_ids) or not 0 <= reused <= len(table):
            await w.engine.abort(rid)
            await self._notify_quietly(transport, kv, notif)
            err = ErrorReply(code=500, message="imported block table does not match kv", request_id=rid)
            await self.finish(entry, "error", error=err)
            return
        try:
            # Also notifies when there is nothing to read (every block reused).
            moved = await transport.read_blocks(
                kv.agent_name,
                kv.agent_metadata,
                kv.descriptors[reused:],
                table[reused:],
                notif,
                w.config.transfer_timeout_s,
            )
        except (KvTransferError, ValueError, IndexError) as exc:
            w.log.warning("kv_transfer_failed", request_id=rid, transport=transport.kind, error=str(exc))
            err = ErrorReply(
                code=502, message=f"KV transfer failed: {exc}", request_id=rid, type="kv_transfer"
            )
            # The client hears at once (and migrates); the blocks wait for the READ to let go.
            await self.finish(entry, "error", error=err)
            released = exc.released if isinstance(exc, KvTransferError) else None
            if released is not None:
                w.log.warning("kv_read_in_flight", request_id=rid, note="blocks kept until released")
                await released
            await w.engine.abort(rid)
            await self._notify_quietly(transport, kv, notif)  # let the prefill side free early
            return
        stream = entry.stream
        if stream is not None:
            stream.metrics.kv_transfer = KvTransferStats(
                blocks=moved.blocks, bytes=moved.bytes, ms=moved.ms, reused_blocks=reused
            )
        w.log.debug("kv_imported", request_id=rid, blocks=moved.blocks, reused=reused, ms=round(moved.ms, 3))
        if entry.cancelled or w.table.get(rid) is not entry or entry.phase is not Phase.IMPORTING:
            # Cancelled during the READ (the cancel already answered the stream; the blocks were
            # kept until now because the READ was writing them).
            await w.engine.abort(rid)
            await self.finish(entry, "abort")
            return
        entry.move(Phase.RUNNING)
        await w.engine.call(w.engine.engine.activate_imported, rid)
        w.engine.wake()

    async def _notify_quietly(self, transport: KvTransport, kv: KvTransferParams, notif: bytes) -> None:
        """Tell the prefill worker it may free its pinned blocks (nothing will be READ)."""
        try:
            await transport.notify(kv.agent_name, kv.agent_metadata, notif)
        except Exception as exc:
            self.w.log.warning("notify_prefill_failed", error=repr(exc))

    # ---- outputs and chunks -----------------------------------------------------------------------

    async def on_output(self, entry: WorkerRequest, out: RequestOutput) -> None:
        """Engine loop: an output of a RUNNING request → its tokens wait for :meth:`flush` (the
        final chunk goes out at once, with them, on a finish)."""
        stream = entry.stream
        if stream is None:
            return
        if not stream.saw_first_output and (out.new_token_ids or out.finish_reason):
            stream.saw_first_output = True
            if stream.metrics.kv_transfer is None:  # prefilled here
                stream.metrics.prefill_worker = self.w.id
                stream.metrics.cached_tokens = int(out.num_cached_tokens or 0)
                stream.metrics.prefill_ms = float(out.prefill_ms or 0.0)
                # The routers stop counting its prompt tokens as our prefill load now, not at
                # the next heartbeat (up to a second of phantom load otherwise).
                await self.w.publish(
                    self.w.subjects.prefill_finished,
                    PrefillFinished(request_id=entry.request_id, worker_id=self.w.id),
                )
        if out.finish_reason == "error":  # this request alone failed in the engine step
            err = ErrorReply(
                code=500,
                message=f"generation failed: {out.error or 'engine error'}",
                request_id=entry.request_id,
                type="internal_error",
            )
            await self.finish(entry, "error", list(out.new_token_ids), error=err)
        elif out.finish_reason is not None:
            await self.finish(entry, finish_reason(out.finish_reason), list(out.new_token_ids))
        elif out.new_token_ids:
            if not stream.unsent:
                self._unflushed.append(entry)
                if stream.next_index == 0:  # the first token: no waiting for a burst to end
                    self.w.engine.end_burst()
            stream.unsent += out.new_token_ids

    async def flush(self) -> None:
        """Publish every stream's unsent tokens as one chunk each (the engine loop's ``on_flush``)."""
        if not self._unflushed:
            return
        entries, self._unflushed = self._unflushed, []
        for entry in entries:
            stream = entry.stream
            if stream is None or not stream.unsent or entry.phase is not Phase.RUNNING:
                continue
            token_ids, stream.unsent = stream.unsent, []
            await self._send(entry, stream, token_ids)

    async def _send(self, entry: WorkerRequest, stream: DecodeStream, token_ids: list[int]) -> None:
        chunk = TokenChunk(
            request_id=entry.request_id, index=stream.next_index, token_ids=token_ids, worker_id=self.w.id
        )
        stream.next_index += 1
        await self.w.publish(stream.reply_to, chunk)

    async def finish(
        self,
        entry: WorkerRequest,
        reason: FinishReason,
        token_ids: list[int] | None = None,
        error: ErrorReply | None = None,
    ) -> None:
        """Send the final chunk (once; with the stream's unsent tokens before ``token_ids``), then
        ``RequestFinished``; the entry is FINISHED."""
        stream = entry.stream
        if stream is None or entry.phase is Phase.FINISHED:
            return
        entry.move(Phase.FINISHED)
        self.w.table.retire(entry)
        unsent, stream.unsent = stream.unsent, []
        if token_ids:
            unsent += token_ids
        chunk = TokenChunk(
            request_id=entry.request_id,
            index=stream.next_index,
            token_ids=unsent,
            worker_id=self.w.id,
            finish_reason=reason,
            error=error,
            metrics=stream.metrics,
        )
        stream.next_index += 1
        self.w.engine.end_burst()
        await self.w.publish(stream.reply_to, chunk)
        done = RequestFinished(request_id=entry.request_id, worker_id=self.w.id, finish_reason=reason)
        await self.w.publish(self.w.subjects.request_finished, done)

    # ---- NIXL warm-up -----------------------------------------------------------------------------

    async def warm_up(self, peer: InstanceInfo) -> None:
        """Warm the NIXL path to a prefill worker that just registered, so the first READ from
        it runs like every later one: connect (``KvTransferAgent.connect``: connection and
        notification path), then READ one of its blocks (``peer.kv_probe``) into a block of our
        pool taken for the purpose — a one-block import that is aborted right after (UCX sets
        up the local pool's registration on its first READ into it). Measured first READ of a
        1k-token prompt (23 MB, ``scripts/bench_kv_transfer.py``): cold 1.2 GB/s, after
        connect 5-6 GB/s, after connect + probe 7 GB/s like a warm READ. Failures are logged:
        a cold READ still works."""
        w = self.w
        transport = w.transport
        t0 = time.perf_counter()
        try:
            await transport.connect(peer.nixl_agent_name, peer.nixl_metadata)
        except KvTransferError as exc:
            w.log.warning("kv_peer_connect_failed", peer=peer.instance_id, error=str(exc))
            return
        probe = peer.kv_probe
        if probe is not None and not w.draining:
            await self._probe(peer, probe)
        w.log.info("kv_peer_connected", peer=peer.instance_id, ms=round((time.perf_counter() - t0) * 1e3, 2))

    async def _probe(self, peer: InstanceInfo, probe: tuple[int, int, int]) -> None:
        """READ ``probe`` (one block of the peer) into a block imported for it, then abort."""
        w = self.w
        rid = f"warm-up-{peer.instance_id}-{uuid.uuid4().hex[:8]}"
        try:
            imported = await w.engine.call(
                w.engine.engine.import_request, rid, [0], 0, SamplingParams(max_tokens=1), []
            )
        except Exception as exc:
            w.log.warning("kv_peer_probe_failed", peer=peer.instance_id, error=repr(exc))
            return
        if imported is None:
            return  # no free block right now: the first request warms up instead
        try:
            # No notification: connect() sent one already, and nothing is pinned for this READ.
            await w.transport.read_blocks(
                peer.nixl_agent_name, peer.nixl_metadata, [probe], imported[0][:1], b"", PROBE_TIMEOUT_S
            )
        except (KvTransferError, ValueError, IndexError) as exc:
            w.log.warning("kv_peer_probe_failed", peer=peer.instance_id, error=str(exc))
        finally:
            await w.engine.abort(rid)
