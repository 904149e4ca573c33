"""Token sampling: greedy, temperature, top-k and top-p, reproducible by ``(seed, position)``.

Every random row draws exactly one uniform number ``u`` from a hash of ``(seed, position)``
(``position`` = index in the sequence of the token being sampled) and picks a token by inverse
CDF over the filtered distribution, with tokens ordered by descending logit (stable, so ties go
to the lower token id). Nothing depends on the batch the row sits in or on the worker that runs
it, so a request sampled with a seed gives the same tokens whether its prefill and its decode ran
on one worker or on two.

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


def validate_sampling(params: SamplingParams) -> None:
    """Raise ``ValueError`` if ``params`` cannot be sampled.

    Rules: ``max_tokens >= 1``; ``temperature`` finite and ``>= 0``; ``0 < top_p <= 1``;
    ``top_k >= 0``; stop token ids non-negative.
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
        ``S`` token ids. Rows with ``temperature == 0`` (or ``top_k == 1``) take the argmax.

    Raises:
        ValueError: if the lengths of ``logits``, ``params`` and ``positions`` disagree.
    """
    import torch

    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(positions):
        raise ValueError(
            f"logits {tuple(logits.shape)}, {len(params)} params and {len(positions)} positions disagree"
        )
    num_rows = logits.shape[0]
    out = torch.argmax(logits, dim=-1).tolist()  # (S,) greedy for every row; random rows overwritten
    rows = [i for i, p in enumerate(params) if p.temperature > 0 and p.top_k != 1]
    if not rows or num_rows == 0:
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


def _sample_random(
    logits: torch.Tensor,
    temperature: list[float],
    top_k: list[int],
    top_p: list[float],
    uniforms: list[float],
) -> list[int]:
    """Inverse-CDF sampling of ``(R, V)`` logits with per-row filters and one uniform per row."""
    import torch

    vocab = logits.shape[1]
    sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True, stable=True)  # (R, V) each
    temp = torch.tensor(temperature, dtype=torch.float64).unsqueeze(1)  # (R, 1)
    scaled = sorted_logits.to(torch.float64) / temp  # (R, V)

    k = torch.tensor([kk if 0 < kk < vocab else vocab for kk in top_k]).unsqueeze(1)  # (R, 1)
    ranks = torch.arange(vocab).unsqueeze(0)  # (1, V)
    scaled = scaled.masked_fill(ranks >= k, float("-inf"))  # top-k: keep the k best ranks
    probs = torch.softmax(scaled, dim=-1)  # (R, V)

    p = torch.tensor(top_p, dtype=torch.float64).unsqueeze(1)  # (R, 1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (R, V) probability of better tokens
    probs = probs.masked_fill(mass_before >= p, 0.0)  # top-p: smallest prefix with mass >= p

    cdf = torch.cumsum(probs, dim=-1)  # (R, V) unnormalised
    target = torch.tensor(uniforms, dtype=torch.float64).unsqueeze(1) * cdf[:, -1:]  # (R, 1)
    idx = torch.searchsorted(cdf, target, right=True)  # (R, 1) first rank whose cdf > target
    last_kept = (probs > 0).sum(dim=-1, keepdim=True) - 1  # (R, 1) kept tokens form a prefix
    idx = torch.minimum(idx, last_kept)
    return torch.gather(sorted_ids, 1, idx).squeeze(1).tolist()  # (R,)
