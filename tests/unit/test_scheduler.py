"""Scheduler with a real KvCacheManager and a fake model (every sampled token is 7)."""

from __future__ import annotations

import pytest

from tandem.engine.scheduler import Scheduler, SchedulerOutput, Sequence, SequenceStatus
from tandem.kvbm.manager import KvCacheManager
from tandem.protocol import SamplingParams

BS = 4  # block size (tokens)


def make(
    num_blocks: int = 64, max_num_seqs: int = 8, max_tokens_per_step: int = 64, max_model_len: int = 1024
) -> Scheduler:
    return Scheduler(KvCacheManager(num_blocks, BS), max_num_seqs, max_tokens_per_step, max_model_len)


def seq(rid: str, prompt: list[int] | int, max_tokens: int = 4, **kw: object) -> Sequence:
    tokens = list(range(100, 100 + prompt)) if isinstance(prompt, int) else list(prompt)
    return Sequence(rid, tokens, SamplingParams(max_tokens=max_tokens, seed=0), [], **kw)  # type: ignore[arg-type]


def run_step(s: Scheduler) -> SchedulerOutput:
    """One step with a fake model: sampling rows get token 7; finished sequences leave."""
    out = s.schedule()
    for item in out.scheduled:
        if item.samples:
            item.seq.token_ids.append(7)
    s.commit(out)
    for item in out.scheduled:
        if item.samples and item.seq.num_output_tokens >= item.seq.sampling.max_tokens:
            s.finish(item.seq, "length")
    s.kv.check_integrity()
    return out


def run_all(s: Scheduler, max_steps: int = 500) -> list[SchedulerOutput]:
    outs = []
    while s.has_work():
        outs.append(run_step(s))
        if len(outs) > max_steps:
            raise AssertionError("scheduler made no progress")
    return outs


def tokens_of(out: SchedulerOutput) -> dict[str, int]:
    return {i.seq.request_id: i.num_tokens for i in out.scheduled}


def test_batches_within_seq_and_token_budgets() -> None:
    s = make(max_num_seqs=3, max_tokens_per_step=20)
    seqs = [seq(f"r{i}", [200 + 10 * i + j for j in range(6)]) for i in range(5)]  # no shared prefix
    for q in seqs:
        s.add(q)
    first = run_step(s)
    assert tokens_of(first) == {"r0": 6, "r1": 6, "r2": 6}  # max_num_seqs caps the batch
    for out in run_all(s):
        assert out.num_batched_tokens <= 20
        assert len(out.scheduled) <= 3
    assert all(q.status is SequenceStatus.FINISHED and q.output_token_ids == [7] * 4 for q in seqs)
    assert s.kv.stats().in_use == 0


def test_chunked_prefill_splits_prompt_and_decodes_go_first() -> None:
    s = make(max_tokens_per_step=16)
    s.add(seq("short", 3, max_tokens=10))
    run_step(s)  # short prefilled, now decoding
    s.add(seq("long", 40, max_tokens=2))
    chunks = []
    while s.get("long") is not None and s.get("long").num_pending_tokens > 1:  # type: ignore[union-attr]
        out = run_step(s)
        assert out.scheduled[0].seq.request_id == "short"  # decode scheduled first
        assert out.scheduled[0].num_tokens == 1
        chunks.append(tokens_of(out)["long"])
        assert out.num_batched_tokens <= 16
    assert chunks == [15, 15, 10]  # 40 prompt tokens over three steps, filling the budget
    run_all(s)
    assert s.kv.stats().in_use == 0


def test_prefix_cache_hit_skips_cached_tokens() -> None:
    s = make()
    prompt = list(range(200, 218))  # 18 tokens: 4 full blocks + 2
    s.add(seq("a", prompt, max_tokens=1))
    first = run_step(s)
    assert tokens_of(first) == {"a": 18}
    s.add(seq("b", [*prompt[:16], 1, 2, 3], max_tokens=1))
    out = run_step(s)
    assert tokens_of(out) == {"b": 3}  # 16 cached tokens, only the 3 new ones computed
    assert out.scheduled[0].start == 16
    b = out.scheduled[0].seq
    assert b.num_cached_tokens == 16


def test_whole_prompt_cached_still_computes_last_token() -> None:
    s = make()
    s.add(seq("a", 16, max_tokens=1))
    run_step(s)
    s.add(seq("b", 16, max_tokens=1))
    out = run_step(s)
    assert tokens_of(out) == {"b": 4}  # last block recomputed: begin caps at len - 1


def test_preemption_when_blocks_run_out_then_recovery() -> None:
    # 8 blocks of 4 tokens. Two requests of 8-token prompts that each grow to 16 tokens of KV:
    # 4 + 4 blocks would fit, but chunks plus decode growth force the newer one out at some point.
    s = make(num_blocks=8, max_tokens_per_step=64)
    a = seq("a", 8, max_tokens=12)
    b = seq("b", list(range(300, 308)), max_tokens=12)
    s.add(a)
    s.add(b)
    outs = run_all(s)
    preempted = [p.request_id for o in outs for p in o.preempted]
    assert preempted and set(preempted) == {"b"}  # the most recently admitted one
    assert b.num_preemptions >= 1
    assert a.output_token_ids == [7] * 12 and b.output_token_ids == [7] * 12
    st = s.kv.stats()
    assert st.in_use == 0 and st.free + st.cached == 8


