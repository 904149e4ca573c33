"""LLMEngine with the real model (fp32): batching, chunking, prefix cache and the disaggregation
path (prefill_only → KV copy → import/activate) all give the same tokens as a plain run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine, RequestOutput
from tandem.engine.model import LlamaForCausalLM
from tandem.engine.weights import load_model, prepare_model
from tandem.protocol import SamplingParams

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234, max_tokens=6, ignore_eos=True)


def prompt(n: int, salt: int = 0) -> list[int]:
    """``n`` deterministic token ids (arbitrary but valid)."""
    return [1 + (i * 7919 + salt * 104729) % 49000 for i in range(n)]


PROMPTS = [prompt(5, 1), prompt(37, 2), prompt(20, 3)]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return prepare_model()


@pytest.fixture(scope="module")
def model(model_dir: Path) -> LlamaForCausalLM:
    return load_model(model_dir, "float32")


@pytest.fixture
def make_engine(model_dir: Path, model: LlamaForCausalLM) -> Iterator:
    """Factory of fp32 engines sharing the loaded weights; checks every pool at teardown.

    One torch thread: on a shared 2-core machine two OpenMP threads stall each other (measured
    ~25x slower steps under load), and the tests compare tokens, not speed.
    """
    engines: list[LLMEngine] = []

    def make(**kw: object) -> LLMEngine:
        cfg: dict = {"dtype": "float32", "block_size": 16, "num_blocks": 64, "num_threads": 1, **kw}
        eng = LLMEngine(EngineConfig(model_dir=str(model_dir), **cfg), model=model)
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.kv.check_integrity()
        assert eng.kv.stats().in_use == 0, eng.kv.stats()
        assert not eng.has_unfinished()


@pytest.fixture(scope="module")
def reference(model_dir: Path, model: LlamaForCausalLM) -> dict[tuple[int, str], list[int]]:
    """Tokens of each prompt run alone, with no prefix cache, greedy and seeded."""
    eng = LLMEngine(
        EngineConfig(
            model_dir=str(model_dir),
            dtype="float32",
            num_blocks=64,
            enable_prefix_caching=False,
            num_threads=1,
        ),
        model=model,
    )
    out = {}
    for i, p in enumerate(PROMPTS):
        out[i, "greedy"] = eng.generate([p], GREEDY)[0]
        out[i, "seeded"] = eng.generate([p], SEEDED)[0]
    return out


def test_batched_equals_one_at_a_time(make_engine, reference) -> None:
    eng = make_engine()
    got = eng.generate(PROMPTS, GREEDY)
    assert got == [reference[i, "greedy"] for i in range(len(PROMPTS))]
    assert all(len(t) == GREEDY.max_tokens for t in got)
    got = eng.generate(PROMPTS, SEEDED)
    assert got == [reference[i, "seeded"] for i in range(len(PROMPTS))]


def test_chunked_prefill_same_tokens(make_engine, reference) -> None:
    eng = make_engine(max_num_batched_tokens=16, enable_prefix_caching=False)
    assert eng.generate(PROMPTS, GREEDY) == [reference[i, "greedy"] for i in range(len(PROMPTS))]


def test_prefix_cache_hit_same_tokens(make_engine, reference) -> None:
    eng = make_engine()
    long = PROMPTS[1]  # 37 tokens: 2 full blocks
    eng.add_request("a", long, GREEDY)
    while eng.has_unfinished():
        eng.step()
    eng.add_request("b", long, GREEDY)
    outs = drain(eng)
    assert outs["b"][0].num_cached_tokens == 32
    assert tokens(outs["b"]) == reference[1, "greedy"]
    # a prompt sharing only the first block, then diverging
    other = [*long[:16], *prompt(10, 9)]
    eng.add_request("c", other, GREEDY)
    outs = drain(eng)
    assert outs["c"][0].num_cached_tokens == 16
    plain = make_engine(enable_prefix_caching=False)
    assert tokens(outs["c"]) == plain.generate([other], GREEDY)[0]


def test_prefix_computed_in_the_same_step_same_tokens(make_engine) -> None:
    """Two prompts sharing 2 full blocks arrive together: the second takes the blocks the first
    computes in the same forward pass as a prefix hit (registered when scheduled; every layer
    writes the batch's K/V before attention reads the cache) and computes only its own tail,
    with the same tokens as each run alone."""
    eng = make_engine()
    long = PROMPTS[1]  # 37 tokens: 2 full blocks
    other = [*long[:32], *prompt(9, 11)]
    eng.add_request("a", long, GREEDY)
    eng.add_request("b", other, GREEDY)
    outs = drain(eng)
    assert outs["a"][0].num_cached_tokens == 0
    assert outs["b"][0].num_cached_tokens == 32
    plain = make_engine(enable_prefix_caching=False)
    assert [tokens(outs["a"]), tokens(outs["b"])] == plain.generate([long, other], GREEDY)


def test_preemption_recomputes_same_tokens(make_engine) -> None:
    # 4 blocks of 16 tokens. Both prompts fit at once (1 + 2 blocks) but each crosses a block
    # boundary while decoding (14 -> 19 and 30 -> 35 tokens): the newer one gets preempted,
    # recomputed later, and its tokens must not change.
    prompts = [prompt(14, 5), prompt(30, 6)]
    expected = make_engine(enable_prefix_caching=False).generate(prompts, GREEDY)
    eng = make_engine(num_blocks=4)
    preempted: list[str] = []
    schedule = eng.scheduler.schedule

    def spy():  # record who gets preempted
        out = schedule()
        preempted.extend(s.request_id for s in out.preempted)
        return out

    eng.scheduler.schedule = spy  # type: ignore[method-assign]
    assert eng.generate(prompts, GREEDY) == expected
    assert preempted


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_disaggregated_equals_single_engine(make_engine, reference, kind: str) -> None:
    params = GREEDY if kind == "greedy" else SEEDED
    prefill, decode = make_engine(), make_engine()
    for i in (1, 2):
        for attempt in range(2):  # the second time, decode already caches the prompt's blocks
            rid = f"req-{i}-{attempt}"
            prefill.add_request(rid, PROMPTS[i], params, prefill_only=True)
            (first,) = prefill.step()
            assert first.pinned_block_ids is not None and first.finish_reason is None
            assert first.prefill_ms > 0
            assert len(first.pinned_block_ids) == -(-len(PROMPTS[i]) // 16)
            assert not prefill.has_unfinished()

            got = decode.import_request(rid, PROMPTS[i], first.new_token_ids[0], params, None)
            assert got is not None
            table, reused = got
            assert reused == (0 if attempt == 0 else len(PROMPTS[i]) // 16)
            src = torch.tensor(first.pinned_block_ids[reused:], dtype=torch.int64)
            dst = torch.tensor(table[reused:], dtype=torch.int64)
            decode.kv_cache[dst] = prefill.kv_cache[src]  # what the NIXL READ does
            prefill.release_pinned(rid)
            decode.activate_imported(rid)
            outs = drain(decode)[rid]
            assert first.new_token_ids + tokens(outs) == reference[i, kind]
            assert outs[-1].finish_reason == "length"
            assert outs[0].num_cached_tokens == len(PROMPTS[i])
    # the imported prompts were committed: their blocks are advertised as stored
    assert decode.kv.take_events()


def test_prefill_only_that_finishes_pins_nothing(make_engine) -> None:
    eng = make_engine()
    eng.add_request("p", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=1), prefill_only=True)
    (out,) = eng.step()
    assert out.finish_reason == "length" and out.pinned_block_ids is None
    assert eng.kv.stats().pinned == 0


def test_abort_and_validation(make_engine) -> None:
    eng = make_engine()
    eng.add_request("x", PROMPTS[1], GREEDY)
    eng.step()
    assert eng.abort("x")
    assert not eng.abort("x")
    (out,) = eng.step()
    assert out.finish_reason == "abort"
    assert eng.import_request("y", PROMPTS[1], 5, GREEDY, None) is not None
    assert eng.abort("y")
    eng.step()
    for bad in (
        lambda: eng.add_request("e", [], GREEDY),
        lambda: eng.add_request("e", [10**9], GREEDY),
        lambda: eng.add_request("e", [1, 2], SamplingParams(top_p=0.0)),
        lambda: eng.add_request("e", prompt(16), GREEDY, block_hashes=[123]),
        lambda: eng.add_request("e", prompt(2000), GREEDY),  # more than the pool
    ):
        with pytest.raises(ValueError):
            bad()


def test_stop_token_finishes(make_engine, reference) -> None:
    eng = make_engine()
    stop_at = reference[0, "greedy"][2]
    params = SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[stop_at], ignore_eos=True)
    (got,) = eng.generate([PROMPTS[0]], params)
    assert got == reference[0, "greedy"][: reference[0, "greedy"].index(stop_at) + 1]


def test_subnormal_temperature_is_greedy_and_isolated(make_engine, reference) -> None:
    """temperature=1e-310 passes validation; it used to overflow the softmax to NaN, crash the
    step and abort every request batched with it. Now it is greedy (below the 1e-5 floor)."""
    eng = make_engine()
    tiny = SamplingParams(temperature=1e-310, max_tokens=6, ignore_eos=True, seed=5)
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"g{i}", p, GREEDY)
    eng.add_request("tiny", PROMPTS[1], tiny)
    outs = drain(eng)
    assert tokens(outs["tiny"]) == reference[1, "greedy"]
    for i in range(len(PROMPTS)):
        assert tokens(outs[f"g{i}"]) == reference[i, "greedy"]
    assert all(o[-1].finish_reason == "length" for o in outs.values())


def test_sampling_failure_fails_only_that_request(make_engine, reference, monkeypatch) -> None:
    """The real executor: a request whose sampling raises (here: seed 666 is poisoned) finishes
    with an error, its blocks freed; the others in its batch get exactly their tokens."""
    from tandem.engine import sampling

    real_sample = sampling.sample

    def poisoned(logits, params, positions):
        if any(p.seed == 666 for p in params):
            raise FloatingPointError("poisoned")
        return real_sample(logits, params, positions)

    monkeypatch.setattr(sampling, "sample", poisoned)
    eng = make_engine()
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"s{i}", p, SEEDED)
    eng.add_request("bad", PROMPTS[2], SamplingParams(temperature=0.5, max_tokens=6, seed=666))
    outs = drain(eng)
    assert outs["bad"][-1].finish_reason == "error"
    assert outs["bad"][-1].error == "FloatingPointError: poisoned"
    assert tokens(outs["bad"]) == []
    for i in range(len(PROMPTS)):
        assert tokens(outs[f"s{i}"]) == reference[i, "seeded"]
    # make_engine's teardown checks the pool: integrity, nothing in use


def drain(eng: LLMEngine) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]
