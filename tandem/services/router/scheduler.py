"""The router's decisions without NATS: candidates → policy → conditional disaggregation.

:class:`RouterScheduler` holds the three policies (one per pool), the busy thresholds, the
per-worker :class:`~.tracker.ActiveTracker` and a decision timer. :mod:`.service` calls it with the
live registry; ``scripts/bench_router.py`` and the unit tests call it with synthetic
``InstanceInfo`` values.

Pools and costs (``kv`` mode; other modes rank the same pools with their own rule):

* *local*: decode-capable workers (role ``decode`` or ``both``) for a request that is prefilled
  where it decodes — full cost ``prefill_load_scale × prefill_blocks + decode_blocks``;
* *prefill*: prefill-capable workers (role ``prefill`` or ``both``) — the same cost;
* *decode after a remote prefill*: decode-capable workers with the prefill worker's
  ``compat_hash``, other than it — decode blocks only (Dynamo runs its decode router with the
  prefill term off), chosen when the prefill result is back, on the load of that moment.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tandem.protocol.messages import InstanceInfo

from .config import RouterConfig
from .policy import (
    BusyThresholds,
    KvWeights,
    PolicyRequest,
    RoutingPolicy,
    disagg_decision,
    make_policy,
)
from .tracker import ActiveTracker

#: How many ranked candidates a decision keeps (the first plus fall-backs).
DEFAULT_MAX_ATTEMPTS = 2


def _by_id(instances: Iterable[InstanceInfo] | Mapping[str, InstanceInfo]) -> Mapping[str, InstanceInfo]:
    if isinstance(instances, Mapping):
        return instances
    return {i.instance_id: i for i in instances}


class RoutingError(Exception):
    """No worker can take the request (HTTP-like ``code``; ``retry_after_s`` for busy)."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        type: str = "service_unavailable",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.type = type
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class Decision:
    """Where a request goes: ``prefill`` is None for a local (aggregated) run on ``local[0]``;
    otherwise prefill on ``prefill[0]`` and pick the decode worker afterwards. Lists are
    ranked, best first (fall-backs after)."""

    local: list[InstanceInfo]
    prefill: list[InstanceInfo] | None
    reason: str
    scores: dict[str, int] = field(default_factory=dict)

    @property
    def disaggregated(self) -> bool:
        return self.prefill is not None


class DecisionTimer:
    """Time of the last ``maxlen`` decisions, for p50/p99: wall time (``perf_counter_ns``) and
    the router thread's CPU time (``thread_time_ns``). On a saturated machine the wall time also
    holds the time the OS ran other processes; the CPU time is what the decision itself costs."""

    def __init__(self, maxlen: int = 4096) -> None:
        self._ns: deque[int] = deque(maxlen=maxlen)
        self._cpu_ns: deque[int] = deque(maxlen=maxlen)
        self.count = 0

    def record(self, ns: int, cpu_ns: int | None = None) -> None:
        self._ns.append(ns)
        if cpu_ns is not None:
            self._cpu_ns.append(cpu_ns)
        self.count += 1

    @staticmethod
    def _percentiles_us(samples: deque[int], qs: tuple[float, ...]) -> list[float]:
        data = sorted(samples)
        if not data:
            return [0.0 for _ in qs]
        n = len(data)
        return [data[min(n - 1, int(q * n))] / 1000.0 for q in qs]

    def percentiles_us(self, *qs: float) -> list[float]:
        """The ``qs`` quantiles (0–1) of the kept wall times, in microseconds (0.0 with none)."""
        return self._percentiles_us(self._ns, qs)

    def cpu_percentiles_us(self, *qs: float) -> list[float]:
        """The same for the CPU times."""
        return self._percentiles_us(self._cpu_ns, qs)

    def stats(self) -> dict[str, float]:
        p50, p99, pmax = self.percentiles_us(0.5, 0.99, 1.0)
        cpu50, cpu99 = self.cpu_percentiles_us(0.5, 0.99)
        return {
            "decisions": float(self.count),
            "p50_us": p50,
            "p99_us": p99,
            "max_us": pmax,
            "cpu_p50_us": cpu50,
            "cpu_p99_us": cpu99,
        }