def test_preempted_sequence_rehits_prefix_cache() -> None:
    s = make(num_blocks=8, max_tokens_per_step=64)
    s.add(seq("a", 8, max_tokens=12))
    s.add(seq("b", list(range(300, 308)), max_tokens=12))
    recomputed = []
    while s.has_work():
        out = run_step(s)
        recomputed += [i.start for i in out.scheduled if i.seq.request_id == "b" and i.seq.num_preemptions]
    # b restarted from its cached full blocks (not from 0) at least once
    assert any(start > 0 for start in recomputed)


def test_oversized_request_rejected() -> None:
    s = make(num_blocks=4)  # 16 tokens of KV
    with pytest.raises(ValueError, match="KV blocks"):
        s.add(seq("big", 20, max_tokens=1))
    with pytest.raises(ValueError, match="KV blocks"):
        s.add(seq("grows", 10, max_tokens=10))  # prompt fits, prompt + output does not
    s.add(seq("ok", 10, max_tokens=7))  # 16 tokens total, last never needs KV
    with pytest.raises(ValueError, match="already exists"):
        s.add(seq("ok", 3))
    with pytest.raises(ValueError, match="empty"):
        s.add(seq("empty", []))
    m = make(max_model_len=10)
    with pytest.raises(ValueError, match="max_model_len"):
        m.add(seq("long", 10))


def test_abort_in_every_state() -> None:
    s = make(max_num_seqs=1)
    s.add(seq("run", 5))
    s.add(seq("wait", 5))
    run_step(s)
    assert s.abort("run") is not None
    assert s.abort("wait") is not None
    assert s.abort("nope") is None
    imp = seq("imp", 9)  # shares its first block with "run", which is cached now
    got = s.add_imported(imp)
    assert got is not None and len(got[0]) == 3 and got[1] == 1
    assert s.abort("imp") is not None
    assert not s.has_work()
    st = s.kv.stats()
    assert st.in_use == 0
    s.kv.check_integrity()


def test_imported_request_decodes_after_activation() -> None:
    s = make()
    imp = seq("imp", 9, max_tokens=3)
    table, num_reused = s.add_imported(imp)  # type: ignore[misc]
    assert num_reused == 0
    assert not s.has_work()  # nothing to schedule while importing
    s.activate("imp", 42)
    out = run_step(s)
    assert tokens_of(out) == {"imp": 1} and out.scheduled[0].start == 9
    assert s.kv.block_table("imp")[:3] == table
    run_all(s)
    assert imp.output_token_ids == [42, 7, 7]
    assert s.kv.stats().in_use == 0


def test_waits_instead_of_deadlocking_when_blocks_are_pinned() -> None:
    s = make(num_blocks=4, max_tokens_per_step=64)
    p = seq("p", 12, max_tokens=1, prefill_only=True)
    s.add(p)
    out = s.schedule()
    p.token_ids.append(7)
    s.commit(out)
    pinned = s.finish(p, None, pin=True)
    assert pinned is not None and len(pinned) == 3
    s.add(seq("q", list(range(500, 510)), max_tokens=2))
    assert s.schedule().is_empty  # 1 free block, needs 3: waits
    s.kv.unpin("p")
    run_all(s)
    assert s.kv.stats().in_use == 0


def test_prefix_scheduled_in_the_same_step_is_computed_once() -> None:
    """Blocks are registered when their step is scheduled (vLLM v1 caches in allocate_slots):
    a request admitted after another in the same step takes the blocks that one computes as a
    prefix hit, and the KV events announce them before the step runs."""
    s = make()
    shared = list(range(300, 308))  # 2 full blocks
    s.add(seq("a", [*shared, 1, 2, 3, 4]))
    s.add(seq("b", [*shared, 5, 6]))
    s.add(seq("c", [9, *shared]))  # same tokens, other position: no hit
    out = s.schedule()
    assert tokens_of(out) == {"a": 12, "b": 2, "c": 9}
    b = out.scheduled[1]
    assert (b.start, b.seq.num_cached_tokens) == (8, 8)
    assert s.kv.block_table("b")[:2] == s.kv.block_table("a")[:2]
    stored = [e.data for e in s.kv.take_events()]
    assert [len(d.blocks) for d in stored] == [3, 2]  # a: 3 full blocks; c: 2 (b: none new)
    s.kv.check_integrity()
    for item in out.scheduled:
        item.seq.token_ids.append(7)
    s.commit(out)
    assert s.kv.take_events() == []  # nothing left to register after the step
    run_all(s)
    assert s.kv.stats().in_use == 0


def test_rollback_unregisters_a_failed_items_blocks_and_names_who_shared_them() -> None:
    s = make()
    shared = list(range(400, 408))
    s.add(seq("a", [*shared, 1, 2, 3, 4]))
    s.add(seq("b", [*shared, 5, 6]))
    s.add(seq("c", [20, 21, 22, 23, 24]))
    out = s.schedule()
    s.kv.take_events()
    a, b, c = out.scheduled
    assert s.rollback_item(a) == ["b"]  # b took a's first 2 blocks as a hit
    assert s.kv.lookup_prefix(a.seq.token_ids) == 0
    (removed,) = [e.data for e in s.kv.take_events()]
    assert len(removed.block_hashes) == 3
    assert s.rollback_item(c) == []
    s.kv.check_integrity()
    for item in (a, b):  # the engine fails both: out of the queues, blocks freed (not cached)
        s.abort(item.seq.request_id, reason="error")
    stats = s.kv.stats()
    assert (stats.cached, stats.in_use) == (0, 2)  # a's and b's blocks freed, not cached; c runs on
    s.kv.check_integrity()
