"""The worker process: one model, one KV block pool, one scheduler, one NIXL agent.

``python -m tandem.services.worker --role prefill|decode|both [...]`` (flags: ``--help``).

Life cycle of a request
=======================

Every engine call runs on ONE dedicated thread (``engine_thread``, a single-thread executor);
every NATS and NIXL call runs on the asyncio event loop thread. The engine loop task awaits
``engine.step()`` on the engine thread while there is work and sleeps on an ``asyncio.Event``
when idle, so NATS traffic, heartbeats and NIXL polling never stall behind a forward pass.

Prefill role (``worker_prefill(id)``: PrefillRequest → PrefillResult):

1. *received* — decoded by ``runtime.serve``; refused with 503 while draining, 409 if the id is
   already known. A future is parked in ``_prefills[request_id]``.
2. *scheduled* — ``engine.add_request(prefill_only=True)`` (a ``ValueError`` → ErrorReply 400);
   the engine loop steps it (chunked prefill over several steps for long prompts).
3. *first token* — the engine loop resolves the future with the request's output.
   If the request already finished (stop token, ``max_tokens == 1``) nothing is pinned and the
   reply is ``PrefillResult(finish_reason=..., kv=None)``.
4. *pinned awaiting NIXL notification* — otherwise the engine pinned the prompt's blocks; they
   enter the pending-transfer table ``_pending[request_id]`` (owner of the pinned blocks on
   this side) and the reply carries ``KvTransferParams`` (agent name + metadata, block ids,
   descriptors, ``expires_at``). The notification task polls ``agent.poll_notifs()`` every
   ~1 ms while anything is pending (every 50 ms when idle; polling also drives NIXL progress).
5. *freed* — on the NIXL notification ``request_id`` (decode finished its READ), on expiry
   (``--kv-ttl-s``, logged as a warning) or on ``Cancel``: ``engine.release_pinned``.

Decode role (``worker_generate(id)``: DecodeRequest → Ack, then TokenChunk* to ``reply_to``):

1. *received* — validated (``kv.compat_hash`` must equal ours, else ErrorReply 409; shape checks
   → 400); answered with ``Ack`` at once; a ``_DecodeStream`` is registered in ``_streams``.
2. *importing* — ``engine.import_request`` allocates blocks for the prompt, reusing cached
   prefix blocks; ``agent.read_blocks`` READs the blocks it lacks (``blocks[num_reused:]``)
   from the same positions of the remote descriptors, notification = ``request_id`` (sent even
   when nothing is read, so the prefill side always frees). Failure → the imported blocks are
   freed (``engine.abort``) and a final error chunk is sent.
3. *running* — ``engine.activate_imported``; one TokenChunk per engine step, ``index`` from 1
   (the router sent chunk 0 with the first token).
4. *finished / aborted* — the final chunk carries ``finish_reason`` and ``metrics``
   (decode worker, KV transfer blocks/bytes/ms, reused blocks). ``Cancel`` → ``engine.abort``
   and a final chunk with ``finish_reason="abort"``.

Both role: a DecodeRequest without ``kv`` is prefilled and decoded locally (``add_request``),
first chunk ``index`` 0. (Decode-only workers accept such requests too: short prompts.)

KV events: after every engine call the engine thread drains ``engine.kv.take_events()`` and
hands them, in order, to the event publisher task, which publishes ``KvEventBatch`` to
``subjects.kv_events(id)`` through JetStream.

Shutdown (SIGTERM/SIGINT; Dynamo's order, driven by ``runtime.ServiceBase.shutdown``):
unregister (the instances-bucket entry is deleted, heartbeats stop) → grace period (new work gets
503, running requests may finish for ``--shutdown-grace-s``, then they are aborted) → drain
in-flight KV transfers (the pending table empties by notification or expiry, bounded by
``--drain-timeout-s``) → unsubscribe and drain handler tasks → cleanup (release what is left,
flush KV events, stop the tasks, ``agent.close()``, stop the engine thread) → drain NATS.
By default it takes at most about 30 s (20 s grace + 10 s transfer drain), under the launcher's
40 s stop grace.
Exit code 0; a start-up failure (e.g. NIXL cannot load: there is no fallback) exits 1.

Health: ``HealthRequest`` on ``Subjects.health("worker")`` (queue group ``worker``) is answered by
the runtime; ``ready`` is false while draining.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec
import psutil
from nats.aio.msg import Msg as NatsMsg

from tandem.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    DecodeRequest,
    ErrorReply,
    FinishReason,
    InstanceInfo,
    KvEvent,
    KvEventBatch,
    KvTransferParams,
    KvTransferStats,
    PrefillRequest,
    PrefillResult,
    RequestMetrics,
    Role,
    TokenChunk,
    WorkerLoad,
    WorkerStats,
    WorkerStatsRequest,
    encode,
)
from tandem.services import runtime

if TYPE_CHECKING:
    from tandem.engine.engine import LLMEngine, RequestOutput
    from tandem.services.runtime import ServiceBase, WorkerRegistration
    from tandem.transfer.nixl import KvTransferAgent

SERVICE = "worker"

T = TypeVar("T")

#: How often the notification task polls NIXL while transfers are pending (s).
NOTIF_POLL_BUSY_S = 0.001
#: ... and when nothing is pending (it still drains stray notifications) (s).
NOTIF_POLL_IDLE_S = 0.05
#: How long the engine loop waits before retrying a stalled step, unless woken earlier (s).
STALLED_BACKOFF_S = 0.005


_FINISH_REASONS: dict[str, FinishReason] = {r: r for r in ("stop", "length", "abort", "error")}


def finish_reason(engine_reason: str) -> FinishReason:
    """The protocol's finish reason for an engine one (anything unknown is an ``"error"``)."""
    return _FINISH_REASONS.get(engine_reason, "error")


