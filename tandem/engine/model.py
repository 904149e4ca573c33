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

Deterministic (batch-invariant) mode, ``forward(..., deterministic=True)``: the same pass with
every GEMM over the rows padded to a multiple of 4 (or in fixed-shape calls), an exact SiLU and
attention read from the paged cache in fixed key chunks (:mod:`tandem.engine.batch_invariant`,
whose docstring says what is invariant, how, and what it costs)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from tandem.engine.batch_invariant import (
    QUERY_TILE_MAX,
    ROW_PAD,
    ROW_TILE,
    DetPlan,
    attend_deterministic,
    plan_deterministic,
    query_tile_unit,
)
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
        plan: DetPlan,
    ) -> torch.Tensor:
        """The layer, batch-invariant (:mod:`tandem.engine.batch_invariant`): the row-wise parts
        on tiles of ``tile`` rows, attention by :func:`attend_deterministic`.

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
        o = attend_deterministic(_cat(qs)[:t], layer_cache, plan)  # (T, H, D)
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
    #: count that is a multiple of 4 (:func:`~tandem.engine.batch_invariant.probe_batch_invariance`;
    #: the executor sets it), so each GEMM runs once over the pass's rows padded to :data:`ROW_PAD`
    #: and attention tiles hold up to :data:`QUERY_TILE_MAX` queries; False = calls of fixed
    #: shapes only (:data:`ROW_TILE` rows, one-unit query tiles, :func:`query_tile_unit`), slower.
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
            deterministic: batch-invariant computation (:mod:`tandem.engine.batch_invariant`): a
                token's K/V and hidden state do not depend on the rest of the batch or on how its
                prompt was chunked. Slower; not numerically equal to the default path.

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
        plan = plan_deterministic(positions, attn, kv_cache.shape[3], n_rep, max_tile)
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
        the other rows (:mod:`tandem.engine.batch_invariant`).
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
