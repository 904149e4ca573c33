"""Deterministic mode (``EngineConfig(deterministic=True)``, ``--deterministic``): a request's greedy
and seeded tokens are the same, token for token, whether it ran alone, batched with any
co-runners (arriving at any step), with its prompt chunked by a small token budget, after a
prefix-cache hit (including on blocks that were computed by decode steps), recomputed after a
preemption, or prefilled on one engine and decoded on another. Real model, fp32, one thread.

In default mode none of this is promised (the fast kernels' results depend on the batch's
shapes); the last tests check that default mode is the untouched fast path.

Tokens alone are a weak witness (a last-bit difference rarely flips an argmax on these prompts:
default mode passes the token checks here too), so every test also compares the logits of
every sampled token, bit for bit, with those of the request run alone. They are recorded by
wrapping the executor's sampler, keyed by ``(seed, position)`` (every request has its own seed,
greedy ones too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tandem.engine import batch_invariant, runner
from tandem.engine import model as model_mod
from tandem.engine.batch_invariant import probe_batch_invariance
from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.model import LlamaForCausalLM, build_attention_metadata
from tandem.engine.weights import load_model, prepare_model
from tandem.protocol import SamplingParams

pytestmark = pytest.mark.slow

MAX_TOKENS = 8


def prompt(n: int, salt: int = 0) -> list[int]:
    """``n`` deterministic token ids (arbitrary but valid)."""
    return [1 + (i * 7919 + salt * 104729) % 49000 for i in range(n)]


#: 5 to 130 tokens: under one block, several blocks, several 64-key attention chunks
PROMPTS = {"a": prompt(5, 1), "b": prompt(37, 2), "c": prompt(70, 3), "d": prompt(130, 4)}
#: co-runners: never part of a reference, only there to change the batch
FILLERS = {f"f{i}": prompt(11 + 29 * i, 40 + i) for i in range(4)}


def params(kind: str, rid: str) -> SamplingParams:
    """Every request its own seed (greedy ones too: it keys the recorded logits)."""
    seed = 1000 + sum(ord(c) << (5 * i) for i, c in enumerate(rid))
    if kind == "greedy":
        return SamplingParams(temperature=0.0, seed=seed, max_tokens=MAX_TOKENS, ignore_eos=True)
    return SamplingParams(
        temperature=0.9, top_p=0.95, top_k=100, seed=seed, max_tokens=MAX_TOKENS, ignore_eos=True
    )


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return prepare_model()


@pytest.fixture(scope="module")
def model(model_dir: Path) -> LlamaForCausalLM:
    return load_model(model_dir, "float32")


@pytest.fixture
def make_engine(model_dir: Path, model: LlamaForCausalLM) -> Iterator[Callable[..., LLMEngine]]:
    """Factory of deterministic fp32 engines sharing the weights; checks every pool at teardown."""
    engines: list[LLMEngine] = []

    def make(**kw: Any) -> LLMEngine:
        cfg: dict[str, Any] = {
            "dtype": "float32",
            "block_size": 16,
            "num_blocks": 96,
            "num_threads": 1,
            "deterministic": True,
            **kw,
        }
        eng = LLMEngine(EngineConfig(model_dir=str(model_dir), **cfg), model=model)
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.kv.check_integrity()
        assert eng.kv.stats().in_use == 0, eng.kv.stats()
        assert not eng.has_unfinished()


#: logits row of every sampled token: (seed, position) -> (V,) fp32
LOGITS: dict[tuple[int, int], torch.Tensor] = {}


@pytest.fixture(scope="module", autouse=True)
def _record_logits() -> Iterator[None]:
    real = runner.sample_each

    def recording(logits: torch.Tensor, params: Any, positions: Any) -> Any:
        for row, sp, pos in zip(logits, params, positions, strict=True):
            LOGITS[sp.seed, pos] = row.clone()
        return real(logits, params, positions)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "sample_each", recording)
        yield


def logits_of(seed: int, prompt_len: int) -> list[torch.Tensor]:
    """The recorded logits of a request's sampled tokens, in order (positions from the prompt's end)."""
    return [LOGITS[seed, pos] for pos in range(prompt_len, prompt_len + MAX_TOKENS) if (seed, pos) in LOGITS]


Result = tuple[list[int], list[torch.Tensor]]  # a request's new tokens and their logits


def run(
    eng: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]
) -> dict[str, Result]:
    """Add ``arrivals[step]`` before step ``step``, step until idle; every request's new tokens
    and the logits they were sampled from."""
    LOGITS.clear()
    out: dict[str, list[int]] = {}
    step = 0
    while step <= max(arrivals) or eng.has_unfinished():
        for rid, p, sp in arrivals.get(step, []):
            eng.add_request(rid, p, sp)
        for o in eng.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
            assert o.finish_reason != "error", o.error
        step += 1
    seeds = {rid: (sp.seed, len(p)) for items in arrivals.values() for rid, p, sp in items}
    return {rid: (toks, logits_of(*seeds[rid])) for rid, toks in out.items() if seeds[rid][0] is not None}


def same(got: Result, want: Result) -> bool:
    """Same tokens, and every sampled token's logits bit-identical."""
    (tokens, logits), (want_tokens, want_logits) = got, want
    return (
        tokens == want_tokens
        and len(logits) == len(want_logits) == len(tokens)
        and all(torch.equal(a, b) for a, b in zip(logits, want_logits, strict=True))
    )


