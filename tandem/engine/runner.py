"""ModelExecutor: owns the model and the KV cache tensor; runs one scheduled step.

The real-model implementation of :class:`tandem.engine.executor.Executor` (``engine="model"``).

A step is one forward pass over a *varlen* batch: the scheduled tokens of every sequence,
flattened in :class:`~tandem.engine.scheduler.SchedulerOutput` order. Logits are computed only
for the last token of sequences whose chunk reaches the end of their tokens (decodes and final
prefill chunks); a non-final prefill chunk only fills the KV cache. A row whose sampling fails
fails only its sequence (:func:`~tandem.engine.sampling.sample_each`).

With ``EngineConfig.deterministic`` the forward pass and the logits are batch-invariant (see
:mod:`tandem.engine.batch_invariant`); sampling always is (a pure function of the row, seed and
position).
"""

from __future__ import annotations

import torch

from tandem.engine.batch_invariant import probe_batch_invariance
from tandem.engine.config import EngineConfig, ModelConfig
from tandem.engine.executor import TokenResult, check_copy
from tandem.engine.model import LlamaForCausalLM, allocate_kv_cache, build_attention_metadata, resolve_dtype
from tandem.engine.sampling import sample_each
from tandem.engine.scheduler import SchedulerOutput
from tandem.engine.weights import load_model
from tandem.kvbm.manager import KvCacheManager


class ModelExecutor:
    """Loads the model, allocates the KV cache and executes scheduled steps.

    Args:
        config: engine settings (model_dir, dtype, device, block_size, num_threads,
            deterministic).
        model_config: the model's architecture.
        num_blocks: KV blocks to allocate (blocks).
        model: an already-built model to use instead of loading ``config.model_dir`` (tests).

    Attributes:
        model: the :class:`LlamaForCausalLM`.
        kv_cache: ``(num_blocks, L, 2, block_size, Hkv, D)`` in the model dtype, on ``device``.
        last_step_simulated_s: always 0.0 (real work takes real time).
        batch_invariance: deterministic mode's path (None when off): ``"any-rows"`` (this
            machine's GEMMs give a row the same bits for any row count that is a multiple of 4:
            one call per GEMM) or ``"fixed-shapes"`` (fixed-shape calls only, slower), picked by
            :func:`~tandem.engine.batch_invariant.probe_batch_invariance` at construction.

    Raises:
        ValueError: ``config.model_dir`` is None and no ``model`` is given.
        RuntimeError: ``config.deterministic`` and neither path is batch-invariant here.
    """

    last_step_simulated_s: float = 0.0

    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        num_blocks: int,
        model: LlamaForCausalLM | None = None,
    ) -> None:
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype)
        self.block_size = config.block_size
        self.deterministic = config.deterministic
        if model is None and config.model_dir is None:
            raise ValueError("the model engine needs a model_dir")
        self.model: LlamaForCausalLM = (
            model if model is not None else load_model(str(config.model_dir), self.dtype, self.device)
        )
        self.num_blocks = num_blocks
        self.kv_cache = allocate_kv_cache(
            model_config, num_blocks, config.block_size, self.dtype, self.device
        )
        self.batch_invariance: str | None = None
        if self.deterministic:
            self.batch_invariance = self._pick_batch_invariance(config)

    def _pick_batch_invariance(self, config: EngineConfig) -> str:
        """Probe this machine's GEMMs (at the configured thread count) and set the model's
        deterministic path; ``RuntimeError`` if neither is batch-invariant."""
        rows, seqs = config.max_num_batched_tokens, config.max_num_seqs
        fast_failures = probe_batch_invariance(self.model, rows, seqs, any_rows=True)
        self.model.gemm_rows_invariant = not fast_failures
        if not fast_failures:
            return "any-rows"
        fixed_failures = probe_batch_invariance(self.model, rows, seqs, any_rows=False)
        if fixed_failures:
            raise RuntimeError(
                "deterministic mode: this machine's GEMM kernels are not batch-invariant for the "
                f"model (any row count: {fast_failures[:3]}; fixed shapes: {fixed_failures[:3]})"
            )
        return "fixed-shapes"

    def copy_blocks(self, src_ids: list[int], dst_ids: list[int]) -> None:
        """Copy the KV of block ``src_ids[i]`` to ``dst_ids[i]`` (all layers, K and V).

        Raises ``ValueError`` if the lengths differ, ``IndexError`` for a block id outside
        ``[0, num_blocks)``.
        """
        check_copy(src_ids, dst_ids, self.num_blocks)
        if not src_ids:
            return
        with torch.inference_mode():
            src = torch.tensor(src_ids, dtype=torch.int64, device=self.device)
            dst = torch.tensor(dst_ids, dtype=torch.int64, device=self.device)
            self.kv_cache[dst] = self.kv_cache[src]

    def execute(self, out: SchedulerOutput, kv: KvCacheManager) -> list[TokenResult]:
        """Run the model on ``out`` and sample.

        Args:
            out: a non-empty schedule; every sequence must own blocks for ``start + num_tokens``
                tokens in ``kv``.
            kv: the manager holding the sequences' block tables.

        Returns:
            One entry per ``out.scheduled`` item: the sampled token id if the item samples,
            else None; the exception if sampling that item alone failed. Nothing in the
            sequences is modified.

        Raises:
            ValueError: the schedule is empty.
        """
        if out.is_empty:
            raise ValueError("nothing scheduled")
        input_ids: list[int] = []
        for item in out.scheduled:
            input_ids.extend(item.seq.token_ids[item.start : item.start + item.num_tokens])
        positions, attn = build_attention_metadata(
            [kv.block_table(item.seq.request_id) for item in out.scheduled],
            [item.start for item in out.scheduled],
            [item.num_tokens for item in out.scheduled],
            self.block_size,
            self.device,
        )  # positions (T,), attn per sequence
        # Row of the last token of every sampling sequence in the flattened batch.
        rows: list[int] = []
        end = 0
        for item in out.scheduled:
            end += item.num_tokens
            if item.samples:
                rows.append(end - 1)

        with torch.inference_mode():
            ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)  # (T,)
            hidden = self.model.forward(
                ids, positions, self.kv_cache, attn, deterministic=self.deterministic
            )  # (T, E)
            if not rows:
                return [None] * len(out.scheduled)
            row_idx = torch.tensor(rows, dtype=torch.int64, device=self.device)  # (N,)
            logits = self.model.compute_logits(
                hidden[row_idx], deterministic=self.deterministic
            ).cpu()  # (N, V)
            samplers = [item for item in out.scheduled if item.samples]
            tokens = sample_each(
                logits,
                [item.seq.sampling for item in samplers],
                [item.start + item.num_tokens for item in samplers],  # position of the new token
            )
        it = iter(tokens)
        return [next(it) if item.samples else None for item in out.scheduled]
