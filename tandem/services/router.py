"""Prefill router: picks the workers for each request and runs the disaggregation dance.

Life cycle of one request (``RouteRequest`` on ``{ns}.router.generate``, queue group ``router``)
---------------------------------------------------------------------------------------------------
States (:class:`Phase`), in order; every request ends in exactly one of the last four:

``RECEIVED``
    Decoded by :func:`~tandem.services.runtime.serve` (a bad payload gets ``ErrorReply(400)`` on
    the message's reply subject). ``sampling.seed`` is set to a random 32-bit seed when None, so
    the tokens do not depend on which worker runs the request.
``ROUTING``
    ``OverlapQuery`` to the indexer (``--overlap-timeout-s``; timeout or error → no overlap).
    Candidates come from the instances bucket: prefill-capable = role ``prefill`` or ``both``,
    decode-capable = role ``decode`` or ``both``. No decode-capable worker → error chunk 503.
    The *local* choice is the decode-capable worker with the lowest
    ``overlap_weight × uncached_blocks + decode_load``. The request is disaggregated only if
    some worker has role ``prefill``, and the prompt tokens the local choice does not cache
    are at least ``--disagg-min-tokens``, and the chosen prefill worker is not itself the chosen
    decode worker. Otherwise → ``DISPATCHING`` with ``DecodeRequest(kv=None)`` to the local choice.
``PREFILLING``
    Prefill worker = lowest ``overlap_weight × uncached_blocks + prefill_load``;
    ``PrefillRequest`` → ``PrefillResult`` (``--prefill-timeout-s``). While it runs the router
    counts the request's uncached blocks as that worker's in-flight load.
``FIRST_TOKEN``
    ``TokenChunk(index=0, [first_token], worker_id=prefill worker)`` published to ``reply_to`` at
    once (TTFT = prefill). If the prefill finished the request (``finish_reason`` set) that chunk
    is final and carries the metrics → ``FINISHED``. Otherwise the prompt's KV is now *pinned* on
    the prefill worker.
``DISPATCHING``
    ``DecodeRequest`` (with ``first_token``, ``kv``, ``prefill_worker_id`` and
    ``metrics=RequestMetrics(prefill_worker, cached_tokens, prefill_ms)`` when disaggregated) to
    the decode worker with the lowest ``decode_load`` (same ``compat_hash`` as the prefill
    worker; more overlap breaks ties), awaiting its ``Ack`` (``--ack-timeout-s``).
``HANDED_OFF``
    Acked: the decode worker streams the remaining chunks straight to ``reply_to``.
``FINISHED``
    The prefill worker's first token ended the request.
``FAILED``
    Any error: a final ``TokenChunk(finish_reason="error", error=ErrorReply(code, ...))`` goes to
    ``reply_to`` (index 0, or 1 when chunk 0 was already sent), and if KV may be pinned (prefill
    answered or timed out) a ``Cancel`` goes to that prefill worker's cancel subject to free it.
``CANCELLED``
    A ``Cancel`` for the request (``{ns}.cancel``, broadcast) arrived before the decode worker
    acked: nothing more is forwarded or sent, and pinned KV is freed with a ``Cancel`` to the
    prefill worker. (Cancels arriving before their request are remembered for a minute.)

A worker that stopped answering (``no responders``) before it accepted anything is skipped and
the next best candidate tried (at most ``MAX_ATTEMPTS`` per step).

Load model (per worker, all from this router's view)
----------------------------------------------------
* ``prefill_load`` = uncached blocks of this router's prefills in flight on the worker
  + reported ``num_waiting`` (+ ``num_running`` for role ``both``, which also decodes).
* ``decode_load`` = reported ``num_running + num_waiting`` + requests this router dispatched to
  it since its last heartbeat + KV usage ``used_blocks / num_blocks`` (0–1).

Costs mix blocks and sequences on purpose: one waiting sequence weighs about one uncached
block. ``--overlap-weight`` scales the cache term.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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
    PrefillRequest,
    PrefillResult,
    RequestMetrics,
    RouteRequest,
    TokenChunk,
)
from tandem.services.runtime import (
    InstanceRegistry,
    NoRespondersError,
    ServiceBase,
    ServiceError,
    common_parser,
    publish,
    request,
    run_service,
)

SERVICE = "router"
#: Tries per step (prefill, decode dispatch) when a chosen worker has no responders.
MAX_ATTEMPTS = 2
#: How long a Cancel that arrived before its request is remembered (seconds), and how many.
EARLY_CANCEL_TTL_S = 60.0
EARLY_CANCEL_MAX = 4096


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


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Router knobs. Durations in seconds, sizes in tokens."""

    disagg_min_tokens: int = 64
    overlap_weight: float = 1.0
    overlap_timeout_s: float = 0.1
    prefill_timeout_s: float = 120.0
    ack_timeout_s: float = 5.0


