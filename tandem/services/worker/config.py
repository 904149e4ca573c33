"""The worker's own settings: one dataclass drives ``python -m tandem.services.worker``'s flags
and the launcher's pass-through (:mod:`tandem.config`: ``add_arguments`` / ``from_namespace`` /
``to_argv``). The engine's settings are :class:`tandem.engine.config.EngineConfig`'s; the worker
command line is both (plus the common service flags), nothing restated.

Light on purpose: importing it needs neither NATS nor torch (the launcher imports it).
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from typing import Literal

from tandem.config import option

__all__ = ["DEFAULT_KV_TRANSFER_BANDWIDTH_GBPS", "WorkerConfig", "worker_ids"]

#: Dynamo mocker's default ``--kv-transfer-bandwidth`` (GB/s; inter-node InfiniBand).
DEFAULT_KV_TRANSFER_BANDWIDTH_GBPS = 64.0

_TRAILING_INDEX = re.compile(r"^(.*)-(\d+)$")


@dataclass(frozen=True)
class WorkerConfig:
    """Worker knobs (durations in seconds). See the flags' help for each field."""

    role: Literal["prefill", "decode", "both"] = option(
        "both", help="serve prefill only, decode only, or both (aggregated)"
    )
    instance_id: str | None = option(
        None,
        help="instance id (default: <role>-<random hex>); with --num-workers N it is the first "
        "worker's and the others count up its trailing number (decode-64 -> decode-64..decode-127; "
        "an id without one gets -0, -1, ...)",
    )
    num_workers: int = option(
        1,
        help="workers hosted by this process, each with its own instance id, subjects, heartbeat "
        "and KV event stream (> 1 needs --engine mock)",
    )
    kv_transport: Literal["nixl", "simulated"] | None = option(
        None,
        help="how decode workers move prefilled KV: nixl (real bytes) or simulated (no bytes, "
        "time = bytes / --kv-transfer-bandwidth); default: nixl for the model engine, simulated "
        "for mock",
    )
    kv_transfer_bandwidth: float = option(
        DEFAULT_KV_TRANSFER_BANDWIDTH_GBPS,
        help="simulated KV transport's bandwidth (GB/s, 1 GB = 1e9 B; 0 = instant; Dynamo mocker's flag)",
    )
    kv_ttl_s: float = option(
        30.0, help="pinned prefill KV is freed this long after the reply without a READ (s)"
    )
    transfer_timeout_s: float = option(10.0, help="longest one KV READ may take (s)")
    first_token_timeout_s: float = option(
        300.0, help="longest a prefill may take to produce its first token (s)"
    )
    heartbeat_s: float = option(1.0, help="registry heartbeat period (s)")
    shutdown_grace_s: float = option(
        20.0, help="on SIGTERM, running requests may finish for this long before they are aborted (s)"
    )
    drain_timeout_s: float = option(
        10.0, help="on SIGTERM, then in-flight KV transfers may finish for this long (s)"
    )

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"--num-workers must be at least 1, got {self.num_workers}")
        if not (self.kv_transfer_bandwidth >= 0 and math.isfinite(self.kv_transfer_bandwidth)):
            raise ValueError(f"--kv-transfer-bandwidth must be >= 0, got {self.kv_transfer_bandwidth}")
        for name in ("kv_ttl_s", "transfer_timeout_s", "first_token_timeout_s", "heartbeat_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        for name in ("shutdown_grace_s", "drain_timeout_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
        if self.instance_id is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", self.instance_id):
            raise ValueError(
                "--instance-id may only hold letters, digits, '-' and '_' (it is a subject token)"
            )


def worker_ids(config: WorkerConfig) -> list[str]:
    """The instance ids of the ``config.num_workers`` workers of one process.

    One worker: ``instance_id`` (default ``<role>-<8 hex>``). Several: ``instance_id`` is the
    first one's, and the rest count up its trailing ``-<n>`` (``decode-64`` → ``decode-64`` …
    ``decode-<63 + N>``); an id without a trailing number, or no id, gets ``-0`` … ``-<N-1>``.
    """
    base = config.instance_id or f"{config.role}-{uuid.uuid4().hex[:8]}"
    n = config.num_workers
    if n == 1:
        return [base]
    m = _TRAILING_INDEX.match(base)
    if m is None:
        return [f"{base}-{i}" for i in range(n)]
    prefix, start = m.group(1), int(m.group(2))
    return [f"{prefix}-{start + i}" for i in range(n)]
