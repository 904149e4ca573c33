"""Batch-invariant ("deterministic") kernels for :mod:`tandem.engine.model`.

Batch invariance here: in ``forward(..., deterministic=True)`` a token's K/V, hidden state and
logits are a function of its own token, its position and its sequence's cached K/V only, bit for
bit; never of the other rows in the pass (co-runners, padding to the batch's longest context),
of how its prompt was cut into prefill chunks, or of whether its prefix came from the cache. That
is what makes a request's greedy and seeded tokens the same whatever the batch, the chunking, the
prefix-cache hits, a recompute after preemption, or disaggregation (prefill on one worker, decode
on another).

This module holds the parts that are not a model module's own computation: the row and tile
sizes (:data:`ROW_PAD`, :data:`ROW_TILE`, :data:`QUERY_ROWS`, :data:`QUERY_TILE_MAX`,
:data:`KEY_CHUNK`, :func:`query_tile_unit`), the paged attention in fixed key chunks combined in
a fixed tree (:func:`plan_deterministic` once per pass, :func:`attend_deterministic` per
layer) and the BLAS start-up probe that picks the row-padded or the fixed-shape path
(:func:`probe_batch_invariance`). The row padding of the GEMMs and the exact SiLU are done on
the modules' own weights by the ``forward_deterministic`` methods and ``compute_logits`` of
:mod:`tandem.engine.model`, with these sizes. :mod:`tandem.engine.model` imports this module;
this module names the model's classes only for type checking.

Shapes as in :mod:`tandem.engine.model` (T tokens, H / Hkv query / KV heads, D head_dim, NB KV
blocks, B block size); the attention's own (U, KC, NT, TQ, NP, M, NC) are defined on
:class:`DetPlan` and :class:`_TileGroup`.

Deterministic (batch-invariant) mode, ``forward(..., deterministic=True)``
-------------------------------------------------------------------------
The default path is fast but not batch-invariant. Measured here (torch 2.13 CPU, MKL, AVX2,
fp32): row ``i`` of ``x[:m] @ W.T`` differs in the last bits from the full product's for
``m <= 3`` (MKL's small-M kernel) and, with 2 threads, for ``m`` in 5-7 and 9-11 (MKL splits
the rows between threads, leaving pieces under 4 rows); SDPA's reduction order over keys depends
on the context length, on the padding to the batch's longest context and on the path (a whole
prompt attends over its own K/V, a chunk or a decode over the cache); ``F.silu``/``sigmoid``
compute a tensor's scalar tail differently from its vectorised body (``exp``, ``cos``, ``sin``
do not). RMSNorm (a per-row reduction of fixed length), RoPE, the embedding and the KV writes
were invariant. So a token's logits depended on its co-runners, its prefill chunking and
prefix-cache hits (K/V differed by up to ~2e-5, logits by ~3e-5). The deterministic path:

* GEMMs over tokens (projections, MLP, ``lm_head``): MKL gives a row the same bits for every
  row count >= 4 except those the threads split into pieces under 4 rows, and a multiple of 4
  never is (checked 1..1024 rows, 1, 2 and 4 threads, every weight shape of the model). So
  each GEMM runs once over the pass's rows zero-padded to a multiple of :data:`ROW_PAD`. This
  is a property of the BLAS, so the executor checks it at start on the model's own weights
  and thread count (:func:`probe_batch_invariance`); where it fails, every GEMM call has one
  fixed shape instead (:data:`ROW_TILE` rows, and attention tiles of one unit): invariant by
  construction (same shape, same kernel, a row's bits independent of its place in the tile,
  probed too), 3.5-5x slower to prefill. SiLU is ``g / (1 + exp(-g))``.
* attention (:func:`attend_deterministic`) reads K/V only from the paged cache (a whole
  prompt too), in fixed key chunks (``c * KC .. c * KC + KC - 1``, :data:`KEY_CHUNK`), for
  query tiles of one sequence (a multiple of :func:`query_tile_unit` tokens, so its GEMMs have
  >= 4 rows): per (tile, chunk) pair batched GEMMs ``q·k`` and ``e·v``, a row max (exact in any
  order), ``exp``, a fixed-length row sum, and a sum over the chunks in a fixed binary tree
  zero-padded to a power of two (``x + 0 == x``: the longest context in the batch changes
  nothing). No reduction is split by anything the batch decides. Attention runs in float32
  whatever the model dtype.

So a token's K/V, hidden state and logits are bit-identical whether it was computed alone,
batched with any co-runners, in one prefill chunk or several, after a prefix-cache hit, by
recompute after preemption, or as a decode step; on another worker too, given the same dtype,
block size and kernels (1 and 2 threads give the same bits here). bfloat16 takes the same
path (GEMMs in bf16, attention in fp32): here (emulated bf16) it passes the probe and a prompt's
logits and K/V were bit-identical across chunkings and batches; float16 and CUDA are untested.
Cost, fp32, one thread, this machine (``scripts/bench_engine.py --deterministic``): decode about
2x slower at batch 1 (a 1-row GEMM is computed as 4 rows), 1.1-1.2x at batches of 8-32 with
short contexts, faster than the default path with long contexts (its padded SDPA); prefill 1.3-1.4x.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from tandem.engine.model import AttentionMetadata, DecoderLayer, LlamaForCausalLM

__all__ = [
    "KEY_CHUNK",
    "QUERY_ROWS",
    "QUERY_TILE_MAX",
    "ROW_PAD",
    "ROW_TILE",
    "DetPlan",
    "attend_deterministic",
    "plan_deterministic",
    "probe_batch_invariance",
    "query_tile_unit",
]

#: Deterministic mode on a row-invariant BLAS (:attr:`LlamaForCausalLM.gemm_rows_invariant`):
#: one GEMM call over the pass's rows padded to a multiple of this many (tokens).
ROW_PAD = 4
#: Deterministic mode otherwise: GEMM calls of exactly this many rows (tokens).
ROW_TILE = 16
#: Fewest rows of an attention GEMM (query tokens of a tile x query heads per KV head): below 4
#: rows MKL computes a row with another kernel. A query tile holds a multiple of
#: ``ceil(QUERY_ROWS / rep)`` tokens (:func:`query_tile_unit`): up to :data:`QUERY_TILE_MAX`
#: tokens on a row-invariant BLAS, else exactly one unit.
QUERY_ROWS = 4
QUERY_TILE_MAX = 64
#: Keys per attention chunk (tokens), rounded up to a multiple of the block size.
KEY_CHUNK = 64


def query_tile_unit(n_rep: int) -> int:
    """Tokens per attention query-tile unit: ``ceil(QUERY_ROWS / n_rep)`` (``n_rep`` = query
    heads per KV head), so a tile's GEMMs have at least :data:`QUERY_ROWS` rows."""
    return -(-QUERY_ROWS // n_rep)


@dataclass
class _TileGroup:
    """The query tiles of one size TQ in a pass and their (tile, key chunk) pairs.

    NT = tiles, R = real queries in them, NP = pairs, M = TQ * (H / Hkv) query rows per tile and
    KV head, KC = keys per chunk, NC = key chunks per tile rounded up to a power of two.
    """

    tile_rows: torch.Tensor  # (NT, TQ) int64: batch row of each tile slot (padding: the tile's first row)
    slots: torch.Tensor  # (R,) int64: flat tile slot (tile * TQ + i) of each real query
    rows: torch.Tensor  # (R,) int64: the batch row of that query
    pair_tile: torch.Tensor  # (NP,) int64: the pair's tile
    pair_chunk: torch.Tensor  # (NP,) int64: the pair's chunk index c in its sequence (keys c*KC ..)
    pair_uniq: (
        torch.Tensor | None
    )  # (NP,) int64: the pair's chunk (a row of chunk_blocks); None: all, in order
    mask: torch.Tensor  # (NP, M, KC) bool: key position <= query position (True = attend)
    num_chunks: int  # NC


@dataclass
class DetPlan:
    """Layout of one pass's deterministic attention (built once per forward by
    :func:`plan_deterministic`, used by every layer). U = key chunks of all sequences (each
    sequence's chunks ``0 .. (seq_len - 1) // KC``), BC = blocks per chunk (KC / B)."""

    chunk_blocks: torch.Tensor  # (U * BC,) int64: block ids of the key chunks, in order (0 past a table)
    num_chunks: int  # U
    chunk_size: int  # KC (tokens)
    groups: list[_TileGroup]


@dataclass
class _GroupLists:
    tile_rows: list[list[int]] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    pair_tile: list[int] = field(default_factory=list)
    pair_chunk: list[int] = field(default_factory=list)
    pair_uniq: list[int] = field(default_factory=list)


def plan_deterministic(
    positions: torch.Tensor, attn: AttentionMetadata, block_size: int, n_rep: int, max_tile: int
) -> DetPlan:
    """Cut every sequence's new tokens into query tiles of up to ``max_tile`` tokens (each a
    multiple of :func:`query_tile_unit`, the last one padded) and pair each tile with the key
    chunks up to its last query (see :func:`attend_deterministic`); ``n_rep`` = query heads per
    KV head."""
    query_lens, seq_lens = attn.host_lens()
    device = positions.device
    unit = query_tile_unit(n_rep)
    max_tile = max(unit, max_tile // unit * unit)
    bc = max(1, -(-KEY_CHUNK // block_size))  # blocks per chunk
    kc = bc * block_size
    chunk_seq: list[int] = []
    chunk_idx: list[int] = []
    by_size: dict[int, _GroupLists] = {}
    start = 0
    for s, (q, total) in enumerate(zip(query_lens, seq_lens, strict=True)):
        done = total - q  # cached tokens: the chunk starts at position ``done``
        base = len(chunk_seq)
        for c in range((total - 1) // kc + 1):
            chunk_seq.append(s)
            chunk_idx.append(c)
        for first in range(0, q, max_tile):
            n = min(max_tile, q - first)
            tq = -(-n // unit) * unit
            g = by_size.setdefault(tq, _GroupLists())
            tile = len(g.tile_rows)
            g.tile_rows.append([start + first + (i if i < n else 0) for i in range(tq)])
            g.slots.extend(tile * tq + i for i in range(n))
            g.rows.extend(start + first + i for i in range(n))
            for c in range((done + first + n - 1) // kc + 1):  # up to the tile's last query
                g.pair_tile.append(tile)
                g.pair_chunk.append(c)
                g.pair_uniq.append(base + c)
        start += q

    def long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    tables = F.pad(attn.block_tables.long(), (0, bc))  # (S, max_blocks + BC), 0-padded
    cols = long(chunk_idx)[:, None] * bc + torch.arange(bc, device=device)  # (U, BC)
    chunk_blocks = tables[long(chunk_seq)[:, None], cols]  # (U, BC)
    key_offsets = torch.arange(kc, device=device)  # (KC,)
    groups = []
    for tq, g in sorted(by_size.items()):
        rows = long([r for tile in g.tile_rows for r in tile]).view(-1, tq)  # (NT, TQ)
        p_tile, p_chunk = long(g.pair_tile), long(g.pair_chunk)  # (NP,) each
        q_pos = positions[rows].index_select(0, p_tile)  # (NP, TQ)
        mask = p_chunk[:, None, None] * kc + key_offsets <= q_pos[:, :, None]  # (NP, TQ, KC)
        in_order = len(by_size) == 1 and g.pair_uniq == list(range(len(chunk_seq)))
        groups.append(
            _TileGroup(
                tile_rows=rows,
                slots=long(g.slots),
                rows=long(g.rows),
                pair_tile=p_tile,
                pair_chunk=p_chunk,
                pair_uniq=None if in_order else long(g.pair_uniq),
                mask=mask.repeat_interleave(n_rep, dim=1),  # (NP, M, KC): rows (TQ, n_rep)
                num_chunks=1 << max(g.pair_chunk).bit_length(),  # power of two >= any tile's chunks
            )
        )
    return DetPlan(
        chunk_blocks=chunk_blocks.view(-1), num_chunks=len(chunk_seq), chunk_size=kc, groups=groups
    )


def attend_deterministic(q: torch.Tensor, layer_cache: torch.Tensor, plan: DetPlan) -> torch.Tensor:
    """Causal GQA attention of ``q (T, H, D)`` over the paged cache ``(NB, 2, B, Hkv, D)``,
    batch-invariant: a query's output depends only on its own vector, its position and the
    cache's K/V up to that position.

    For every (query tile, key chunk) pair and KV head, in float32: ``s = (q * D**-0.5) @ k.T``
    and ``e @ v`` are batched GEMMs (``(M, D) @ (D, KC)``, ``(M, KC) @ (KC, D)``, M rows per
    tile; the row count never changes a row's bits, :func:`probe_batch_invariance`); masked keys
    get ``e = exp(-inf - m) = 0``; the row max ``m`` is exact in any order; ``e.sum`` over the
    chunk's KC keys gives the softmax denominator; the per-chunk sums are added in a fixed
    binary tree over chunk indices zero-padded to ``NC`` (``x + 0 == x``: how many chunks other
    tiles have changes nothing). Returns ``(T, H, D)`` in ``q``'s dtype.
    """
    t, h, d = q.shape
    hkv = layer_cache.shape[3]
    rep, kc, nu = h // hkv, plan.chunk_size, plan.num_chunks
    qf = q.float() * d**-0.5  # (T, H, D)
    # index_select: the same bytes as indexing, half the time on CPU
    k = layer_cache[:, 0].index_select(0, plan.chunk_blocks).float().view(nu, kc, hkv, d)  # (U, KC, Hkv, D)
    v = layer_cache[:, 1].index_select(0, plan.chunk_blocks).float().view(nu, kc, hkv, d)  # (U, KC, Hkv, D)
    out = torch.empty(t, h, d, device=q.device)  # (T, H, D) fp32
    for g in plan.groups:
        nt, tq = g.tile_rows.shape
        m = tq * rep
        qt = qf.index_select(0, g.tile_rows.view(-1)).view(nt, tq, hkv, rep, d)  # (NT, TQ, Hkv, rep, D)
        qt = qt.transpose(1, 2).reshape(nt, hkv, m, d)  # (NT, Hkv, M, D)
        qp = qt.index_select(0, g.pair_tile)  # (NP, Hkv, M, D)
        kp, vp = k, v
        if g.pair_uniq is not None:  # chunks shared by several tiles: one copy per pair
            kp, vp = k.index_select(0, g.pair_uniq), v.index_select(0, g.pair_uniq)  # (NP, KC, Hkv, D)
        # one batched GEMM per KV head on strided views (no transposing copies)
        s = torch.stack([torch.bmm(qp[:, j], kp[:, :, j].transpose(1, 2)) for j in range(hkv)], dim=1)
        s = s.masked_fill(~g.mask[:, None], float("-inf"))  # (NP, Hkv, M, KC)
        chunk_max = torch.full((nt, g.num_chunks, hkv, m), float("-inf"), device=q.device)
        chunk_max[g.pair_tile, g.pair_chunk] = s.amax(dim=-1)  # (NT, NC, Hkv, M)
        row_max = chunk_max.amax(dim=1)  # (NT, Hkv, M)
        e = torch.exp(s - row_max.index_select(0, g.pair_tile).unsqueeze(-1))  # (NP, Hkv, M, KC)
        pv = torch.stack([torch.bmm(e[:, j], vp[:, :, j]) for j in range(hkv)], dim=1)  # (NP, Hkv, M, D)

        num = torch.zeros(nt, g.num_chunks, hkv, m, d, device=q.device)  # (NT, NC, Hkv, M, D)
        den = torch.zeros(nt, g.num_chunks, hkv, m, 1, device=q.device)  # (NT, NC, Hkv, M, 1)
        num[g.pair_tile, g.pair_chunk] = pv
        den[g.pair_tile, g.pair_chunk] = e.sum(dim=-1, keepdim=True)
        while num.shape[1] > 1:  # fixed binary tree over chunk indices
            num = num[:, 0::2] + num[:, 1::2]
            den = den[:, 0::2] + den[:, 1::2]
        o = num[:, 0] / den[:, 0]  # (NT, Hkv, M, D)
        o = o.view(nt, hkv, tq, rep, d).transpose(1, 2).reshape(nt * tq, h, d)  # (NT*TQ, H, D)
        out.index_copy_(0, g.rows, o.index_select(0, g.slots))
    return out.to(q.dtype)  # (T, H, D)


def probe_batch_invariance(
    model: LlamaForCausalLM, max_rows: int, max_logit_rows: int, *, any_rows: bool
) -> list[str]:
    """Check, on this machine and at the current torch thread count, what deterministic mode
    assumes of the BLAS for the model's projection, MLP and ``lm_head`` weights (model dtype)
    and the float32 attention GEMMs (strided per-head operands, as used). Random inputs; about
    a second on one thread.

    ``any_rows=True`` (the fast path, :attr:`LlamaForCausalLM.gemm_rows_invariant`): a row of a
    GEMM gets the same bits for every row count that is a multiple of :data:`ROW_PAD` (GEMM rows)
    or of an attention tile's unit rows. Measured with MKL on AVX2 at 1, 2 and 4 threads: true
    for any count >= 4 except 5-7 and 9-11 rows with 2 threads (not in batched GEMMs); below 4
    rows MKL takes another kernel. ``any_rows=False`` (the fallback): in calls of one fixed
    shape (:data:`ROW_TILE` rows, one-unit attention tiles) a row's bits do not depend on where
    it sits or on the other rows.

    Args:
        max_rows: largest GEMM row count to check for the layers (tokens; the engine's
            ``max_num_batched_tokens``; capped at 1024).
        max_logit_rows: largest row count for ``lm_head`` (the engine's ``max_num_seqs``;
            capped at 256).
        any_rows: which property to check (above).

    Returns:
        What differed; empty if the property holds.
    """
    gen = torch.Generator().manual_seed(0x5EED)  # CPU draws, moved to the model's device
    device = model.model.embed_tokens.weight.device
    layer = cast("DecoderLayer", model.model.layers[0])
    attn, mlp = layer.self_attn, layer.mlp
    lm_head = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    cfg = model.config
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    unit_rows = query_tile_unit(rep) * rep
    d, kc = cfg.head_dim, KEY_CHUNK
    # 8 key chunks laid out as the cache gives them: (8, KC, Hkv=2, D), one head's strided view
    keys = torch.randn(8, kc, 2, d, generator=gen).to(device)[:, :, 1]  # (8, KC, D)
    values = torch.randn(8, kc, 2, d, generator=gen).to(device)[:, :, 1]  # (8, KC, D)
    failures: list[str] = []

    def batched(other: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        # (rows, C) -> (rows, 8 * N): the rows against 8 matrices, as the attention's bmm
        return lambda x: (
            torch.bmm(x.unsqueeze(0).expand(8, -1, -1).contiguous(), other).transpose(0, 1).flatten(1)
        )

    def linear(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: F.linear(x, w)

    def row_sum(x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=-1, keepdim=True)

    gemms: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], int, torch.dtype, int, int]] = [
        (name, linear(lin.weight), lin.weight.shape[1], lin.weight.dtype, min(max_rows, 1024), ROW_PAD)
        for name, lin in (
            ("q_proj", attn.q_proj),
            ("k_proj", attn.k_proj),
            ("o_proj", attn.o_proj),
            ("gate_proj", mlp.gate_proj),
            ("down_proj", mlp.down_proj),
        )
    ]
    gemms.append(
        ("lm_head", linear(lm_head), lm_head.shape[1], lm_head.dtype, min(max_logit_rows, 256), ROW_PAD)
    )
    attn_rows = QUERY_TILE_MAX * rep
    gemms.append(("attention q.k", batched(keys.transpose(1, 2)), d, torch.float32, attn_rows, unit_rows))
    gemms.append(("attention p.v", batched(values), kc, torch.float32, attn_rows, unit_rows))
    gemms.append(("attention denominator", row_sum, kc, torch.float32, attn_rows, unit_rows))
    with torch.no_grad():
        for name, fn, cols, dtype, limit, step in gemms:
            if any_rows:
                top = -(-max(limit, 4 * step) // step) * step
                x = torch.randn(top + step, cols, generator=gen).to(device, dtype)  # (top + step, cols)
                full = fn(x)
                counts = {
                    *range(step, 8 * step + 1, step),
                    *(c for c in (64, 128, 256) if c % step == 0),
                    top,
                }
                for c in sorted(c for c in counts if c <= top):
                    for offset in (0, step):
                        if not torch.equal(fn(x[offset : offset + c]), full[offset : offset + c]):
                            failures.append(f"{name}: {c} rows at offset {offset}")
            else:
                size = ROW_TILE if step == ROW_PAD else step  # the fixed call shape (rows)
                x = torch.randn(4 * size, cols, generator=gen).to(device, dtype)  # (4 tiles, cols)
                ref = torch.cat([fn(x[i : i + size]) for i in range(0, 4 * size, size)])
                for _ in range(4):
                    idx = torch.randperm(4 * size, generator=gen)[:size].to(device)  # rows from anywhere
                    if not torch.equal(fn(x[idx]), ref[idx]):
                        failures.append(f"{name}: {size}-row calls depend on the rows' places")
                        break
    return failures