Ref = dict[tuple[str, str], Result]


@pytest.fixture(scope="module")
def reference(model_dir: Path, model: LlamaForCausalLM, _record_logits: None) -> Ref:
    """Every prompt alone, in one prefill chunk, no prefix cache: greedy and seeded tokens and
    their logits."""
    eng = LLMEngine(
        EngineConfig(
            model_dir=str(model_dir),
            dtype="float32",
            num_blocks=96,
            enable_prefix_caching=False,
            num_threads=1,
            deterministic=True,
        ),
        model=model,
    )
    assert eng.executor.batch_invariance in ("any-rows", "fixed-shapes")  # type: ignore[attr-defined]
    ref = {}
    for kind in ("greedy", "seeded"):
        for rid, p in PROMPTS.items():
            ref[rid, kind] = run(eng, {0: [(rid, p, params(kind, rid))]})[rid]
            assert len(ref[rid, kind][0]) == len(ref[rid, kind][1]) == MAX_TOKENS
    return ref


def check(got: dict[str, Result], reference: Ref, kind: str) -> None:
    """Every reference prompt in ``got`` has the tokens and logits of its run alone."""
    for rid in PROMPTS:
        assert same(got[rid], reference[rid, kind]), (rid, kind, got[rid][0], reference[rid, kind][0])


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_batched_with_different_co_runners(make_engine, reference, kind: str) -> None:
    everything = [(rid, p, params(kind, rid)) for rid, p in (PROMPTS | FILLERS).items()]
    # all at once
    check(run(make_engine(enable_prefix_caching=False), {0: everything}), reference, kind)
    # staggered: each request arrives while others decode, so every step's batch differs
    staggered = {2 * i: [item] for i, item in enumerate(reversed(everything))}
    check(run(make_engine(enable_prefix_caching=False), staggered), reference, kind)


@pytest.mark.parametrize("budget", [16, 23])
def test_chunked_prefill(make_engine, reference, budget: int) -> None:
    """A small token budget cuts prompts into chunks (23: chunks that end mid-block), shared
    with other requests' decodes and chunks."""
    eng = make_engine(max_num_batched_tokens=budget, enable_prefix_caching=False)
    everything = [(rid, p, params("greedy", rid)) for rid, p in (FILLERS | PROMPTS).items()]
    check(run(eng, {0: everything}), reference, "greedy")
    everything = [(rid, p, params("seeded", rid)) for rid, p in PROMPTS.items()]
    eng = make_engine(max_num_batched_tokens=budget, enable_prefix_caching=False)
    check(run(eng, {0: everything}), reference, "seeded")


def test_prefix_cache_hits(make_engine, model_dir, model, reference) -> None:
    eng = make_engine()
    d = PROMPTS["d"]
    run(eng, {0: [("warm", d, params("greedy", "warm"))]})
    # the whole prompt again: 128 of its 130 tokens come from the cache
    got = run(eng, {0: [("d", d, params("greedy", "d")), ("b", PROMPTS["b"], params("greedy", "b"))]})
    assert same(got["d"], reference["d", "greedy"])
    assert same(got["b"], reference["b", "greedy"])
    # a prompt sharing d's first 64 tokens, then diverging; and one that continues d with the
    # tokens decoded for it (its blocks past the prompt were filled by decode steps, one token
    # at a time): both must match a fresh engine that computes them from scratch
    branch = [*d[:64], *prompt(40, 77)]
    continued = [*d, *reference["d", "greedy"][0], *prompt(9, 78)]
    requests = {"branch": branch, "cont": continued}
    got = run(eng, {0: [(rid, p, params("greedy", rid)) for rid, p in requests.items()]})
    fresh = make_engine(enable_prefix_caching=False)
    for rid, p in requests.items():
        assert same(got[rid], run(fresh, {0: [(rid, p, params("greedy", rid))]})[rid]), rid


