"""The mock engine (``EngineConfig(engine="mock")``): Dynamo's mocker timing polynomials, real
scheduling / KV blocks / prefix cache / KV events with no model, deterministic tokens, and no
torch import. The model-vs-mock scheduling equivalence lives in tests/model/test_executor_seam.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.config import add_arguments, from_namespace, to_argv
from tandem.engine import mock
from tandem.engine.config import SMOLLM2_135M_CONFIG, EngineConfig
from tandem.engine.engine import LLMEngine, RequestOutput
from tandem.engine.executor import Executor
from tandem.engine.mock import (
    MockExecutor,
    decode_time_ms,
    kv_transfer_delay_s,
    pass_cost,
    prefill_time_ms,
    random_token,
)
from tandem.engine.scheduler import ScheduledSeq, SchedulerOutput, Sequence
from tandem.kvbm.hashing import compute_block_hashes, compute_local_hashes
from tandem.protocol import KvRemoved, KvStored, SamplingParams

BS = 16
SEEDED = SamplingParams(max_tokens=6, seed=1234)


def prompt(n: int, salt: int = 0) -> list[int]:
    """``n`` deterministic valid token ids, none of them eos (2)."""
    return [3 + (i * 7919 + salt * 104729) % 49000 for i in range(n)]


def make(**kw: object) -> LLMEngine:
    cfg: dict = {"engine": "mock", "block_size": BS, "num_blocks": 64, **kw}
    return LLMEngine(EngineConfig(**cfg))


def run(engine: LLMEngine, max_steps: int = 1000) -> dict[str, RequestOutput]:
    """Step until idle; the last output of every request, with all its new tokens."""
    final: dict[str, RequestOutput] = {}
    tokens: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                out.new_token_ids = tokens[out.request_id]
                final[out.request_id] = out
        engine.kv.check_integrity()
    else:
        raise AssertionError("engine made no progress")
    return final


def item(seq: Sequence, start: int, num_tokens: int) -> ScheduledSeq:
    return ScheduledSeq(seq, start, num_tokens, start + num_tokens == seq.num_tokens)


# ---- the perf model -----------------------------------------------------------------------------


def test_prefill_polynomial() -> None:
    assert prefill_time_ms(0) == 0.0
    assert prefill_time_ms(-5) == 0.0
    assert prefill_time_ms(1) == pytest.approx(16.50142 + 1.518344e-2 + 4.209989e-7)
    assert prefill_time_ms(1000) == pytest.approx(32.1058589)  # Dynamo's own test value
    assert prefill_time_ms(8192) == pytest.approx(169.1369184042496)


def test_decode_polynomial() -> None:
    assert decode_time_ms(0.0) == pytest.approx(5.74)
    assert decode_time_ms(0.25) == pytest.approx(17.63375)
    assert decode_time_ms(0.5) == pytest.approx(26.31)  # Dynamo's own test value
    assert decode_time_ms(1.0) == pytest.approx(34.01)
    assert decode_time_ms(3.0) == decode_time_ms(1.0)  # utilisation clamped to 1
    assert decode_time_ms(-1.0) == decode_time_ms(0.0)


def test_decode_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mock, "DECODE_POLY_MS", (0.0, 0.0, 0.0))
    assert decode_time_ms(0.5) == 1.0


def test_kv_transfer_delay() -> None:
    assert kv_transfer_delay_s(128, 1_000_000, 1.0) == pytest.approx(0.128)  # Dynamo's test: 128 ms
    assert kv_transfer_delay_s(128, 1_000_000, 0.0) == 0.0  # simulation off
    assert kv_transfer_delay_s(0, 1_000_000, 1.0) == 0.0


def test_pass_cost_combines_prefill_and_decode() -> None:
    a = Sequence("a", prompt(100, 1), SEEDED, [])  # prefilling
    b = Sequence("b", [*prompt(20, 2), 9], SEEDED, [], num_prompt_tokens=20)  # decoding
    b.num_computed_tokens = 20
    c = Sequence("c", prompt(30, 3), SEEDED, [], prefill_only=True)

    chunk = pass_cost(SchedulerOutput([item(a, 0, 64)]), kv_usage=0.5)
    assert (chunk.prefill_tokens, chunk.num_decode_seqs) == (64, 0)  # a non-final chunk samples nothing
    assert chunk.decode_ms == 0.0
    assert chunk.simulated_s == pytest.approx(prefill_time_ms(64) / 1e3)

    decode = pass_cost(SchedulerOutput([item(b, 20, 1)]), kv_usage=0.5)
    assert (decode.prefill_tokens, decode.prefill_ms) == (0, 0.0)
    assert decode.simulated_s == pytest.approx(26.31 / 1e3)

    # a's final chunk samples its first token as part of the prefill; b decodes.
    mixed = pass_cost(SchedulerOutput([item(b, 20, 1), item(a, 64, 36)]), kv_usage=0.25, speedup_ratio=10.0)
    assert (mixed.prefill_tokens, mixed.num_prefill_seqs, mixed.num_decode_seqs) == (36, 1, 1)
    assert mixed.simulated_s == pytest.approx((prefill_time_ms(36) + 17.63375) / 1e3 / 10.0)

    # A prefill that completes alone adds no decode time (measured on Dynamo 1.6.1's mocker: the
    # same TTFT with decode time scaled away as without).
    final = pass_cost(SchedulerOutput([item(a, 64, 36)]), kv_usage=0.25)
    assert (final.prefill_tokens, final.num_decode_seqs, final.decode_ms) == (36, 0, 0.0)
    assert final.simulated_s == pytest.approx(prefill_time_ms(36) / 1e3)

    # A prefill-only request's first token is part of the prefill pass (Dynamo's prefill worker).
    handoff = pass_cost(SchedulerOutput([item(c, 0, 30)]), kv_usage=0.25)
    assert (handoff.prefill_tokens, handoff.num_decode_seqs, handoff.decode_ms) == (30, 0, 0.0)

    with pytest.raises(ValueError):
        pass_cost(SchedulerOutput([item(a, 0, 4)]), 0.1, speedup_ratio=0.0)


def test_recomputed_output_tokens_are_not_prompt_tokens() -> None:
    s = Sequence("p", [*prompt(20, 4), 5, 6, 7], SEEDED, [], num_prompt_tokens=20)  # preempted
    cost = pass_cost(SchedulerOutput([item(s, 16, 7)]), kv_usage=0.0)
    assert cost.prefill_tokens == 4  # Dynamo counts prompt tokens only (prompt_after - prompt_before)


def test_engine_reports_simulated_step_time() -> None:
    eng = make(speedup_ratio=4.0)
    eng.add_request("r", prompt(40), SEEDED)
    eng.step()  # 40 uncached prompt tokens, samples the first token as part of the prefill
    expected = prefill_time_ms(40) / 1e3 / 4.0
    assert eng.last_step_simulated_s == pytest.approx(expected)
    assert eng.executor.last_step_simulated_s == eng.last_step_simulated_s
    eng.step()  # one decode token
    assert eng.last_step_simulated_s == pytest.approx(decode_time_ms(3 / 64) / 1e3 / 4.0)
    run(eng)
    eng.step()  # nothing to run
    assert eng.last_step_simulated_s == 0.0
    assert eng.last_step_tokens == 0


def test_huge_speedup_means_no_delay() -> None:
    eng = make(speedup_ratio=1e12)
    eng.add_request("r", prompt(40), SEEDED)
    eng.step()
    assert eng.last_step_simulated_s < 1e-12


# ---- the engine around it -----------------------------------------------------------------------


def test_end_to_end_kv_events_and_prefix_cache() -> None:
    eng = make()
    assert isinstance(eng.executor, MockExecutor)
    assert isinstance(eng.executor, Executor)
    assert eng.kv_cache is None
    p = prompt(40, 7)
    eng.add_request("a", p, SamplingParams(max_tokens=5, seed=1))
    out = run(eng)["a"]
    assert out.finish_reason == "length"
    assert len(out.new_token_ids) == 5
    assert all(0 <= t < 49152 and t != 2 for t in out.new_token_ids)
    assert out.prefill_ms > 0  # the simulated time counts

    events = eng.kv.take_events()
    stored = [b for e in events if isinstance(e.data, KvStored) for b in e.data.blocks]
    # Full blocks of prompt + output (45 tokens, the last one never computed: 44 → 2 blocks).
    full = p + out.new_token_ids
    assert [b.block_hash for b in stored] == compute_block_hashes(full, BS)[: len(stored)]
    assert [b.tokens_hash for b in stored] == compute_local_hashes(full, BS)[: len(stored)]
    assert len(stored) == 2
    assert [e.event_id for e in events] == list(range(len(events)))

    eng.add_request("b", p, SamplingParams(max_tokens=3, seed=2))
    again = run(eng)["b"]
    assert again.num_cached_tokens == 32  # both full prompt blocks from the prefix cache
    eng.kv.check_integrity()
    assert eng.kv.stats().in_use == 0


def test_eviction_emits_removed() -> None:
    eng = make(num_blocks=4)
    eng.add_request("a", prompt(48, 1), SamplingParams(max_tokens=1, seed=1))
    run(eng)
    eng.add_request("b", prompt(48, 2), SamplingParams(max_tokens=1, seed=1))
    run(eng)
    kinds = [type(e.data) for e in eng.kv.take_events()]
    assert KvRemoved in kinds
    eng.kv.check_integrity()


def test_preemption_under_pressure_keeps_tokens() -> None:
    prompts = [prompt(30, i) for i in range(4)]
    params = [SamplingParams(max_tokens=20, seed=i) for i in range(4)]
    roomy = make(num_blocks=64).generate(prompts, params)
    tight_engine = make(num_blocks=8, max_num_batched_tokens=32)
    schedule = tight_engine.scheduler.schedule
    preempted: list[str] = []

    def recording() -> SchedulerOutput:
        out = schedule()
        preempted.extend(s.request_id for s in out.preempted)
        return out

    tight_engine.scheduler.schedule = recording  # type: ignore[method-assign]
    tight = tight_engine.generate(prompts, params)
    assert preempted  # 4 requests x 4 blocks do not fit 8 blocks
    assert tight == roomy  # tokens depend on (seed, position) only
    tight_engine.kv.check_integrity()


def test_prefill_only_then_import_matches_aggregated() -> None:
    p = prompt(37, 3)
    sampling = SamplingParams(max_tokens=6, seed=99)
    aggregated = make().generate([p], sampling)[0]

    pre = make()
    pre.add_request("r", p, sampling, prefill_only=True)
    (first,) = pre.step()
    assert first.pinned_block_ids is not None and first.finish_reason is None
    assert len(first.pinned_block_ids) == 3
    assert first.new_token_ids == aggregated[:1]
    pre.kv.check_integrity()
    assert pre.kv.stats().pinned == 3

    dec = make()
    got = dec.import_request("r", p, first.new_token_ids[0], sampling, compute_block_hashes(p, BS))
    assert got is not None
    blocks, reused = got
    assert (len(blocks), reused) == (3, 0)
    dec.copy_blocks([], [])  # nothing to copy for the mock
    dec.activate_imported("r")
    out = run(dec)["r"]
    assert first.new_token_ids + out.new_token_ids == aggregated
    assert out.num_cached_tokens == 37
    dec.kv.check_integrity()

    pre.release_pinned("r")
    pre.kv.check_integrity()
    assert pre.kv.stats().in_use == 0
    assert dec.kv.stats().in_use == 0


def test_same_seed_same_tokens_across_engines_and_batches() -> None:
    prompts = [prompt(5, 1), prompt(37, 2), prompt(20, 3)]
    a = make().generate(prompts, SEEDED)
    b = make(max_num_batched_tokens=8, max_num_seqs=2).generate(prompts, SEEDED)
    alone = [make().generate([p], SEEDED)[0] for p in prompts]
    assert a == b == alone
    assert a[0] != a[1]  # positions differ → tokens differ (overwhelmingly likely)
    other_seed = make().generate(prompts, SamplingParams(max_tokens=6, seed=1235))
    assert other_seed != a


def test_random_tokens_never_eos_and_respect_vocab() -> None:
    tokens = [random_token(7, pos, 10, 2) for pos in range(2000)]
    assert set(tokens) == set(range(10)) - {2}
    assert random_token(7, 5, 10, 2) == random_token(7, 5, 10, 2)


def test_echo_repeats_the_prompt_without_eos() -> None:
    eng = make(mock_tokens="echo")
    p = [10, 11, 2, 12]  # 2 = eos: skipped
    out = eng.generate([p], SamplingParams(max_tokens=7, seed=5))[0]
    assert out == [10, 11, 12, 10, 11, 12, 10]
    assert make(mock_tokens="echo").generate([[2, 2]], SamplingParams(max_tokens=2, seed=5))[0] == [
        random_token(5, 2, 49152, 2),
        random_token(5, 3, 49152, 2),
    ]


def test_echo_same_across_disaggregation() -> None:
    p = prompt(21, 9)
    sampling = SamplingParams(max_tokens=5, seed=3)
    aggregated = make(mock_tokens="echo").generate([p], sampling)[0]
    assert aggregated == p[:5]
    pre = make(mock_tokens="echo")
    pre.add_request("r", p, sampling, prefill_only=True)
    (first,) = pre.step()
    dec = make(mock_tokens="echo")
    assert dec.import_request("r", p, first.new_token_ids[0], sampling, None) is not None
    dec.activate_imported("r")
    assert first.new_token_ids + run(dec)["r"].new_token_ids == aggregated


def test_stop_token_still_stops() -> None:
    p = [10, 11, 12]
    out = make(mock_tokens="echo").generate([p], SamplingParams(max_tokens=9, seed=1, stop_token_ids=[12]))
    assert out == [[10, 11, 12]]


def test_waiting_prefill_tokens_and_kv_usage() -> None:
    eng = make(max_num_batched_tokens=16)
    assert eng.num_waiting_prefill_tokens() == 0
    assert eng.kv_usage() == 0.0
    eng.add_request("a", prompt(40, 1), SEEDED)
    eng.add_request("b", prompt(10, 2), SEEDED)
    assert eng.num_waiting_prefill_tokens() == 50
    eng.step()  # 16 tokens of a's prompt
    assert eng.num_waiting_prefill_tokens() == 34
    assert eng.kv_usage() == pytest.approx(1 / 64)
    run(eng)
    assert eng.num_waiting_prefill_tokens() == 0
    assert eng.kv_usage() == 0.0


def test_copy_blocks_checks_ids() -> None:
    eng = make(num_blocks=8)
    eng.copy_blocks([0, 1], [2, 3])
    with pytest.raises(ValueError):
        eng.copy_blocks([0], [1, 2])
    with pytest.raises(IndexError):
        eng.copy_blocks([8], [0])


# ---- configuration ------------------------------------------------------------------------------


def test_shape_from_model_dir_or_default(tmp_path: Path) -> None:
    eng = make()
    assert eng.model_config == SMOLLM2_135M_CONFIG
    assert eng.block_nbytes == BS * 30 * 2 * 3 * 64 * 2  # bfloat16
    assert eng.max_model_len == 8192

    cfg = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 50,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    small = make(model_dir=tmp_path)
    assert small.model_config.vocab_size == 50
    assert small.block_nbytes == BS * 2 * 2 * 2 * 16 * 2
    out = small.generate([[3, 4, 5]], SamplingParams(max_tokens=200, seed=4))[0]
    assert all(0 <= t < 50 and t != 1 for t in out)
    with pytest.raises(ValueError):
        small.add_request("bad", [60], SEEDED)  # outside the vocabulary


def test_kv_bytes_per_token_sizes_blocks() -> None:
    eng = make(num_blocks=None, kv_cache_gb=1.0, kv_bytes_per_token=1024)
    assert eng.block_nbytes == BS * 1024
    assert eng.kv.num_blocks == 2**30 // (BS * 1024)
    # The model engine always uses the real geometry.
    assert (
        EngineConfig(kv_bytes_per_token=1024, dtype="bfloat16").block_nbytes(SMOLLM2_135M_CONFIG)
        == BS * 23040
    )


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        EngineConfig(engine="mock", speedup_ratio=0.0)
    with pytest.raises(ValueError):
        EngineConfig(engine="mock", speedup_ratio=float("inf"))
    with pytest.raises(ValueError):
        EngineConfig(engine="mock", kv_bytes_per_token=0)
    with pytest.raises(ValueError):
        EngineConfig(engine="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        EngineConfig(mock_tokens="zeros")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LLMEngine(EngineConfig(engine="model"))  # the model engine needs a model_dir
    assert EngineConfig(model_dir=Path("/x")).model_dir == "/x"  # type: ignore[arg-type]


def test_cli_is_derived_from_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, EngineConfig)
    ns = parser.parse_args(
        ["--engine", "mock", "--num-gpu-blocks-override", "100", "--speedup-ratio", "10", "--threads", "2"]
    )
    cfg = from_namespace(EngineConfig, ns)
    assert (cfg.engine, cfg.num_blocks, cfg.speedup_ratio, cfg.num_threads) == ("mock", 100, 10.0, 2)
    argv = to_argv(cfg)
    assert argv[argv.index("--threads") + 1] == "2"  # the worker's historical flag name
    assert from_namespace(EngineConfig, parser.parse_args(argv)) == cfg
    with pytest.raises(SystemExit):
        parser.parse_args(["--mock-tokens", "zeros"])


def test_mock_path_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import tandem.engine.engine\n"
        "from tandem.engine.config import EngineConfig\n"
        "from tandem.engine.engine import LLMEngine\n"
        "from tandem.protocol import SamplingParams\n"
        "eng = LLMEngine(EngineConfig(engine='mock', num_blocks=32))\n"
        "eng.add_request('a', list(range(3, 40)), SamplingParams(max_tokens=3, seed=1), prefill_only=True)\n"
        "assert eng.generate([[5, 6, 7]], SamplingParams(max_tokens=4, seed=1))\n"
        "eng.copy_blocks([0], [1])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
