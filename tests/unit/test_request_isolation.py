"""Request isolation: whatever fails for one request inside an engine step (its sampling, its stop
handling, a forward pass that fails only with it in the batch, its commit) finishes that request
alone with ``finish_reason="error"``, frees its blocks, and leaves every other request's tokens
exactly as in a clean run. Mock engine (no torch); the real-model case (a request with
``temperature=1e-310``) is in tests/model/test_engine.py."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import pytest
import structlog

from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine, RequestOutput
from tandem.engine.mock import MockExecutor
from tandem.engine.scheduler import SchedulerOutput, Sequence
from tandem.kvbm.manager import KvCacheManager
from tandem.protocol import SamplingParams
from tandem.services.worker.engine_client import EngineClient

BS = 16
BAD = "bad"


def prompt(n: int, salt: int = 0) -> list[int]:
    """``n`` deterministic valid token ids, none of them eos (2)."""
    return [3 + (i * 7919 + salt * 104729) % 49000 for i in range(n)]


#: request id -> (prompt, max_tokens): prompts of 1-3 blocks, so a small token budget chunks them
REQUESTS = {f"r{i}": (prompt(7 + 13 * i, i), 5 + i) for i in range(5)}


def make(**kw: Any) -> LLMEngine:
    cfg: dict[str, Any] = {"engine": "mock", "block_size": BS, "num_blocks": 64, **kw}
    return LLMEngine(EngineConfig(**cfg))


def params(rid: str, max_tokens: int) -> SamplingParams:
    """Seeded by the request id (without an ``-again`` suffix): a resubmission gets the same tokens."""
    return SamplingParams(max_tokens=max_tokens, seed=zlib.crc32(rid.removesuffix("-again").encode()))


def run(
    engine: LLMEngine, requests: dict[str, tuple[list[int], int]], **add_kw: Any
) -> dict[str, RequestOutput]:
    """Add every request, step until idle (checking the pool after every step); the last output
    of each request, with all its new tokens."""
    for rid, (p, n) in requests.items():
        engine.add_request(rid, p, params(rid, n), **add_kw)
    final: dict[str, RequestOutput] = {}
    tokens: dict[str, list[int]] = {}
    for _ in range(500):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                out.new_token_ids = tokens[out.request_id]
                final[out.request_id] = out
        engine.kv.check_integrity()
    else:
        raise AssertionError("engine did not go idle")
    return final


def assert_clean_pool(engine: LLMEngine) -> None:
    engine.kv.check_integrity()
    stats = engine.kv.stats()
    assert stats.in_use == 0 and stats.pinned == 0, stats
    assert not engine.has_unfinished()
    assert engine.scheduler.num_unfinished == 0


def with_bad(n_tokens: int = 30) -> dict[str, tuple[list[int], int]]:
    """REQUESTS plus the poisoned one, in the middle of the arrival order."""
    items = list(REQUESTS.items())
    return dict([*items[:2], (BAD, (prompt(n_tokens, 99), 8)), *items[2:]])


def poison_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mock executor's step raises for the whole batch whenever the bad request is in it."""
    execute = MockExecutor.execute

    def poisoned(self: MockExecutor, out: SchedulerOutput, kv: KvCacheManager) -> list[Any]:
        if any(item.seq.request_id == BAD for item in out.scheduled):
            raise RuntimeError("poisoned forward")
        return execute(self, out, kv)

    monkeypatch.setattr(MockExecutor, "execute", poisoned)


def poison_sampling(monkeypatch: pytest.MonkeyPatch, message: str, after_tokens: int = 0) -> None:
    """The bad request's sampling raises ``FloatingPointError(message)`` once it has
    ``after_tokens`` output tokens (its forward pass runs)."""
    token_at = MockExecutor.token_at

    def poisoned(self: MockExecutor, seq: Sequence, position: int) -> int:
        if seq.request_id == BAD and seq.num_output_tokens >= after_tokens:
            raise FloatingPointError(message)
        return token_at(self, seq, position)

    monkeypatch.setattr(MockExecutor, "token_at", poisoned)


