"""The engine seam: the real model and the mock executor get identical scheduling decisions.

The scheduler, block pool, prefix cache and KV events are the same objects whichever executor
runs, so for the same requests (arriving at the same steps) and the same block geometry, every
step schedules the same requests, chunks and preemptions, hands out the same block ids and
emits KV events of the same shape. Stop conditions cannot diverge: ``ignore_eos`` and no stop
tokens, so every request ends on ``max_tokens``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.mock import MockExecutor
from tandem.engine.runner import ModelExecutor
from tandem.engine.scheduler import SchedulerOutput
from tandem.protocol import KvStored, SamplingParams

pytestmark = pytest.mark.slow


def prompt(n: int, salt: int = 0) -> list[int]:
    return [3 + (i * 7919 + salt * 104729) % 49000 for i in range(n)]


A = prompt(70, 1)
# step -> requests arriving before it: (request id, prompt, max_tokens, prefill_only)
ARRIVALS: dict[int, list[tuple[str, list[int], int, bool]]] = {
    0: [("a", A, 20, False), ("b", prompt(20, 2), 30, False)],
    2: [("c", A[:48] + prompt(10, 3), 12, False), ("d", prompt(30, 4), 20, False)],
    4: [("e", prompt(25, 5), 4, True)],
    9: [("f", A[:40], 5, False)],
}
GEOMETRY: dict[str, Any] = {
    "block_size": 16,
    "num_blocks": 12,
    "max_num_batched_tokens": 64,
    "max_num_seqs": 4,
}

Decision = tuple[
    tuple[tuple[str, int, int, bool], ...], tuple[str, ...], tuple[tuple[str, tuple[int, ...]], ...]
]


def drive(engine: LLMEngine) -> tuple[list[Decision], list[tuple[str, int]], dict[str, tuple[Any, ...]]]:
    """Feed ARRIVALS and step to the end. Returns per-step decisions (scheduled
    ``(request, start, num_tokens, samples)``, preempted requests, block tables after the
    schedule), KV event shapes, and each request's final ``(finish_reason, num_cached_tokens,
    pinned_block_ids, num_tokens)``."""
    decisions: list[Decision] = []
    schedule = engine.scheduler.schedule

    def recording() -> SchedulerOutput:
        out = schedule()
        tables = tuple(
            (i.seq.request_id, tuple(engine.kv.block_table(i.seq.request_id))) for i in out.scheduled
        )
        decisions.append(
            (
                tuple((i.seq.request_id, i.start, i.num_tokens, i.samples) for i in out.scheduled),
                tuple(s.request_id for s in out.preempted),
                tables,
            )
        )
        return out

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    events: list[tuple[str, int]] = []
    final: dict[str, tuple[Any, ...]] = {}
    counts: dict[str, int] = {}
    step = 0
    while step <= max(ARRIVALS) or engine.has_unfinished():
        for rid, p, max_tokens, prefill_only in ARRIVALS.get(step, []):
            sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, seed=7)
            engine.add_request(rid, p, sampling, prefill_only=prefill_only)
        for out in engine.step():
            counts[out.request_id] = counts.get(out.request_id, 0) + len(out.new_token_ids)
            if out.finished:
                pinned = tuple(out.pinned_block_ids) if out.pinned_block_ids is not None else None
                final[out.request_id] = (
                    out.finish_reason,
                    out.num_cached_tokens,
                    pinned,
                    counts[out.request_id],
                )
                if pinned is not None:
                    engine.release_pinned(out.request_id)
        for ev in engine.kv.take_events():
            n = (
                len(ev.data.blocks)
                if isinstance(ev.data, KvStored)
                else len(getattr(ev.data, "block_hashes", []))
            )
            events.append((type(ev.data).__name__, n))
        engine.kv.check_integrity()
        step += 1
        assert step < 500, "no progress"
    return decisions, events, final


def test_model_and_mock_make_identical_scheduling_decisions(model_dir: Path, our_model_fp32: Any) -> None:
    model_engine = LLMEngine(
        EngineConfig(model_dir=str(model_dir), dtype="float32", num_threads=1, **GEOMETRY),
        model=our_model_fp32,
    )
    mock_engine = LLMEngine(EngineConfig(model_dir=str(model_dir), engine="mock", **GEOMETRY))
    assert isinstance(model_engine.executor, ModelExecutor)
    assert isinstance(mock_engine.executor, MockExecutor)
    assert model_engine.kv.num_blocks == mock_engine.kv.num_blocks == 12

    model_run = drive(model_engine)
    mock_run = drive(mock_engine)

    decisions, events, final = model_run
    assert decisions == mock_run[0]
    assert events == mock_run[1]
    assert final == mock_run[2]
    # The scenario exercises what it is meant to: chunked prefill, preemption, prefix hits,
    # a prefill-only hand-off, and every request ending on max_tokens.
    assert any(start > 0 and n > 1 for step in decisions for (_, start, n, _) in step[0])
    assert any(step[1] for step in decisions)
    assert final["c"][1] == 48 and final["f"][1] == 32
    assert final["e"][2] is not None
    assert {rid: f[0] for rid, f in final.items() if rid != "e"} == dict.fromkeys("abcdf", "length")
    for engine in (model_engine, mock_engine):
        assert engine.kv.stats().in_use == 0
    assert model_engine.last_step_simulated_s == 0.0  # real work takes real time
    assert mock_engine.last_step_simulated_s > 0.0  # the last step decoded one token


def test_model_executor_copy_blocks(model_dir: Path, our_model_fp32: Any) -> None:
    import torch

    engine = LLMEngine(
        EngineConfig(model_dir=str(model_dir), dtype="float32", num_threads=1, num_blocks=4),
        model=our_model_fp32,
    )
    engine.kv_cache[0].fill_(1.5)
    engine.copy_blocks([0], [3])
    assert torch.equal(engine.kv_cache[3], engine.kv_cache[0])
    with pytest.raises(ValueError):
        engine.copy_blocks([0, 1], [2])
    with pytest.raises(IndexError):
        engine.copy_blocks([4], [0])
