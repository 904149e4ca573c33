"""The router's settings: one dataclass drives ``python -m tandem.services.router``'s flags and the
launcher's pass-through (:mod:`tandem.config`: ``add_arguments`` / ``from_namespace`` / ``to_argv``).

Flags use Dynamo's names where Dynamo has the knob (``--router-mode``, ``--router-temperature``,
``--router-prefill-load-scale``, ``--router-kv-overlap-score-credit``,
``--active-decode-blocks-threshold``, ``--active-prefill-tokens-threshold``); earlier tandem
names keep working as aliases. Light on purpose: importing it needs neither NATS nor torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from tandem.config import option

RouterModeName = Literal["kv", "round-robin", "random", "power-of-two", "least-loaded"]


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Router knobs. Durations in seconds, sizes in tokens unless the name says blocks."""

    router_mode: Literal["kv", "round-robin", "random", "power-of-two", "least-loaded"] = option(
        "kv",
        help="worker selection policy (Dynamo's --router-mode): kv = KV-overlap + load cost, "
        "round-robin, random, power-of-two, least-loaded",
    )
    router_temperature: float = option(
        0.0,
        help="kv mode: 0 = lowest cost wins; > 0 = softmax sampling over normalised costs "
        "(Dynamo's --router-temperature)",
    )
    prefill_load_scale: float = option(
        1.0,
        flag="--router-prefill-load-scale",
        aliases=("--kv-overlap-score-weight", "--overlap-weight"),
        help="kv mode: weight of the prefill term (prompt blocks left after overlap credit, plus "
        "queued prefill) against active decode blocks; Dynamo's prefill_load_scale, formerly "
        "--kv-overlap-score-weight",
    )
    overlap_score_credit: float = option(
        1.0,
        flag="--router-kv-overlap-score-credit",
        help="kv mode: prefill blocks credited per prompt block the worker has cached "
        "(Dynamo's --router-kv-overlap-score-credit)",
    )
    disagg_min_tokens: int = option(
        64,
        help="prefill on a prefill worker only when at least this many prompt tokens are uncached "
        "on the chosen decode worker (tokens)",
    )
    max_prefill_queue_tokens: int = option(
        4096,
        help="prefill pool saturated: when the best prefill worker already has this many prompt "
        "tokens queued and the decode worker fewer, the decode worker prefills locally (tokens; "
        "0 = off: always disaggregate long prompts)",
    )
    active_decode_blocks_threshold: float | None = option(
        None,
        help="a worker is busy above this fraction (0-1) of its KV blocks in use; when every "
        "candidate is busy the request gets 503 + Retry-After (Dynamo's flag; unset = off)",
    )
    active_prefill_tokens_threshold: int | None = option(
        None,
        help="a worker is busy above this many queued prompt tokens (tokens; Dynamo's flag; unset = off)",
    )
    busy_retry_after_s: float = option(
        1.0, help="Retry-After sent with a 503 when every candidate worker is busy (s)"
    )
    decode_wait_s: float = option(
        10.0,
        help="when every decode candidate declines a request for lack of free KV blocks, try them "
        "again (every 50 ms, backing off to 0.5 s) for up to this long before answering 503 + "
        "Retry-After; a prefilled request's KV stays pinned meanwhile, within --kv-ttl-s (s)",
    )
    active_request_ttl_s: float = option(
        300.0,
        help="forget a request's tracked load after this long even without a completion signal (s)",
    )
    overlap_timeout_s: float = option(0.1, help="KV indexer overlap query timeout (s)")
    prefill_timeout_s: float = option(120.0, help="prefill worker timeout (s)")
    ack_timeout_s: float = option(5.0, help="decode worker Ack timeout (s)")
    worker_probe_interval_s: float = option(
        1.0,
        flag="--worker-probe-interval",
        help="while a prefill worker has not answered, probe its liveness this often; a worker "
        "gone (no responders) or silent for 3 probes is skipped for the next one (s)",
    )

    def __post_init__(self) -> None:
        def finite(name: str, v: float, lo: float = 0.0) -> None:
            if not (math.isfinite(v) and v >= lo):
                raise ValueError(f"{name} must be a finite number >= {lo}, got {v}")

        if self.router_mode not in ("kv", "round-robin", "random", "power-of-two", "least-loaded"):
            raise ValueError(f"unknown router_mode {self.router_mode!r}")
        finite("router_temperature", self.router_temperature)
        finite("prefill_load_scale", self.prefill_load_scale)
        finite("overlap_score_credit", self.overlap_score_credit)
        if self.disagg_min_tokens < 0:
            raise ValueError("disagg_min_tokens must be >= 0")
        if self.max_prefill_queue_tokens < 0:
            raise ValueError("max_prefill_queue_tokens must be >= 0")
        t = self.active_decode_blocks_threshold
        if t is not None and not (math.isfinite(t) and 0.0 <= t <= 1.0):
            raise ValueError(f"active_decode_blocks_threshold is a fraction in [0, 1], got {t}")
        if self.active_prefill_tokens_threshold is not None and self.active_prefill_tokens_threshold < 0:
            raise ValueError("active_prefill_tokens_threshold must be >= 0 (tokens)")
        finite("busy_retry_after_s", self.busy_retry_after_s)
        finite("decode_wait_s", self.decode_wait_s)
        for name in (
            "active_request_ttl_s",
            "overlap_timeout_s",
            "prefill_timeout_s",
            "ack_timeout_s",
            "worker_probe_interval_s",
        ):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be > 0, got {v}")


__all__ = ["RouterConfig", "RouterModeName"]
