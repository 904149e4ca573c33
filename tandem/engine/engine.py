"""LLMEngine: requests in, tokens out, one :meth:`LLMEngine.step` at a time.

The engine glues the :class:`~tandem.engine.scheduler.Scheduler` (which tokens to compute),
an :class:`~tandem.engine.executor.Executor` (runs a step: the real model,
:class:`~tandem.engine.runner.ModelExecutor`, or none, :class:`~tandem.engine.mock.MockExecutor`,
picked by ``EngineConfig.engine``) and the :class:`~tandem.kvbm.manager.KvCacheManager` (block
tables, prefix cache, KV events), which are the same whichever executor runs. torch is imported
only when a model executor is built, so a mock engine never loads it. The engine never sleeps:
a mock step's simulated duration is :attr:`LLMEngine.last_step_simulated_s`, for the caller to
wait. It knows nothing about NATS or NIXL: a worker service drives it from one dedicated thread
(the engine is not thread-safe) and moves KV bytes itself between
:meth:`LLMEngine.import_request` and :meth:`LLMEngine.activate_imported`.

Three ways in:

* :meth:`LLMEngine.add_request` — prefill locally and generate until a stop.
* ``add_request(..., prefill_only=True)`` — the prefill side of disaggregation: prefill, sample
  the first token, then hand the prompt's KV blocks over pinned (``pinned_block_ids``) until
  :meth:`LLMEngine.release_pinned`.
* :meth:`LLMEngine.import_request` + :meth:`LLMEngine.activate_imported` — the decode side:
  allocate blocks, let the caller fill them (NIXL READ), then continue from the first token.

Request isolation: whatever fails for one sequence inside a step (its sampling, its stop
handling, or a forward pass that fails only when that sequence is in it) finishes that request
alone with ``finish_reason="error"`` (its blocks freed, :attr:`RequestOutput.error` saying why);
the rest of the batch goes on. Only a failure of the step itself (the scheduler, the block
manager) raises from :meth:`LLMEngine.step`.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from tandem.engine.config import SMOLLM2_135M_CONFIG, EngineConfig, ModelConfig
from tandem.engine.executor import Executor, TokenResult
from tandem.engine.sampling import validate_sampling
from tandem.engine.scheduler import Scheduler, SchedulerOutput, Sequence, SequenceStatus
from tandem.kvbm.hashing import compute_local_hashes, compute_sequence_hashes
from tandem.kvbm.manager import KvCacheManager
from tandem.protocol import SamplingParams

if TYPE_CHECKING:
    from tandem.engine.model import LlamaForCausalLM


@dataclass
class RequestOutput:
    """What one step produced for one request.

    Attributes:
        request_id: the request.
        new_token_ids: tokens sampled this step (0 or 1 of them).
        finish_reason: ``"stop"`` (a stop token, included in ``new_token_ids``), ``"length"``
            (``max_tokens`` new tokens or ``max_model_len``), ``"abort"``, ``"error"`` (this
            request failed on its own, see ``error``; its blocks are freed); None while running,
            and None on the last output of a ``prefill_only`` request whose KV is handed over.
        num_cached_tokens: prompt tokens that came from the prefix cache (or were imported).
        prefill_ms: wall time of the steps that computed the prompt, up to and including the
            one that sampled the first token (ms; 0 for imported requests).
        pinned_block_ids: for a ``prefill_only`` request that did not finish on its first token:
            the block ids (token order) holding the prompt's KV, pinned until
            :meth:`LLMEngine.release_pinned`. None otherwise.
        error: set iff ``finish_reason == "error"``: what failed, one line
            (``"<ExceptionType>: <message>"``).
    """

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    prefill_ms: float = 0.0
    pinned_block_ids: list[int] | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        """True on a request's last output (finished, aborted, or handed over pinned)."""
        return self.finish_reason is not None or self.pinned_block_ids is not None


