"""A llama decoder (SmolLM2 and friends) over a paged KV cache, in plain torch.

Shapes use: T = tokens in the flattened batch, S = sequences, H = query heads, Hkv = KV heads,
D = head_dim, E = hidden size, F = FFN size, V = vocab, L = layers, NB = KV blocks,
B = block size (tokens), C = context length of a sequence (tokens), P = padded context.

One forward pass takes a *varlen* batch: the new tokens of S sequences concatenated, where a
sequence contributes either a prefill chunk (one or more prompt tokens; the chunk may start
mid-prompt, its earlier tokens already in the cache) or one decode token. For every layer the
new tokens' K/V are written into the paged cache at ``slot_mapping``, then each query attends to
its sequence's context gathered from the cache through the block table, causally: the token at
position ``p`` sees cache positions ``0..p``.

KV cache: one tensor ``(NB, L, 2, B, Hkv, D)`` (block-major: one block of all layers is one
contiguous range, which is what NIXL transfers). Index 0/1 of dim 2 is K/V. Cache position
``p`` of a sequence lives in block ``block_table[p // B]`` at offset ``p % B``, i.e. slot
``block_table[p // B] * B + p % B``. Positions fed to :meth:`LlamaForCausalLM.forward` must be
these cache positions (0-based index of the token in its sequence).

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
* attention (:func:`_attend_deterministic`) reads K/V only from the paged cache (a whole
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

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from tandem.engine.config import ModelConfig

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,  # for exactness tests only
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.bfloat16`` / ``float16`` / ``float32`` / ``float64`` from a dtype or its name
    (``"float32"``, ``"torch.float32"``). Raises ``ValueError`` for anything else."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


# ---- attention metadata ---------------------------------------------------------------------------


@dataclass
class AttentionMetadata:
    """Where a flattened batch's tokens go in the paged KV cache and what each one attends to.

    Tensors live on the model's device. Sequence ``s`` owns tokens
    ``query_start_loc[s]:query_start_loc[s+1]`` of the batch.

    Attributes:
        slot_mapping: ``(T,) int64``: cache slot of each new token,
            ``block_id * block_size + offset``.
        query_start_loc: ``(S+1,) int32/int64``: cumulative new-token counts, starting at 0.
        seq_lens: ``(S,) int32/int64``: context length of each sequence after this step
            (cached tokens + new tokens).
        block_tables: ``(S, max_blocks) int32``: block ids of each sequence, padded with 0;
            must cover ``ceil(seq_lens[s] / block_size)`` blocks.
        query_lens_cpu / seq_lens_cpu: optional host copies of the per-sequence new-token counts
            and ``seq_lens`` (avoid device→host syncs on CUDA); derived when None.
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_lens_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None

    def host_lens(self) -> tuple[list[int], list[int]]:
        """``(query_lens, seq_lens)`` as Python lists (tokens per sequence)."""
        if self.query_lens_cpu is None:
            starts = self.query_start_loc.tolist()
            self.query_lens_cpu = [b - a for a, b in itertools.pairwise(starts)]
        if self.seq_lens_cpu is None:
            self.seq_lens_cpu = [int(x) for x in self.seq_lens.tolist()]
        return self.query_lens_cpu, self.seq_lens_cpu


