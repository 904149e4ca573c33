"""Prefill router: picks the workers for each request and runs the disaggregation dance.

Life cycle of one request (``RouteRequest`` on ``{ns}.router.generate``, queue group ``router``)
---------------------------------------------------------------------------------------------------
States (:class:`Phase`), in order; every request ends in exactly one of the last four:

1. ``RECEIVED``
    Decoded by :func:`~tandem.services.messaging.serve` (a bad payload gets ``ErrorReply(400)`` on
    the message's reply subject). ``sampling.seed`` is set to a random 32-bit seed when None, so
    the tokens do not depend on which worker runs the request.
2. ``ROUTING``
    ``OverlapQuery`` to the indexer (``--overlap-timeout-s``; timeout or error → no overlap),
    then :meth:`RouterScheduler.decide <tandem.services.router.scheduler.RouterScheduler.decide>`
    (pure, timed): candidates from the instances bucket (``InstanceInfo.can_decode`` /
    ``can_prefill``) as :class:`~tandem.services.router.policy.WorkerState` values, busy ones
    dropped, ranked by the ``--router-mode`` policy (see :mod:`.policy`). No decode-capable worker
    → error chunk 503; every decode-capable worker busy → error chunk 503 with
    ``retry_after_s`` (``--busy-retry-after-s``; the frontend sends HTTP ``Retry-After``).
    The request is disaggregated only if some worker has role ``prefill``, the prompt tokens the
    local (decode) choice lacks reach ``--disagg-min-tokens``, a free prefill worker exists and
    is not saturated (``--max-prefill-queue-tokens``), and a decode worker with its
    ``compat_hash`` other than it exists. Otherwise → ``DISPATCHING`` with
    ``DecodeRequest(kv=None)`` to the local choice, which prefills itself.
3. ``PREFILLING``
    ``PrefillRequest`` → ``PrefillResult`` (``--prefill-timeout-s``) to the ranked prefill
    workers (:meth:`PrefillRouter._try_candidates`). While it runs, the request's blocks and
    uncached prompt tokens count as that worker's load in this router's
    :class:`~tandem.services.router.tracker.ActiveTracker`; they leave when the answer comes.
4. ``FIRST_TOKEN``
    ``TokenChunk(index=0, [first_token], worker_id=prefill worker)`` published to ``reply_to`` at
    once (TTFT = prefill). If the prefill finished the request (``finish_reason`` set) that chunk
    is final and carries the metrics → ``FINISHED``. Otherwise the prompt's KV is now *pinned* on
    the prefill worker.
5. ``DISPATCHING``
    ``DecodeRequest`` (with ``first_token``, ``kv``, ``prefill_worker_id`` and
    ``metrics=RequestMetrics(prefill_worker, cached_tokens, prefill_ms)`` when disaggregated) to
    the ranked decode workers — for a disaggregated request ranked now, on the current load,
    among those with the prefill worker's ``compat_hash`` — awaiting the ``Ack``
    (``--ack-timeout-s``). The request's blocks count as the decode worker's load from the send.
6. ``HANDED_OFF``
    Acked: the decode worker streams the remaining chunks straight to ``reply_to``. The router
    keeps counting the request's blocks on that worker until ``RequestFinished`` (or a
    ``Cancel``) for it arrives, a heartbeat shows it cannot be there any more, or its lease
    ends (see :mod:`.active`).
7. ``FINISHED``
    The prefill worker's first token ended the request.
8. ``FAILED``
    Any error: a final ``TokenChunk(finish_reason="error", error=ErrorReply(code, ...))`` goes to
    ``reply_to`` (index 0, or 1 when chunk 0 was already sent), and if KV may be pinned (prefill
    answered or timed out) a ``Cancel`` goes to that prefill worker's cancel subject to free it.
9. ``CANCELLED``
    A ``Cancel`` for the request (``{ns}.cancel``, broadcast) arrived before the decode worker
    acked: nothing more is forwarded or sent, and pinned KV is freed with a ``Cancel`` to the
    prefill worker. (Cancels arriving before their request are remembered for a minute.)

Faults (issue 6)
----------------
* The router acks every request on ``reply_to`` (``Ack(service="router")``, its instance id) on
  receipt, and again with the decode worker's id once that one accepted it, so the frontend can
  probe whoever holds the request (see ``tandem.services.frontend.token_stream``).
* A worker that stopped answering (``no responders``), a worker found gone by the liveness
  probe while the router waits for its prefill or its ``Ack`` (``--worker-probe-interval``; no
  responders, or three probes unanswered), a decode worker that does not ack in
  ``--ack-timeout-s`` (it gets a ``Cancel``) or answers 503 (draining, short of KV blocks) is
  skipped and the next ranked candidate tried (at most ``MAX_ATTEMPTS`` per step). A worker
  skipped that way is *suspect*: left out of decisions until it heartbeats again (a restarted
  worker does at once).
* No prefill worker answered: the request falls back to prefilling on its decode worker.
* Every decode candidate declined (503, e.g. ``kv_capacity``: short of free KV blocks): they are
  tried again, backing off from 50 ms to 0.5 s, for up to ``--decode-wait-s`` (10 s) while their
  running requests finish (the prefilled KV stays pinned, within its lease); then 503 with
  ``Retry-After`` (busy: the frontend does not migrate it). Gone is not busy: a candidate with no
  responders makes it a 503 without ``Retry-After``, which the frontend migrates.

Replicas: several routers may serve the queue group. They share the KV indexer's overlap answers
and the instances bucket (worker list + heartbeat load); each keeps its own in-flight tracking
and merges it with the heartbeat load (see :mod:`.active` and ``docs/router.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import msgspec
from nats.aio.msg import Msg as NatsMsg

from tandem.protocol.messages import (
    Ack,
    Cancel,
    DecodeRequest,
    ErrorReply,
    InstanceInfo,
    OverlapQuery,
    OverlapScores,
    PrefillFinished,
    PrefillRequest,
    PrefillResult,
    RequestFinished,
    RequestMetrics,
    RouteRequest,
    TokenChunk,
)
from tandem.services.discovery import InstanceRegistry
from tandem.services.messaging import (
    NoRespondersError,
    RemoteError,
    ServiceError,
    probe_liveness,
    publish,
    request,
)
from tandem.services.runtime import ServiceBase

from .config import RouterConfig
from .scheduler import Decision, RouterScheduler, RoutingError

SERVICE = "router"
#: Tries per step (prefill, decode dispatch) when a chosen worker has no responders.
MAX_ATTEMPTS = 3
#: Liveness probes in a row without an answer after which a prefill worker counts as gone.
PROBE_MISSES = 3
#: How long a Cancel that arrived before its request is remembered (seconds), and how many.
EARLY_CANCEL_TTL_S = 60.0
EARLY_CANCEL_MAX = 4096

T = TypeVar("T")


class Phase(enum.Enum):
    """Where a request is in the router (see the module docstring)."""

    RECEIVED = "received"
    ROUTING = "routing"
    PREFILLING = "prefilling"
    FIRST_TOKEN = "first_token"
    DISPATCHING = "dispatching"
    HANDED_OFF = "handed_off"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class _Request:
    req: RouteRequest
    phase: Phase = Phase.RECEIVED
    cancelled: bool = False
    chunks_sent: int = 0
    prefill_worker: str | None = None  # set once KV may be pinned there


class _Cancelled(Exception):
    """The request was cancelled while the router held it."""


class _NoneAnswered(ServiceError):
    """Every candidate of a step was gone or declined."""


class WorkerLostError(NoRespondersError):
    """A worker was found gone (or hung) while the router waited for it."""


class PrefillRouter:
    """The router's state and handlers, attached to a started :class:`ServiceBase`."""

    def __init__(
        self, svc: ServiceBase, config: RouterConfig | None = None, *, rng: random.Random | None = None
    ):
        self.svc = svc
        self.config = config or RouterConfig()
        self.registry = InstanceRegistry(svc.js, svc.subjects, replicas=svc.jetstream_replicas)
        self.log = svc.log
        self._rng = rng or random.Random()
        self.scheduler = RouterScheduler(self.config, rng=self._rng, max_attempts=MAX_ATTEMPTS)
        self._requests: dict[str, _Request] = {}
        self._early_cancels: OrderedDict[str, float] = OrderedDict()
        self.counts: dict[str, int] = {p.value: 0 for p in Phase}
        #: Workers found gone: instance id → wall time (s) they were; left out of decisions
        #: until their heartbeat is newer than that.
        self._suspects: dict[str, float] = {}
        #: Requests re-routed to a local prefill because no prefill worker answered.
        self.prefill_fallbacks = 0

    async def start(self) -> None:
        """Watch the instances bucket and serve ``router.generate``, ``cancel`` and
        ``router.finished``."""
        svc = self.svc
        self.registry.on_removed(self._on_worker_removed)
        await self.registry.start()
        svc.on_close(self.registry.stop)
        svc.readiness = self._readiness
        svc.holds = self._requests.__contains__
        await svc.serve(svc.subjects.cancel, Cancel, self._on_cancel)
        await svc.serve(svc.subjects.request_finished, RequestFinished, self._on_finished)
        await svc.serve(svc.subjects.prefill_finished, PrefillFinished, self._on_prefilled)
        await svc.serve(
            svc.subjects.router_generate, RouteRequest, self.on_route, queue=svc.subjects.ROUTER_QUEUE
        )

    def stats(self) -> dict[str, float]:
        """Decision time (``p50_us``, ``p99_us``, ``max_us`` over the last 4096 decisions,
        ``decisions``) and tracking figures (``tracked`` requests, ``reconciled``, ``expired``)."""
        out = self.scheduler.timer.stats()
        active = self.scheduler.active
        out.update(
            tracked=float(len(active)), reconciled=float(active.reconciled), expired=float(active.expired)
        )
        return out

    def _readiness(self) -> tuple[bool, str]:
        """Ready iff a decode-capable worker is routable (what routing sees, not the bucket)."""
        infos = self.live_instances().values()
        n_prefill = sum(1 for i in infos if i.can_prefill)
        n_decode = sum(1 for i in infos if i.can_decode)
        s = self.stats()
        return n_decode > 0, (
            f"prefill_workers={n_prefill} decode_workers={n_decode} inflight={len(self._requests)} "
            f"mode={self.config.router_mode} tracked={int(s['tracked'])} decisions={int(s['decisions'])} "
            f"decide_p50_us={s['p50_us']:.1f} decide_p99_us={s['p99_us']:.1f} "
            f"decide_cpu_p50_us={s['cpu_p50_us']:.1f} decide_cpu_p99_us={s['cpu_p99_us']:.1f}"
        )

    # ---- cancel / finished / workers ---------------------------------------------------------------

    async def _on_cancel(self, msg: Cancel, _nmsg: NatsMsg) -> None:
        st = self._requests.get(msg.request_id)
        if st is not None:
            st.cancelled = True
            return
        if self.scheduler.active.free(msg.request_id):
            return  # handed off earlier: the worker drops it now
        now = time.monotonic()
        self._early_cancels[msg.request_id] = now
        while self._early_cancels:
            rid, at = next(iter(self._early_cancels.items()))
            if len(self._early_cancels) <= EARLY_CANCEL_MAX and now - at < EARLY_CANCEL_TTL_S:
                break
            del self._early_cancels[rid]

    async def _on_finished(self, msg: RequestFinished, _nmsg: NatsMsg) -> None:
        """A decode worker finished a request: stop counting it (no-op if another replica sent it)."""
        self.scheduler.active.free(msg.request_id, msg.worker_id or None)

    async def _on_prefilled(self, msg: PrefillFinished, _nmsg: NatsMsg) -> None:
        """A worker finished a local prefill: its prompt tokens leave the prefill load (no-op if
        another replica sent the request)."""
        self.scheduler.active.mark_prefill_done(msg.request_id)

    async def _on_worker_removed(self, info: InstanceInfo) -> None:
        self.scheduler.active.remove_worker(info.instance_id)
        self._suspects.pop(info.instance_id, None)

    def live_instances(self) -> Mapping[str, InstanceInfo]:
        """The registered workers minus the suspects (gone since their last heartbeat); not a
        copy unless there are suspects (read it at once)."""
        if not self._suspects:
            return self.registry.view
        instances = self.registry.instances
        for iid, at in list(self._suspects.items()):
            info = instances.get(iid)
            if info is None:
                del self._suspects[iid]
            elif info.heartbeat_at > at:
                del self._suspects[iid]  # it heartbeat since: back (e.g. restarted)
            else:
                del instances[iid]
        return instances

    def _suspect(self, worker_id: str, why: str) -> None:
        if worker_id not in self._suspects:
            self.log.warning("worker_suspect", worker_id=worker_id, reason=why)
        self._suspects[worker_id] = time.time()

    async def _probe(self, worker_id: str) -> bool | None:
        """Liveness of a worker: True (answered), False (no responders), None (no answer)."""
        subject = self.svc.subjects.worker_health(worker_id)
        return await probe_liveness(self.svc.nc, subject, self.config.worker_probe_interval_s)

    async def _watched(self, worker_id: str, work: Awaitable[T]) -> T:
        """``await work`` while probing ``worker_id`` every ``--worker-probe-interval`` seconds;
        raises :class:`WorkerLostError` (and cancels ``work``) once the worker is gone or missed
        ``PROBE_MISSES`` probes in a row."""
        task = asyncio.ensure_future(work)
        misses = 0
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.config.worker_probe_interval_s)
                if done:
                    return task.result()
                alive = await self._probe(worker_id)
                misses = misses + 1 if alive is None else 0
                if task.done():
                    return task.result()
                if alive is False or misses >= PROBE_MISSES:
                    raise WorkerLostError(self.svc.subjects.worker_health(worker_id))
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def _check_cancelled(self, st: _Request) -> None:
        if st.cancelled:
            raise _Cancelled

    # ---- the request ------------------------------------------------------------------------------

    async def on_route(self, req: RouteRequest, _nmsg: NatsMsg) -> None:
        """Route one request (never raises: failures become an error chunk to ``reply_to``)."""
        if req.sampling.seed is None:
            req = msgspec.structs.replace(
                req, sampling=msgspec.structs.replace(req.sampling, seed=self._rng.getrandbits(32))
            )
        st = _Request(req)
        if self._early_cancels.pop(req.request_id, None) is not None:
            st.cancelled = True
        self._requests[req.request_id] = st
        try:
            await self._ack(req, self.svc.instance_id, "router")
            await self._route(st)
        except _Cancelled:
            st.phase = Phase.CANCELLED
            self.log.info("request_cancelled", phase=st.phase.value)
            await self._free_pinned(st, "cancelled")
        except asyncio.CancelledError:  # router shutting down mid-request
            await self._fail(st, 503, "router shutting down", "service_unavailable")
            raise
        except RoutingError as e:
            await self._fail(st, e.code, e.message, e.type, retry_after_s=e.retry_after_s)
        except ServiceError as e:
            if st.cancelled:
                st.phase = Phase.CANCELLED
                await self._free_pinned(st, "cancelled")
            else:
                await self._fail(st, e.code, e.message, e.type)
        except TimeoutError as e:
            if st.cancelled:
                st.phase = Phase.CANCELLED
                await self._free_pinned(st, "cancelled")
            else:
                await self._fail(st, 504, str(e) or "timeout", "timeout")
        except Exception as e:
            self.log.exception("route_failed", error=repr(e))
            await self._fail(st, 500, f"router error: {type(e).__name__}: {e}", "internal_error")
        finally:
            self._requests.pop(req.request_id, None)
            self.counts[st.phase.value] += 1

    async def _route(self, st: _Request) -> None:
        req = st.req
        st.phase = Phase.ROUTING
        self._check_cancelled(st)
        scores = await self._overlap(req)
        self._check_cancelled(st)
        decision = self.scheduler.decide(self.live_instances(), len(req.token_ids), req.block_hashes, scores)
        self.log.debug(
            "routed",
            reason=decision.reason,
            local=decision.local[0].instance_id,
            prefill=decision.prefill[0].instance_id if decision.prefill else None,
        )
        # No await between the decision and the first bookkeeping ``add``: concurrent requests
        # see this one's load.
        if decision.prefill is None:
            await self._dispatch_local(st, decision)
        else:
            await self._disaggregate(st, decision, decision.prefill)

    async def _overlap(self, req: RouteRequest) -> dict[str, int]:
        if not req.block_hashes:
            return {}
        try:
            reply = await request(
                self.svc.nc,
                self.svc.subjects.indexer_overlap,
                OverlapQuery(request_id=req.request_id, block_hashes=req.block_hashes),
                OverlapScores,
                timeout=self.config.overlap_timeout_s,
            )
        except (ServiceError, TimeoutError) as e:
            self.log.warning("overlap_unavailable", error=str(e))
            return {}
        return reply.scores

    async def _try_candidates(
        self,
        st: _Request,
        candidates: Sequence[InstanceInfo],
        attempt: Callable[[InstanceInfo], Awaitable[T]],
        what: str,
        *,
        wait_s: float = 0.0,
    ) -> tuple[InstanceInfo, T]:
        """``await attempt(worker)`` on the ranked candidates until one answers.

        A worker with no responders (gone since its last heartbeat) is skipped, at most
        ``MAX_ATTEMPTS`` are tried; any other error propagates. A worker that declines (503:
        e.g. a decode worker short of free KV blocks) is skipped too. When every candidate tried
        declined, they are tried again — after 50 ms, backing off to 0.5 s — for up to ``wait_s``
        seconds (capacity frees as their running requests finish); then :class:`RoutingError`
        (503 with ``Retry-After``: busy, not lost). Raises ``_NoneAnswered`` (503, no
        ``Retry-After``) when a candidate was gone, or every one declined and ``wait_s`` is 0.
        """
        deadline = time.monotonic() + wait_s
        delay = 0.05
        while True:
            tried = candidates[:MAX_ATTEMPTS]
            declined: list[str] = []
            for n, info in enumerate(tried):
                self._check_cancelled(st)
                try:
                    return info, await attempt(info)
                except NoRespondersError as e:
                    self.log.warning(f"{what}_worker_gone", worker_id=info.instance_id, attempt=n)
                    self._suspect(info.instance_id, type(e).__name__)
                except RemoteError as e:
                    if e.code != 503:
                        raise
                    declined.append(e.message)
                    self.log.info(f"{what}_worker_declined", worker_id=info.instance_id, error=e.message)
            if not tried or len(declined) < len(tried) or wait_s <= 0:
                raise _NoneAnswered(503, f"no {what} worker answered", type="service_unavailable")
            if time.monotonic() + delay > deadline:
                raise RoutingError(
                    503,
                    f"every {what} worker is busy ({declined[-1]})",
                    retry_after_s=self.config.busy_retry_after_s,
                )
            await asyncio.sleep(delay)
            delay = min(0.5, delay * 2)

    # ---- the two paths ---------------------------------------------------------------------------

    async def _dispatch_local(self, st: _Request, d: Decision) -> None:
        req = st.req
        st.phase = Phase.DISPATCHING
        msg = DecodeRequest(
            request_id=req.request_id,
            token_ids=req.token_ids,
            block_hashes=req.block_hashes,
            sampling=req.sampling,
            reply_to=req.reply_to,
        )
        await self._send_decode(st, msg, d.local, d.scores, local_prefill=True)

    async def _disaggregate(self, st: _Request, d: Decision, prefill_ranked: list[InstanceInfo]) -> None:
        req = st.req
        active = self.scheduler.active
        n_tokens = len(req.token_ids)
        st.phase = Phase.PREFILLING
        msg = PrefillRequest(
            request_id=req.request_id,
            token_ids=req.token_ids,
            block_hashes=req.block_hashes,
            sampling=req.sampling,
        )

        async def prefill_on(info: InstanceInfo) -> PrefillResult:
            uncached = self.scheduler.uncached_tokens(info, n_tokens, d.scores)
            active.add(info, req.request_id, req.block_hashes, n_tokens, uncached, now=time.time())
            try:
                return await self._watched(
                    info.instance_id,
                    request(
                        self.svc.nc,
                        self.svc.subjects.worker_prefill(info.instance_id),
                        msg,
                        PrefillResult,
                        timeout=self.config.prefill_timeout_s,
                    ),
                )
            except TimeoutError:
                st.prefill_worker = info.instance_id  # it may still finish and pin KV
                raise
            finally:
                active.free(req.request_id, info.instance_id)

        try:
            prefill, result = await self._try_candidates(st, prefill_ranked, prefill_on, "prefill")
        except _NoneAnswered:
            self.prefill_fallbacks += 1
            self.log.warning("prefill_fallback_local", decode_worker=d.local[0].instance_id)
            live = self.live_instances()
            local = [i for i in d.local if i.instance_id in live]
            if not local:
                raise
            await self._dispatch_local(st, dataclasses.replace(d, local=local, prefill=None))
            return
        if result.kv is not None:
            st.prefill_worker = result.worker_id or prefill.instance_id
        self._check_cancelled(st)

        st.phase = Phase.FIRST_TOKEN
        metrics = RequestMetrics(
            prefill_worker=result.worker_id, cached_tokens=result.cached_tokens, prefill_ms=result.prefill_ms
        )
        final = result.finish_reason is not None
        await self._send_chunk(
            st,
            TokenChunk(
                request_id=req.request_id,
                index=0,
                token_ids=[result.first_token],
                worker_id=result.worker_id,
                finish_reason=result.finish_reason,
                metrics=metrics if final else None,
            ),
        )
        if final:
            st.phase = Phase.FINISHED
            await self._free_pinned(st, "finished_at_prefill")  # only if a kv came anyway
            return
        if result.kv is None:
            raise ServiceError(
                502, "prefill worker returned neither KV nor a finish reason", type="bad_gateway"
            )

        st.phase = Phase.DISPATCHING
        decode_msg = DecodeRequest(
            request_id=req.request_id,
            token_ids=req.token_ids,
            block_hashes=req.block_hashes,
            sampling=req.sampling,
            reply_to=req.reply_to,
            first_token=result.first_token,
            kv=result.kv,
            prefill_worker_id=result.worker_id,
            metrics=metrics,
        )
        ranked = self.scheduler.rank_decode(
            self.live_instances(),
            n_tokens,
            req.block_hashes,
            d.scores,
            prefill_worker=result.worker_id or prefill.instance_id,
            compat_hash=result.kv.compat_hash or prefill.compat_hash,
        )
        if not ranked:
            raise ServiceError(
                503, "no decode worker can import the prefill worker's KV", type="service_unavailable"
            )
        await self._send_decode(st, decode_msg, ranked, d.scores, local_prefill=False)

    async def _send_decode(
        self,
        st: _Request,
        msg: DecodeRequest,
        candidates: Sequence[InstanceInfo],
        scores: dict[str, int],
        *,
        local_prefill: bool,
    ) -> None:
        active = self.scheduler.active
        n_tokens = len(msg.token_ids)

        async def decode_on(info: InstanceInfo) -> Ack:
            uncached = self.scheduler.uncached_tokens(info, n_tokens, scores) if local_prefill else 0
            active.add(
                info,
                msg.request_id,
                msg.block_hashes,
                n_tokens,
                uncached,
                now=time.time(),
                prefill_until_heartbeat=local_prefill,
            )
            try:
                # Watched too: a worker killed after the request reached it never acks.
                ack = await self._watched(
                    info.instance_id,
                    request(
                        self.svc.nc,
                        self.svc.subjects.worker_generate(info.instance_id),
                        msg,
                        Ack,
                        timeout=self.config.ack_timeout_s,
                    ),
                )
            except WorkerLostError:
                active.free(msg.request_id, info.instance_id)
                await self._cancel_on(info.instance_id, msg.request_id, "worker_lost")
                raise
            except TimeoutError as e:
                # Hung or gone: make sure it drops the request if it did take it, try the next.
                active.free(msg.request_id, info.instance_id)
                await self._cancel_on(info.instance_id, msg.request_id, "ack_timeout")
                raise WorkerLostError(self.svc.subjects.worker_generate(info.instance_id)) from e
            except BaseException:
                active.free(msg.request_id, info.instance_id)
                raise
            active.confirm(msg.request_id, time.time())
            return ack

        _info, ack = await self._try_candidates(
            st, candidates, decode_on, "decode", wait_s=self.config.decode_wait_s
        )
        st.phase = Phase.HANDED_OFF
        await self._ack(st.req, ack.worker_id, "worker")
        if st.cancelled:  # the Cancel broadcast reached the worker too: it drops the request
            active.free(msg.request_id)
        self.log.debug(
            "handed_off",
            decode_worker=ack.worker_id,
            prefill_worker=msg.prefill_worker_id,
            disaggregated=msg.kv is not None,
        )

    # ---- replies --------------------------------------------------------------------------------------

    async def _ack(self, req: RouteRequest, holder: str, service: Literal["router", "worker"]) -> None:
        """Tell the frontend who holds the request now (its liveness probe target)."""
        try:
            await publish(
                self.svc.nc, req.reply_to, Ack(request_id=req.request_id, worker_id=holder, service=service)
            )
        except Exception as e:
            self.log.warning("ack_publish_failed", error=repr(e))

    async def _cancel_on(self, worker_id: str, request_id: str, reason: str) -> None:
        try:
            await publish(
                self.svc.nc,
                self.svc.subjects.worker_cancel(worker_id),
                Cancel(request_id=request_id, reason=f"router:{reason}"),
            )
        except Exception as e:
            self.log.warning("cancel_publish_failed", worker_id=worker_id, error=repr(e))

    async def _send_chunk(self, st: _Request, chunk: TokenChunk) -> None:
        await publish(self.svc.nc, st.req.reply_to, chunk)
        st.chunks_sent += 1

    async def _fail(
        self, st: _Request, code: int, message: str, type_: str, *, retry_after_s: float | None = None
    ) -> None:
        req = st.req
        self.log.warning("request_failed", code=code, error=message, phase=st.phase.value)
        st.phase = Phase.FAILED
        err = ErrorReply(
            code=code, message=message, request_id=req.request_id, type=type_, retry_after_s=retry_after_s
        )
        with contextlib.suppress(Exception):
            await self._send_chunk(
                st,
                TokenChunk(
                    request_id=req.request_id,
                    index=st.chunks_sent,
                    token_ids=[],
                    finish_reason="error",
                    error=err,
                ),
            )
        await self._free_pinned(st, "error")

    async def _free_pinned(self, st: _Request, reason: str) -> None:
        worker = st.prefill_worker
        if worker is None:
            return
        st.prefill_worker = None
        await self._cancel_on(worker, st.req.request_id, reason)


__all__ = [
    "EARLY_CANCEL_MAX",
    "EARLY_CANCEL_TTL_S",
    "MAX_ATTEMPTS",
    "PROBE_MISSES",
    "SERVICE",
    "Phase",
    "PrefillRouter",
    "WorkerLostError",
]