def test_preemption_recomputes_same_tokens(make_engine) -> None:
    """7 blocks of 16 tokens; 14-, 30- and 45-token prompts hold 6 and each crosses a block
    boundary while decoding: the newest running request is preempted and later recomputed, its
    decoded tokens now as part of a prefill, and its tokens must not change."""
    prompts = {"x": prompt(14, 5), "y": prompt(30, 6), "z": prompt(45, 7)}
    alone = make_engine(enable_prefix_caching=False)
    expected = {rid: run(alone, {0: [(rid, p, params("greedy", rid))]})[rid] for rid, p in prompts.items()}
    eng = make_engine(num_blocks=7)
    preempted: list[str] = []
    schedule = eng.scheduler.schedule

    def spy() -> Any:
        out = schedule()
        preempted.extend(s.request_id for s in out.preempted)
        return out

    eng.scheduler.schedule = spy  # type: ignore[method-assign]
    got = run(eng, {0: [(rid, p, params("greedy", rid)) for rid, p in prompts.items()]})
    assert preempted
    for rid in prompts:
        assert same(got[rid], expected[rid]), rid


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_disaggregated_equals_alone(make_engine, reference, kind: str) -> None:
    """Prefill on one engine (batched with a co-runner), KV copied, decode on another engine that
    is busy with other requests."""
    prefill, decode = make_engine(), make_engine()
    decode.add_request("busy1", FILLERS["f3"], SamplingParams(max_tokens=30, ignore_eos=True, seed=3))
    decode.add_request("busy2", FILLERS["f2"], SamplingParams(max_tokens=40, ignore_eos=True, seed=4))
    decode.step()
    for rid in ("b", "d"):
        p = PROMPTS[rid]
        prefill.add_request(rid, p, params(kind, rid), prefill_only=True)
        prefill.add_request(f"other-{rid}", FILLERS["f1"], params(kind, "other"))
        firsts = {o.request_id: o for o in prefill.step()}
        first = firsts[rid]
        assert first.pinned_block_ids is not None
        got = decode.import_request(rid, p, first.new_token_ids[0], params(kind, rid), None)
        assert got is not None
        table, reused = got
        src = torch.tensor(first.pinned_block_ids[reused:], dtype=torch.int64)
        decode.kv_cache[torch.tensor(table[reused:], dtype=torch.int64)] = prefill.kv_cache[src]
        prefill.release_pinned(rid)
        decode.activate_imported(rid)
        new: list[int] = []
        while decode.scheduler.get(rid) is not None:
            for o in decode.step():
                if o.request_id == rid:
                    new.extend(o.new_token_ids)
        seed = params(kind, rid).seed
        assert seed is not None
        assert same((first.new_token_ids + new, logits_of(seed, len(p))), reference[rid, kind])
        while prefill.has_unfinished():
            prefill.step()
    while decode.has_unfinished():
        decode.step()


def test_fixed_shapes_fallback_is_invariant_too(make_engine, model, reference) -> None:
    """The path used where the BLAS is not row-invariant (fixed-shape GEMM calls): invariant as
    well (on this machine it even gives the same bits as the fast path)."""
    assert not probe_batch_invariance(model, 64, 8, any_rows=False)
    eng = make_engine(enable_prefix_caching=False, max_num_batched_tokens=40)
    alone = make_engine(enable_prefix_caching=False)  # (building an engine probes and sets the flag)
    saved = model.gemm_rows_invariant
    model.gemm_rows_invariant = False
    try:
        everything = [(rid, p, params("greedy", rid)) for rid, p in (PROMPTS | FILLERS).items()]
        got = run(eng, {0: everything[:3], 3: everything[3:]})
        for rid in ("a", "c"):
            assert same(got[rid], run(alone, {0: [(rid, PROMPTS[rid], params("greedy", rid))]})[rid]), rid
    finally:
        model.gemm_rows_invariant = saved


