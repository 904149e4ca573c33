"""The router's fast decision path ranks exactly as the plain per-worker implementation.

``RouterScheduler`` (column-wise candidates, per-worker figures kept between decisions, only the
ranked candidates built as ``WorkerState``) against a reference kept here: the implementation
before that rewrite, in its plainest form — every worker's ``WorkerState`` recomputed from the
tracked requests and the heartbeat on every decision (shared prefix by a scan), and the
policies' list-based ``select`` as they were. Both get the same seeded rng and the same seeded
random workload (heartbeats, reconciliation, leases, workers leaving and returning, busy
thresholds, ties, every mode, temperature sampling, several fall-back limits); every decision,
error, decode ranking, bookkeeping figure and the rng state itself must agree at every step.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
import pytest

from tandem.protocol.messages import InstanceInfo, WorkerLoad
from tandem.services.router.active import ActiveSequences
from tandem.services.router.config import RouterConfig
from tandem.services.router.policy import (
    BusyThresholds,
    Candidates,
    KvWeights,
    PolicyRequest,
    WorkerState,
    disagg_decision,
    is_busy,
    make_policy,
    softmax_sample,
)
from tandem.services.router.scheduler import RouterScheduler, RoutingError

# ---- reference policies: the list-based select of every mode, as it was ---------------------------


class RefKv:
    def __init__(self, weights: KvWeights, rng: random.Random) -> None:
        self.weights, self.rng = weights, rng

    def select(
        self, request: PolicyRequest, cands: Sequence[WorkerState], limit: int | None
    ) -> list[WorkerState]:
        if not cands:
            return []
        wt = self.weights
        scale, credit, isl = wt.prefill_load_scale, wt.overlap_score_credit, request.prompt_tokens
        costs = [scale * max(0.0, (w[5] + isl) / (w[1] or 1) - credit * w[3]) + w[4] + w[7] for w in cands]
        chosen = softmax_sample(costs, wt.temperature, self.rng)
        n = len(cands) if limit is None else min(limit, len(cands))
        if n <= 1:
            return [cands[chosen]]
        costs[chosen] = math.inf
        if n == 2:
            return [cands[chosen], cands[costs.index(min(costs))]]
        order = sorted(range(len(costs)), key=costs.__getitem__)[: n - 1]
        return [cands[chosen], *(cands[i] for i in order)]


class RefRoundRobin:
    def __init__(self, weights: KvWeights, rng: random.Random) -> None:
        self.counter = 0

    def select(
        self, request: PolicyRequest, cands: Sequence[WorkerState], limit: int | None
    ) -> list[WorkerState]:
        if not cands:
            return []
        ordered = sorted(cands, key=lambda w: w.instance_id)
        k = self.counter % len(ordered)
        self.counter += 1
        return (ordered[k:] + ordered[:k])[:limit]


class RefRandom:
    def __init__(self, weights: KvWeights, rng: random.Random) -> None:
        self.rng = rng

    def select(
        self, request: PolicyRequest, cands: Sequence[WorkerState], limit: int | None
    ) -> list[WorkerState]:
        n = len(cands) if limit is None else min(limit, len(cands))
        return self.rng.sample(list(cands), n)


class RefPowerOfTwo:
    def __init__(self, weights: KvWeights, rng: random.Random) -> None:
        self.rng = rng

    def select(
        self, request: PolicyRequest, cands: Sequence[WorkerState], limit: int | None
    ) -> list[WorkerState]:
        if len(cands) <= 1:
            return list(cands)
        i, j = self.rng.sample(range(len(cands)), 2)
        a, b = cands[i], cands[j]
        key = lambda w: (w.active_requests, w.active_decode_blocks)  # noqa: E731
        return ([b, a] if key(b) < key(a) else [a, b])[:limit]


class RefLeastLoaded:
    def __init__(self, weights: KvWeights, rng: random.Random) -> None:
        self.rng = rng

    def select(
        self, request: PolicyRequest, cands: Sequence[WorkerState], limit: int | None
    ) -> list[WorkerState]:
        rnd = self.rng.random
        keyed = [(w.active_requests, w.active_decode_blocks, rnd(), k) for k, w in enumerate(cands)]
        top = sorted(keyed) if limit is None else heapq.nsmallest(limit, keyed)
        return [cands[t[3]] for t in top]


REF_POLICIES: dict[str, Any] = {
    "kv": RefKv,
    "round-robin": RefRoundRobin,
    "random": RefRandom,
    "power-of-two": RefPowerOfTwo,
    "least-loaded": RefLeastLoaded,
}


# ---- reference tracker: every figure recomputed for every decision ----------------------------------


class RefTracker:
    """The tracker's semantics without caches: per decision and worker, reconcile with a new
    heartbeat (then expire), take the larger of the tracked and the reported figures, apply the
    busy thresholds, and scan the worker's active blocks for the shared prefix."""

    def __init__(self, ttl_s: float, thresholds: BusyThresholds, margin_s: float = 0.1) -> None:
        self.ttl_s, self.margin_s, self.thresholds = ttl_s, margin_s, thresholds
        self.workers: dict[str, ActiveSequences] = {}
        self.owners: dict[str, str] = {}
        self.reconciled = self.expired = 0

    def state(
        self, info: InstanceInfo, overlap: Mapping[str, int], hashes: Sequence[int], n_tokens: int, now: float
    ) -> tuple[WorkerState, bool]:
        load = info.load
        blocks = load.used_blocks + load.pinned_blocks
        prefill = load.waiting_prefill_tokens
        requests = load.num_running + load.num_waiting
        seqs = self.workers.get(info.instance_id)
        shared = 0
        if seqs is not None:
            if info.heartbeat_at != seqs.heartbeat_at:
                for rid in seqs.on_heartbeat(info.heartbeat_at, requests, self.margin_s):
                    self.owners.pop(rid, None)
                    self.reconciled += 1
                for rid in seqs.expire(now, self.ttl_s):
                    self.owners.pop(rid, None)
                    self.expired += 1
            if seqs:
                blocks = max(blocks, seqs.active_blocks)
                prefill = max(prefill, seqs.prefill_tokens)
                requests = max(requests, len(seqs))
                while shared < len(hashes) and hashes[shared] in seqs._refs:
                    shared += 1
        bs = info.block_size if info.block_size > 0 else 1
        full = -(-n_tokens // bs)
        st = WorkerState(
            info.instance_id,
            bs,
            info.num_blocks,
            overlap.get(info.instance_id, 0),
            blocks,
            prefill,
            requests,
            full - shared,
        )
        return st, self.thresholds.enabled and is_busy(st, self.thresholds)

    def pools(
        self,
        instances: Iterable[InstanceInfo],
        overlap: Mapping[str, int],
        hashes: Sequence[int],
        n_tokens: int,
        now: float,
        *,
        decode_only: bool = False,
        ignore_busy: bool = False,
    ) -> tuple[list[WorkerState], list[WorkerState], int, int, bool]:
        decode: list[WorkerState] = []
        prefill: list[WorkerState] = []
        busy_d = busy_p = 0
        has_prefill_role = False
        for info in instances:
            st, busy = self.state(info, overlap, hashes, n_tokens, now)
            if info.role == "prefill":
                has_prefill_role = True
                if decode_only:
                    continue
            if busy and not ignore_busy:
                busy_d += info.role != "prefill"
                busy_p += info.role != "decode"
                continue
            if info.role != "prefill":
                decode.append(st)
            if info.role != "decode" and not decode_only:
                prefill.append(st)
        return decode, prefill, busy_d, busy_p, has_prefill_role

    def add(
        self,
        info: InstanceInfo,
        rid: str,
        hashes: Sequence[int],
        n_tokens: int,
        prefill_tokens: int,
        *,
        now: float,
        prefill_until_heartbeat: bool = False,
    ) -> None:
        prev = self.owners.get(rid)
        if prev is not None and prev != info.instance_id:
            self.free(rid)
        seqs = self.workers.get(info.instance_id)
        if seqs is None:
            seqs = self.workers[info.instance_id] = ActiveSequences(max(1, info.block_size))
            seqs.heartbeat_at = info.heartbeat_at
        seqs.add(
            rid, hashes, n_tokens, prefill_tokens, now=now, prefill_until_heartbeat=prefill_until_heartbeat
        )
        self.owners[rid] = info.instance_id

    def confirm(self, rid: str, now: float) -> None:
        worker = self.owners.get(rid)
        if worker is not None:
            self.workers[worker].confirm(rid, now)

    def mark_prefill_done(self, rid: str) -> bool:
        worker = self.owners.get(rid)
        return worker is not None and self.workers[worker].mark_prefill_done(rid)

    def free(self, rid: str, worker_id: str | None = None) -> bool:
        worker = self.owners.get(rid)
        if worker is None or (worker_id is not None and worker_id != worker):
            return False
        del self.owners[rid]
        seqs = self.workers.get(worker)
        return seqs is not None and seqs.free(rid)

    def remove_worker(self, worker_id: str) -> None:
        seqs = self.workers.pop(worker_id, None)
        if seqs is not None:
            for rid in seqs.request_ids():
                self.owners.pop(rid, None)


# ---- reference scheduler: decide / rank_decode as they were ------------------------------------------


class RefScheduler:
    def __init__(self, cfg: RouterConfig, rng: random.Random, max_attempts: int) -> None:
        self.cfg = cfg
        full = KvWeights(cfg.prefill_load_scale, cfg.overlap_score_credit, cfg.router_temperature)
        decode_only = KvWeights(0.0, 0.0, cfg.router_temperature)
        ref = REF_POLICIES[cfg.router_mode]
        self.local_policy, self.prefill_policy = ref(full, rng), ref(full, rng)
        self.decode_policy = ref(decode_only, rng)
        th = BusyThresholds(cfg.active_decode_blocks_threshold, cfg.active_prefill_tokens_threshold)
        self.active = RefTracker(cfg.active_request_ttl_s, th)
        self.k = max(1, max_attempts)

    def decide(
        self,
        instances: Mapping[str, InstanceInfo],
        n_tokens: int,
        hashes: Sequence[int],
        scores: Mapping[str, int],
        now: float,
    ) -> tuple[str, list[str], list[str] | None]:
        by_id = instances
        decode, prefill, busy_d, _, has_prefill_role = self.active.pools(
            by_id.values(), scores, hashes, n_tokens, now
        )
        cfg = self.cfg
        if not decode:
            if busy_d:
                raise RoutingError(503, f"all {busy_d} decode-capable workers are busy, retry later")
            raise RoutingError(503, "no decode-capable worker is registered")
        req = PolicyRequest(n_tokens)
        local_ranked = self.local_policy.select(req, decode, self.k)
        local_ids = [s[0] for s in local_ranked]
        local = local_ranked[0]
        if not has_prefill_role:
            return "aggregated", local_ids, None
        if n_tokens - local.cached_tokens(n_tokens) < cfg.disagg_min_tokens:
            return "short_uncached", local_ids, None
        pre_ranked = self.prefill_policy.select(req, prefill, self.k) if prefill else []
        verdict = disagg_decision(
            req,
            local,
            pre_ranked[0] if pre_ranked else None,
            disagg_min_tokens=cfg.disagg_min_tokens,
            max_prefill_queue_tokens=cfg.max_prefill_queue_tokens,
        )
        if not verdict.remote:
            return verdict.reason, local_ids, None
        first = by_id[pre_ranked[0][0]]
        compat, pid = first.compat_hash, first.instance_id
        if not any(by_id[s[0]].compat_hash == compat and s[0] != pid for s in decode):
            return "no_compatible_decode", local_ids, None
        return "remote", local_ids, [s[0] for s in pre_ranked]

    def rank_decode(
        self,
        instances: Mapping[str, InstanceInfo],
        n_tokens: int,
        hashes: Sequence[int],
        scores: Mapping[str, int],
        prefill_worker: str,
        compat_hash: str,
        now: float,
    ) -> list[str]:
        infos = [
            i for i in instances.values() if i.compat_hash == compat_hash and i.instance_id != prefill_worker
        ]
        decode, *_ = self.active.pools(
            infos, scores, hashes, n_tokens, now, decode_only=True, ignore_busy=True
        )
        if not decode:
            return []
        return [s[0] for s in self.decode_policy.select(PolicyRequest(n_tokens), decode, self.k)]


# ---- the workload ------------------------------------------------------------------------------------


def make_info(wid: str, role: str, bs: int, compat: str, hb: float, rng: random.Random) -> InstanceInfo:
    return InstanceInfo(
        instance_id=wid,
        role=role,  # type: ignore[arg-type]
        model="m",
        block_size=bs,
        num_blocks=rng.choice([64, 256, 1000]),
        block_nbytes=64,
        compat_hash=compat,
        nixl_agent_name=f"agent-{wid}",
        nixl_metadata=b"",
        heartbeat_at=hb,
        load=WorkerLoad(
            num_running=rng.randrange(0, 4),
            used_blocks=rng.choice([0, 0, 0, rng.randrange(0, 300)]),
            waiting_prefill_tokens=rng.choice([0, 0, rng.randrange(0, 2000)]),
        ),
    )


class Workload:
    """Prompts as chains of sequence hashes: a shared system prefix per group, then either a
    fresh tail or a follow-up that extends an earlier prompt (so shared prefixes of every length
    occur). Block sizes vary per worker; the hashes are for ``BS``-token blocks."""

    BS = 4

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.serial = 0
        self.groups = [[(g + 1) << 40 | i for i in range(rng.randrange(2, 12))] for g in range(5)]
        self.history: list[list[int]] = []

    def prompt(self) -> tuple[int, list[int]]:
        rng = self.rng
        if self.history and rng.random() < 0.3:
            base = rng.choice(self.history)
        else:
            base = rng.choice(self.groups)[: rng.randrange(0, 12)]
        n_full = len(base) + rng.randrange(0, 20)
        self.serial += 1
        hashes = base + [(1 << 60) | (self.serial << 8) | i for i in range(n_full - len(base))]
        if rng.random() < 0.05:
            hashes = []  # a prompt shorter than a block
        n_tokens = len(hashes) * self.BS + rng.randrange(0, self.BS) if hashes else rng.randrange(0, self.BS)
        if len(self.history) < 50:
            self.history.append(hashes)
        else:
            self.history[rng.randrange(50)] = hashes
        return n_tokens, hashes

    def scores(self, instances: Mapping[str, InstanceInfo], hashes: list[int]) -> dict[str, int]:
        rng = self.rng
        out: dict[str, int] = {}
        if not hashes or rng.random() < 0.2:
            return out
        for wid in instances:
            if rng.random() < 0.3:
                out[wid] = rng.randrange(0, len(hashes) + 3)
        if rng.random() < 0.2:
            out["gone-worker"] = 3  # the indexer may know workers the registry dropped
        return out


CONFIGS: list[dict[str, Any]] = [
    {"router_mode": "kv"},
    {"router_mode": "kv", "router_temperature": 0.5},
    {"router_mode": "kv", "active_decode_blocks_threshold": 0.3, "active_prefill_tokens_threshold": 600},
    {"router_mode": "kv", "prefill_load_scale": 0.0, "max_prefill_queue_tokens": 0},
    {"router_mode": "kv", "prefill_load_scale": 2.5, "overlap_score_credit": 0.5, "router_temperature": 2.0},
    {"router_mode": "round-robin"},
    {"router_mode": "random", "active_prefill_tokens_threshold": 900},
    {"router_mode": "power-of-two"},
    {"router_mode": "least-loaded", "active_decode_blocks_threshold": 0.5},
]


def run_workload(seed: int, cfg_kw: dict[str, Any], max_attempts: int, steps: int) -> dict[str, int]:
    rng = random.Random(seed)
    cfg = RouterConfig(**{"disagg_min_tokens": 8, "active_request_ttl_s": 2.0, **cfg_kw})
    new = RouterScheduler(cfg, rng=random.Random(seed + 1), max_attempts=max_attempts)
    ref = RefScheduler(cfg, random.Random(seed + 1), max_attempts)
    new_rng = new.local_policy.rng if hasattr(new.local_policy, "rng") else None
    ref_rng = ref.local_policy.rng if hasattr(ref.local_policy, "rng") else None

    clock = 1000.0
    roles = ["decode"] * 5 + ["prefill"] * 3 + ["both"] * 2
    registry: dict[str, InstanceInfo] = {}
    gone: dict[str, InstanceInfo] = {}
    for i in range(rng.randrange(3, 14)):
        wid = f"w{i}"
        bs = rng.choice([Workload.BS] * 4 + [8, 16])
        registry[wid] = make_info(wid, rng.choice(roles), bs, rng.choice(["c1"] * 3 + ["c2"]), clock, rng)
    traffic = Workload(rng)
    tracked: list[str] = []
    seen: dict[str, int] = {}

    def both(fn: str, *args: Any, **kw: Any) -> Any:
        a = getattr(new.active, fn)(*args, **kw)
        b = getattr(ref.active, fn)(*args, **kw)
        assert a == b, fn
        return a

    def heartbeat(wid: str) -> None:  # sometimes stale, sometimes with the same stamp
        seqs = new.active.get(wid)
        n_seq = len(seqs) if seqs else 0
        hb = clock - rng.choice([0.0, 0.0, 0.05, 0.5])
        if rng.random() < 0.1:
            hb = registry[wid].heartbeat_at
        registry[wid] = msgspec.structs.replace(
            registry[wid],
            heartbeat_at=hb,
            load=WorkerLoad(
                num_running=max(0, n_seq - rng.randrange(0, 3)),
                num_waiting=rng.randrange(0, 2),
                used_blocks=rng.randrange(0, 400),
                waiting_prefill_tokens=rng.choice([0, rng.randrange(0, 1500)]),
            ),
        )

    for step in range(steps):
        clock += rng.choice([0.001, 0.01, 0.05, 0.3])
        action = rng.random()
        if action < 0.15 and registry:
            heartbeat(rng.choice(list(registry)))
            continue
        if action < 0.18 and len(registry) > 1:  # a worker is suspected / leaves (maybe for good)
            wid = rng.choice(list(registry))
            gone[wid] = registry.pop(wid)
            if rng.random() < 0.5:
                both("remove_worker", wid)
            continue
        if action < 0.21 and gone:  # ... and comes back (at the end of the registry's order)
            wid = rng.choice(list(gone))
            back = msgspec.structs.replace(gone.pop(wid), heartbeat_at=clock)
            if rng.random() < 0.3:  # restarted as something else
                back = msgspec.structs.replace(
                    back, role=rng.choice(roles), compat_hash=rng.choice(["c1", "c2"])
                )
            registry[wid] = back
            continue
        if action < 0.30 and tracked:  # RequestFinished / Cancel / PrefillFinished
            rid = tracked.pop(rng.randrange(len(tracked)))
            if rng.random() < 0.3:
                both("mark_prefill_done", rid)
                tracked.append(rid)
            else:
                both("free", rid, rng.choice([None, new.active.owner(rid), "elsewhere"]))
            continue
        if action < 0.32:
            clock += 2.5  # past the lease of everything tracked so far

        n_tokens, hashes = traffic.prompt()
        scores = traffic.scores(registry, hashes)
        rid = f"r{step}"
        try:
            d = new.decide(registry, n_tokens, hashes, scores, now=clock)
            got: Any = (
                d.reason,
                [i.instance_id for i in d.local],
                d.prefill and [i.instance_id for i in d.prefill],
            )
        except RoutingError as e:
            got = ("error", e.code, e.message)
        try:
            want: Any = ref.decide(registry, n_tokens, hashes, scores, clock)
        except RoutingError as e:
            want = ("error", e.code, e.message)
        assert got == want, f"step {step}"
        seen[got[0]] = seen.get(got[0], 0) + 1
        if got[0] == "error":
            continue
        by_id = registry
        if got[2]:
            p = by_id[got[2][0]]
            uncached = n_tokens - min(scores.get(p.instance_id, 0) * p.block_size, n_tokens)
            both("add", p, rid, hashes, n_tokens, uncached, now=clock)
            both("confirm", rid, clock)
            if rng.random() < 0.3:  # a heartbeat lands while the prefill runs
                continue
            both("free", rid, p.instance_id)
            if rng.random() < 0.5:  # heartbeats land while the prefill runs (on it, too)
                heartbeat(p.instance_id if rng.random() < 0.5 else rng.choice(list(registry)))
            if tracked and rng.random() < 0.5:  # ... and other requests finish
                both("free", tracked.pop(rng.randrange(len(tracked))))
            if rng.random() < 0.1:  # ... and a worker restarts with another compat hash
                wid = rng.choice(list(registry))
                registry[wid] = msgspec.structs.replace(
                    registry[wid],
                    heartbeat_at=clock,
                    compat_hash="c2" if registry[wid].compat_hash == "c1" else "c1",
                )
            ranked = new.rank_decode(
                registry,
                n_tokens,
                hashes,
                scores,
                prefill_worker=p.instance_id,
                compat_hash=p.compat_hash,
                now=clock,
            )
            want_ranked = ref.rank_decode(
                registry, n_tokens, hashes, scores, p.instance_id, p.compat_hash, clock
            )
            assert [i.instance_id for i in ranked] == want_ranked, f"step {step}"
            if not ranked:
                continue
            target, prefill_tokens = ranked[0], 0
        else:
            target = by_id[got[1][0]]
            prefill_tokens = n_tokens - min(scores.get(target.instance_id, 0) * target.block_size, n_tokens)
        both(
            "add",
            target,
            rid,
            hashes,
            n_tokens,
            prefill_tokens,
            now=clock,
            prefill_until_heartbeat=not got[2],
        )
        if rng.random() < 0.8:
            both("confirm", rid, clock)
        tracked.append(rid)

        if new_rng is not None:
            assert new_rng.getstate() == ref_rng.getstate()  # type: ignore[union-attr]
        assert len(new.active) == len(ref.active.owners)
        assert (new.active.reconciled, new.active.expired) == (ref.active.reconciled, ref.active.expired)
    return seen


@pytest.mark.parametrize("cfg_kw", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("max_attempts", [1, 2, 4])
def test_decisions_match_the_reference(cfg_kw: dict[str, Any], max_attempts: int) -> None:
    seen: dict[str, int] = {}
    for seed in range(12):
        for k, v in run_workload(seed * 31 + max_attempts, cfg_kw, max_attempts, steps=250).items():
            seen[k] = seen.get(k, 0) + v
    # the workload reaches the interesting paths
    assert seen.get("remote", 0) > 0 and len(seen) >= 3, seen


def test_pools_match_the_reference() -> None:
    """The candidate states themselves (built from the columns), every flag and filter."""
    rng = random.Random(5)
    for seed in range(40):
        th = BusyThresholds(rng.choice([None, 0.4]), rng.choice([None, 700]))
        cfg = RouterConfig(
            active_decode_blocks_threshold=th.active_decode_blocks,
            active_prefill_tokens_threshold=th.active_prefill_tokens,
        )
        tracker = RouterScheduler(cfg).active
        ref = RefTracker(300.0, th)
        traffic = Workload(random.Random(seed))
        registry = {
            f"w{i}": make_info(
                f"w{i}",
                rng.choice(["decode", "prefill", "both"]),
                rng.choice([4, 8]),
                rng.choice(["c1", "c2"]),
                0.0,
                rng,
            )
            for i in range(rng.randrange(1, 12))
        }
        for k in range(30):
            n_tokens, hashes = traffic.prompt()
            info = rng.choice(list(registry.values()))
            prefill_tokens = rng.randrange(0, 1000)
            tracker.add(info, f"r{k}", hashes, n_tokens, prefill_tokens, now=0.0)
            ref.add(info, f"r{k}", hashes, n_tokens, prefill_tokens, now=0.0)
            if rng.random() < 0.3:
                rid = f"r{rng.randrange(k + 1)}"
                assert tracker.free(rid) == ref.free(rid)
            n_tokens, hashes = traffic.prompt()
            scores = traffic.scores(registry, hashes)
            compat, exclude = rng.choice([None, "c1", "c2"]), rng.choice([None, *registry])
            subset = [
                i
                for i in registry.values()
                if (compat is None or i.compat_hash == compat) and i.instance_id != exclude
            ]
            for decode_only in (False, True):
                for ignore_busy in (False, True):
                    kw = {"decode_only": decode_only, "ignore_busy": ignore_busy}
                    got = tracker.pools(
                        registry.values(),
                        scores,
                        hashes,
                        n_tokens,
                        0.0,
                        compat_hash=compat,
                        exclude=exclude,
                        **kw,
                    )
                    want = ref.pools(subset, scores, hashes, n_tokens, 0.0, **kw)
                    assert (list(got.decode), list(got.prefill), *got[2:]) == want
                    plain = tracker.pools(subset, scores, hashes, n_tokens, 0.0, **kw)
                    assert (list(plain.decode), list(plain.prefill), *plain[2:]) == want


def test_block_holders_index_matches_every_workers_blocks() -> None:
    """The holders index is exactly "which workers have this block active", through adds, frees,
    reconciliation, leases and workers leaving; empty once nothing is tracked."""
    rng = random.Random(3)
    tracker = RouterScheduler(RouterConfig(active_request_ttl_s=5.0)).active
    traffic = Workload(rng)
    workers = [make_info(f"w{i}", "decode", 4, "c1", 0.0, rng) for i in range(6)]
    live: list[str] = []

    def check() -> None:
        holders = tracker._holders
        index = {h: m for shard in holders.shards for h, m in shard.items()}
        want: dict[int, int] = {}
        for wid, seqs in tracker._workers.items():
            for h in seqs._refs:
                want[h] = want.get(h, 0) | 1 << holders.slot_of(wid)
        assert index == want

    for k in range(400):
        n_tokens, hashes = traffic.prompt()
        action = rng.random()
        if action < 0.5 or not live:
            tracker.add(rng.choice(workers), f"r{k}", hashes, n_tokens, 0, now=float(k))
            live.append(f"r{k}")
        elif action < 0.85:
            tracker.free(live.pop(rng.randrange(len(live))))
        elif action < 0.9:
            wid = rng.choice(workers).instance_id
            tracker.remove_worker(wid)
        else:  # a heartbeat: reconciliation and the lease run in the next decision
            i = rng.randrange(len(workers))
            workers[i] = msgspec.structs.replace(workers[i], heartbeat_at=float(k), load=WorkerLoad())
            for rid in list(live):
                tracker.confirm(rid, float(k) - 1.0)
        tracker.pools(workers, {}, hashes, n_tokens, now=float(k))
        check()
    for rid in live:
        tracker.free(rid)
    check()
    assert not any(tracker._holders.shards)


@pytest.mark.parametrize("mode", ["kv", "round-robin", "random", "power-of-two", "least-loaded"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_policies_match_the_reference(mode: str, temperature: float) -> None:
    """Each policy on random candidate lists with many ties, limits None, 0, 1, 2, 3, 50."""
    rng = random.Random(17)
    for seed in range(300):
        weights = KvWeights(rng.choice([0.0, 1.0, 1.7]), rng.choice([0.0, 1.0, 0.3]), temperature)
        new, ref = (
            make_policy(mode, weights, random.Random(seed)),
            REF_POLICIES[mode](weights, random.Random(seed)),
        )
        cands = [
            WorkerState(
                f"w{rng.randrange(1000)}-{i}",
                rng.choice([0, 4, 16]),
                100,
                rng.choice([0, 0, rng.randrange(0, 40)]),
                rng.choice([0, 3, 7]),
                rng.choice([0, 0, 16, 100]),
                rng.choice([0, 1, 2]),
                rng.choice([0, 5]),
            )
            for i in range(rng.randrange(0, 12))
        ]
        req = PolicyRequest(rng.choice([0, 1, 40, 1000]))
        for limit in (None, 0, 1, 2, 3, 50):
            assert new.select(req, cands, limit) == ref.select(req, cands, limit), (seed, limit)
            assert new.select(req, Candidates.of(cands), limit) == ref.select(req, cands, limit), (
                seed,
                limit,
            )


def test_bookkeeping_brings_workers_up_to_date_without_reconciling() -> None:
    """A change to a worker's tracked requests updates its candidate figures at once (no work
    left for the next decision), but never runs heartbeat reconciliation out of turn: with a
    heartbeat the layout has not seen, the worker is left to the next decision."""
    rng = random.Random(1)
    tracker = RouterScheduler(RouterConfig()).active
    old = make_info("w0", "decode", 4, "c1", 10.0, rng)
    tracker.pools([old], {}, [], 0, now=10.0)
    tracker.add(old, "a", [1, 2], 8, 0, now=10.0)
    tracker.add(old, "b", [1, 3], 8, 0, now=10.0)
    assert not tracker._changed  # settled by the bookkeeping itself
    assert tracker.pools([old], {}, [], 0, now=10.0).decode[0].active_decode_blocks == 3
    # A newer heartbeat reconciles w0 through state(): the layout still holds the old info.
    tracker.confirm("a", 10.5)
    new = msgspec.structs.replace(old, heartbeat_at=12.0, load=WorkerLoad(num_running=0))
    tracker.state(new, 0, [], 0, now=12.0)  # frees "a" (acked before it, 0 reported)
    assert tracker.owner("a") is None and tracker.get("w0").heartbeat_at == 12.0  # type: ignore[union-attr]
    tracker.add(old, "c", [7], 4, 0, now=12.0)
    tracker.confirm("c", 11.0)
    tracker.free("b")
    assert tracker.get("w0").heartbeat_at == 12.0  # type: ignore[union-attr]  # not reconciled again
    assert "w0" in tracker._changed  # left to the next decision
    assert tracker.owner("c") == "w0"
    st = tracker.pools([new], {}, [], 0, now=12.0).decode[0]
    assert (st.active_requests, st.active_decode_blocks) == (1, 1)