def check_isolated(final: dict[str, RequestOutput], clean: dict[str, RequestOutput], what: str) -> None:
    bad = final[BAD]
    assert bad.finish_reason == "error"
    assert bad.error is not None and what in bad.error
    for rid in REQUESTS:
        assert final[rid].finish_reason == clean[rid].finish_reason == "length"
        assert final[rid].new_token_ids == clean[rid].new_token_ids, rid
        assert final[rid].error is None


@pytest.mark.parametrize("budget", [512, 24])  # 24: chunked prefill, the bad request mid-prompt
def test_sampling_failure_fails_only_that_request(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    clean = run(make(max_num_batched_tokens=budget), REQUESTS)
    poison_sampling(monkeypatch, "poisoned sampling", after_tokens=2)  # fails on its third token
    engine = make(max_num_batched_tokens=budget)
    final = run(engine, with_bad())
    check_isolated(final, clean, "FloatingPointError: poisoned sampling")
    assert final[BAD].num_cached_tokens == 0
    assert_clean_pool(engine)
    # the engine goes on serving: the same requests again give the same tokens (prefix hits now)
    again = run(engine, {f"{rid}-again": v for rid, v in REQUESTS.items()})
    assert {rid.removesuffix("-again"): o.new_token_ids for rid, o in again.items()} == {
        rid: o.new_token_ids for rid, o in clean.items()
    }
    assert all(o.num_cached_tokens > 0 for rid, o in again.items() if len(REQUESTS[rid[:2]][0]) >= BS)
    assert_clean_pool(engine)


def test_stop_handling_failure_fails_only_that_request(monkeypatch: pytest.MonkeyPatch) -> None:
    clean = run(make(), REQUESTS)
    engine = make()
    stop_reason = engine._stop_reason

    def poisoned(seq: Sequence, token: int) -> str | None:
        if seq.request_id == BAD:
            raise KeyError("poisoned stop handling")
        return stop_reason(seq, token)

    monkeypatch.setattr(engine, "_stop_reason", poisoned)
    final = run(engine, with_bad())
    check_isolated(final, clean, "poisoned stop handling")
    assert_clean_pool(engine)


def test_forward_failure_with_one_request_in_the_batch_fails_only_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The executor raises for the whole step whenever the bad request is in it: the engine
    retries the step's items one by one and fails only the bad one."""
    clean = run(make(), REQUESTS)
    poison_forward(monkeypatch)
    engine = make()
    final = run(engine, with_bad())
    check_isolated(final, clean, "RuntimeError: poisoned forward")
    assert_clean_pool(engine)


def test_commit_failure_fails_only_that_request(monkeypatch: pytest.MonkeyPatch) -> None:
    clean = run(make(), REQUESTS)
    engine = make()
    commit = engine.kv.commit

    def poisoned(request_id: str, token_ids: Any, num_computed_tokens: int) -> None:
        if request_id == BAD:
            raise ValueError("poisoned commit")
        commit(request_id, token_ids, num_computed_tokens)

    monkeypatch.setattr(engine.kv, "commit", poisoned)
    final = run(engine, with_bad())
    check_isolated(final, clean, "poisoned commit")
    assert_clean_pool(engine)


def test_prefill_only_failure_pins_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill-only request that fails hands no blocks over: nothing stays pinned."""
    poison_sampling(monkeypatch, "poisoned first token")
    engine = make()
    outs = run(engine, {BAD: (prompt(40, 7), 8), "good": (prompt(40, 8), 8)}, prefill_only=True)
    assert outs[BAD].finish_reason == "error" and outs[BAD].pinned_block_ids is None
    good = outs["good"]
    assert good.pinned_block_ids is not None and len(good.new_token_ids) == 1
    engine.release_pinned("good")
    assert_clean_pool(engine)


def test_failed_request_can_be_resubmitted_under_its_id(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    token_at = MockExecutor.token_at

    def fails_once(self: MockExecutor, seq: Sequence, position: int) -> int:
        if seq.request_id == BAD and calls["n"] == 0:
            calls["n"] += 1
            raise FloatingPointError("once")
        return token_at(self, seq, position)

    monkeypatch.setattr(MockExecutor, "token_at", fails_once)
    engine = make()
    assert run(engine, {BAD: (prompt(20, 3), 4)})[BAD].finish_reason == "error"
    assert run(engine, {BAD: (prompt(20, 3), 4)})[BAD].finish_reason == "length"
    assert_clean_pool(engine)


async def test_engine_client_hands_a_failed_request_to_on_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the worker's engine loop: the failed request arrives as an ``error`` output (the
    worker sends it an error chunk), ``on_failure`` (fail every request) is never called, and
    the other request finishes normally."""
    poison_sampling(monkeypatch, "poisoned")
    config = EngineConfig(engine="mock", speedup_ratio=1e6, num_blocks=64)
    client = EngineClient(config, lambda _events: None, structlog.get_logger("test"))
    finals: dict[str, RequestOutput] = {}
    failures: list[str] = []
    done = asyncio.Event()

    async def on_outputs(outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                finals[out.request_id] = out
        if len(finals) == 2:
            done.set()

    async def on_failure(message: str) -> None:
        failures.append(message)

    await client.start()
    client.start_loop(on_outputs, on_failure)
    try:
        await client.call(client.engine.add_request, "good", prompt(20, 1), params("good", 6))
        await client.call(client.engine.add_request, BAD, prompt(20, 2), params(BAD, 6))
        client.wake()
        async with asyncio.timeout(30):
            await done.wait()
        assert await client.call(lambda: client.engine.kv.stats().in_use) == 0
    finally:
        await client.close()
    assert not failures
    assert finals[BAD].finish_reason == "error" and finals[BAD].error == "FloatingPointError: poisoned"
    assert finals["good"].finish_reason == "length"


def test_forward_failure_fails_who_took_its_prefix_in_the_same_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bad request's forward pass fails alone, and another request admitted after it in the
    same step took the blocks it was computing as a prefix hit: those blocks are unregistered
    (``KvRemoved``) and that request fails too, since its KV would be garbage; the rest run
    clean, and the sharer resubmitted gets its clean tokens, computing the prefix itself."""
    shared = prompt(2 * BS, 99)
    sharer = {"sharer": ([*shared, *prompt(5, 42)], 6)}
    clean = run(make(), {**REQUESTS, **sharer})
    poison_forward(monkeypatch)
    engine = make()
    final = run(engine, {**with_bad(), **sharer} | {BAD: ([*shared, *prompt(3, 7)], 8)})
    assert final[BAD].finish_reason == "error"
    assert final["sharer"].finish_reason == "error"
    assert final["sharer"].error is not None and f"computed by request {BAD!r}" in final["sharer"].error
    assert final["sharer"].num_cached_tokens == 2 * BS
    for rid in REQUESTS:
        assert final[rid].new_token_ids == clean[rid].new_token_ids, rid
    assert_clean_pool(engine)
    assert engine.kv.lookup_prefix(shared) == 0  # rolled back: nothing garbage stays cached
    again = run(engine, {"sharer-again": sharer["sharer"]})["sharer-again"]
    assert again.num_cached_tokens == 0
    assert again.new_token_ids == clean["sharer"].new_token_ids
    assert_clean_pool(engine)


def test_sampling_failure_keeps_the_prefix_it_computed_for_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bad request fails in its sampling, after a forward pass that ran: the prefix it
    computed is valid, so the request that took it in the same step runs on, with clean tokens."""
    shared = prompt(2 * BS, 98)
    sharer = {"sharer": ([*shared, *prompt(5, 43)], 6)}
    clean = run(make(), sharer)
    poison_sampling(monkeypatch, "poisoned sampling")
    engine = make()
    final = run(engine, {BAD: ([*shared, *prompt(3, 8)], 8), **sharer})
    assert final[BAD].finish_reason == "error"
    assert final["sharer"].finish_reason == "length" and final["sharer"].num_cached_tokens == 2 * BS
    assert final["sharer"].new_token_ids == clean["sharer"].new_token_ids
    assert engine.kv.lookup_prefix(shared) == 2
    assert_clean_pool(engine)
