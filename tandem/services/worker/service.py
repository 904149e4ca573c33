"""Worker wiring: one :class:`Worker` per instance, N of them per process in a :class:`WorkerHost`.

A :class:`Worker` puts together its engine client, its KV transports, the prefill and decode
handlers, its KV event publisher, its registry entry (heartbeats), its subjects and its stats.
A :class:`WorkerHost` runs ``--num-workers`` of them inside one
:class:`~tandem.services.runtime.ServiceBase`: one NATS connection, one health responder, one
subscription to the broadcast ``cancel`` subject (dispatched to whichever worker holds the
request), and per worker its own instance id, ``worker_prefill/generate/cancel/stats(id)``
subjects, heartbeat entry and ``kv_events(id)`` stream subject. More than one worker per process
needs the mock engine (one model per process); a mock worker has no thread and no polling task,
so an idle one costs an awaited event per task and a heartbeat per ``--heartbeat-s``.

Shutdown (SIGTERM/SIGINT; Dynamo's order, driven by ``ServiceBase.shutdown``; all workers in
parallel): unregister (registry entries deleted, heartbeats stop) → grace period (new work gets
503, running requests may finish for ``--shutdown-grace-s``, then they are aborted) → drain
in-flight KV transfers (pinned KV waits for its notification or expiry, bounded by
``--drain-timeout-s``) → unsubscribe and drain handler tasks → close (release what is left, flush
KV events, stop the tasks, close the transports, stop the engine thread) → drain NATS.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from nats.aio.msg import Msg as NatsMsg

from tandem.config import add_arguments, from_namespace
from tandem.engine.config import EngineConfig
from tandem.protocol.messages import (
    PROTOCOL_VERSION,
    Cancel,
    DecodeRequest,
    ErrorReply,
    Health,
    HealthRequest,
    InstanceInfo,
    Message,
    PrefillRequest,
    WorkerLoad,
    WorkerStats,
    WorkerStatsRequest,
    encode,
)
from tandem.services import discovery, messaging, observability, runtime
from tandem.services.worker.config import WorkerConfig, worker_ids
from tandem.services.worker.decode import DecodeHandler
from tandem.services.worker.engine_client import EngineClient
from tandem.services.worker.kv_events import KvEventPublisher
from tandem.services.worker.prefill import PrefillHandler
from tandem.services.worker.requests import Phase, RequestTable
from tandem.transfer.base import KV_LAYOUT, KvTransport, compat_hash
from tandem.transfer.local import LocalTransport

if TYPE_CHECKING:
    from tandem.engine.engine import RequestOutput
    from tandem.services.runtime import ServiceBase

__all__ = ["DEFAULT_MODEL_NAME", "SERVICE", "Worker", "WorkerHost", "build_parser", "main"]

SERVICE = "worker"
#: ``tandem.engine.weights.MODEL_NAME`` (that module imports torch; a mock worker must not).
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


def served_model_name(model_dir: str | None) -> str:
    """The model name in ``<model_dir>/prepared.json`` (what the frontend serves), else the default."""
    if model_dir:
        try:
            name = json.loads((Path(model_dir) / "prepared.json").read_text()).get("model")
        except (OSError, ValueError):
            name = None
        if isinstance(name, str) and name:
            return name
    return DEFAULT_MODEL_NAME


class Worker:
    """One worker instance: engine, transports, handlers, registration, stats.

    Args:
        svc: the process's service (NATS connection, subscriptions, shutdown order).
        instance_id: this worker's id (subjects, registry key, KV event stream).
        engine_config: its engine's settings (``model_dir`` already resolved for the model).
        config: the worker settings (shared by the workers of a host).
    """

    def __init__(
        self, svc: ServiceBase, instance_id: str, engine_config: EngineConfig, config: WorkerConfig
    ) -> None:
        self.svc = svc
        self.id = instance_id
        self.config = config
        self.engine_config = engine_config
        self.subjects = svc.subjects
        self.role = config.role
        self.log = observability.get_logger("tandem.worker").bind(instance_id=instance_id, role=config.role)
        self.table = RequestTable()
        self.events = KvEventPublisher(svc.js, svc.subjects.kv_events(instance_id), instance_id, self.log)
        self.engine = EngineClient(engine_config, self.events.put, self.log)
        self.prefill = PrefillHandler(self)
        self.decode = DecodeHandler(self)
        self._transport: KvTransport | None = None
        self.local: LocalTransport | None = None
        self.model_name = served_model_name(engine_config.model_dir)
        self.block_size = engine_config.block_size
        self.block_nbytes = 0
        self.num_blocks = 0
        self.compat_hash = ""
        self.draining = False
        self._registration: discovery.WorkerRegistration | None = None
        self._registry: discovery.InstanceRegistry | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watch_task: asyncio.Task[None] | None = None

    # ---- start ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the engine and transports, subscribe, start the tasks, register.

        Raises ``NixlUnavailableError`` when NIXL cannot load (no fallback) and whatever engine
        loading or NATS raises; :meth:`close` releases what was created before a failure.
        """
        t0 = time.perf_counter()
        engine = await self.engine.start()
        self.block_nbytes = int(engine.block_nbytes)
        self.num_blocks = int(engine.kv.num_blocks)
        self._transport = await self._open_transport(engine)
        if self.role != "prefill":
            self.local = LocalTransport(
                self.transport.name,
                self.transport.metadata,
                _base_addr(self.transport),
                self.num_blocks,
                self.block_nbytes,
                self.engine.copy_blocks,
            )
        for transport in self.notif_sources():
            transport.set_notif_callback(self.prefill.notified)
        mc = engine.model_config
        layout = KV_LAYOUT
        if self.engine_config.engine == "mock":
            # Mock KV is never real: pair only with mock workers of the same transport and size.
            layout = f"mock+{self.transport.kind}:{self.block_nbytes}:{KV_LAYOUT}"
        self.compat_hash = compat_hash(
            self.model_name,
            mc.num_hidden_layers,
            mc.num_key_value_heads,
            mc.head_dim,
            self.engine_config.dtype,
            self.block_size,
            layout=layout,
        )
        self.events.start()
        self.engine.start_loop(self._on_outputs, self._fail_all, self.decode.flush)
        self._watch_task = asyncio.get_running_loop().create_task(
            self.prefill.watch(), name=f"pinned:{self.id}"
        )

        svc, s = self.svc, self.subjects
        if self.role != "decode":
            await svc.serve(s.worker_prefill(self.id), PrefillRequest, self.prefill.on_prefill)
        if self.role != "prefill":
            await svc.serve(s.worker_generate(self.id), DecodeRequest, self.decode.on_generate)
            if self.transport.kind == "nixl":
                await self._watch_peers()
        await svc.serve(s.worker_cancel(self.id), Cancel, self._on_cancel_msg)
        await svc.serve(s.worker_debug(self.id), WorkerStatsRequest, self._on_stats)
        await svc.serve(s.worker_health(self.id), HealthRequest, self._on_health)
        self._registration = discovery.WorkerRegistration(
            svc.js,
            s,
            self._instance_info,
            interval_s=self.config.heartbeat_s,
            replicas=svc.jetstream_replicas,
        )
        await self._registration.start()
        # One line per worker at info for a single worker; hundreds of mock workers log at debug.
        log = self.log.info if self.config.num_workers == 1 else self.log.debug
        log(
            "worker_started",
            engine=self.engine_config.engine,
            kv_transport=self.transport.kind,
            num_blocks=self.num_blocks,
            block_nbytes=self.block_nbytes,
            compat_hash=self.compat_hash,
            kv_agent=self.transport.name,
            startup_s=round(time.perf_counter() - t0, 3),
        )

    async def _open_transport(self, engine: Any) -> KvTransport:
        """The primary KV transport: NIXL over the engine's KV tensor, or simulated."""
        kind = self.config.kv_transport or ("nixl" if self.engine_config.engine == "model" else "simulated")
        name = f"tandem-{self.id}"
        if kind == "simulated":
            if self.engine_config.engine != "mock":
                raise ValueError("--kv-transport simulated moves no bytes: it needs --engine mock")
            from tandem.transfer.simulated import SimulatedTransport

            subject = f"{self.subjects.ns}.worker.{self.id}.kv_notify" if self.role != "decode" else ""
            sim = SimulatedTransport(
                name,
                self.num_blocks,
                self.block_nbytes,
                self.config.kv_transfer_bandwidth,
                nc=self.svc.nc,
                notify_subject=subject,
            )
            await sim.start()
            return sim
        from tandem.transfer.nixl import KvTransferAgent, NixlUnavailableError, alloc_kv_cache

        kv_cache = engine.kv_cache
        if kv_cache is None:  # mock engine over NIXL: real bytes (contents meaningless)
            import torch

            kv_cache = alloc_kv_cache((self.num_blocks, self.block_nbytes), torch.uint8, prefault=False)
        try:
            # NIXL lives on the event loop thread.
            return KvTransferAgent(name, kv_cache, self.block_nbytes)
        except NixlUnavailableError as exc:
            self.log.error("nixl_unavailable", error=str(exc))
            raise

    @property
    def peer_registry(self) -> discovery.InstanceRegistry | None:
        """The registry view of the NIXL peers (decode side with NIXL only; None otherwise)."""
        return self._registry

    async def _watch_peers(self) -> None:
        """Warm up the NIXL path to every prefill worker as it registers (see ``decode.warm_up``)."""
        registry = discovery.InstanceRegistry(
            self.svc.js, self.subjects, replicas=self.svc.jetstream_replicas
        )
        self._registry = registry

        async def added(info: InstanceInfo) -> None:
            if (
                info.instance_id != self.id
                and info.can_prefill
                and info.kv_transport == self.transport.kind
                and info.compat_hash == self.compat_hash
            ):
                self.spawn(self.decode.warm_up(info), f"warm-up:{info.instance_id}")

        async def removed(info: InstanceInfo) -> None:
            if info.instance_id != self.id:
                self.transport.disconnect(info.nixl_agent_name)

        registry.on_added(added)
        registry.on_removed(removed)
        await registry.start()

    @property
    def transport(self) -> KvTransport:
        """The primary KV transport (NIXL or simulated); ``RuntimeError`` before :meth:`start`."""
        if self._transport is None:
            raise RuntimeError("worker not started")
        return self._transport

    def notif_sources(self) -> list[KvTransport]:
        """The transports whose notifications free this worker's pinned KV (those opened so far)."""
        return [t for t in (self._transport, self.local) if t is not None]

    # ---- registry entry ---------------------------------------------------------------------------

    def _instance_info(self) -> InstanceInfo:
        """This worker's entry in the instances bucket (called by every heartbeat)."""
        probe = None
        if self.transport.kind == "nixl" and self.role != "decode":
            probe = self.transport.block_descriptors([0])[0]
        return InstanceInfo(
            instance_id=self.id,
            role=self.role,
            model=self.model_name,
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            block_nbytes=self.block_nbytes,
            compat_hash=self.compat_hash,
            nixl_agent_name=self.transport.name,
            nixl_metadata=self.transport.metadata,
            heartbeat_at=time.time(),
            protocol_version=PROTOCOL_VERSION,
            load=self.load(),
            engine=self.engine_config.engine,
            kv_transport=self.transport.kind,
            kv_probe=probe,
        )

    def load(self) -> WorkerLoad:
        """Current load: the request table, and the engine's state as of its last step."""
        snap = self.engine.snapshot
        stats = snap.stats
        return WorkerLoad(
            num_running=self.table.count(Phase.RUNNING),
            num_waiting=self.table.count(Phase.PREFILLING, Phase.IMPORTING),
            used_blocks=int(stats.in_use) if stats is not None else 0,
            pinned_blocks=int(stats.pinned) if stats is not None else 0,
            waiting_prefill_tokens=snap.waiting_prefill_tokens,
        )

    # ---- engine outputs ---------------------------------------------------------------------------

    async def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Route each engine output to its request's prefill or decode side."""
        for out in outputs:
            try:
                entry = self.table.get(out.request_id)
                if entry is not None and entry.phase is Phase.PREFILLING:
                    self.engine.end_burst()  # the prefill answer goes out from its handler task
                    if self.prefill.on_output(entry, out):
                        continue
                elif entry is not None and entry.phase is Phase.RUNNING:
                    await self.decode.on_output(entry, out)
                    continue
                if out.pinned_block_ids is not None:
                    # Nobody waits for this prefill any more (timed out / cancelled): free it.
                    rid = out.request_id
                    self.log.warning(
                        "orphan_pinned_kv_released", request_id=rid, blocks=len(out.pinned_block_ids)
                    )
                    self.spawn(self.engine.release_pinned(rid), f"orphan:{rid}")
            except Exception as exc:
                self.log.exception("dispatch_failed", request_id=out.request_id, error=repr(exc))

    async def _fail_all(self, message: str) -> None:
        """The engine step failed: fail every prefill waiting and every running stream."""
        for entry in self.table:
            if entry.phase is Phase.PREFILLING:
                await self.engine.abort(entry.request_id)
                self.prefill.abort_waiter(entry, RuntimeError(message))
            elif entry.phase is Phase.RUNNING:
                await self.engine.abort(entry.request_id)
                err = ErrorReply(
                    code=500, message=message, request_id=entry.request_id, type="internal_error"
                )
                await self.decode.finish(entry, "error", error=err)

    # ---- cancel / stats ---------------------------------------------------------------------------

    async def _on_cancel_msg(self, msg: Cancel, _msg: NatsMsg) -> None:
        await self.cancel(msg.request_id)

    async def cancel(self, request_id: str) -> None:
        """Cancel the request wherever it is here; unknown ids are ignored (it is a broadcast)."""
        entry = self.table.get(request_id)
        if entry is None:
            return
        entry.cancelled = True  # an import in progress checks this after its READ
        if entry.phase is Phase.PREFILLING:
            await self.engine.abort(request_id)
            self.prefill.abort_waiter(entry)
        if entry.pinned is not None and not entry.pinned.releasing:
            self.log.info("cancel_frees_pinned_kv", request_id=request_id)
            await self.prefill.release(entry, "cancelled")
        if entry.phase is Phase.RUNNING:
            await self.engine.abort(request_id)
            await self.decode.finish(entry, "abort")
        elif entry.phase is Phase.IMPORTING:
            # Takes effect now (final chunk, RequestFinished); the import task frees the blocks
            # once its READ returns, since the READ may still be writing them.
            await self.decode.finish(entry, "abort")

    async def _on_health(self, req: HealthRequest, _msg: NatsMsg) -> Health:
        """Liveness, answered here on the event loop (a long engine step does not delay it);
        ``holds``: whether ``req.request_id`` is still being served here."""
        holds = None
        if req.request_id:
            entry = self.table.get(req.request_id)
            holds = entry is not None and entry.phase is not Phase.FINISHED
        ready = self.engine.started and not self.draining
        return Health(service="worker", instance_id=self.id, ready=ready, holds=holds)

    async def _on_stats(self, req: WorkerStatsRequest, _msg: NatsMsg) -> WorkerStats:
        """Pool state, integrity check, RSS and counters."""
        if not self.engine.started:
            raise messaging.ServiceError(503, "worker not started", type="unavailable")
        engine = self.engine.engine

        def job() -> tuple[Any, str]:
            stats = engine.kv.stats()
            err = ""
            if req.check_integrity:
                try:
                    engine.kv.check_integrity()
                except Exception as exc:
                    err = f"{type(exc).__name__}: {exc}"
            return stats, err

        stats, err = await self.engine.call(job)
        transfers = sum(t.pending_transfers for t in self.notif_sources())
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
            pending_transfers=len(self.table.pinned()) + transfers,
            kv_events_published=self.events.published,
        )

    # ---- helpers ----------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start a task owned by this worker (cancelled by :meth:`close` if still running)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("task_failed", task=task.get_name(), error=repr(task.exception()))

    async def publish(self, subject: str, msg: Message) -> None:
        """Publish ``msg`` (errors logged: the connection may be closing)."""
        try:
            await self.svc.nc.publish(subject, encode(msg))
        except Exception as exc:
            self.log.warning("publish_failed", subject=subject, error=repr(exc))

    async def _wait_until(self, cond: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() >= deadline:
                self.log.warning("shutdown_wait_gave_up", waiting_for=what, timeout_s=timeout_s)
                return
            await asyncio.sleep(0.01)

    # ---- shutdown ---------------------------------------------------------------------------------

    async def unregister(self) -> None:
        """Delete the registry entry and stop heartbeats (first thing on shutdown)."""
        self.draining = True
        if self._registration is not None:
            await self._registration.stop()

    async def drain(self) -> None:
        """Grace period for running requests, then abort them, then wait for pinned KV."""
        self.draining = True
        cfg = self.config
        active = (Phase.PREFILLING, Phase.IMPORTING, Phase.RUNNING)
        if self.table.count(*active):
            self.log.info("draining", requests=len(self.table), pinned=len(self.table.pinned()))
        await self._wait_until(lambda: not self.table.count(*active), cfg.shutdown_grace_s, "requests")
        for entry in self.table:
            entry.cancelled = True
            if entry.phase is Phase.PREFILLING:
                await self.engine.abort(entry.request_id)
                self.prefill.abort_waiter(entry)
            elif entry.phase is Phase.RUNNING:
                await self.engine.abort(entry.request_id)
                await self.decode.finish(entry, "abort")
        # Imports still READing finish (or time out) on their own and then see `cancelled`;
        # pinned KV waits for its readers' notifications (or expiry).
        await self._wait_until(lambda: not len(self.table), cfg.drain_timeout_s, "kv transfers")

    async def close(self) -> None:
        """Release what is left, flush events, stop tasks, transports and the engine thread."""
        self.draining = True
        if self.engine.started:
            for entry in self.table:
                if entry.pinned is not None:
                    self.log.warning("pinned_kv_released_at_shutdown", request_id=entry.request_id)
                    await self.prefill.release(entry, "shutdown")
                if entry.phase in (Phase.RUNNING, Phase.IMPORTING):
                    await self.engine.abort(entry.request_id)
                    await self.decode.finish(entry, "abort")
        if self._registry is not None:
            await self._registry.stop()
        tasks = list(self._tasks)
        if self._watch_task is not None:
            tasks.append(self._watch_task)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        if not await self.events.flush(5.0):
            self.log.warning("shutdown_wait_gave_up", waiting_for="kv events", timeout_s=5.0)
        await self.events.stop()
        await self.engine.close()
        for transport in self.notif_sources():
            try:
                await transport.aclose()
            except Exception as exc:
                self.log.exception("transport_close_failed", transport=transport.kind, error=repr(exc))
        self.log.debug("worker_closed", kv_events_published=self.events.published)


def _base_addr(transport: KvTransport) -> int:
    """Address of block 0 in ``transport``'s descriptors."""
    return int(transport.block_descriptors([0])[0][0])


class WorkerHost:
    """The workers of one process, sharing its :class:`ServiceBase` (see the module docstring).

    Args:
        svc: the started service.
        engine_config: the engine settings every worker uses (``model_dir`` resolved here for
            the model engine).
        config: the worker settings; ``config.num_workers`` workers are hosted.

    Raises:
        ValueError: several workers without the mock engine.
    """

    def __init__(self, svc: ServiceBase, engine_config: EngineConfig, config: WorkerConfig) -> None:
        if config.num_workers > 1 and engine_config.engine != "mock":
            raise ValueError("--num-workers > 1 needs --engine mock (one model per process)")
        self.svc = svc
        self.engine_config = engine_config
        self.config = config
        self.ids = worker_ids(config)
        self.workers: list[Worker] = []
        self.log = observability.get_logger("tandem.worker").bind(role=config.role)

    async def start(self) -> None:
        """Start every worker (concurrently), then hook the shutdown stages onto ``svc``."""
        svc, cfg = self.svc, self.config
        svc.on_close(self._close)  # first: releases what a failed start created
        svc.readiness = self._readiness
        # The hooks run with svc.drain_timeout_s each: make room for our grace + drain bounds.
        svc.drain_timeout_s = max(svc.drain_timeout_s, cfg.shutdown_grace_s + cfg.drain_timeout_s + 10.0)
        t0 = time.perf_counter()
        engine_config = self.engine_config
        if engine_config.engine == "model" and engine_config.model_dir is None:
            from tandem.engine.weights import prepare_model

            model_dir = await asyncio.to_thread(prepare_model)
            engine_config = dataclasses.replace(engine_config, model_dir=str(model_dir))
        self.workers = [Worker(svc, iid, engine_config, cfg) for iid in self.ids]
        await svc.serve(svc.subjects.cancel, Cancel, self._on_cancel)
        svc.on_unregister(self._unregister)
        results = await asyncio.gather(*(w.start() for w in self.workers), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        self.log.info(
            "workers_started",
            workers=len(self.workers),
            first=self.ids[0],
            last=self.ids[-1],
            engine=engine_config.engine,
            kv_transport=self.workers[0].transport.kind,
            num_blocks=self.workers[0].num_blocks,
            startup_s=round(time.perf_counter() - t0, 2),
        )

    def _readiness(self) -> tuple[bool, str]:
        ready = bool(self.workers) and not any(w.draining for w in self.workers)
        n = len(self.workers)
        return ready, self.config.role if n == 1 else f"{self.config.role} x{n}"

    async def _on_cancel(self, msg: Cancel, _msg: NatsMsg) -> None:
        """The broadcast cancel: one subscription per process, handed to the worker holding it."""
        for w in self.workers:
            if msg.request_id in w.table:
                await w.cancel(msg.request_id)

    async def _unregister(self) -> None:
        """Unregister hook: every entry goes first, then every worker drains (in parallel)."""
        await asyncio.gather(*(w.unregister() for w in self.workers))
        await asyncio.gather(*(w.drain() for w in self.workers))

    async def _close(self) -> None:
        """Close hook: close every worker (in parallel)."""
        results = await asyncio.gather(*(w.close() for w in self.workers), return_exceptions=True)
        for w, r in zip(self.workers, results, strict=True):
            if isinstance(r, BaseException):
                w.log.error("worker_close_failed", error=repr(r))
        published = sum(w.events.published for w in self.workers)
        self.log.info("workers_closed", workers=len(self.workers), kv_events_published=published)


# ---- entry point ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The worker's command line: common service flags + :class:`EngineConfig`'s + :class:`WorkerConfig`'s."""
    p = runtime.common_parser(SERVICE, "tandem worker: engine, KV block pool, scheduler, KV transport")
    add_arguments(p.add_argument_group("engine"), EngineConfig)
    add_arguments(p.add_argument_group("worker"), WorkerConfig)
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, EngineConfig, WorkerConfig]:
    """Parse and validate (``SystemExit`` with a usage message on a bad value)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        engine_config = from_namespace(EngineConfig, args)
        config = from_namespace(WorkerConfig, args)
        if config.num_workers > 1 and engine_config.engine != "mock":
            raise ValueError("--num-workers > 1 needs --engine mock (one model per process)")
        if config.kv_transport == "simulated" and engine_config.engine != "mock":
            raise ValueError("--kv-transport simulated moves no bytes: it needs --engine mock")
    except ValueError as exc:
        parser.error(str(exc))
    return args, engine_config, config


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tandem.services.worker``: serve until SIGTERM/SIGINT; returns the exit code."""
    args, engine_config, config = parse_args(argv)
    ids = worker_ids(config)
    # Fix the ids now so the service's own id (logs, health) is the first worker's.
    config = dataclasses.replace(config, instance_id=ids[0])

    async def setup(svc: ServiceBase) -> None:
        await WorkerHost(svc, engine_config, config).start()

    return runtime.run_service(setup, SERVICE, args, instance_id=ids[0])
