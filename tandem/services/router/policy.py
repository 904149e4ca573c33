"""Routing policies as values: pure, NATS-free worker selection (Dynamo's ``WorkerSelector``).

A policy sees one request (:class:`PolicyRequest`) and the candidate workers of one pool as
:class:`WorkerState` values, and returns them ranked best first (the router tries the first and,
if it has vanished, the next). Nothing here touches NATS, clocks or globals: randomness comes
from the ``random.Random`` handed to the policy, so a seeded rng makes every choice reproducible.

Modes (``--router-mode``, Dynamo's names; :data:`POLICIES`):

``kv`` (default) — :class:`KvPolicy`, Dynamo's cost. Sources, in ``ai-dynamo/dynamo``:
    ``lib/llm/src/kv_router/scheduler.rs`` (``DefaultWorkerSelector``: ``logit =
    overlap_score_weight × potential_prefill_blocks + potential_decode_blocks``, lower wins;
    ``softmax_sample``) and its successor ``lib/kv-router/src/scheduling/selector/default.rs``
    (``worker_logit``: the weight renamed ``prefill_load_scale``, overlap became a credit)::

        raw_prefill_blocks = (active_prefill_tokens + prompt_tokens) / block_size
        prefill_blocks     = max(0, raw_prefill_blocks − overlap_score_credit × overlap_blocks)
        decode_blocks      = active_decode_blocks + new_blocks      # "potential" active blocks
        cost               = prefill_load_scale × prefill_blocks + decode_blocks

    ``new_blocks`` are the request's blocks not already active on that worker (a prefix shared
    with requests in flight there is counted once, see :mod:`.active`). ``temperature == 0``:
    argmin, ties broken at random. ``temperature > 0``: Dynamo's ``softmax_sample`` — costs
    normalised by their range, negated, divided by the temperature, softmax, one draw.
``round-robin`` / ``random`` — :class:`RoundRobinPolicy`, :class:`RandomPolicy`
    (``lib/runtime/src/pipeline/network/egress/push_router.rs``: a counter modulo the candidates
    in a stable order; a uniform draw).
``power-of-two`` — :class:`PowerOfTwoPolicy`: two distinct random candidates, the less loaded
    wins (Dynamo's ``PowerOfTwoChoices``, load = in-flight requests).
``least-loaded`` — :class:`LeastLoadedPolicy`: fewest in-flight requests, then fewest active
    blocks, ties at random (Dynamo's ``LeastLoaded``).

Busy workers (:func:`is_busy`, Dynamo's ``LoadThresholdConfig`` in
``lib/llm/src/discovery/worker_monitor.rs``): a worker is busy when
``active_decode_blocks > active_decode_blocks_threshold × num_blocks`` (a *fraction* of its KV
capacity) or ``active_prefill_tokens > active_prefill_tokens_threshold`` (*tokens*); unset
thresholds are off. Busy workers are not candidates; when every candidate is busy the request
is refused (503 + ``Retry-After``) rather than queued.

Conditional disaggregation (:func:`disagg_decision`; Dynamo's ``PyDisaggregatedRouter`` in
``examples/llm/components/disagg_router.py``: remote iff ``prefill_length >
max_local_prefill_length and queue_size < max_prefill_queue_size``): prefill remotely only if
the prompt tokens the local (decode) choice lacks reach ``disagg_min_tokens`` *and* the prefill
pool is not saturated — when the best prefill worker already has at least
``max_prefill_queue_tokens`` prompt tokens queued and the local choice has fewer, the decode
worker (which is not busy, so it has spare capacity) prefills locally.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, get_args

RouterMode = Literal["kv", "round-robin", "random", "power-of-two", "least-loaded"]
ROUTER_MODES: tuple[str, ...] = get_args(RouterMode)


class WorkerState(NamedTuple):
    """One candidate worker as a policy sees it, for one request (a value; build a new one per
    decision). Load figures are *before* the request is added."""

    instance_id: str
    #: KV block size (tokens) and capacity (blocks) of the worker.
    block_size: int
    num_blocks: int
    #: Leading prompt blocks the worker has cached (from the KV indexer).
    overlap_blocks: int = 0
    #: KV blocks of the requests in flight there (decode-side load), blocks.
    active_decode_blocks: int = 0
    #: Prompt tokens queued or being prefilled there (prefill-side load), tokens.
    active_prefill_tokens: int = 0
    #: Requests in flight there.
    active_requests: int = 0
    #: Blocks this request would add to ``active_decode_blocks`` (its blocks not already active).
    new_blocks: int = 0

    @property
    def potential_decode_blocks(self) -> int:
        """Active blocks if the request were placed here (Dynamo's ``potential_decode_blocks``)."""
        return self.active_decode_blocks + self.new_blocks

    def cached_tokens(self, prompt_tokens: int) -> int:
        """Prompt tokens this worker already holds (never more than the prompt)."""
        return min(self.overlap_blocks * self.block_size, prompt_tokens)


class PolicyRequest(NamedTuple):
    """What a policy knows of the request."""

    #: Prompt length (Dynamo's ``isl_tokens``), tokens.
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class KvWeights:
    """The ``kv`` cost's knobs (see the module docstring)."""

    #: Weight of the prefill term (Dynamo: ``prefill_load_scale``, formerly
    #: ``kv_overlap_score_weight``). 0 = decode load only.
    prefill_load_scale: float = 1.0
    #: Prefill blocks credited per cached block (Dynamo: ``overlap_score_credit``).
    overlap_score_credit: float = 1.0
    #: 0 = argmin; > 0 = softmax sampling over the normalised costs (Dynamo: ``router_temperature``).
    temperature: float = 0.0


class RoutingPolicy(Protocol):
    """Ranks the candidates of one pool for one request, best first (never empty for a
    non-empty input; the first is the choice, the rest are fall-backs in order). ``limit``: at
    most that many (None = all); the first is the same either way."""

    name: str

    def select(
        self, request: PolicyRequest, candidates: Sequence[WorkerState], limit: int | None = None
    ) -> list[WorkerState]: ...


def kv_cost(request: PolicyRequest, w: WorkerState, weights: KvWeights) -> float:
    """Dynamo's ``worker_logit`` for ``w`` (lower is better); see the module docstring."""
    bs = w.block_size if w.block_size > 0 else 1
    raw_prefill_blocks = (w.active_prefill_tokens + request.prompt_tokens) / bs
    prefill_blocks = raw_prefill_blocks - weights.overlap_score_credit * w.overlap_blocks
    if prefill_blocks < 0.0:
        prefill_blocks = 0.0
    return weights.prefill_load_scale * prefill_blocks + w.active_decode_blocks + w.new_blocks


def softmax_sample(costs: Sequence[float], temperature: float, rng: random.Random) -> int:
    """Index drawn from ``softmax(−normalised cost / temperature)`` (Dynamo's ``softmax_sample``).

    Costs are divided by their range (max − min) first, so the temperature is scale free; equal
    costs give a uniform draw. ``temperature <= 0``: a uniformly random index among the minima.
    """
    if not costs:
        raise ValueError("softmax_sample of no candidates")
    lo = min(costs)
    if temperature <= 0.0:
        if costs.count(lo) == 1:  # the usual case, without a Python-level loop
            return costs.index(lo)
        best = [i for i, c in enumerate(costs) if c == lo]
        return best[rng.randrange(len(best))]
    hi = max(costs)
    if hi == lo:
        return rng.randrange(len(costs))
    scale = 1.0 / ((hi - lo) * temperature)
    # exp(−(c − lo)·scale) = softmax numerator shifted so the largest term is exp(0) = 1.
    weights = [math.exp(-(c - lo) * scale) for c in costs]
    draw = rng.random() * sum(weights)
    acc = 0.0
    for i, wt in enumerate(weights):
        acc += wt
        if draw <= acc:
            return i
    return len(costs) - 1


class KvPolicy:
    """``kv`` mode: Dynamo's cost (:func:`kv_cost`) with argmin or softmax sampling."""

    name = "kv"

    def __init__(self, weights: KvWeights | None = None, rng: random.Random | None = None) -> None:
        self.weights = weights or KvWeights()
        self.rng = rng or random.Random()

    def costs(self, request: PolicyRequest, candidates: Sequence[WorkerState]) -> list[float]:
        """:func:`kv_cost` of every candidate, in order (inlined: this is the hot loop)."""
        wt = self.weights
        scale, credit, isl = wt.prefill_load_scale, wt.overlap_score_credit, request.prompt_tokens
        # w = (id, block_size, num_blocks, overlap, decode blocks, prefill tokens, requests, new)
        return [
            scale * max(0.0, (w[5] + isl) / (w[1] or 1) - credit * w[3]) + w[4] + w[7] for w in candidates
        ]

    def select(
        self, request: PolicyRequest, candidates: Sequence[WorkerState], limit: int | None = None
    ) -> list[WorkerState]:
        if not candidates:
            return []
        costs = self.costs(request, candidates)
        chosen = softmax_sample(costs, self.weights.temperature, self.rng)
        n = len(candidates) if limit is None else min(limit, len(candidates))
        if n <= 1:
            return [candidates[chosen]]
        # Fall-backs: ascending cost (equal costs in input order).
        costs[chosen] = math.inf
        if n == 2:
            return [candidates[chosen], candidates[costs.index(min(costs))]]
        order = sorted(range(len(costs)), key=costs.__getitem__)[: n - 1]
        return [candidates[chosen], *(candidates[i] for i in order)]


class RoundRobinPolicy:
    """``round-robin`` mode: the next candidate by instance id, cycling (per policy instance)."""

    name = "round-robin"

    def __init__(self, weights: KvWeights | None = None, rng: random.Random | None = None) -> None:
        self.counter = 0

    def select(
        self, request: PolicyRequest, candidates: Sequence[WorkerState], limit: int | None = None
    ) -> list[WorkerState]:
        if not candidates:
            return []
        ordered = sorted(candidates, key=lambda w: w.instance_id)
        k = self.counter % len(ordered)
        self.counter += 1
        return (ordered[k:] + ordered[:k])[:limit]


class RandomPolicy:
    """``random`` mode: a uniformly random candidate (fall-backs in random order too)."""

    name = "random"

    def __init__(self, weights: KvWeights | None = None, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def select(
        self, request: PolicyRequest, candidates: Sequence[WorkerState], limit: int | None = None
    ) -> list[WorkerState]:
        n = len(candidates) if limit is None else min(limit, len(candidates))
        return self.rng.sample(list(candidates), n)


def _load_key(w: WorkerState) -> tuple[int, int]:
    return (w.active_requests, w.active_decode_blocks)


class PowerOfTwoPolicy:
    """``power-of-two`` mode: two distinct random candidates; the one with fewer in-flight
    requests (then fewer active blocks) wins, the other is the fall-back."""

    name = "power-of-two"

    def __init__(self, weights: KvWeights | None = None, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def select(
        self, request: PolicyRequest, candidates: Sequence[WorkerState], limit: int | None = None
    ) -> list[WorkerState]:
        if len(candidates) <= 1:
            return list(candidates)
        i, j = self.rng.sample(range(len(candidates)), 2)
        a, b = candidates[i], candidates[j]
        return ([b, a] if _load_key(b) < _load_key(a) else [a, b])[:limit]


class LeastLoadedPolicy:
    """``least-loaded`` mode: fewest in-flight requests, then fewest active blocks; ties at random."""

    name = "least-loaded"

    def __init__(self, weights: KvWeights | None = None, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def select(
        self, request: PolicyRequest, candidates: Sequence[WorkerState], limit: int | None = None
    ) -> list[WorkerState]:
        rnd = self.rng.random
        keyed = [(w.active_requests, w.active_decode_blocks, rnd(), k) for k, w in enumerate(candidates)]
        top = sorted(keyed) if limit is None else heapq.nsmallest(limit, keyed)
        return [candidates[t[3]] for t in top]


PolicyFactory = Callable[[KvWeights, random.Random], RoutingPolicy]

#: ``--router-mode`` → policy class (constructed with ``(weights, rng)``).
POLICIES: dict[str, PolicyFactory] = {
    "kv": KvPolicy,
    "round-robin": RoundRobinPolicy,
    "random": RandomPolicy,
    "power-of-two": PowerOfTwoPolicy,
    "least-loaded": LeastLoadedPolicy,
}


def make_policy(
    mode: str, weights: KvWeights | None = None, rng: random.Random | None = None
) -> RoutingPolicy:
    """The policy for ``mode`` (``ValueError`` for an unknown one)."""
    try:
        factory = POLICIES[mode]
    except KeyError:
        raise ValueError(f"unknown router mode {mode!r} (one of {', '.join(POLICIES)})") from None
    return factory(weights or KvWeights(), rng or random.Random())


# ---- busy workers ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BusyThresholds:
    """Dynamo's ``LoadThresholdConfig`` (None = that check is off)."""

    #: Busy when ``active_decode_blocks > this × num_blocks`` (a fraction, 0–1).
    active_decode_blocks: float | None = None
    #: Busy when ``active_prefill_tokens > this`` (tokens).
    active_prefill_tokens: int | None = None

    @property
    def enabled(self) -> bool:
        return self.active_decode_blocks is not None or self.active_prefill_tokens is not None


def is_busy(w: WorkerState, th: BusyThresholds) -> bool:
    """Whether ``w`` is over a threshold (see the module docstring)."""
    frac = th.active_decode_blocks
    if frac is not None and w.num_blocks > 0 and w.active_decode_blocks > frac * w.num_blocks:
        return True
    tokens = th.active_prefill_tokens
    return tokens is not None and w.active_prefill_tokens > tokens


def split_busy(
    candidates: Sequence[WorkerState], th: BusyThresholds
) -> tuple[list[WorkerState], list[WorkerState]]:
    """``(free, busy)`` candidates, each in input order."""
    if not th.enabled:
        return list(candidates), []
    free: list[WorkerState] = []
    busy: list[WorkerState] = []
    for w in candidates:
        (busy if is_busy(w, th) else free).append(w)
    return free, busy


# ---- conditional disaggregation ------------------------------------------------------------------


class DisaggDecision(NamedTuple):
    """Whether to prefill on a prefill worker, and why (a short, loggable reason)."""

    remote: bool
    reason: str


def disagg_decision(
    request: PolicyRequest,
    local: WorkerState,
    prefill: WorkerState | None,
    *,
    disagg_min_tokens: int,
    max_prefill_queue_tokens: int,
) -> DisaggDecision:
    """Prefill remotely on ``prefill`` or locally on ``local`` (the decode-capable choice)?

    ``prefill`` is the best free prefill worker (None: there is none, or all are busy). Reasons:
    ``no_prefill_worker``, ``short_uncached`` (fewer than ``disagg_min_tokens`` prompt tokens
    are missing on ``local``), ``prefill_saturated`` (the prefill worker has at least
    ``max_prefill_queue_tokens`` prompt tokens queued and ``local`` has fewer; 0 turns this
    off), ``remote``.
    """
    if prefill is None:
        return DisaggDecision(False, "no_prefill_worker")
    uncached = request.prompt_tokens - local.cached_tokens(request.prompt_tokens)
    if uncached < disagg_min_tokens:
        return DisaggDecision(False, "short_uncached")
    queued = prefill.active_prefill_tokens
    if (
        max_prefill_queue_tokens > 0
        and queued >= max_prefill_queue_tokens
        and local.active_prefill_tokens < queued
    ):
        return DisaggDecision(False, "prefill_saturated")
    return DisaggDecision(True, "remote")


__all__ = [
    "POLICIES",
    "ROUTER_MODES",
    "BusyThresholds",
    "DisaggDecision",
    "KvPolicy",
    "KvWeights",
    "LeastLoadedPolicy",
    "PolicyRequest",
    "PowerOfTwoPolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "RouterMode",
    "RoutingPolicy",
    "WorkerState",
    "disagg_decision",
    "is_busy",
    "kv_cost",
    "make_policy",
    "softmax_sample",
    "split_busy",
]
