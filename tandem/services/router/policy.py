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

Candidates are column-wise (:class:`Candidates`: the ids and one int64 row per other
:class:`WorkerState` field, in candidate order), so a decision over hundreds of workers costs a
few array operations, not one Python object per worker; indexing a :class:`Candidates` builds
the :class:`WorkerState` of one candidate. Every policy ranks positions (``rank``); ``select``
maps them back to states. The array forms compute exactly what the per-worker forms compute
(the same IEEE operations in the same order, the same rng draws), so a seeded rng gives the same
ranking either way (``tests/unit/test_router_equivalence.py`` checks this against the
per-worker implementation).

Conditional disaggregation (:func:`disagg_decision`; Dynamo's ``PyDisaggregatedRouter`` in
``examples/llm/components/disagg_router.py``: remote iff ``prefill_length >
max_local_prefill_length and queue_size < max_prefill_queue_size``): prefill remotely only if
the prompt tokens the local (decode) choice lacks reach ``disagg_min_tokens`` *and* the prefill
pool is not saturated — when the best prefill worker already has at least
``max_prefill_queue_tokens`` prompt tokens queued and the local choice has fewer, the decode
worker (which is not busy, so it has spare capacity) prefills locally.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, get_args, overload

import numpy as np
import numpy.typing as npt

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


IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
#: Rows of :attr:`Candidates.cols`: the :class:`WorkerState` fields after ``instance_id``.
(
    BLOCK_SIZE,
    NUM_BLOCKS,
    OVERLAP_BLOCKS,
    ACTIVE_DECODE_BLOCKS,
    ACTIVE_PREFILL_TOKENS,
    ACTIVE_REQUESTS,
    NEW_BLOCKS,
) = range(7)


