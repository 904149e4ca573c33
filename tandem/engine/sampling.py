"""Token sampling: greedy, temperature, top-k and top-p, reproducible by ``(seed, position)``.

Every random row draws exactly one uniform number ``u`` from a hash of ``(seed, position)``
(``position`` = index in the sequence of the token being sampled) and picks a token by inverse
CDF over the filtered distribution, with tokens ordered by descending logit (stable, so ties go
to the lower token id). Nothing depends on the batch the row sits in or on the worker that runs
it, so a request sampled with a seed gives the same tokens whether its prefill and its decode ran
on one worker or on two.

A row is greedy when ``temperature < MIN_TEMPERATURE`` (vLLM's floor) or ``top_k == 1``: dividing
logits by a subnormal temperature such as ``1e-310`` overflows to inf and the softmax to NaN.
Rows whose logits hold NaN cannot be sampled (:class:`SamplingError`); :func:`sample_each` keeps
such a row's failure to that row, so one request can never fail the rest of its batch.

torch is imported only by :func:`sample` (lazily): :func:`validate_sampling` and :func:`uniform`
serve the mock engine, which must not load torch.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

import xxhash

from tandem.protocol import SamplingParams

if TYPE_CHECKING:
    import torch

_U64 = (1 << 64) - 1
_UNIFORM_HASH_SEED = 0x5EED_7A9D  # domain separator: these hashes are not block hashes

#: Temperatures below this sample greedily (vLLM's ``_SAMPLING_EPS``). Above it, fp32 logits
#: divided by the temperature stay finite in float64 (|logit| <= 3.4e38, / 1e-5 <= 3.4e43).
MIN_TEMPERATURE = 1e-5


class SamplingError(ValueError):
    """A row cannot be sampled (its logits are NaN, or its distribution is not finite)."""


def is_greedy(params: SamplingParams) -> bool:
    """True if ``params`` pick the argmax: ``temperature < MIN_TEMPERATURE`` or ``top_k == 1``."""
    return params.temperature < MIN_TEMPERATURE or params.top_k == 1


def validate_sampling(params: SamplingParams) -> None:
    """Raise ``ValueError`` if ``params`` cannot be sampled.

    Rules: ``max_tokens >= 1``; ``temperature`` finite and ``>= 0`` (below
    :data:`MIN_TEMPERATURE` it is greedy); ``0 < top_p <= 1``; ``top_k >= 0``; stop token ids
    non-negative.
    """
    if params.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0, got {params.temperature}")
    if not (0.0 < params.top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {params.top_k}")
    if any(t < 0 for t in params.stop_token_ids):
        raise ValueError("stop_token_ids must be non-negative token ids")


def uniform(seed: int, position: int) -> float:
    """The uniform number in ``(0, 1)`` used to sample token ``position`` of a request seeded ``seed``.

    A pure function of its arguments (XXH3-64 of both as little-endian u64, top 53 bits).
    """
    h = xxhash.xxh3_64_intdigest(struct.pack("<QQ", seed & _U64, position & _U64), seed=_UNIFORM_HASH_SEED)
    return ((h >> 11) + 0.5) * 2.0**-53


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]) -> list[int]:
    """Pick one token per row.

    Args:
        logits: ``(S, V)`` float32, one row per sequence that samples this step.
        params: ``S`` sampling parameters, one per row (``seed=None`` counts as seed 0: the
            engine gives every request a seed before it gets here).
        positions: ``S`` positions (tokens) of the tokens being sampled.

    Returns:
        ``S`` token ids. Greedy rows (:func:`is_greedy`) take the argmax (ties: the lowest id).
        Each row's token depends only on that row's logits, params and position, never on the
        other rows of the batch.

    Raises:
        ValueError: if the lengths of ``logits``, ``params`` and ``positions`` disagree.
        SamplingError: a row's logits are NaN, or its filtered distribution is not finite
            (the whole call fails: use :func:`sample_each` to fail only that row).
    """
    import torch

    _check_lengths(logits, params, positions)
    num_rows = logits.shape[0]
    if num_rows == 0:
        return []
    nan_rows = torch.isnan(logits).any(dim=-1)  # (S,)
    if bool(nan_rows.any()):
        raise SamplingError(f"logits are NaN in rows {nan_rows.nonzero().flatten().tolist()}")
    out: list[int] = torch.argmax(logits, dim=-1).tolist()  # (S,) greedy; random rows overwritten
    rows = [i for i, p in enumerate(params) if not is_greedy(p)]
    if not rows:
        return out
    picked = _sample_random(
        logits[rows],
        temperature=[params[i].temperature for i in rows],
        top_k=[params[i].top_k for i in rows],
        top_p=[params[i].top_p for i in rows],
        uniforms=[uniform(params[i].seed or 0, positions[i]) for i in rows],
    )
    for i, token in zip(rows, picked, strict=True):
        out[i] = token
    return out


def sample_each(
    logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]
) -> list[int | Exception]:
    """:func:`sample`, with every row's failure kept to that row.

    Samples the batch at once; if that raises, samples row by row (same tokens: a row never
    depends on the others), so a row that cannot be sampled yields its exception and every
    other row its token.

    Args / shapes: as :func:`sample`.

    Returns:
        ``S`` entries: a token id, or the exception sampling that row raised.

    Raises:
        ValueError: if the lengths of ``logits``, ``params`` and ``positions`` disagree.
    """
    _check_lengths(logits, params, positions)
    try:
        return list(sample(logits, params, positions))
    except Exception:
        pass
    results: list[int | Exception] = []
    for i in range(len(params)):
        try:
            results.append(sample(logits[i : i + 1], [params[i]], [positions[i]])[0])
        except Exception as exc:
            results.append(exc)
    return results


def _check_lengths(logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(positions):
        raise ValueError(
            f"logits {tuple(logits.shape)}, {len(params)} params and {len(positions)} positions disagree"
        )


def _sample_random(
    logits: torch.Tensor,
    temperature: list[float],
    top_k: list[int],
    top_p: list[float],
    uniforms: list[float],
) -> list[int]:
    """Inverse-CDF sampling of ``(R, V)`` logits with per-row filters and one uniform per row.

    Temperatures are ``>= MIN_TEMPERATURE`` here. ``+inf`` logits count as the largest finite
    float64 (so such tokens share the mass), ``-inf`` as impossible. Raises
    :class:`SamplingError` if a row's distribution is not finite (every logit ``-inf``).
    """
    import torch

    vocab = logits.shape[1]
    sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True, stable=True)  # (R, V) each
    temp = torch.tensor(temperature, dtype=torch.float64).unsqueeze(1)  # (R, 1)
    scaled = sorted_logits.to(torch.float64) / temp  # (R, V)
    scaled = scaled.clamp(max=torch.finfo(torch.float64).max)  # +inf -> finite; -inf stays

    k = torch.tensor([kk if 0 < kk < vocab else vocab for kk in top_k]).unsqueeze(1)  # (R, 1)
    ranks = torch.arange(vocab).unsqueeze(0)  # (1, V)
    scaled = scaled.masked_fill(ranks >= k, float("-inf"))  # top-k: keep the k best ranks
    probs = torch.softmax(scaled, dim=-1)  # (R, V)
    bad = ~torch.isfinite(probs).all(dim=-1)  # (R,)
    if bool(bad.any()):
        raise SamplingError(f"no finite distribution in rows {bad.nonzero().flatten().tolist()}")

    p = torch.tensor(top_p, dtype=torch.float64).unsqueeze(1)  # (R, 1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (R, V) probability of better tokens
    probs = probs.masked_fill(mass_before >= p, 0.0)  # top-p: smallest prefix with mass >= p

    cdf = torch.cumsum(probs, dim=-1)  # (R, V) unnormalised
    target = torch.tensor(uniforms, dtype=torch.float64).unsqueeze(1) * cdf[:, -1:]  # (R, 1)
    idx = torch.searchsorted(cdf, target, right=True)  # (R, 1) first rank whose cdf > target
    last_kept = (probs > 0).sum(dim=-1, keepdim=True) - 1  # (R, 1) kept tokens form a prefix
    idx = torch.minimum(idx, last_kept).clamp(min=0)
    return torch.gather(sorted_ids, 1, idx).squeeze(1).tolist()  # (R,)
