"""The engine seam: what :class:`~tandem.engine.engine.LLMEngine` steps through.

The engine owns the :class:`~tandem.engine.scheduler.Scheduler` and the
:class:`~tandem.kvbm.manager.KvCacheManager` (block tables, prefix cache, Dynamo-compatible KV
events); an executor only computes one scheduled step and reports the sampled tokens. Two
implementations:

* :class:`tandem.engine.runner.ModelExecutor` — the real model on a paged KV cache tensor
  (torch; imported lazily by the engine).
* :class:`tandem.engine.mock.MockExecutor` — no model, no torch: synthetic tokens and Dynamo's
  mocker timing model (:attr:`Executor.last_step_simulated_s`).

Both see exactly the same :class:`~tandem.engine.scheduler.SchedulerOutput` for the same inputs,
so scheduling, KV events and routing are exercised for real with either.

A failure that belongs to one sequence (its sampling raised, say) is returned in that
sequence's slot as the exception (:data:`TokenResult`), never raised: the engine fails that
request alone and the rest of the batch goes on.

This module does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable

if TYPE_CHECKING:
    from tandem.engine.scheduler import SchedulerOutput
    from tandem.kvbm.manager import KvCacheManager

#: What a step gives one scheduled item: the sampled token id, None (the item does not sample:
#: a non-final prefill chunk), or the exception that failed this sequence alone.
TokenResult: TypeAlias = "int | Exception | None"


@runtime_checkable
class Executor(Protocol):
    """Runs scheduled steps for an :class:`~tandem.engine.engine.LLMEngine`.

    Attributes:
        kv_cache: the model executor's ``(num_blocks, L, 2, block_size, Hkv, D)`` KV tensor
            (what NIXL registers); ``None`` for the mock executor (no KV bytes exist).
        last_step_simulated_s: seconds the last :meth:`execute` call would take on the simulated
            hardware, already divided by ``speedup_ratio`` (s); always 0.0 for the model
            executor. The engine never sleeps: its async caller (the worker) waits this long.
    """

    kv_cache: Any
    last_step_simulated_s: float

    def execute(self, out: SchedulerOutput, kv: KvCacheManager) -> list[TokenResult]:
        """Compute one non-empty schedule.

        Args:
            out: the step; every scheduled sequence owns blocks for ``start + num_tokens``
                tokens in ``kv``.
            kv: the engine's block manager (block tables; the mock reads its utilisation).

        Returns:
            One entry per ``out.scheduled`` item: the sampled token id where the item samples
            (``item.samples``), else None; or the exception that failed this item alone (its
            sampling raised). Sequences are not modified.

        Raises:
            ValueError: ``out`` is empty. Anything else raised fails the whole step (the engine
            then retries its items one by one to find the failing ones).
        """
        ...

    def copy_blocks(self, src_ids: list[int], dst_ids: list[int]) -> None:
        """Copy the KV of blocks ``src_ids[i]`` to ``dst_ids[i]`` inside this executor's pool
        (a ``both`` worker decoding its own prefill). No-op for the mock.

        Raises:
            ValueError: lengths differ; IndexError: a block id outside ``[0, num_blocks)``.
        """
        ...


def check_copy(src_ids: list[int], dst_ids: list[int], num_blocks: int) -> None:
    """Validate a :meth:`Executor.copy_blocks` call: ``ValueError`` if the lengths differ,
    ``IndexError`` if a block id is outside ``[0, num_blocks)``."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    if any(not 0 <= b < num_blocks for b in (*src_ids, *dst_ids)):
        raise IndexError(f"block ids must be in [0, {num_blocks})")