class Candidates(Sequence[WorkerState]):
    """The candidates of one pool, column-wise: ``ids`` (an object array of instance ids) and
    ``cols`` (int64, 7 × n: one row per :class:`WorkerState` field after the id, in field
    order), in candidate order. Indexing builds that candidate's :class:`WorkerState` (plain
    ints); policies read the rows (``block_size``, ``active_requests``, …) or :meth:`kv_costs`.

    A pool is usually a *view* (:meth:`view`): positions of a larger ``Candidates`` (every worker
    of the decision). Its columns are gathered on first use only, and its ``kv`` costs are
    gathered from the larger one's, which computes them once per request and weights for all of
    its views (the local and prefill pools of a decision share them).
    """

    __slots__ = ("_cols", "_costs", "_ids", "_pos", "_src")

    def __init__(self, ids: npt.NDArray[np.object_], cols: IntArray) -> None:
        self._ids: npt.NDArray[np.object_] | None = ids
        self._cols: IntArray | None = cols
        self._src: Candidates | None = None
        self._pos: npt.NDArray[np.intp] | None = None
        self._costs: dict[tuple[int, KvWeights], FloatArray] | None = None

    @classmethod
    def view(cls, src: Candidates, pos: npt.NDArray[np.intp]) -> Candidates:
        """The candidates of ``src`` at positions ``pos`` (in that order)."""
        c = cls.__new__(cls)
        c._ids = c._cols = c._costs = None
        c._src, c._pos = src, pos
        return c

    @classmethod
    def of(cls, states: Sequence[WorkerState]) -> Candidates:
        """The columns of ``states``."""
        ids = np.empty(len(states), dtype=object)
        ids[:] = [w[0] for w in states]
        rows = np.array([w[1:] for w in states], dtype=np.int64).reshape(len(states), 7)
        return cls(ids, np.ascontiguousarray(rows.T))

    @classmethod
    def empty(cls) -> Candidates:
        return cls(np.empty(0, dtype=object), np.zeros((7, 0), dtype=np.int64))

    @property
    def ids(self) -> npt.NDArray[np.object_]:
        if self._ids is None:
            assert self._src is not None and self._pos is not None
            self._ids = self._src.ids[self._pos]
        return self._ids

    @property
    def cols(self) -> IntArray:
        if self._cols is None:
            assert self._src is not None and self._pos is not None
            self._cols = self._src.cols[:, self._pos]
        return self._cols

    def _row(self, row: int) -> IntArray:
        out: IntArray = self.cols[row]
        return out

    @property
    def block_size(self) -> IntArray:
        return self._row(BLOCK_SIZE)

    @property
    def num_blocks(self) -> IntArray:
        return self._row(NUM_BLOCKS)

    @property
    def overlap_blocks(self) -> IntArray:
        return self._row(OVERLAP_BLOCKS)

    @property
    def active_decode_blocks(self) -> IntArray:
        return self._row(ACTIVE_DECODE_BLOCKS)

    @property
    def active_prefill_tokens(self) -> IntArray:
        return self._row(ACTIVE_PREFILL_TOKENS)

    @property
    def active_requests(self) -> IntArray:
        return self._row(ACTIVE_REQUESTS)

    @property
    def new_blocks(self) -> IntArray:
        return self._row(NEW_BLOCKS)

    def kv_costs(self, request: PolicyRequest, weights: KvWeights) -> FloatArray:
        """:func:`kv_costs` of these candidates (a new array: the caller may change it)."""
        if self._src is not None:
            return self._src._shared_costs(request, weights)[self._pos]
        return kv_costs(request, self, weights)

    def _shared_costs(self, request: PolicyRequest, weights: KvWeights) -> FloatArray:
        key = (request.prompt_tokens, weights)
        if self._costs is None:
            self._costs = {}
        costs = self._costs.get(key)
        if costs is None:
            costs = self._costs[key] = kv_costs(request, self, weights)
        return costs

    def __len__(self) -> int:
        return len(self._pos) if self._pos is not None else len(self.ids)

    @overload
    def __getitem__(self, j: int) -> WorkerState: ...
    @overload
    def __getitem__(self, j: slice) -> list[WorkerState]: ...
    def __getitem__(self, j: int | slice) -> WorkerState | list[WorkerState]:
        if isinstance(j, slice):
            return [self[k] for k in range(len(self))[j]]
        if self._cols is None and self._src is not None and self._pos is not None:
            return self._src[int(self._pos[j])]
        return WorkerState(self.ids[j], *self.cols[:, j].tolist())

    def __iter__(self) -> Iterator[WorkerState]:
        return (self[j] for j in range(len(self)))

    def __repr__(self) -> str:
        return f"Candidates({list(self)!r})"


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
    most that many (None = all); the first is the same either way. ``rank`` returns positions
    in ``candidates``; ``select`` the states."""

    name: str

    def rank(self, request: PolicyRequest, candidates: Candidates, limit: int | None = None) -> list[int]: ...

    def select(
        self, request: PolicyRequest, candidates: Sequence[WorkerState], limit: int | None = None
    ) -> list[WorkerState]: ...


class _Ranking:
    """``select`` in terms of ``rank`` (shared by the policies below)."""

    def rank(self, request: PolicyRequest, candidates: Candidates, limit: int | None = None) -> list[int]:
        raise NotImplementedError

    def select(
        self, request: PolicyRequest, candidates: Sequence[WorkerState], limit: int | None = None
    ) -> list[WorkerState]:
        cands = candidates if isinstance(candidates, Candidates) else Candidates.of(candidates)
        return [candidates[j] for j in self.rank(request, cands, limit)]


def kv_cost(request: PolicyRequest, w: WorkerState, weights: KvWeights) -> float:
    """Dynamo's ``worker_logit`` for ``w`` (lower is better); see the module docstring."""
    bs = w.block_size if w.block_size > 0 else 1
    raw_prefill_blocks = (w.active_prefill_tokens + request.prompt_tokens) / bs
    prefill_blocks = raw_prefill_blocks - weights.overlap_score_credit * w.overlap_blocks
    if prefill_blocks < 0.0:
        prefill_blocks = 0.0
    return weights.prefill_load_scale * prefill_blocks + w.active_decode_blocks + w.new_blocks


def kv_costs(request: PolicyRequest, c: Candidates, weights: KvWeights) -> npt.NDArray[np.float64]:
    """Dynamo's ``worker_logit`` of every candidate (lower is better), as an array.

    The same IEEE operations in the same order as the per-worker form
    ``scale × max(0, (prefill_tokens + isl) / (block_size or 1) − credit × overlap) + decode_blocks
    + new_blocks`` evaluated in Python floats (ints convert exactly below 2**53), so the costs,
    their ties and their order are bit for bit those of the per-worker loop."""
    bs = c.block_size
    if not bs.all():
        bs = np.where(bs == 0, 1, bs)
    raw_prefill_blocks = (c.active_prefill_tokens + request.prompt_tokens) / bs
    x = raw_prefill_blocks - weights.overlap_score_credit * c.overlap_blocks
    # np.where(x > 0, x, 0) is Python's max(0.0, x) (0.0 for x <= 0, and for NaN).
    return weights.prefill_load_scale * np.where(x > 0.0, x, 0.0) + c.active_decode_blocks + c.new_blocks


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


