"""The worker's pure parts: the request table's phases, the worker config and its instance ids,
and that the config (what the launcher imports) loads neither NATS clients nor torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tandem.config import to_argv
from tandem.services.worker.config import WorkerConfig, worker_ids
from tandem.services.worker.requests import Phase, PinnedKv, RequestTable, WorkerRequest, finish_reason


def test_phase_moves() -> None:
    r = WorkerRequest("a", Phase.PREFILLING)
    r.move(Phase.PINNED)
    r.move(Phase.IMPORTING)  # a `both` worker importing its own prefill
    r.move(Phase.RUNNING)
    r.move(Phase.FINISHED)
    for bad_from, bad_to in [
        (Phase.RUNNING, Phase.PREFILLING),
        (Phase.PREFILLING, Phase.RUNNING),
        (Phase.FINISHED, Phase.RUNNING),
        (Phase.IMPORTING, Phase.PINNED),
    ]:
        with pytest.raises(RuntimeError):
            WorkerRequest("b", bad_from).move(bad_to)


def test_table_retires_only_done_entries() -> None:
    table = RequestTable()
    r = table.add(WorkerRequest("a", Phase.PINNED, pinned=PinnedKv(num_blocks=2, expires_at=1.0)))
    with pytest.raises(KeyError):
        table.add(WorkerRequest("a", Phase.RUNNING))
    r.move(Phase.IMPORTING)
    assert table.pinned() == [r] and table.has_pinned and table.count(Phase.IMPORTING) == 1
    r.move(Phase.RUNNING)
    r.move(Phase.FINISHED)
    table.retire(r)
    assert "a" in table  # still holds pinned blocks
    r.pinned = None
    table.retire(r)
    assert "a" not in table and len(table) == 0
    table.add(WorkerRequest("b", Phase.RUNNING))
    for entry in table:  # iterating a snapshot: removal is safe
        entry.move(Phase.FINISHED)
        table.retire(entry)
    assert len(table) == 0


def test_finish_reason_mapping() -> None:
    assert [finish_reason(r) for r in ("stop", "length", "abort", "weird")] == [
        "stop",
        "length",
        "abort",
        "error",
    ]


def test_worker_ids() -> None:
    assert worker_ids(WorkerConfig(instance_id="decode-7")) == ["decode-7"]
    assert worker_ids(WorkerConfig(instance_id="decode-64", num_workers=3)) == [
        "decode-64",
        "decode-65",
        "decode-66",
    ]
    assert worker_ids(WorkerConfig(instance_id="m", num_workers=2)) == ["m-0", "m-1"]
    ids = worker_ids(WorkerConfig(role="prefill", num_workers=2))
    assert len(ids) == 2 and ids[0].startswith("prefill-") and ids[0].endswith("-0")
    assert worker_ids(WorkerConfig(instance_id=ids[0], num_workers=2)) == ids  # stable when re-derived


def test_worker_config_validation_and_argv() -> None:
    for bad in (
        {"num_workers": 0},
        {"kv_transfer_bandwidth": -1.0},
        {"kv_ttl_s": 0.0},
        {"drain_timeout_s": -1.0},
        {"instance_id": "has.dot"},
    ):
        with pytest.raises(ValueError):
            WorkerConfig(**bad)  # type: ignore[arg-type]
    cfg = WorkerConfig(role="decode", kv_transfer_bandwidth=5.0, num_workers=4)
    assert to_argv(cfg) == ["--role", "decode", "--num-workers", "4", "--kv-transfer-bandwidth", "5.0"]


def test_worker_config_import_is_light() -> None:
    code = (
        "import sys, tandem.services.worker.config, tandem.services.worker; "
        "heavy = {'torch', 'nixl', 'nats', 'tandem.services.worker.service'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
