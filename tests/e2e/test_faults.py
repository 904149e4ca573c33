"""The fault-tolerance suite in small: every scenario of ``scripts/fault_tolerance.py`` with 2
clients × 10 streaming greedy requests on mock workers (Dynamo's timing at ``--speedup-ratio 1``,
one worker per process), the fault 1.5 s into the run.

Where a spare exists, every request succeeds with the fault-free run's exact text (a killed decode
worker's streams migrate; a killed prefill worker's requests go to the other or prefill locally;
a killed router replica's requests are re-sent; a NATS restart's lost chunks are detected by the
liveness probe and the requests migrate; losing the leader of a 3-node R3 JetStream cluster likewise).
The only decode worker killed: requests fail fast with
a clear 503 (none hangs) and the stack serves again once it is back. Every pool is intact with
nothing in use or pinned afterwards.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


def _load_script() -> ModuleType:
    path = REPO / "scripts" / "fault_tolerance.py"
    spec = importlib.util.spec_from_file_location("fault_tolerance", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_tolerance"] = module
    spec.loader.exec_module(module)
    return module


ft = _load_script()


def _args(**over: Any) -> argparse.Namespace:
    args = ft.build_parser().parse_args(
        ["--clients", "2", "--requests", "10", "--fault-at", "1.5", "--max-tokens", "48"]
    )
    for k, v in over.items():
        setattr(args, k, v)
    return args


async def _run(scenario: str, tmp_path: Path) -> dict[str, Any]:
    row: dict[str, Any] = await ft.run_scenario(scenario, _args(), tmp_path)
    print(row)
    return row


def _assert_clean_pools(row: dict[str, Any]) -> None:
    stranded = row["stranded"]
    assert stranded["workers"] >= 1, row
    assert stranded["in_use"] == 0 and stranded["pinned"] == 0, row
    assert not stranded["integrity_failures"], row


@pytest.mark.parametrize(
    "scenario",
    [
        "decode_killed",
        "prefill_killed",
        "indexer_restarted",
        "router_killed",
        "nats_restarted",
        "nats_node_killed",
    ],
)
async def test_fault_with_a_spare_loses_nothing(scenario: str, tmp_path: Path) -> None:
    row = await _run(scenario, tmp_path)
    assert row["baseline_failed"] == 0, row
    assert "note" not in row, row  # the fault happened during the run
    assert row["succeeded"] == row["total"], row
    assert row["equal"] == row["total"], row  # same greedy text as the fault-free run
    assert row["hung"] == 0
    assert row["served_after_s"] is not None, row
    _assert_clean_pools(row)


async def test_only_decode_worker_restarted_fails_fast_then_recovers(tmp_path: Path) -> None:
    row = await _run("decode_restarted", tmp_path)
    assert row["hung"] == 0, row  # every failure was a clear, immediate error
    assert row["succeeded"] + row["failed"] == row["total"], row
    assert row["served_after_s"] is not None, row  # served again once the worker was back
    assert all("503" in e or "decode" in e or "worker" in e for e in row["errors"]), row
    assert row["equal"] == row["succeeded"], row
    _assert_clean_pools(row)