class _Aborted(Exception):
    """A prefill was cancelled (or the worker stopped) before its first token."""


# ---- options --------------------------------------------------------------------------------------


@dataclass
class WorkerOptions:
    """Worker settings; :func:`parse_args` builds them from the command line.

    Durations are seconds, ``kv_cache_gb`` is GiB, ``threads`` = torch intra-op threads.
    ``kv_ttl_s``: pinned prefill KV is freed this long after the reply if no notification came.
    """

    role: Role
    instance_id: str
    model_dir: str | None = None
    kv_cache_gb: float = 1.0
    num_blocks: int | None = None
    threads: int | None = None
    dtype: str = "bfloat16"
    block_size: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    kv_ttl_s: float = 30.0
    transfer_timeout_s: float = 10.0
    prefill_timeout_s: float = 300.0
    heartbeat_s: float = runtime.HEARTBEAT_INTERVAL_S
    shutdown_grace_s: float = 20.0
    drain_timeout_s: float = 10.0


def build_parser() -> argparse.ArgumentParser:
    """The worker's argparse parser (common service flags + the worker's own)."""
    p = runtime.common_parser(SERVICE, "tandem worker: model, KV block pool, scheduler, NIXL agent")
    p.add_argument("--role", choices=["prefill", "decode", "both"], required=True)
    p.add_argument("--instance-id", default=None, help="default: <role>-<random hex>")
    p.add_argument("--model-dir", default=None, help="default: tandem.engine.weights.prepare_model()")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache budget in GiB")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks (overrides --kv-cache-gb)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-ttl-s", type=float, default=30.0, help="pinned prefill KV expiry")
    p.add_argument("--transfer-timeout-s", type=float, default=10.0, help="one NIXL READ")
    p.add_argument("--heartbeat-s", type=float, default=runtime.HEARTBEAT_INTERVAL_S)
    p.add_argument("--shutdown-grace-s", type=float, default=20.0, help="running requests may finish")
    p.add_argument("--drain-timeout-s", type=float, default=10.0, help="in-flight KV transfers may finish")
    return p


