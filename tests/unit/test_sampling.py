"""Sampling: greedy, filters, and randomness as a pure function of (seed, position)."""

from __future__ import annotations

import collections

import pytest
import torch

from tandem.engine.sampling import (
    MIN_TEMPERATURE,
    SamplingError,
    is_greedy,
    sample,
    sample_each,
    uniform,
    validate_sampling,
)
from tandem.protocol import SamplingParams

VOCAB = 1000


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=gen) * 3  # (rows, VOCAB) fp32


def test_greedy_is_argmax() -> None:
    logits = _logits(5)
    params = [SamplingParams(temperature=0.0)] * 5
    assert sample(logits, params, [0, 1, 2, 3, 4]) == logits.argmax(dim=-1).tolist()


def test_top_k_one_equals_greedy() -> None:
    logits = _logits(6)
    params = [SamplingParams(temperature=1.5, top_k=1, seed=s) for s in range(6)]
    assert sample(logits, params, list(range(6))) == logits.argmax(dim=-1).tolist()


def test_same_seed_and_position_same_token_regardless_of_batch() -> None:
    logits = _logits(4)
    params = [SamplingParams(temperature=1.0, seed=7 + i) for i in range(4)]
    positions = [10, 11, 12, 13]
    batched = sample(logits, params, positions)
    alone = [sample(logits[i : i + 1], [params[i]], [positions[i]])[0] for i in range(4)]
    assert batched == alone
    # a greedy neighbour in the batch changes nothing for the random rows
    mixed = sample(
        torch.cat([_logits(1, seed=99), logits]),
        [SamplingParams(temperature=0.0), *params],
        [0, *positions],
    )
    assert mixed[1:] == batched
    assert sample(logits, params, positions) == batched  # repeatable


def test_position_and_seed_change_the_draw() -> None:
    logits = torch.zeros(1, VOCAB)  # uniform distribution: the draw is all randomness
    tokens_by_seed = {sample(logits, [SamplingParams(seed=s)], [5])[0] for s in range(20)}
    tokens_by_pos = {sample(logits, [SamplingParams(seed=3)], [p])[0] for p in range(20)}
    assert len(tokens_by_seed) > 10
    assert len(tokens_by_pos) > 10
    assert uniform(1, 2) == uniform(1, 2)
    assert uniform(1, 2) != uniform(2, 1)
    assert all(0.0 < uniform(s, p) < 1.0 for s in range(50) for p in range(50))


def test_different_seeds_give_different_sequences() -> None:
    logits = _logits(1, seed=3) / 3  # a flattish distribution
    a = [sample(logits, [SamplingParams(seed=1)], [p])[0] for p in range(32)]
    b = [sample(logits, [SamplingParams(seed=2)], [p])[0] for p in range(32)]
    assert a != b


def test_top_k_restricts_to_k_best() -> None:
    logits = _logits(1, seed=4)
    best = set(logits[0].topk(5).indices.tolist())
    params = [SamplingParams(temperature=5.0, top_k=5, seed=s) for s in range(200)]
    drawn = sample(logits.expand(200, VOCAB), params, [0] * 200)
    assert set(drawn) <= best
    assert len(set(drawn)) > 1


def test_top_p_keeps_smallest_prefix_with_mass_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().unsqueeze(0).expand(400, 4)  # (400, 4)
    params = [SamplingParams(temperature=1.0, top_p=0.7, seed=s) for s in range(400)]
    counts = collections.Counter(sample(logits, params, [0] * 400))
    assert set(counts) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert 0.5 < counts[0] / 400 < 0.75  # renormalised: 0.5 / 0.8 = 0.625


def test_temperature_distribution_roughly_matches_softmax() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    n = 3000
    params = [SamplingParams(temperature=1.0, seed=1234)] * n
    counts = collections.Counter(sample(probs.log().unsqueeze(0).expand(n, 3), params, list(range(n))))
    for token, p in enumerate(probs.tolist()):
        assert abs(counts[token] / n - p) < 0.04


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError):
        sample(_logits(2), [SamplingParams()], [0, 1])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=0),
        SamplingParams(temperature=-1.0),
        SamplingParams(temperature=float("nan")),
        SamplingParams(top_p=0.0),
        SamplingParams(top_p=1.5),
        SamplingParams(top_k=-2),
        SamplingParams(stop_token_ids=[-1]),
    ],
)
def test_validate_rejects_bad_params(params: SamplingParams) -> None:
    with pytest.raises(ValueError):
        validate_sampling(params)


def test_validate_accepts_defaults() -> None:
    validate_sampling(SamplingParams())


# ---- request isolation: one row's parameters or logits never fail the others ------------------


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-300, 1e-6, MIN_TEMPERATURE / 2])
def test_tiny_temperature_is_greedy(temperature: float) -> None:
    # 1e-310 is subnormal: logits / 1e-310 overflow to inf and the softmax to NaN (it used to
    # crash the step and every request batched with it).
    logits = _logits(3, seed=5)
    params = [SamplingParams(temperature=temperature, seed=s) for s in range(3)]
    validate_sampling(params[0])
    assert all(is_greedy(p) for p in params)
    assert sample(logits, params, [7, 8, 9]) == logits.argmax(dim=-1).tolist()


def test_temperature_at_the_floor_samples_with_finite_probabilities() -> None:
    logits = _logits(2, seed=6) * 1e6  # huge logits, divided by the smallest allowed temperature
    params = [SamplingParams(temperature=MIN_TEMPERATURE, seed=s) for s in range(2)]
    assert not is_greedy(params[0])
    assert sample(logits, params, [0, 1]) == logits.argmax(dim=-1).tolist()  # all mass on the best


def test_infinite_logits_are_sampled_not_nan() -> None:
    logits = torch.full((2, VOCAB), float("-inf"))
    logits[0, [3, 10]] = float("inf")  # two +inf tokens share the mass
    logits[1, 42] = 0.0  # a single finite token among -inf
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(2)]
    draws = {sample(logits[:1], [SamplingParams(seed=s)], [0])[0] for s in range(50)}
    assert draws == {3, 10}
    assert sample(logits, params, [0, 0])[1] == 42


def test_nan_logits_fail_the_batch_but_sample_each_fails_only_that_row() -> None:
    logits = _logits(4, seed=7)
    logits[2, 17] = float("nan")
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(seed=1),
        SamplingParams(seed=2),
        SamplingParams(seed=3),
    ]
    positions = [5, 6, 7, 8]
    with pytest.raises(SamplingError):
        sample(logits, params, positions)
    results = sample_each(logits, params, positions)
    assert isinstance(results[2], SamplingError)
    for i in (0, 1, 3):
        assert results[i] == sample(logits[i : i + 1], [params[i]], [positions[i]])[0]


def test_all_minus_inf_row_fails_alone() -> None:
    logits = _logits(2, seed=8)
    logits[0] = float("-inf")
    params = [SamplingParams(seed=1), SamplingParams(seed=2)]
    results = sample_each(logits, params, [0, 1])
    assert isinstance(results[0], SamplingError)
    assert results[1] == sample(logits[1:], params[1:], [1])[0]


def test_sample_each_without_failures_equals_sample() -> None:
    logits = _logits(5, seed=9)
    params = [SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=s) for s in range(5)]
    assert sample_each(logits, params, list(range(5))) == sample(logits, params, list(range(5)))
    with pytest.raises(ValueError):
        sample_each(logits, params[:2], [0, 1])  # a caller bug, not a row's failure