def test_logits_and_kv_bit_identical_across_chunkings(model) -> None:
    """Model level: one prompt's KV and last-token logits, bit for bit, whether it ran as one
    chunk, as chunks of 21, after its first 64 tokens were cached, batched with another
    sequence, ending in a decode step, or on 2 threads (another worker's ``--threads``)."""
    cfg = model.config
    p = PROMPTS["d"]
    n = len(p)

    def once(chunks: list[int], other: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        cache = model_mod.allocate_kv_cache(cfg, 24, 16, torch.float32)
        table, done = list(range(10)), 0
        with torch.inference_mode():
            for i, c in enumerate(chunks):
                tables, computed, new, ids = [table], [done], [c], p[done : done + c]
                if other is not None and i == 0:
                    tables, computed, new, ids = (
                        [list(range(10, 20)), table],
                        [0, done],
                        [len(other), c],
                        other + ids,
                    )
                positions, attn = build_attention_metadata(tables, computed, new, 16)
                hidden = model.forward(torch.tensor(ids), positions, cache, attn, deterministic=True)
                done += c
            logits = model.compute_logits(hidden[-1:], deterministic=True)
        return logits, cache[table[: -(-n // 16)]]

    ref_logits, ref_kv = once([n])
    for chunks, other in (
        ([21] * 6 + [4], None),
        ([64, n - 64], None),
        ([n], prompt(33, 9)),
        ([n - 1, 1], None),
    ):
        logits, kv = once(chunks, other)
        assert torch.equal(logits, ref_logits), chunks
        assert torch.equal(kv, ref_kv), chunks
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not probe_batch_invariance(model, 256, 8, any_rows=model.gemm_rows_invariant)
        logits, kv = once([64, n - 64], prompt(20, 8))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(logits, ref_logits) and torch.equal(kv, ref_kv)


def test_probe_picks_the_path(model_dir, model, monkeypatch) -> None:
    """The executor probes the GEMMs: any-rows where they are row-invariant, fixed shapes where
    only fixed shapes are, and a refusal to start where neither is."""
    monkeypatch.setattr(batch_invariant, "ROW_PAD", 1)  # 1-3 rows take MKL's other kernel
    assert any("rows at offset" in f for f in probe_batch_invariance(model, 32, 8, any_rows=True))
    monkeypatch.undo()
    saved = model.gemm_rows_invariant

    def build() -> LLMEngine:
        cfg = EngineConfig(model_dir=str(model_dir), dtype="float32", num_blocks=8, deterministic=True)
        return LLMEngine(cfg, model=model)

    try:
        verdicts = {True: ["x: 4 rows at offset 0"], False: []}
        monkeypatch.setattr(runner, "probe_batch_invariance", lambda *a, any_rows: verdicts[any_rows])
        assert build().executor.batch_invariance == "fixed-shapes"  # type: ignore[attr-defined]
        assert model.gemm_rows_invariant is False
        verdicts[False] = ["x: 16-row calls depend on the rows' places"]
        with pytest.raises(RuntimeError, match="not batch-invariant"):
            build()
    finally:
        model.gemm_rows_invariant = saved


# ---- default mode is the fast path, unchanged -----------------------------------------------------


def test_default_mode_is_the_fast_path(model_dir, model, monkeypatch) -> None:
    assert EngineConfig(model_dir=str(model_dir)).deterministic is False
    eng = LLMEngine(
        EngineConfig(model_dir=str(model_dir), dtype="float32", num_blocks=32, num_threads=1), model=model
    )
    assert eng.executor.batch_invariance is None  # type: ignore[attr-defined]

    def boom(*_a: Any, **_k: Any) -> None:
        raise AssertionError("default mode took the deterministic path")

    monkeypatch.setattr(LlamaForCausalLM, "_forward_deterministic", boom)
    got = eng.generate([PROMPTS["b"]], params("greedy", "b"))[0]
    # the default path's greedy tokens are those of the model's plain forward, step by step
    cache = model_mod.allocate_kv_cache(model.config, 8, 16, torch.float32)
    tokens = list(PROMPTS["b"])
    with torch.inference_mode():
        for step in range(MAX_TOKENS):
            done = 0 if step == 0 else len(tokens) - 1
            positions, attn = build_attention_metadata([list(range(8))], [done], [len(tokens) - done], 16)
            hidden = model.forward(torch.tensor(tokens[done:]), positions, cache, attn)
            tokens.append(int(model.compute_logits(hidden[-1:]).argmax()))
    assert got == tokens[len(PROMPTS["b"]) :]