def build_attention_metadata(
    block_tables: Sequence[Sequence[int]],
    num_computed_tokens: Sequence[int],
    num_new_tokens: Sequence[int],
    block_size: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions and :class:`AttentionMetadata` for a batch, from host-side bookkeeping.

    Args:
        block_tables: per sequence, its block ids (at least ``ceil(seq_len / block_size)``).
        num_computed_tokens: per sequence, tokens already in the cache (the chunk starts there).
        num_new_tokens: per sequence, tokens in this step (>= 1).
        block_size: tokens per block.
        device: where the tensors go.

    Returns:
        ``(positions (T,) int64, metadata)``; feed the sequences' new token ids in the same
        order, concatenated.

    Raises:
        ValueError: lengths disagree, a sequence has no new token, or a block table is too short.
    """
    n = len(block_tables)
    if not (n == len(num_computed_tokens) == len(num_new_tokens)) or n == 0:
        raise ValueError("block_tables, num_computed_tokens and num_new_tokens need the same non-zero length")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    positions: list[int] = []
    slots: list[int] = []
    seq_lens: list[int] = []
    starts = [0]
    for table, done, new in zip(block_tables, num_computed_tokens, num_new_tokens, strict=True):
        if new < 1 or done < 0:
            raise ValueError(f"bad chunk: {done} computed, {new} new tokens")
        total = done + new
        if len(table) * block_size < total:
            raise ValueError(f"block table of {len(table)} blocks cannot hold {total} tokens")
        for p in range(done, total):
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
        seq_lens.append(total)
        starts.append(starts[-1] + new)
    width = max(len(t) for t in block_tables)
    padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int64, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        query_lens_cpu=list(num_new_tokens),
        seq_lens_cpu=seq_lens,
    )
    return torch.tensor(positions, dtype=torch.int64, device=device), meta


def allocate_kv_cache(
    cfg: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A zeroed KV cache ``(num_blocks, L, 2, block_size, Hkv, D)``.

    Its size in bytes is ``num_blocks * L * 2 * block_size * Hkv * D * dtype_bytes``.
    Raises ``ValueError`` for a non-positive size or an unsupported dtype.
    """
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
    shape = (num_blocks, cfg.num_hidden_layers, 2, block_size, cfg.num_key_value_heads, cfg.head_dim)
    if torch.device(device).type == "cpu":
        # Huge-page backed host memory: NIXL/UCX (cma) READs of it run 2-5x faster than of 4 KiB
        # pages (measured by scripts/bench_kv_transfer.py). Zeroed, like torch.zeros.
        from tandem.transfer.nixl import alloc_kv_cache

        cache = alloc_kv_cache(shape, resolve_dtype(dtype), prefault=False)
        cache.zero_()
        return cache
    return torch.zeros(shape, dtype=resolve_dtype(dtype), device=device)


@dataclass
class _AttnGroup:
    """Sequences attended together in one SDPA call (precomputed once per forward)."""

    token_index: torch.Tensor | slice  # which of the T tokens are this group's queries
    block_ids: torch.Tensor | None  # (G, nb) block ids of the group's contexts; None: no cached context
    mask: torch.Tensor | None  # (G, 1, Q, P) bool, True = attend; None: plain causal over the queries
    num_queries: int  # Q: queries per sequence (1 for the decode group)
    num_keys: int  # P: context length attended (keys past a sequence's length are masked)


def _plan_attention(positions: torch.Tensor, attn: AttentionMetadata, block_size: int) -> list[_AttnGroup]:
    """Split the batch into one group of all decode tokens (one query per sequence, batched over
    sequences) and one group per multi-token (prefill) chunk."""
    query_lens, seq_lens = attn.host_lens()
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    device = positions.device
    groups: list[_AttnGroup] = []

    decode = [s for s, q in enumerate(query_lens) if q == 1]
    if decode:
        nb = -(-max(seq_lens[s] for s in decode) // block_size)
        sel = torch.tensor(decode, device=device)
        tok = torch.tensor([starts[s] for s in decode], device=device)
        key_pos = torch.arange(nb * block_size, device=device)  # (P,)
        mask = key_pos[None, :] <= positions[tok][:, None]  # (G, P)
        groups.append(
            _AttnGroup(
                token_index=tok,
                block_ids=attn.block_tables[sel, :nb].long(),  # (G, nb)
                mask=mask[:, None, None, :],  # (G, 1, 1, P)
                num_queries=1,
                num_keys=nb * block_size,
            )
        )
    for s, q in enumerate(query_lens):
        if q == 1:
            continue
        if q < 1:
            raise ValueError(f"sequence {s} has {q} new tokens")
        tok_slice = slice(starts[s], starts[s] + q)
        if seq_lens[s] == q:  # a whole prompt: its keys are exactly the new tokens, plain causal
            groups.append(_AttnGroup(tok_slice, None, None, num_queries=q, num_keys=q))
            continue
        nb = -(-seq_lens[s] // block_size)
        key_pos = torch.arange(seq_lens[s], device=device)  # (P,)
        mask = key_pos[None, :] <= positions[tok_slice][:, None]  # (Q, P)
        groups.append(
            _AttnGroup(
                token_index=tok_slice,
                block_ids=attn.block_tables[s : s + 1, :nb].long(),  # (1, nb)
                mask=mask[None, None],  # (1, 1, Q, P)
                num_queries=q,
                num_keys=seq_lens[s],
            )
        )
    return groups


# ---- deterministic (batch-invariant) mode -------------------------------------------------------

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
class _DetPlan:
    """Layout of one pass's deterministic attention (built once per forward by
    :func:`_plan_deterministic`, used by every layer). U = key chunks of all sequences (each
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


def _plan_deterministic(
    positions: torch.Tensor, attn: AttentionMetadata, block_size: int, n_rep: int, max_tile: int
) -> _DetPlan:
    """Cut every sequence's new tokens into query tiles of up to ``max_tile`` tokens (each a
    multiple of :func:`query_tile_unit`, the last one padded) and pair each tile with the key
    chunks up to its last query (see :func:`_attend_deterministic`); ``n_rep`` = query heads per
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
    return _DetPlan(
        chunk_blocks=chunk_blocks.view(-1), num_chunks=len(chunk_seq), chunk_size=kc, groups=groups
    )


def _attend_deterministic(q: torch.Tensor, layer_cache: torch.Tensor, plan: _DetPlan) -> torch.Tensor:
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
    layer = cast(DecoderLayer, model.model.layers[0])
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


# ---- layers -------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x**2) + eps) * weight``, computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # (..., E)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. ``x``: ``(T, heads, D)``; ``cos``/``sin``: ``(T, D)``."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


class Attention(nn.Module):
    """GQA self-attention over the paged KV cache."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        e, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(e, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(e, self.n_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(e, self.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, e, bias=False)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(T, E)`` normed hidden states → ``q (T, H, D)``, ``k (T, Hkv, D)`` (both rotated by
        ``cos``/``sin (T, D)``) and ``v (T, Hkv, D)``."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.n_heads, self.head_dim)  # (T, H, D)
        k = self.k_proj(x).view(t, self.n_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = self.v_proj(x).view(t, self.n_kv_heads, self.head_dim)  # (T, Hkv, D)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def write_kv(
        self,
        kv_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_blocks: torch.Tensor,
        slot_offsets: torch.Tensor,
    ) -> torch.Tensor:
        """Store ``k``/``v (T, Hkv, D)`` at the tokens' slots; returns this layer's cache view
        ``(NB, 2, B, Hkv, D)``."""
        layer_cache = kv_cache[:, self.layer_idx]  # (NB, 2, B, Hkv, D) view
        layer_cache[slot_blocks, 0, slot_offsets] = k.to(kv_cache.dtype)
        layer_cache[slot_blocks, 1, slot_offsets] = v.to(kv_cache.dtype)
        return layer_cache

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_blocks: torch.Tensor,
        slot_offsets: torch.Tensor,
        groups: list[_AttnGroup],
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.project(x, cos, sin)  # (T, H, D), (T, Hkv, D), (T, Hkv, D)
        layer_cache = self.write_kv(kv_cache, k, v, slot_blocks, slot_offsets)

        out = torch.empty_like(q)  # (T, H, D)
        for g in groups:
            if g.block_ids is None:  # whole prompt: attend causally over its own K/V
                qg = q[g.token_index].transpose(0, 1)[None]  # (1, H, Q, D)
                kc = k[g.token_index].transpose(0, 1)[None]  # (1, Hkv, Q, D)
                vc = v[g.token_index].transpose(0, 1)[None]  # (1, Hkv, Q, D)
                og = F.scaled_dot_product_attention(qg, kc, vc, is_causal=True, enable_gqa=True)
            else:
                n_seq = g.block_ids.shape[0]
                ctx = layer_cache[g.block_ids]  # (G, nb, 2, B, Hkv, D)
                ctx = ctx.to(q.dtype).transpose(1, 2).reshape(n_seq, 2, -1, self.n_kv_heads, self.head_dim)
                ctx = ctx[:, :, : g.num_keys]  # (G, 2, P, Hkv, D)
                kc = ctx[:, 0].transpose(1, 2)  # (G, Hkv, P, D)
                vc = ctx[:, 1].transpose(1, 2)  # (G, Hkv, P, D)
                qg = q[g.token_index].view(n_seq, g.num_queries, self.n_heads, self.head_dim)
                qg = qg.transpose(1, 2)  # (G, H, Q, D)
                og = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=g.mask, enable_gqa=True)
            out[g.token_index] = og.transpose(1, 2).reshape(-1, self.n_heads, self.head_dim)  # (G*Q, H, D)
        return self.o_proj(out.view(t, self.n_heads * self.head_dim))  # (T, E)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (T, F) -> (T, E)

    def forward_deterministic(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with SiLU as ``g / (1 + exp(-g))``: the same bits for an element
        wherever it sits in the tensor (``F.silu`` differs in a tensor's scalar tail)."""
        g = self.gate_proj(x)  # (T, F)
        return self.down_proj(g / (1 + torch.exp(-g)) * self.up_proj(x))  # (T, E)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, *attn_args: object) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), *attn_args)  # (T, E)
        return x + self.mlp(self.post_attention_layernorm(x))  # (T, E)

    def forward_deterministic(
        self,
        x: torch.Tensor,
        num_tokens: int,
        tile: int,
        ropes: list[tuple[torch.Tensor, torch.Tensor]],
        kv_cache: torch.Tensor,
        slot_blocks: torch.Tensor,
        slot_offsets: torch.Tensor,
        plan: _DetPlan,
    ) -> torch.Tensor:
        """The layer, batch-invariant (module docstring): the row-wise parts on tiles of
        ``tile`` rows, attention by :func:`_attend_deterministic`.

        Args:
            x: ``(Tp, E)``, ``Tp`` a multiple of ``tile``; rows ``num_tokens..`` are padding.
            num_tokens: ``T``, the real tokens (the first rows).
            tile: rows per GEMM call (``Tp`` itself: one call).
            ropes: ``(cos, sin)`` of each row tile, each ``(tile, D)``.
            kv_cache / slot_blocks / slot_offsets: as :meth:`Attention.forward`.
            plan: the pass's attention layout.

        Returns:
            ``(Tp, E)``.
        """
        attn = self.self_attn
        tp, t = x.shape[0], num_tokens
        qs, ks, vs = [], [], []
        for n, i in enumerate(range(0, tp, tile)):
            q, k, v = attn.project(self.input_layernorm(x[i : i + tile]), *ropes[n])
            qs.append(q)  # (tile, H, D)
            ks.append(k)  # (tile, Hkv, D)
            vs.append(v)  # (tile, Hkv, D)
        layer_cache = attn.write_kv(kv_cache, _cat(ks)[:t], _cat(vs)[:t], slot_blocks, slot_offsets)
        o = _attend_deterministic(_cat(qs)[:t], layer_cache, plan)  # (T, H, D)
        o = F.pad(o.reshape(t, -1), (0, 0, 0, tp - t))  # (Tp, H*D)
        out = []
        for i in range(0, tp, tile):
            y = x[i : i + tile] + attn.o_proj(o[i : i + tile])  # (tile, E)
            out.append(y + self.mlp.forward_deterministic(self.post_attention_layernorm(y)))
        return _cat(out)  # (Tp, E)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along dim 0, without a copy for a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


class LlamaBody(nn.Module):
    """Embedding, decoder layers and final norm (HF's ``model.*`` parameter names)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Llama causal LM over a paged KV cache. Parameter names match HF's ``LlamaForCausalLM``.

    Build on the ``meta`` device and load weights with
    :func:`tandem.engine.weights.load_model`, or construct directly (random weights) for tests.
    """

    inv_freq: torch.Tensor  # (D/2,) fp32 RoPE inverse frequencies (a non-persistent buffer)
    #: Deterministic mode: True = this machine's BLAS gives a GEMM row the same bits for any row
    #: count that is a multiple of 4 (:func:`probe_batch_invariance`; the executor sets it), so
    #: each GEMM runs once over the pass's rows padded to :data:`ROW_PAD` and attention tiles hold
    #: up to :data:`QUERY_TILE_MAX` queries; False = calls of fixed shapes only (:data:`ROW_TILE`
    #: rows, one-unit query tiles, :func:`query_tile_unit`), slower.
    gemm_rows_invariant: bool = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.init_buffers(None)

    def init_buffers(self, device: torch.device | str | None) -> None:
        """(Re)create the RoPE inverse frequencies (fp32, ``(D/2,)``) on ``device``
        (``None``: the embedding's device). Call after loading weights onto a meta-built model."""
        if device is None:
            device = self.model.embed_tokens.weight.device
        d = self.config.head_dim
        exponent = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d
        self.register_buffer("inv_freq", 1.0 / (self.config.rope_theta**exponent), persistent=False)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``(T, D)`` in ``dtype``, for integer ``positions (T,)``."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, D/2) fp32
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        *,
        deterministic: bool = False,
    ) -> torch.Tensor:
        """Run the new tokens of a varlen batch through the model, updating the KV cache.

        Args:
            input_ids: ``(T,) int64`` new tokens of all sequences, concatenated in sequence order.
            positions: ``(T,) int64`` cache position of each token in its sequence.
            kv_cache: ``(NB, L, 2, B, Hkv, D)``; written in place at ``attn.slot_mapping``.
            attn: where tokens go and what they attend to.
            deterministic: batch-invariant computation (module docstring): a token's K/V and
                hidden state do not depend on the rest of the batch or on how its prompt was
                chunked. Slower; not numerically equal to the default path.

        Returns:
            ``(T, E)`` final hidden states (after the last norm) in the model dtype; pass the rows
            you need to :meth:`compute_logits`.

        Raises:
            ValueError: shapes disagree with the config or with each other.
        """
        cfg = self.config
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and positions must both be (T,)")
        if attn.slot_mapping.shape != input_ids.shape:
            raise ValueError("slot_mapping must have one slot per token")
        if kv_cache.dim() != 6 or tuple(kv_cache.shape[1:3]) != (cfg.num_hidden_layers, 2):
            raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)} is not (NB, L, 2, B, Hkv, D)")
        if tuple(kv_cache.shape[4:]) != (cfg.num_key_value_heads, cfg.head_dim):
            raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)} does not match the model's heads")
        block_size = kv_cache.shape[3]
        query_lens, _ = attn.host_lens()
        if sum(query_lens) != input_ids.shape[0]:
            raise ValueError(
                f"query_start_loc covers {sum(query_lens)} tokens, batch has {input_ids.shape[0]}"
            )

        slot_blocks = torch.div(attn.slot_mapping, block_size, rounding_mode="floor")  # (T,)
        slot_offsets = attn.slot_mapping % block_size  # (T,)
        if deterministic:
            return self._forward_deterministic(
                input_ids, positions, kv_cache, attn, slot_blocks, slot_offsets
            )
        groups = _plan_attention(positions, attn, block_size)

        x = self.model.embed_tokens(input_ids)  # (T, E)
        cos, sin = self.rope(positions, x.dtype)  # (T, D) each
        for layer in self.model.layers:
            x = layer(x, cos, sin, kv_cache, slot_blocks, slot_offsets, groups)
        return self.model.norm(x)  # (T, E)

    def _forward_deterministic(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        slot_blocks: torch.Tensor,
        slot_offsets: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`forward` with ``deterministic=True``: ``(T, E)`` final hidden states."""
        cfg, t = self.config, input_ids.shape[0]
        pad = ROW_PAD if self.gemm_rows_invariant else ROW_TILE
        tp = -(-t // pad) * pad
        tile = tp if self.gemm_rows_invariant else ROW_TILE
        n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
        max_tile = QUERY_TILE_MAX if self.gemm_rows_invariant else query_tile_unit(n_rep)
        plan = _plan_deterministic(positions, attn, kv_cache.shape[3], n_rep, max_tile)
        x = self.model.embed_tokens(F.pad(input_ids, (0, tp - t)))  # (Tp, E); padding rows: token 0
        pos = F.pad(positions, (0, tp - t))  # (Tp,)
        ropes = [self.rope(pos[i : i + tile], x.dtype) for i in range(0, tp, tile)]  # (tile, D) each
        for layer in self.model.layers:
            x = cast(DecoderLayer, layer).forward_deterministic(
                x, t, tile, ropes, kv_cache, slot_blocks, slot_offsets, plan
            )
        norm = self.model.norm
        return _cat([norm(x[i : i + tile]) for i in range(0, tp, tile)])[:t]  # (T, E)

    def compute_logits(self, hidden: torch.Tensor, *, deterministic: bool = False) -> torch.Tensor:
        """``(N, E)`` hidden states → ``(N, V)`` fp32 logits (tied embeddings unless configured).

        ``deterministic``: rows padded as in :meth:`forward`, so a row's logits do not depend on
        the other rows (module docstring).
        """
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if not deterministic:
            return F.linear(hidden, weight).float()  # (N, V)
        n = hidden.shape[0]
        pad = ROW_PAD if self.gemm_rows_invariant else ROW_TILE
        padded = F.pad(hidden, (0, 0, 0, -(-n // pad) * pad - n))  # (Np, E)
        tile = padded.shape[0] if self.gemm_rows_invariant else ROW_TILE
        tiles = [F.linear(padded[i : i + tile], weight).float() for i in range(0, padded.shape[0], tile)]
        return _cat(tiles)[:n]  # (N, V)