class RouterScheduler:
    """Decisions and load bookkeeping for one router replica (no I/O)."""

    def __init__(
        self,
        config: RouterConfig | None = None,
        *,
        rng: random.Random | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        cfg = self.config = config or RouterConfig()
        rng = rng or random.Random()
        full = KvWeights(cfg.prefill_load_scale, cfg.overlap_score_credit, cfg.router_temperature)
        decode_only = KvWeights(0.0, 0.0, cfg.router_temperature)
        self.local_policy: RoutingPolicy = make_policy(cfg.router_mode, full, rng)
        self.prefill_policy: RoutingPolicy = make_policy(cfg.router_mode, full, rng)
        self.decode_policy: RoutingPolicy = make_policy(cfg.router_mode, decode_only, rng)
        self.thresholds = BusyThresholds(
            cfg.active_decode_blocks_threshold, cfg.active_prefill_tokens_threshold
        )
        self.active = ActiveTracker(ttl_s=cfg.active_request_ttl_s, thresholds=self.thresholds)
        self.timer = DecisionTimer()
        self.max_attempts = max(1, max_attempts)
        #: Why requests went where they went (``Decision.reason`` → count).
        self.reasons: dict[str, int] = {}

    # ---- decisions -----------------------------------------------------------------------------

    def decide(
        self,
        instances: Iterable[InstanceInfo] | Mapping[str, InstanceInfo],
        num_tokens: int,
        block_hashes: Sequence[int],
        scores: Mapping[str, int],
        *,
        now: float | None = None,
    ) -> Decision:
        """Rank the workers for a new request (raises :class:`RoutingError` 503 when no
        decode-capable worker exists or all are busy). Timed into :attr:`timer`."""
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        try:
            d = self._decide(instances, num_tokens, block_hashes, scores, time.time() if now is None else now)
        finally:
            self.timer.record(time.perf_counter_ns() - t0, time.thread_time_ns() - c0)
        self.reasons[d.reason] = self.reasons.get(d.reason, 0) + 1
        return d

    def _decide(
        self,
        instances: Iterable[InstanceInfo] | Mapping[str, InstanceInfo],
        num_tokens: int,
        block_hashes: Sequence[int],
        scores: Mapping[str, int],
        now: float,
    ) -> Decision:
        by_id = _by_id(instances)
        pools = self.active.pools(by_id.values(), scores, block_hashes, num_tokens, now)
        cfg = self.config
        if not pools.decode:
            if pools.decode_busy:
                raise RoutingError(
                    503,
                    f"all {pools.decode_busy} decode-capable workers are busy, retry later",
                    retry_after_s=cfg.busy_retry_after_s,
                )
            # Retry-After: a worker restarting (the launcher supervises them) is back in seconds.
            raise RoutingError(
                503, "no decode-capable worker is registered", retry_after_s=cfg.busy_retry_after_s
            )
        req = PolicyRequest(num_tokens)
        k = self.max_attempts
        local_ranked = self.local_policy.select(req, pools.decode, k)
        local_infos = [by_id[s[0]] for s in local_ranked]
        local = local_ranked[0]
        if not pools.has_prefill_role:
            return Decision(local_infos, None, "aggregated", dict(scores))
        if num_tokens - local.cached_tokens(num_tokens) < cfg.disagg_min_tokens:
            return Decision(local_infos, None, "short_uncached", dict(scores))
        pre_ranked = self.prefill_policy.select(req, pools.prefill, k) if pools.prefill else []
        verdict = disagg_decision(
            req,
            local,
            pre_ranked[0] if pre_ranked else None,
            disagg_min_tokens=cfg.disagg_min_tokens,
            max_prefill_queue_tokens=cfg.max_prefill_queue_tokens,
        )
        if not verdict.remote:
            return Decision(local_infos, None, verdict.reason, dict(scores))
        pre_infos = [by_id[s[0]] for s in pre_ranked]
        first = pre_infos[0]
        compat, pid = first.compat_hash, first.instance_id
        if not any(by_id[wid].compat_hash == compat and wid != pid for wid in pools.decode.ids):
            return Decision(local_infos, None, "no_compatible_decode", dict(scores))
        return Decision(local_infos, pre_infos, "remote", dict(scores))

    def rank_decode(
        self,
        instances: Iterable[InstanceInfo] | Mapping[str, InstanceInfo],
        num_tokens: int,
        block_hashes: Sequence[int],
        scores: Mapping[str, int],
        *,
        prefill_worker: str,
        compat_hash: str,
        now: float | None = None,
    ) -> list[InstanceInfo]:
        """Decode workers for a remotely prefilled request, best first (no busy filter: the
        request was admitted and already has its first token). Timed into :attr:`timer`."""
        t0 = time.perf_counter_ns()
        try:
            by_id = _by_id(instances)
            pools = self.active.pools(
                by_id.values(),
                scores,
                block_hashes,
                num_tokens,
                time.time() if now is None else now,
                decode_only=True,
                ignore_busy=True,  # admitted already
                compat_hash=compat_hash,
                exclude=prefill_worker,
            )
            if not pools.decode:
                return []
            ranked = self.decode_policy.rank(PolicyRequest(num_tokens), pools.decode, self.max_attempts)
            ids = pools.decode.ids
            return [by_id[ids[j]] for j in ranked]
        finally:
            self.timer.record(time.perf_counter_ns() - t0)

    # ---- bookkeeping -----------------------------------------------------------------------------

    def uncached_tokens(self, info: InstanceInfo, num_tokens: int, scores: Mapping[str, int]) -> int:
        """Prompt tokens ``info`` would have to compute."""
        return num_tokens - min(scores.get(info.instance_id, 0) * info.block_size, num_tokens)


__all__ = ["DEFAULT_MAX_ATTEMPTS", "Decision", "DecisionTimer", "RouterScheduler", "RoutingError"]