class KvPolicy(_Ranking):
    """``kv`` mode: Dynamo's cost (:func:`kv_cost`) with argmin or softmax sampling."""

    name = "kv"

    def __init__(self, weights: KvWeights | None = None, rng: random.Random | None = None) -> None:
        self.weights = weights or KvWeights()
        self.rng = rng or random.Random()

    def costs(self, request: PolicyRequest, candidates: Sequence[WorkerState]) -> list[float]:
        """:func:`kv_cost` of every candidate, in order."""
        cands = candidates if isinstance(candidates, Candidates) else Candidates.of(candidates)
        return cands.kv_costs(request, self.weights).tolist() if len(cands) else []

    def rank(self, request: PolicyRequest, candidates: Candidates, limit: int | None = None) -> list[int]:
        n = len(candidates)
        if n == 0:
            return []
        costs = candidates.kv_costs(request, self.weights)
        temperature = self.weights.temperature
        if temperature > 0.0:
            chosen = softmax_sample(costs.tolist(), temperature, self.rng)
        else:  # softmax_sample's argmin branch, on the array: the minimum, ties at random
            ties = np.flatnonzero(costs == costs.min())
            chosen = int(ties[0] if len(ties) == 1 else ties[self.rng.randrange(len(ties))])
        m = n if limit is None else min(limit, n)
        if m <= 1:
            return [chosen]
        # Fall-backs: ascending cost (equal costs in input order).
        costs[chosen] = math.inf
        if m == 2:
            return [chosen, int(costs.argmin())]  # argmin: the first of equal minima
        return [chosen, *np.argsort(costs, kind="stable")[: m - 1].tolist()]


class RoundRobinPolicy(_Ranking):
    """``round-robin`` mode: the next candidate by instance id, cycling (per policy instance)."""

    name = "round-robin"

    def __init__(self, weights: KvWeights | None = None, rng: random.Random | None = None) -> None:
        self.counter = 0

    def rank(self, request: PolicyRequest, candidates: Candidates, limit: int | None = None) -> list[int]:
        n = len(candidates)
        if n == 0:
            return []
        ordered: list[int] = np.argsort(candidates.ids, kind="stable").tolist()  # by instance id
        k = self.counter % n
        self.counter += 1
        return (ordered[k:] + ordered[:k])[:limit]


class RandomPolicy(_Ranking):
    """``random`` mode: a uniformly random candidate (fall-backs in random order too)."""

    name = "random"

    def __init__(self, weights: KvWeights | None = None, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def rank(self, request: PolicyRequest, candidates: Candidates, limit: int | None = None) -> list[int]:
        n = len(candidates)
        # random.sample draws positions from len(population) alone: sampling range(n) picks the
        # positions sampling the candidates themselves would.
        return self.rng.sample(range(n), n if limit is None else min(limit, n))


class PowerOfTwoPolicy(_Ranking):
    """``power-of-two`` mode: two distinct random candidates; the one with fewer in-flight
    requests (then fewer active blocks) wins, the other is the fall-back."""

    name = "power-of-two"

    def __init__(self, weights: KvWeights | None = None, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def rank(self, request: PolicyRequest, candidates: Candidates, limit: int | None = None) -> list[int]:
        n = len(candidates)
        if n <= 1:
            return list(range(n))
        i, j = self.rng.sample(range(n), 2)
        req, blk = candidates.active_requests, candidates.active_decode_blocks
        b_first = (int(req[j]), int(blk[j])) < (int(req[i]), int(blk[i]))
        return ([j, i] if b_first else [i, j])[:limit]


class LeastLoadedPolicy(_Ranking):
    """``least-loaded`` mode: fewest in-flight requests, then fewest active blocks; ties at random."""

    name = "least-loaded"

    def __init__(self, weights: KvWeights | None = None, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def rank(self, request: PolicyRequest, candidates: Candidates, limit: int | None = None) -> list[int]:
        n = len(candidates)
        # Sort keys (requests, blocks, one random() per candidate in order, position).
        rnd = self.rng.random
        draws = np.array([rnd() for _ in range(n)], dtype=np.float64)
        if limit is not None and limit <= 0:
            return []  # as heapq.nsmallest(limit, ...)
        order = np.lexsort((np.arange(n), draws, candidates.active_decode_blocks, candidates.active_requests))
        top: list[int] = (order if limit is None else order[:limit]).tolist()
        return top


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
    return over_thresholds(th, w.num_blocks, w.active_decode_blocks, w.active_prefill_tokens)


def over_thresholds(
    th: BusyThresholds, num_blocks: int, active_decode_blocks: int, active_prefill_tokens: int
) -> bool:
    """:func:`is_busy` of a worker with these figures."""
    frac = th.active_decode_blocks
    if frac is not None and num_blocks > 0 and active_decode_blocks > frac * num_blocks:
        return True
    tokens = th.active_prefill_tokens
    return tokens is not None and active_prefill_tokens > tokens


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
    "Candidates",
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
    "kv_costs",
    "make_policy",
    "over_thresholds",
    "softmax_sample",
    "split_busy",
]