class LLMEngine:
    """One model, one KV cache, continuous batching. Single-threaded: callers serialize calls.

    Args:
        config: engine settings; ``config.engine`` picks the executor.
        model: an already-loaded model to share (tests; model engine only); default loads
            ``config.model_dir``.

    Attributes:
        model_config: the model's architecture (the mock reads ``<model_dir>/config.json`` too,
            or assumes :data:`~tandem.engine.config.SMOLLM2_135M_CONFIG` without a model_dir).
        executor: the :class:`~tandem.engine.executor.Executor` that runs steps (``runner`` is
            the same object, its former name).
        kv_cache: ``(num_blocks, L, 2, block_size, Hkv, D)`` tensor (what NIXL registers); None
            for the mock engine.
        kv: the block manager (``kv.take_events()`` drains KV events; ``kv.stats()``).
        block_nbytes: bytes of one KV block (all layers, K and V; the mock's
            ``kv_bytes_per_token`` if set).
        eos_token_id: the model's end-of-sequence token.
        max_model_len: longest sequence, prompt + output (tokens).
        last_step_tokens: tokens computed by the last :meth:`step` (0 = nothing could run).

    Raises:
        ValueError: a model engine without ``model_dir`` (and no ``model``), ``model`` given to
            a mock engine, or settings that do not fit the model (``max_model_len``, KV budget).
        FileNotFoundError: ``<model_dir>/config.json`` is missing.
    """

    def __init__(self, config: EngineConfig, *, model: LlamaForCausalLM | None = None) -> None:
        self.config = config
        self.model_config = self._model_config(config, model)
        self.block_size = config.block_size
        self.max_model_len = config.resolve_max_model_len(self.model_config)
        num_blocks = config.resolve_num_blocks(self.model_config)
        self.executor: Executor = self._build_executor(config, self.model_config, num_blocks, model)
        self.kv_cache: Any = self.executor.kv_cache
        self.block_nbytes = config.block_nbytes(self.model_config)
        self.eos_token_id = self.model_config.eos_token_id
        self.kv = KvCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len
        )
        self._pending: list[RequestOutput] = []  # outputs produced between steps (aborts)
        self._import_first_token: dict[str, int] = {}
        self._rng = random.Random()
        self._ids = itertools.count()
        self.last_step_tokens = 0  # tokens computed by the last step (0 = nothing could run)
        self._last_step_simulated_s = 0.0

    @staticmethod
    def _model_config(config: EngineConfig, model: LlamaForCausalLM | None) -> ModelConfig:
        if config.engine == "mock":
            if model is not None:
                raise ValueError("model= is for the model engine; the mock engine runs none")
            if config.model_dir is None:
                return SMOLLM2_135M_CONFIG
            return ModelConfig.load(config.model_dir)
        if config.model_dir is None:
            if model is not None:
                cfg: ModelConfig = model.config
                return cfg
            raise ValueError("the model engine needs a model_dir")
        return ModelConfig.load(config.model_dir)

    @staticmethod
    def _build_executor(
        config: EngineConfig, model_config: ModelConfig, num_blocks: int, model: LlamaForCausalLM | None
    ) -> Executor:
        if config.engine == "mock":
            from tandem.engine.mock import MockExecutor

            return MockExecutor(config, model_config, num_blocks)
        from tandem.engine.runner import ModelExecutor  # imports torch

        return ModelExecutor(config, model_config, num_blocks, model=model)

    # ---- requests in ---------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        token_ids: SequenceT[int],
        sampling: SamplingParams,
        *,
        block_hashes: SequenceT[int] | None = None,
        prefill_only: bool = False,
    ) -> None:
        """Queue a request for local prefill and generation.

        Args:
            request_id: unique among unfinished requests.
            token_ids: the prompt (tokens), non-empty, ids in ``[0, vocab_size)``.
            sampling: sampling and stopping; ``seed=None`` gets a random seed here.
            block_hashes: sequence hashes of (a prefix of) the prompt's full blocks, if the
                caller has them; checked against ``token_ids``.
            prefill_only: stop after the first token and pin the prompt's KV blocks.

        Raises:
            ValueError: empty/too long prompt, bad token ids, bad sampling, wrong block hashes,
                a request that can never fit the KV pool, or a duplicate ``request_id``.
        """
        seq = self._new_sequence(request_id, token_ids, sampling, block_hashes, prefill_only)
        self.scheduler.add(seq)

    def import_request(
        self,
        request_id: str,
        token_ids: SequenceT[int],
        first_token: int,
        sampling: SamplingParams,
        block_hashes: SequenceT[int] | None,
    ) -> tuple[list[int], int] | None:
        """Step 1 of a remotely prefilled request: allocate blocks for its prompt.

        Args:
            token_ids: the prompt (tokens); ``first_token`` was sampled by the prefill worker.

        Returns:
            ``(block_table, num_reused_blocks)``: ``ceil(len(token_ids) / block_size)`` block ids
            in token order, the first ``num_reused_blocks`` already holding the right KV (prefix
            cache); the caller fills ``block_table[num_reused_blocks:]`` with the prefill
            worker's KV, then calls :meth:`activate_imported` (or :meth:`abort`). None if not
            enough blocks are free right now (nothing changed; retry later).

        Raises:
            ValueError: as :meth:`add_request`, or a bad ``first_token``.
        """
        self._check_token_ids([first_token])
        seq = self._new_sequence(request_id, token_ids, sampling, block_hashes, False)
        got = self.scheduler.add_imported(seq)
        if got is not None:
            self._import_first_token[request_id] = first_token
        return got

    def activate_imported(self, request_id: str) -> None:
        """Step 2: the KV is in place. Register the prompt's blocks in the prefix cache (KV events
        flow) and queue the request to decode from ``first_token``.

        If ``first_token`` already ends the request (stop token, ``max_tokens == 1``), it
        finishes at once: the next :meth:`step` reports the finish reason with no new tokens.
        Raises ``KeyError`` if ``request_id`` is not being imported.
        """
        first_token = self._import_first_token.pop(request_id)
        seq = self.scheduler.activate(request_id, first_token)
        self.kv.commit(request_id, seq.token_ids, seq.num_computed_tokens)
        reason = self._stop_reason(seq, first_token)
        if reason is not None:
            self.scheduler.abort(request_id)  # frees its blocks (now cached)
            seq.finish_reason = reason
            self._pending.append(self._output(seq, [], reason))

    def abort(self, request_id: str) -> bool:
        """Stop a request in any state (waiting, running, importing) and free its blocks.

        The next :meth:`step` reports it with ``finish_reason="abort"``. Returns False if the
        request is unknown or already finished (pinned blocks are released with
        :meth:`release_pinned`, not here).
        """
        self._import_first_token.pop(request_id, None)
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return False
        self._pending.append(self._output(seq, [], "abort"))
        return True

    def release_pinned(self, request_id: str) -> None:
        """Release the blocks a ``prefill_only`` request pinned (transfer done or expired).

        Idempotent: releasing twice, or an id with nothing pinned, does nothing.
        """
        self.kv.unpin(request_id, missing_ok=True)

    # ---- running -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report.

        Returns one :class:`RequestOutput` per request that sampled a token this step or failed
        in it (``finish_reason="error"``: that request alone; see the module docstring), plus
        any aborted/finished-on-activation since the last step. Finished and failed requests'
        blocks are freed (still cached for prefix hits); newly full blocks are committed to the
        prefix cache, which queues KV events in ``kv``. Returns ``[]`` when nothing can run.
        """
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        self.last_step_tokens = sched.num_batched_tokens
        self._last_step_simulated_s = 0.0
        if sched.is_empty:
            return outputs
        t0 = time.perf_counter()
        results, forward_failed = self._execute(sched)
        self._last_step_simulated_s = self.executor.last_step_simulated_s
        # The step's duration as the caller sees it: wall time plus the simulated time it waits.
        step_ms = (time.perf_counter() - t0 + self._last_step_simulated_s) * 1e3
        for item, result in zip(sched.scheduled, results, strict=True):
            seq = item.seq
            if seq.num_output_tokens == 0:  # still computing the prompt
                seq.prefill_ms += step_ms
            if isinstance(result, int):
                seq.token_ids.append(result)
        if forward_failed:
            self._roll_back_failed(sched, results)
        for i, item in enumerate(sched.scheduled):
            if isinstance(results[i], Exception):
                continue
            try:  # num_computed_tokens advances; full blocks are registered (KV events)
                self.scheduler.commit_item(item)
            except Exception as exc:
                results[i] = exc
        for item, result in zip(sched.scheduled, results, strict=True):
            if isinstance(result, Exception):
                outputs.append(self._fail(item.seq, result))
            elif result is not None:
                try:
                    outputs.append(self._after_token(item.seq, result))
                except Exception as exc:
                    outputs.append(self._fail(item.seq, exc))
        return outputs

    def _roll_back_failed(self, sched: SchedulerOutput, results: list[TokenResult]) -> None:
        """After a forward pass that raised: the blocks registered when the step was scheduled
        hold no valid KV for the items whose own run raised (their forward may not have run):
        unregister them (``KvRemoved``). A request of this step that took such a block as a
        prefix hit computed on garbage: its result becomes an error as well, and so on for
        whoever took *its* blocks. (An item that fails alone in a pass that ran, e.g. in its
        sampling, has valid KV: nothing is rolled back for it.)"""
        index = {item.seq.request_id: i for i, item in enumerate(sched.scheduled)}
        todo = [i for i, r in enumerate(results) if isinstance(r, Exception)]
        while todo:
            i = todo.pop()
            owner = sched.scheduled[i].seq.request_id
            for rid in self.scheduler.rollback_item(sched.scheduled[i]):
                j = index.get(rid)
                if j is not None and not isinstance(results[j], Exception):
                    results[j] = RuntimeError(
                        f"its cached prefix was being computed by request {owner!r}, whose step failed"
                    )
                    todo.append(j)

    def _execute(self, sched: SchedulerOutput) -> tuple[list[TokenResult], bool]:
        """Run ``sched``; if the whole step raises, run its items one by one, so that the
        items whose own run raises fail alone (their slot holds the exception). Returns the
        results and whether the batched forward pass raised (then a failed item's KV may not
        have been written)."""
        try:
            return self.executor.execute(sched, self.kv), False
        except Exception as exc:
            if len(sched.scheduled) == 1:
                return [exc], True
        results: list[TokenResult] = []
        simulated_s = 0.0
        for item in sched.scheduled:
            try:
                (result,) = self.executor.execute(SchedulerOutput([item]), self.kv)
            except Exception as exc:
                result = exc
            simulated_s += self.executor.last_step_simulated_s
            results.append(result)
        self.executor.last_step_simulated_s = simulated_s
        return results, True

    def _after_token(self, seq: Sequence, token: int) -> RequestOutput:
        """The output of ``seq`` having sampled ``token`` (already appended); finishes it (or
        pins its blocks: ``prefill_only``) when it stops."""
        reason = self._stop_reason(seq, token)
        if seq.prefill_only and reason is None:
            pinned = self.scheduler.finish(seq, None, pin=True)
            return self._output(seq, [token], None, pinned)
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return self._output(seq, [token], reason)

    def _fail(self, seq: Sequence, exc: BaseException) -> RequestOutput:
        """Finish ``seq`` alone, with ``finish_reason="error"``: out of every queue, its blocks
        freed; its output says why."""
        rid = seq.request_id
        self._import_first_token.pop(rid, None)
        if self.scheduler.abort(rid, reason="error") is None and self.kv.has_request(rid):
            self.kv.free(rid)  # already out of the queues: a finish that failed half-way
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "error"
        out = self._output(seq, [], "error")
        out.error = f"{type(exc).__name__}: {exc}"
        return out

    def has_unfinished(self) -> bool:
        """True while some request is waiting or running, or an output is pending.

        Importing requests do not count: there is nothing to step until they are activated.
        """
        return self.scheduler.has_work() or bool(self._pending)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def last_step_simulated_s(self) -> float:
        """Seconds the last :meth:`step` would take on the simulated hardware (mock engine;
        already divided by ``speedup_ratio``); 0.0 for the model engine and for a step that ran
        nothing. The engine never sleeps: the caller waits this long after the step."""
        return self._last_step_simulated_s

    def copy_blocks(self, src_ids: list[int], dst_ids: list[int]) -> None:
        """Copy the KV of block ``src_ids[i]`` to ``dst_ids[i]`` in this engine's pool (a ``both``
        worker decoding its own prefill); no-op for the mock engine.

        Raises ``ValueError`` if the lengths differ, ``IndexError`` for an id outside the pool.
        """
        self.executor.copy_blocks(list(src_ids), list(dst_ids))

    def num_waiting_prefill_tokens(self) -> int:
        """Prompt tokens not computed yet (tokens), over waiting (incl. preempted) and running
        sequences still in their prompt: ``num_prompt_tokens - num_computed_tokens``. A waiting
        request's prefix-cache hits are not known until it is admitted, so they are counted;
        importing requests are not (their KV arrives by transfer)."""
        total = 0
        for seq in (*self.scheduler.waiting, *self.scheduler.running):
            total += max(0, seq.num_prompt_tokens - seq.num_computed_tokens)
        return total

    def kv_usage(self) -> float:
        """Fraction of KV blocks in use (0-1): blocks held by requests, pinned for a transfer or
        being imported, over all blocks; cached-but-free blocks count as free."""
        return self.kv.stats().in_use / self.kv.num_blocks

    @property
    def num_waiting(self) -> int:
        """Waiting (incl. preempted) plus importing requests."""
        return len(self.scheduler.waiting) + len(self.scheduler.importing)

    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams]
    ) -> list[list[int]]:
        """Generate for every prompt (in-process convenience); returns the new tokens of each.

        Loops :meth:`step` until these requests finish. Raises ``ValueError`` like
        :meth:`add_request`, ``RuntimeError`` if nothing can run (blocks held by pinned or
        importing requests that nobody releases).
        """
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [f"generate-{next(self._ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params, strict=True):
            self.add_request(rid, prompt, p)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        done: set[str] = set()
        while len(done) < len(ids):
            outputs = self.step()
            for out in outputs:
                if out.request_id in results:
                    results[out.request_id].extend(out.new_token_ids)
                    if out.finished:
                        done.add(out.request_id)
            if not outputs and self.last_step_tokens == 0:
                for rid in ids:
                    self.abort(rid)
                self._pending.clear()
                raise RuntimeError("generate: no request can run (KV blocks are pinned or importing)")
        return [results[rid] for rid in ids]

    # ---- helpers -------------------------------------------------------------------------------

    def _new_sequence(
        self,
        request_id: str,
        token_ids: SequenceT[int],
        sampling: SamplingParams,
        block_hashes: SequenceT[int] | None,
        prefill_only: bool,
    ) -> Sequence:
        """Validate a request and build its :class:`Sequence` (``ValueError`` on bad input)."""
        if self.scheduler.get(request_id) is not None:
            raise ValueError(f"request {request_id!r} already exists")
        tokens = list(token_ids)
        if not tokens:
            raise ValueError("prompt is empty")
        self._check_token_ids(tokens)
        validate_sampling(sampling)
        self.scheduler.check_fits(len(tokens), sampling.max_tokens, prefill_only)
        local = compute_local_hashes(tokens, self.block_size)
        hashes = compute_sequence_hashes(local)
        if block_hashes is not None and list(block_hashes) != hashes[: len(block_hashes)]:
            raise ValueError(
                "block_hashes do not match the prompt's tokens "
                f"(block size {self.block_size}, {len(hashes)} full blocks)"
            )
        if sampling.seed is None:
            sampling = msgspec.structs.replace(sampling, seed=self._rng.getrandbits(63))
        stop = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop.add(self.eos_token_id)
        return Sequence(
            request_id,
            tokens,
            sampling,
            hashes,
            prefill_only=prefill_only,
            stop_token_ids=frozenset(stop),
            local_hashes=local,
        )

    def _check_token_ids(self, token_ids: list[int]) -> None:
        vocab = self.model_config.vocab_size
        # set(map(type, ...)): the per-token type check at C speed (a generator expression
        # was the worker's largest cost per long prompt)
        if set(map(type, token_ids)) != {int} or min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"token ids must be ints in [0, {vocab})")

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= seq.sampling.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    @staticmethod
    def _output(
        seq: Sequence, new_token_ids: list[int], reason: str | None, pinned: list[int] | None = None
    ) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_token_ids,
            finish_reason=reason,
            num_cached_tokens=seq.num_cached_tokens,
            prefill_ms=seq.prefill_ms,
            pinned_block_ids=pinned,
        )