@dataclass(slots=True)
class _Request:
    req: RouteRequest
    phase: Phase = Phase.RECEIVED
    cancelled: bool = False
    chunks_sent: int = 0
    prefill_worker: str | None = None  # set once KV may be pinned there


@dataclass(slots=True)
class _WorkerLoad:
    inflight_prefill_blocks: int = 0
    dispatched: int = 0  # decode dispatches since the heartbeat below
    dispatched_hb: float = 0.0


class _Cancelled(Exception):
    """The request was cancelled while the router held it."""


@dataclass(slots=True)
class _Decision:
    decode: InstanceInfo
    prefill: InstanceInfo | None = None
    scores: dict[str, int] = field(default_factory=dict)


class PrefillRouter:
    """The router's state and handlers, attached to a started :class:`ServiceBase`."""

    def __init__(
        self, svc: ServiceBase, config: RouterConfig | None = None, *, rng: random.Random | None = None
    ):
        self.svc = svc
        self.config = config or RouterConfig()
        self.registry = InstanceRegistry(svc.js, svc.subjects)
        self.log = svc.log
        self._rng = rng or random.Random()
        self._requests: dict[str, _Request] = {}
        self._loads: dict[str, _WorkerLoad] = {}
        self._early_cancels: OrderedDict[str, float] = OrderedDict()
        self.counts: dict[str, int] = {p.value: 0 for p in Phase}

    async def start(self) -> None:
        """Watch the instances bucket and serve ``router.generate`` and ``cancel``."""
        svc = self.svc
        self.registry.on_removed(self._on_worker_removed)
        await self.registry.start()
        svc.on_close(self.registry.stop)
        svc.readiness = self._readiness
        await svc.serve(svc.subjects.cancel, Cancel, self._on_cancel)
        await svc.serve(
            svc.subjects.router_generate, RouteRequest, self.on_route, queue=svc.subjects.ROUTER_QUEUE
        )

    def _readiness(self) -> tuple[bool, str]:
        infos = self.registry.instances.values()
        n_prefill = sum(1 for i in infos if i.role in ("prefill", "both"))
        n_decode = sum(1 for i in infos if i.role in ("decode", "both"))
        return True, f"prefill_workers={n_prefill} decode_workers={n_decode} inflight={len(self._requests)}"

    # ---- cancel -----------------------------------------------------------------------------------

    async def _on_cancel(self, msg: Cancel, _nmsg: NatsMsg) -> None:
        st = self._requests.get(msg.request_id)
        if st is not None:
            st.cancelled = True
            return
        now = time.monotonic()
        self._early_cancels[msg.request_id] = now
        while self._early_cancels:
            rid, at = next(iter(self._early_cancels.items()))
            if len(self._early_cancels) <= EARLY_CANCEL_MAX and now - at < EARLY_CANCEL_TTL_S:
                break
            del self._early_cancels[rid]

    async def _on_worker_removed(self, info: InstanceInfo) -> None:
        self._loads.pop(info.instance_id, None)

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
            await self._route(st)
        except _Cancelled:
            st.phase = Phase.CANCELLED
            self.log.info("request_cancelled", phase=st.phase.value)
            await self._free_pinned(st, "cancelled")
        except asyncio.CancelledError:  # router shutting down mid-request
            await self._fail(st, 503, "router shutting down", "service_unavailable")
            raise
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
        decision = self._decide(req, scores)
        if decision.prefill is None:
            await self._dispatch_local(st, decision)
        else:
            await self._disaggregate(st, decision)

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

    # ---- decisions ---------------------------------------------------------------------------------

    def _cached_tokens(self, req: RouteRequest, info: InstanceInfo, scores: dict[str, int]) -> int:
        return min(scores.get(info.instance_id, 0) * info.block_size, len(req.token_ids))

    def _uncached_blocks(self, req: RouteRequest, info: InstanceInfo, scores: dict[str, int]) -> int:
        uncached = len(req.token_ids) - self._cached_tokens(req, info, scores)
        return math.ceil(uncached / max(1, info.block_size))

    def _load(self, worker_id: str) -> _WorkerLoad:
        load = self._loads.get(worker_id)
        if load is None:
            load = self._loads[worker_id] = _WorkerLoad()
        return load

    def prefill_load(self, info: InstanceInfo) -> float:
        """See the module docstring (blocks + sequences)."""
        reported = info.load.num_waiting + (info.load.num_running if info.role == "both" else 0)
        return float(self._load(info.instance_id).inflight_prefill_blocks + reported)

    def decode_load(self, info: InstanceInfo) -> float:
        """See the module docstring (sequences + KV usage fraction)."""
        own = self._load(info.instance_id)
        dispatched = own.dispatched if own.dispatched_hb == info.heartbeat_at else 0
        usage = info.load.used_blocks / info.num_blocks if info.num_blocks > 0 else 0.0
        return info.load.num_running + info.load.num_waiting + dispatched + usage

    def _pick(
        self, candidates: Iterable[InstanceInfo], cost: Callable[[InstanceInfo], float]
    ) -> list[InstanceInfo]:
        """Candidates by ascending cost; equal costs in random order."""
        ranked = [(cost(i), self._rng.random(), i) for i in candidates]
        ranked.sort(key=lambda t: (t[0], t[1]))
        return [i for _, _, i in ranked]

    def _decide(self, req: RouteRequest, scores: dict[str, int]) -> _Decision:
        infos = list(self.registry.instances.values())
        decoders = [i for i in infos if i.role in ("decode", "both")]
        if not decoders:
            raise ServiceError(503, "no decode-capable worker is registered", type="service_unavailable")
        w = self.config.overlap_weight
        local = self._pick(
            decoders, lambda i: w * self._uncached_blocks(req, i, scores) + self.decode_load(i)
        )[0]
        uncached_tokens = len(req.token_ids) - self._cached_tokens(req, local, scores)
        has_prefill_role = any(i.role == "prefill" for i in infos)
        if uncached_tokens < self.config.disagg_min_tokens or not has_prefill_role:
            return _Decision(decode=local, scores=scores)
        prefillers = [i for i in infos if i.role in ("prefill", "both")]
        prefill = self._pick(
            prefillers, lambda i: w * self._uncached_blocks(req, i, scores) + self.prefill_load(i)
        )[0]
        same_kv = [i for i in decoders if i.compat_hash == prefill.compat_hash]
        if not same_kv:
            return _Decision(decode=local, scores=scores)
        decode = self._rank_decoders(same_kv, scores)[0]
        if decode.instance_id == prefill.instance_id:
            return _Decision(decode=local, scores=scores)
        return _Decision(decode=decode, prefill=prefill, scores=scores)

    def _rank_decoders(self, decoders: list[InstanceInfo], scores: dict[str, int]) -> list[InstanceInfo]:
        ranked = [
            (self.decode_load(i), -scores.get(i.instance_id, 0), self._rng.random(), i) for i in decoders
        ]
        ranked.sort(key=lambda t: (t[0], t[1], t[2]))
        return [t[3] for t in ranked]

    def _alternatives(
        self, chosen: InstanceInfo, roles: tuple[str, ...], compat: str | None
    ) -> list[InstanceInfo]:
        """Other live workers to try if ``chosen`` has no responders (best first)."""
        others = [
            i
            for i in self.registry.instances.values()
            if i.instance_id != chosen.instance_id
            and i.role in roles
            and (compat is None or i.compat_hash == compat)
        ]
        return [chosen, *self._pick(others, self.decode_load if "decode" in roles else self.prefill_load)]

    # ---- the two paths ---------------------------------------------------------------------------

    async def _dispatch_local(self, st: _Request, d: _Decision) -> None:
        req = st.req
        st.phase = Phase.DISPATCHING
        self.log.debug("route_local", decode_worker=d.decode.instance_id, overlap=d.scores)
        msg = DecodeRequest(
            request_id=req.request_id,
            token_ids=req.token_ids,
            block_hashes=req.block_hashes,
            sampling=req.sampling,
            reply_to=req.reply_to,
        )
        await self._send_decode(st, msg, self._alternatives(d.decode, ("decode", "both"), None))

    async def _disaggregate(self, st: _Request, d: _Decision) -> None:
        req = st.req
        prefill = d.prefill
        if prefill is None:  # pragma: no cover - caller checks
            raise ServiceError(500, "no prefill worker chosen")
        st.phase = Phase.PREFILLING
        result: PrefillResult | None = None
        msg = PrefillRequest(
            request_id=req.request_id,
            token_ids=req.token_ids,
            block_hashes=req.block_hashes,
            sampling=req.sampling,
        )
        for attempt, info in enumerate(self._alternatives(prefill, ("prefill", "both"), None)[:MAX_ATTEMPTS]):
            self._check_cancelled(st)
            blocks = self._uncached_blocks(req, info, d.scores)
            load = self._load(info.instance_id)
            load.inflight_prefill_blocks += blocks
            try:
                result = await request(
                    self.svc.nc,
                    self.svc.subjects.worker_prefill(info.instance_id),
                    msg,
                    PrefillResult,
                    timeout=self.config.prefill_timeout_s,
                )
                break
            except NoRespondersError:
                self.log.warning("prefill_worker_gone", worker_id=info.instance_id, attempt=attempt)
                continue
            except TimeoutError:
                st.prefill_worker = info.instance_id  # it may still finish and pin KV
                raise
            finally:
                load.inflight_prefill_blocks -= blocks
        if result is None:
            raise ServiceError(503, "no prefill worker answered", type="service_unavailable")
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
        candidates = self._alternatives(d.decode, ("decode", "both"), d.decode.compat_hash)
        candidates = [i for i in candidates if i.instance_id != result.worker_id]
        await self._send_decode(st, decode_msg, candidates)

    async def _send_decode(self, st: _Request, msg: DecodeRequest, candidates: list[InstanceInfo]) -> None:
        for attempt, info in enumerate(candidates[:MAX_ATTEMPTS]):
            self._check_cancelled(st)
            load = self._load(info.instance_id)
            if load.dispatched_hb != info.heartbeat_at:
                load.dispatched_hb, load.dispatched = info.heartbeat_at, 0
            load.dispatched += 1
            try:
                ack = await request(
                    self.svc.nc,
                    self.svc.subjects.worker_generate(info.instance_id),
                    msg,
                    Ack,
                    timeout=self.config.ack_timeout_s,
                )
            except NoRespondersError:
                load.dispatched -= 1
                self.log.warning("decode_worker_gone", worker_id=info.instance_id, attempt=attempt)
                continue
            st.phase = Phase.HANDED_OFF
            self.log.debug(
                "handed_off",
                decode_worker=ack.worker_id,
                prefill_worker=msg.prefill_worker_id,
                disaggregated=msg.kv is not None,
            )
            return
        raise ServiceError(503, "no decode worker answered", type="service_unavailable")

    # ---- replies --------------------------------------------------------------------------------------

    async def _send_chunk(self, st: _Request, chunk: TokenChunk) -> None:
        await publish(self.svc.nc, st.req.reply_to, chunk)
        st.chunks_sent += 1

    async def _fail(self, st: _Request, code: int, message: str, type_: str) -> None:
        req = st.req
        self.log.warning("request_failed", code=code, error=message, phase=st.phase.value)
        st.phase = Phase.FAILED
        err = ErrorReply(code=code, message=message, request_id=req.request_id, type=type_)
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
        try:
            await publish(
                self.svc.nc,
                self.svc.subjects.worker_cancel(worker),
                Cancel(request_id=st.req.request_id, reason=f"router:{reason}"),
            )
        except Exception as e:
            self.log.warning("cancel_publish_failed", worker_id=worker, error=repr(e))


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(SERVICE, "Prefill router: overlap-aware worker choice and prefill → decode hand-off.")
    d = RouterConfig()
    p.add_argument(
        "--disagg-min-tokens",
        type=int,
        default=d.disagg_min_tokens,
        help="prefill remotely only when at least this many prompt tokens are uncached (tokens)",
    )
    p.add_argument(
        "--overlap-weight",
        type=float,
        default=d.overlap_weight,
        help="weight of uncached blocks in worker cost",
    )
    p.add_argument(
        "--overlap-timeout-s", type=float, default=d.overlap_timeout_s, help="indexer query timeout (s)"
    )
    p.add_argument("--prefill-timeout-s", type=float, default=d.prefill_timeout_s, help="prefill timeout (s)")
    p.add_argument(
        "--ack-timeout-s", type=float, default=d.ack_timeout_s, help="decode worker Ack timeout (s)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tandem.services.router``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.disagg_min_tokens < 0 or args.overlap_weight < 0:
        build_parser().error("--disagg-min-tokens and --overlap-weight must be >= 0")
    config = RouterConfig(
        disagg_min_tokens=args.disagg_min_tokens,
        overlap_weight=args.overlap_weight,
        overlap_timeout_s=args.overlap_timeout_s,
        prefill_timeout_s=args.prefill_timeout_s,
        ack_timeout_s=args.ack_timeout_s,
    )

    async def setup(svc: ServiceBase) -> None:
        await PrefillRouter(svc, config).start()

    return run_service(setup, SERVICE, args)


if __name__ == "__main__":
    raise SystemExit(main())