def options_from_args(args: argparse.Namespace) -> WorkerOptions:
    """:class:`WorkerOptions` from parsed arguments; ``ValueError`` on a bad value."""
    for name in ("kv_ttl_s", "transfer_timeout_s", "heartbeat_s"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    for name in ("shutdown_grace_s", "drain_timeout_s"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative")
    return WorkerOptions(
        role=args.role,
        instance_id=args.instance_id or f"{args.role}-{uuid.uuid4().hex[:8]}",
        model_dir=args.model_dir,
        kv_cache_gb=args.kv_cache_gb,
        num_blocks=args.num_blocks,
        threads=args.threads,
        dtype=args.dtype,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        kv_ttl_s=args.kv_ttl_s,
        transfer_timeout_s=args.transfer_timeout_s,
        heartbeat_s=args.heartbeat_s,
        shutdown_grace_s=args.shutdown_grace_s,
        drain_timeout_s=args.drain_timeout_s,
    )


# ---- per-request state ------------------------------------------------------------------------------


@dataclass
class _PendingTransfer:
    """Pinned prefill blocks waiting for the decode side's NIXL notification."""

    num_blocks: int
    expires_at: float  # Unix seconds, as sent in KvTransferParams
    created: float = field(default_factory=time.monotonic)


@dataclass
class _DecodeStream:
    """A request this worker streams TokenChunks for (owned by ``Worker._streams``)."""

    request_id: str
    reply_to: str
    next_index: int
    metrics: RequestMetrics
    state: Literal["importing", "running"] = "importing"
    cancelled: bool = False
    saw_first_output: bool = False


# ---- the worker -----------------------------------------------------------------------------------


class Worker:
    """A worker inside a :class:`~tandem.services.runtime.ServiceBase`.

    Owns the engine thread and engine, the NIXL agent, the instance registration, the engine /
    notification / KV-event tasks and per-request tasks. ``svc`` owns the NATS connection, the
    served subscriptions and their handler tasks. :meth:`start` registers shutdown hooks on
    ``svc`` (unregister → grace → drain transfers; close → cleanup), so ``svc.shutdown()`` stops
    everything in order.
    """

    def __init__(self, svc: ServiceBase, opts: WorkerOptions) -> None:
        self.svc = svc
        self.opts = opts
        self.id = opts.instance_id
        self.subjects = svc.subjects
        self.log = runtime.get_logger("tandem.worker").bind(instance_id=self.id, role=opts.role)
        self.compat_hash = ""
        self.block_nbytes = 0
        self.num_blocks = 0
        self.engine: LLMEngine | None = None
        self.agent: KvTransferAgent | None = None

        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._registration: WorkerRegistration | None = None

        self._prefills: dict[str, asyncio.Future[RequestOutput]] = {}
        self._cancelled_prefills: set[str] = set()
        self._pending: dict[str, _PendingTransfer] = {}
        self._releasing: set[str] = set()
        self._streams: dict[str, _DecodeStream] = {}

        self._wake = asyncio.Event()
        self._pending_changed = asyncio.Event()
        self._events_q: asyncio.Queue[list[KvEvent]] = asyncio.Queue()
        self._events_busy = False
        self.kv_events_published = 0
        self._last_stats: Any = None
        self.draining = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[Any]] = []

    # ---- start ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model, create the NIXL agent, subscribe, register with heartbeats.

        Raises ``NixlUnavailableError`` when NIXL cannot load (no fallback: the process exits
        non-zero) and whatever model loading or NATS raises. What was created before a failure
        is released by ``svc.shutdown()`` (the close hook is registered first).
        """
        from tandem.engine.config import EngineConfig
        from tandem.engine.engine import LLMEngine
        from tandem.engine.weights import MODEL_NAME, prepare_model
        from tandem.transfer.nixl import KvTransferAgent, NixlUnavailableError, compat_hash

        o, svc = self.opts, self.svc
        svc.on_close(self._close)
        svc.readiness = lambda: (not self.draining, o.role)
        # The hooks run with svc.drain_timeout_s each: make room for our grace + drain bounds.
        svc.drain_timeout_s = max(svc.drain_timeout_s, o.shutdown_grace_s + o.drain_timeout_s + 10.0)
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        t0 = time.perf_counter()
        model_dir = Path(o.model_dir) if o.model_dir else await asyncio.to_thread(prepare_model)
        config = EngineConfig(
            model_dir=model_dir,
            dtype=o.dtype,
            block_size=o.block_size,
            num_blocks=o.num_blocks,
            kv_cache_gb=o.kv_cache_gb,
            max_num_seqs=o.max_num_seqs,
            max_num_batched_tokens=o.max_num_batched_tokens,
            max_model_len=o.max_model_len,
            num_threads=o.threads,
        )
        # Built on the engine thread, like every later engine call.
        engine = await self._loop.run_in_executor(self._executor, LLMEngine, config)
        self.engine = engine
        self.block_nbytes = int(engine.block_nbytes)
        self.num_blocks = int(engine.kv.num_blocks)
        mc = engine.model_config
        self.compat_hash = compat_hash(
            MODEL_NAME, mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, o.dtype, o.block_size
        )
        self.log.info(
            "engine_loaded",
            model_dir=str(model_dir),
            num_blocks=self.num_blocks,
            block_nbytes=self.block_nbytes,
            load_s=round(time.perf_counter() - t0, 2),
        )
        # NIXL lives on the event loop thread. No fallback: the process exits non-zero.
        try:
            self.agent = KvTransferAgent(f"tandem-{self.id}", engine.kv_cache, self.block_nbytes)
        except NixlUnavailableError as exc:
            self.log.error("nixl_unavailable", error=str(exc))
            raise
        self._last_stats = await self._on_engine(engine.kv.stats)

        self._loops = [
            asyncio.create_task(self._engine_loop(), name="engine-loop"),
            asyncio.create_task(self._notif_loop(), name="nixl-notifs"),
            asyncio.create_task(self._events_loop(), name="kv-events"),
        ]
        s = self.subjects
        if o.role in ("prefill", "both"):
            await svc.serve(s.worker_prefill(self.id), PrefillRequest, self._on_prefill)
        if o.role in ("decode", "both"):
            await svc.serve(s.worker_generate(self.id), DecodeRequest, self._on_generate)
        await svc.serve(s.cancel, Cancel, self._on_cancel)
        await svc.serve(s.worker_cancel(self.id), Cancel, self._on_cancel)
        await svc.serve(s.worker_debug(self.id), WorkerStatsRequest, self._on_stats)

        svc.on_unregister(self._drain)  # LIFO: runs after the registration is deleted
        self._registration = runtime.WorkerRegistration(
            svc.js, s, self._instance_info, interval_s=o.heartbeat_s
        )
        await self._registration.start()
        svc.on_unregister(self._registration.stop)
        self.log.info(
            "worker_started",
            compat_hash=self.compat_hash,
            nixl_agent=self.agent.name,
            startup_s=round(time.perf_counter() - t0, 2),
        )

    def _instance_info(self) -> InstanceInfo:
        """This worker's entry in the instances bucket (called by every heartbeat)."""
        from tandem.engine.weights import MODEL_NAME

        agent = self.agent
        if agent is None:
            raise RuntimeError("worker not started")
        return InstanceInfo(
            instance_id=self.id,
            role=self.opts.role,
            model=MODEL_NAME,
            block_size=self.opts.block_size,
            num_blocks=self.num_blocks,
            block_nbytes=self.block_nbytes,
            compat_hash=self.compat_hash,
            nixl_agent_name=agent.name,
            nixl_metadata=agent.metadata,
            heartbeat_at=time.time(),
            protocol_version=PROTOCOL_VERSION,
            load=self.load(),
        )

    def load(self) -> WorkerLoad:
        """Current load, from worker-side tables and the pool stats of the last engine step."""
        stats = self._last_stats
        running = sum(1 for st in self._streams.values() if st.state == "running")
        return WorkerLoad(
            num_running=running,
            num_waiting=len(self._prefills) + len(self._streams) - running,
            used_blocks=int(stats.in_use) if stats is not None else 0,
            pinned_blocks=int(stats.pinned) if stats is not None else 0,
        )

    # ---- engine thread ----------------------------------------------------------------------------

    async def _on_engine(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the engine thread, then queue the KV events it caused, in order."""
        loop, executor = self._loop, self._executor
        if loop is None or executor is None:
            raise RuntimeError("worker not started")

        def job() -> T:
            try:
                return fn(*args, **kwargs)
            finally:
                self._hand_over_events()

        return await loop.run_in_executor(executor, job)

    def _hand_over_events(self) -> None:
        """On the engine thread: drain the manager's events to the publisher queue."""
        engine, loop = self.engine, self._loop
        if engine is None or loop is None:
            return
        events = engine.kv.take_events()
        if events:
            # call_soon_threadsafe callbacks run in FIFO order, so event order is kept.
            with contextlib.suppress(RuntimeError):  # loop already closed (teardown)
                loop.call_soon_threadsafe(self._events_q.put_nowait, events)

    def _step_job(self) -> tuple[list[RequestOutput], bool, bool, Any]:
        """One engine step: (outputs, has more work, computed anything, pool stats)."""
        engine = self.engine
        if engine is None:
            raise RuntimeError("worker not started")
        outputs = engine.step()
        return outputs, engine.has_unfinished(), engine.last_step_tokens > 0, engine.kv.stats()

    async def _engine_loop(self) -> None:
        """Step the engine while it has work; sleep on ``_wake`` when idle."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                outputs, more, progressed, stats = await self._on_engine(self._step_job)
            except Exception as exc:
                self.log.exception("engine_step_failed", error=repr(exc))
                await self._fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
                continue
            self._last_stats = stats
            if more:
                if not outputs and not progressed:
                    # Work exists but nothing could run (e.g. waiting for pinned or importing
                    # blocks): back off instead of spinning; new work or a release wakes us.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), STALLED_BACKOFF_S)
                self._wake.set()
            for out in outputs:
                try:
                    await self._dispatch(out)
                except Exception as exc:
                    self.log.exception("dispatch_failed", request_id=out.request_id, error=repr(exc))

    async def _dispatch(self, out: RequestOutput) -> None:
        """Route one engine output to its prefill waiter or decode stream."""
        rid = out.request_id
        fut = self._prefills.get(rid)
        if fut is not None and not fut.done():
            if out.new_token_ids or out.finish_reason is not None:
                fut.set_result(out)
            return
        if out.pinned_block_ids is not None:
            # Nobody waits for this prefill any more (timed out / cancelled): free its blocks.
            self.log.warning("orphan_pinned_kv_released", request_id=rid, blocks=len(out.pinned_block_ids))
            self._spawn(self._release_pinned(rid), f"orphan:{rid}")
            return
        st = self._streams.get(rid)
        if st is None or st.state != "running":
            return
        if not st.saw_first_output and (out.new_token_ids or out.finish_reason):
            st.saw_first_output = True
            if st.metrics.kv_transfer is None:  # prefilled here
                st.metrics.prefill_worker = self.id
                st.metrics.cached_tokens = int(out.num_cached_tokens or 0)
                st.metrics.prefill_ms = float(out.prefill_ms or 0.0)
        if out.finish_reason is not None:
            await self._finish(st, finish_reason(out.finish_reason), list(out.new_token_ids))
        elif out.new_token_ids:
            await self._send_chunk(st, list(out.new_token_ids))

    async def _fail_all(self, message: str) -> None:
        for rid, fut in list(self._prefills.items()):
            await self._abort_quietly(rid)
            if not fut.done():
                fut.set_exception(RuntimeError(message))
        for st in list(self._streams.values()):
            if st.state == "running":
                await self._abort_quietly(st.request_id)
                err = ErrorReply(code=500, message=message, request_id=st.request_id, type="internal_error")
                await self._finish(st, "error", error=err)

    async def _abort_quietly(self, request_id: str) -> bool:
        """``engine.abort`` on the engine thread; errors are logged, never raised."""
        engine = self.engine
        if engine is None:
            return False
        try:
            aborted = bool(await self._on_engine(engine.abort, request_id))
            self._wake.set()  # freed blocks may let waiting requests run
            return aborted
        except Exception as exc:
            self.log.exception("abort_failed", request_id=request_id, error=repr(exc))
            return False

    # ---- prefill ----------------------------------------------------------------------------------

    async def _on_prefill(self, req: PrefillRequest, _msg: NatsMsg) -> PrefillResult | ErrorReply:
        """PrefillRequest → PrefillResult (first token + pinned KV descriptors) or ErrorReply."""
        rid = req.request_id
        engine, agent, loop = self.engine, self.agent, self._loop
        if self.draining or engine is None or agent is None or loop is None:
            return ErrorReply(code=503, message="worker is shutting down", request_id=rid, type="unavailable")
        if rid in self._prefills or rid in self._pending or rid in self._streams:
            return ErrorReply(code=409, message="duplicate request_id", request_id=rid, type="conflict")
        fut: asyncio.Future[RequestOutput] = loop.create_future()
        self._prefills[rid] = fut
        try:
            try:
                await self._on_engine(
                    engine.add_request,
                    rid,
                    list(req.token_ids),
                    req.sampling,
                    block_hashes=list(req.block_hashes) or None,
                    prefill_only=True,
                )
            except ValueError as exc:
                return ErrorReply(code=400, message=str(exc), request_id=rid)
            self._wake.set()
            try:
                out = await asyncio.wait_for(fut, self.opts.prefill_timeout_s)
            except _Aborted:
                return ErrorReply(code=499, message="cancelled", request_id=rid, type="aborted")
            except TimeoutError:
                await self._abort_quietly(rid)
                return ErrorReply(code=504, message="prefill timed out", request_id=rid, type="timeout")
        finally:
            self._prefills.pop(rid, None)
            cancelled = rid in self._cancelled_prefills
            self._cancelled_prefills.discard(rid)
        # From here to the return there is no await before the pending entry exists, so a
        # Cancel either saw the future (and marked the id) or will find the pending entry.
        pinned = out.pinned_block_ids
        if cancelled or not out.new_token_ids or out.finish_reason == "abort":
            if pinned is not None:
                await self._release_pinned(rid)
            if cancelled or out.finish_reason == "abort":
                return ErrorReply(code=499, message="cancelled", request_id=rid, type="aborted")
            return ErrorReply(code=500, message="prefill produced no token", request_id=rid)
        result = PrefillResult(
            request_id=rid,
            worker_id=self.id,
            first_token=int(out.new_token_ids[0]),
            cached_tokens=int(out.num_cached_tokens or 0),
            prefill_ms=float(out.prefill_ms or 0.0),
        )
        if pinned is None:  # finished at the first token: nothing pinned, nothing to transfer
            result.finish_reason = finish_reason(out.finish_reason or "stop")
            return result
        expected = math.ceil(len(req.token_ids) / self.opts.block_size)
        if len(pinned) != expected:
            self.log.error("unexpected_pinned_blocks", request_id=rid, pinned=len(pinned), expected=expected)
            await self._release_pinned(rid)
            return ErrorReply(code=500, message="inconsistent pinned blocks", request_id=rid)
        expires_at = time.time() + self.opts.kv_ttl_s
        result.kv = KvTransferParams(
            agent_name=agent.name,
            agent_metadata=agent.metadata,
            block_ids=list(pinned),
            descriptors=agent.block_descriptors(pinned),
            block_nbytes=self.block_nbytes,
            num_tokens=len(req.token_ids),
            block_hashes=list(req.block_hashes),
            compat_hash=self.compat_hash,
            expires_at=expires_at,
        )
        self._pending[rid] = _PendingTransfer(num_blocks=len(pinned), expires_at=expires_at)
        self._pending_changed.set()
        return result

    async def _release_pinned(self, request_id: str) -> None:
        """Free a request's pinned blocks on the engine thread (errors logged)."""
        engine = self.engine
        if engine is None or request_id in self._releasing:
            return
        self._releasing.add(request_id)
        try:
            await self._on_engine(engine.release_pinned, request_id)
            self._wake.set()  # freed blocks may let waiting requests run
        except Exception as exc:
            self.log.exception("release_pinned_failed", request_id=request_id, error=repr(exc))
        finally:
            self._releasing.discard(request_id)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start a task owned by this worker (cancelled by the close hook if still running)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("task_failed", task=task.get_name(), error=repr(task.exception()))

    async def _notif_loop(self) -> None:
        """Poll NIXL (notifications, and UCX progress for READs against us); expire pinned KV."""
        from tandem.transfer.nixl import KvTransferError

        while True:
            agent = self.agent
            if agent is None:
                return
            try:
                notifs = agent.poll_notifs()
            except KvTransferError:
                return  # agent closed
            except Exception as exc:
                self.log.exception("nixl_poll_failed", error=repr(exc))
                notifs = []
            for raw in notifs:
                rid = raw.decode("utf-8", errors="replace")
                entry = self._pending.pop(rid, None)
                if entry is None:
                    self.log.debug("stray_nixl_notification", request_id=rid)
                    continue
                self.log.debug(
                    "kv_transfer_done",
                    request_id=rid,
                    held_ms=round((time.monotonic() - entry.created) * 1e3, 2),
                )
                self._spawn(self._release_pinned(rid), f"release:{rid}")
            if self._pending:
                now = time.time()
                for rid, entry in list(self._pending.items()):
                    if now >= entry.expires_at:
                        del self._pending[rid]
                        self.log.warning("pinned_kv_expired", request_id=rid, blocks=entry.num_blocks)
                        self._spawn(self._release_pinned(rid), f"expire:{rid}")
            if self._pending or agent.pending_transfers:
                await asyncio.sleep(NOTIF_POLL_BUSY_S)
            else:
                self._pending_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._pending_changed.wait(), NOTIF_POLL_IDLE_S)

    # ---- decode -----------------------------------------------------------------------------------

    async def _on_generate(self, req: DecodeRequest, _msg: NatsMsg) -> Ack | ErrorReply:
        """DecodeRequest → Ack (chunks follow on ``reply_to``) or ErrorReply (400/409/503)."""
        rid = req.request_id
        if self.draining or self.engine is None or self.agent is None:
            return ErrorReply(code=503, message="worker is shutting down", request_id=rid, type="unavailable")
        if rid in self._streams or rid in self._prefills:
            return ErrorReply(code=409, message="duplicate request_id", request_id=rid, type="conflict")
        if not req.reply_to:
            return ErrorReply(code=400, message="reply_to is empty", request_id=rid)
        kv = req.kv
        if kv is not None:
            if kv.compat_hash != self.compat_hash:
                msg = f"KV compat hash {kv.compat_hash!r} differs from this worker's {self.compat_hash!r}"
                return ErrorReply(code=409, message=msg, request_id=rid, type="conflict")
            problem = self._check_kv(req, kv)
            if problem:
                return ErrorReply(code=400, message=problem, request_id=rid)
        metrics = msgspec.structs.replace(req.metrics, decode_worker=self.id)
        if kv is not None and not metrics.prefill_worker and req.prefill_worker_id:
            metrics.prefill_worker = req.prefill_worker_id
        st = _DecodeStream(rid, req.reply_to, next_index=0 if kv is None else 1, metrics=metrics)
        self._streams[rid] = st
        self._spawn(self._run_decode(st, req), f"decode:{rid}")
        return Ack(request_id=rid, worker_id=self.id)

    def _check_kv(self, req: DecodeRequest, kv: KvTransferParams) -> str:
        """Why ``kv`` cannot be imported here ('' if it can)."""
        if req.first_token is None:
            return "kv is set but first_token is missing"
        if kv.block_nbytes != self.block_nbytes:
            return f"kv.block_nbytes {kv.block_nbytes} != {self.block_nbytes}"
        if kv.num_tokens != len(req.token_ids):
            return f"kv.num_tokens {kv.num_tokens} != prompt length {len(req.token_ids)}"
        n = math.ceil(kv.num_tokens / self.opts.block_size)
        if len(kv.block_ids) != n or len(kv.descriptors) != n:
            return f"expected {n} blocks, got {len(kv.block_ids)} ids and {len(kv.descriptors)} descriptors"
        if any(d[1] != self.block_nbytes for d in kv.descriptors):
            return "a descriptor's size differs from block_nbytes"
        return ""

    async def _run_decode(self, st: _DecodeStream, req: DecodeRequest) -> None:
        """Add (local prefill) or import + READ the request, then leave it to the engine loop."""
        engine = self.engine
        if engine is None:
            return
        rid = req.request_id
        try:
            if req.kv is not None:
                await self._import(st, req, req.kv)
                return
            st.state = "running"
            try:
                await self._on_engine(
                    engine.add_request,
                    rid,
                    list(req.token_ids),
                    req.sampling,
                    block_hashes=list(req.block_hashes) or None,
                )
            except ValueError as exc:
                await self._finish(st, "error", error=ErrorReply(code=400, message=str(exc), request_id=rid))
                return
            if st.cancelled:  # a Cancel raced the add
                await self._abort_quietly(rid)
                await self._finish(st, "abort")
                return
            self._wake.set()
        except Exception as exc:
            self.log.exception("decode_setup_failed", request_id=rid, error=repr(exc))
            await self._abort_quietly(rid)
            err = ErrorReply(
                code=500, message=f"{type(exc).__name__}: {exc}", request_id=rid, type="internal_error"
            )
            await self._finish(st, "error", error=err)

    async def _import(self, st: _DecodeStream, req: DecodeRequest, kv: KvTransferParams) -> None:
        """Allocate blocks (reusing cached ones), READ the rest from the prefill worker, activate."""
        from tandem.transfer.nixl import KvTransferError

        engine, agent = self.engine, self.agent
        if engine is None or agent is None:
            return
        rid = req.request_id
        notif = rid.encode()
        try:
            imported = await self._on_engine(
                engine.import_request,
                rid,
                list(req.token_ids),
                int(req.first_token or 0),
                req.sampling,
                list(req.block_hashes),
            )
        except ValueError as exc:
            await self._notify_quietly(kv, notif)
            await self._finish(st, "error", error=ErrorReply(code=400, message=str(exc), request_id=rid))
            return
        if imported is None:
            await self._notify_quietly(kv, notif)
            err = ErrorReply(
                code=503, message="not enough free KV blocks", request_id=rid, type="unavailable"
            )
            await self._finish(st, "error", error=err)
            return
        table, reused = imported
        if time.time() >= kv.expires_at:
            await self._abort_quietly(rid)
            err = ErrorReply(
                code=504, message="prefilled KV expired before the READ", request_id=rid, type="timeout"
            )
            await self._finish(st, "error", error=err)
            return
        if len(table) != len(kv.block_ids) or not 0 <= reused <= len(table):
            await self._abort_quietly(rid)
            await self._notify_quietly(kv, notif)
            err = ErrorReply(code=500, message="imported block table does not match kv", request_id=rid)
            await self._finish(st, "error", error=err)
            return
        try:
            if kv.agent_name == agent.name:
                # Prefilled by this very worker (role both): copy between our own blocks.
                moved = await self._on_engine(self._copy_blocks, kv.block_ids[reused:], table[reused:])
                if self._pending.pop(rid, None) is not None:
                    self._spawn(self._release_pinned(rid), f"release:{rid}")
            else:
                # Also sends the notification when there is nothing to read (all blocks reused).
                moved = await agent.read_blocks(
                    kv.agent_name,
                    kv.agent_metadata,
                    kv.descriptors[reused:],
                    table[reused:],
                    notif,
                    timeout_s=self.opts.transfer_timeout_s,
                )
        except (KvTransferError, ValueError, IndexError) as exc:
            self.log.warning("kv_transfer_failed", request_id=rid, error=str(exc))
            await self._abort_quietly(rid)
            if kv.agent_name != agent.name:
                await self._notify_quietly(kv, notif)  # let the prefill side free early
            err = ErrorReply(
                code=502, message=f"KV transfer failed: {exc}", request_id=rid, type="kv_transfer"
            )
            await self._finish(st, "error", error=err)
            return
        st.metrics.kv_transfer = KvTransferStats(
            blocks=moved.blocks, bytes=moved.bytes, ms=moved.ms, reused_blocks=reused
        )
        self.log.debug(
            "kv_imported", request_id=rid, blocks=moved.blocks, reused=reused, ms=round(moved.ms, 3)
        )
        if st.cancelled or self._streams.get(rid) is not st:
            await self._abort_quietly(rid)
            await self._finish(st, "abort")
            return
        st.state = "running"
        await self._on_engine(engine.activate_imported, rid)
        self._wake.set()

    def _copy_blocks(self, src: list[int], dst: list[int]) -> KvTransferStats:
        """On the engine thread: copy KV blocks ``src`` to ``dst`` inside our own cache."""
        import torch

        engine = self.engine
        if engine is None:
            raise RuntimeError("worker not started")
        if any(not 0 <= b < self.num_blocks for b in src):
            raise IndexError("kv.block_ids outside this worker's pool")
        t0 = time.perf_counter()
        if src:
            engine.kv_cache[torch.tensor(dst)] = engine.kv_cache[torch.tensor(src)]
        ms = (time.perf_counter() - t0) * 1e3
        return KvTransferStats(blocks=len(src), bytes=len(src) * self.block_nbytes, ms=ms)

    async def _notify_quietly(self, kv: KvTransferParams, notif: bytes) -> None:
        """Tell the prefill worker it may free its pinned blocks (nothing will be READ)."""
        agent = self.agent
        if agent is None:
            return
        try:
            await agent.read_blocks(kv.agent_name, kv.agent_metadata, [], [], notif, timeout_s=1.0)
        except Exception as exc:
            self.log.warning("notify_prefill_failed", error=repr(exc))

    async def _send_chunk(self, st: _DecodeStream, token_ids: list[int]) -> None:
        chunk = TokenChunk(
            request_id=st.request_id, index=st.next_index, token_ids=token_ids, worker_id=self.id
        )
        st.next_index += 1
        await self._publish(st.reply_to, chunk)

    async def _finish(
        self,
        st: _DecodeStream,
        reason: FinishReason,
        token_ids: list[int] | None = None,
        error: ErrorReply | None = None,
    ) -> None:
        """Send the final chunk (once) and forget the stream."""
        if self._streams.get(st.request_id) is not st:
            return
        del self._streams[st.request_id]
        chunk = TokenChunk(
            request_id=st.request_id,
            index=st.next_index,
            token_ids=token_ids or [],
            worker_id=self.id,
            finish_reason=reason,
            error=error,
            metrics=st.metrics,
        )
        st.next_index += 1
        await self._publish(st.reply_to, chunk)

    async def _publish(self, subject: str, msg: TokenChunk) -> None:
        try:
            await self.svc.nc.publish(subject, encode(msg))
        except Exception as exc:
            self.log.warning("publish_failed", subject=subject, error=repr(exc))

    # ---- cancel / stats ---------------------------------------------------------------------------

    async def _on_cancel(self, msg: Cancel, _msg: NatsMsg) -> None:
        """Cancel the request wherever it is here; unknown ids are ignored (it is a broadcast)."""
        rid = msg.request_id
        fut = self._prefills.get(rid)
        if fut is not None:
            self._cancelled_prefills.add(rid)
            await self._abort_quietly(rid)
            if not fut.done():
                fut.set_exception(_Aborted())
            if rid not in self._prefills:
                self._cancelled_prefills.discard(rid)
        if self._pending.pop(rid, None) is not None:
            self.log.info("cancel_frees_pinned_kv", request_id=rid)
            await self._release_pinned(rid)
        st = self._streams.get(rid)
        if st is not None:
            st.cancelled = True  # an import in progress checks this after its READ
            if st.state == "running":
                await self._abort_quietly(rid)
                await self._finish(st, "abort")

    async def _on_stats(self, req: WorkerStatsRequest, _msg: NatsMsg) -> WorkerStats:
        """Pool state, integrity check, RSS and counters."""
        engine = self.engine
        if engine is None:
            raise runtime.ServiceError(503, "worker not started", type="unavailable")

        def job() -> tuple[Any, str]:
            stats = engine.kv.stats()
            err = ""
            if req.check_integrity:
                try:
                    engine.kv.check_integrity()
                except Exception as exc:
                    err = f"{type(exc).__name__}: {exc}"
            return stats, err

        stats, err = await self._on_engine(job)
        agent = self.agent
        return WorkerStats(
            worker_id=self.id,
            num_blocks=int(stats.num_blocks),
            free_blocks=int(stats.free),
            cached_blocks=int(stats.cached),
            in_use_blocks=int(stats.in_use),
            pinned_blocks=int(stats.pinned),
            integrity_ok=not err,
            integrity_error=err,
            rss_bytes=psutil.Process().memory_info().rss,
            pending_transfers=len(self._pending) + (agent.pending_transfers if agent is not None else 0),
            kv_events_published=self.kv_events_published,
        )

    # ---- KV events --------------------------------------------------------------------------------

    async def _events_loop(self) -> None:
        """Publish KV events in order through JetStream (queued lists merge into one batch)."""
        subject = self.subjects.kv_events(self.id)
        while True:
            events = await self._events_q.get()
            self._events_busy = True
            try:
                while not self._events_q.empty():
                    events.extend(self._events_q.get_nowait())
                payload = encode(KvEventBatch(worker_id=self.id, events=events))
                for attempt in range(5):
                    try:
                        await self.svc.js.publish(subject, payload, timeout=5.0)
                        self.kv_events_published += len(events)
                        break
                    except Exception as exc:
                        self.log.warning(
                            "kv_events_publish_failed",
                            attempt=attempt + 1,
                            events=len(events),
                            error=repr(exc),
                        )
                        await asyncio.sleep(0.1 * 2**attempt)
                else:
                    self.log.error("kv_events_dropped", first_event_id=events[0].event_id, events=len(events))
            finally:
                self._events_busy = False

    # ---- shutdown ---------------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Unregister hook (after the registry entry is gone): grace period, then KV drain."""
        self.draining = True
        o = self.opts
        self.log.info(
            "draining", streams=len(self._streams), prefills=len(self._prefills), pending=len(self._pending)
        )
        await self._wait_until(
            lambda: not self._streams and not self._prefills, o.shutdown_grace_s, "requests"
        )
        for rid, fut in list(self._prefills.items()):
            self._cancelled_prefills.add(rid)
            await self._abort_quietly(rid)
            if not fut.done():
                fut.set_exception(_Aborted())
        for st in list(self._streams.values()):
            st.cancelled = True
            if st.state == "running":
                await self._abort_quietly(st.request_id)
                await self._finish(st, "abort")
        # Imports still READing finish (or time out) on their own and then see `cancelled`;
        # pinned KV waits for its readers' notifications (or expiry).
        await self._wait_until(
            lambda: not self._streams and not self._pending and not self._releasing,
            o.drain_timeout_s,
            "kv transfers",
        )

    async def _close(self) -> None:
        """Close hook: release what is left, flush events, stop tasks, NIXL and the engine thread."""
        self.draining = True
        for rid in list(self._pending):
            del self._pending[rid]
            self.log.warning("pinned_kv_released_at_shutdown", request_id=rid)
            await self._release_pinned(rid)
        for st in list(self._streams.values()):
            await self._abort_quietly(st.request_id)
            await self._finish(st, "abort")
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        await self._wait_until(lambda: self._events_q.empty() and not self._events_busy, 5.0, "kv events")
        loops, self._loops = self._loops, []
        for task in loops:
            task.cancel()
        if loops:
            await asyncio.wait(loops, timeout=5.0)
        if self.agent is not None:
            try:
                self.agent.close()
            except Exception as exc:
                self.log.exception("nixl_close_failed", error=repr(exc))
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        self.log.info("worker_closed", kv_events_published=self.kv_events_published)

    async def _wait_until(self, cond: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() >= deadline:
                self.log.warning("shutdown_wait_gave_up", waiting_for=what, timeout_s=timeout_s)
                return
            await asyncio.sleep(0.01)


# ---- entry point ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tandem.services.worker``: serve until SIGTERM/SIGINT; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        opts = options_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))

    async def setup(svc: ServiceBase) -> None:
        await Worker(svc, opts).start()

    return runtime.run_service(setup, SERVICE, args, instance_id=opts.instance_id)


if __name__ == "__main__":
    raise SystemExit(main())
