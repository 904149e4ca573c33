"""EngineClient: the only code in the worker that calls :class:`~tandem.engine.engine.LLMEngine`.

The analogue of vLLM's ``AsyncLLM``/``EngineCoreClient``: it owns the engine, serializes every
call to it, runs the step loop and hands what the engine produced — outputs and KV events — back
to the worker on the asyncio loop, in order.

* **model engine**: every engine call runs on ONE dedicated thread (a single-thread executor,
  ``engine``); NATS, NIXL and the worker's tables stay on the loop thread, so heartbeats, NIXL
  polling and new requests never wait behind a forward pass. Events drained on the engine thread
  reach the loop with ``call_soon_threadsafe`` (FIFO, so their order is kept).
* **mock engine**: calls run inline on the loop (a mock step is scheduler and block bookkeeping,
  no model: well under a millisecond), so a process hosting hundreds of mock workers has no
  thread per worker and an idle worker costs nothing but one awaited ``asyncio.Event``. After a
  step the loop sleeps ``engine.last_step_simulated_s`` minus the real time the step took before
  reporting its outputs: the mock's timing is reproduced, and other workers run meanwhile. The
  next pass is timed from the end of that one (when there is more work), not from after its
  outputs were handed over: publishing a pass's tokens overlaps the next pass, as a real
  engine's output processing overlaps its next forward pass (at most one pass of overlap).
  A step whose simulated time already passed while it ran (a high ``--speedup-ratio``: the
  worker is CPU-bound, not timed) does not yield: the next step runs at once, for up to
  :data:`MAX_BURST_S` (shared by the process's CPU-bound workers: a loop cycle stays about that
  long however many of them there are) and :data:`MAX_BURST_STEPS`, and the tokens of such a
  burst leave as one chunk per request (``on_flush``) instead of one publish, and one socket
  write, per step.
  Whatever must not wait for the end of a burst (a first token, a final chunk, a prefill
  answer) calls :meth:`EngineClient.end_burst`: the loop yields after that step.
  The engine state for heartbeats (:attr:`EngineClient.snapshot`) is read when asked for.

The step loop awaits ``step()`` while the engine has work and sleeps on an event when idle; a
step that could run nothing (waiting for pinned or importing blocks) backs off briefly. After
the outputs of a step it waited out (or of the last step of a burst) it calls ``on_flush``.

Request isolation: a request that fails on its own inside a step (its sampling or stop handling
raised, a poisoned parameter) comes out of ``step()`` as an ordinary output with
``finish_reason="error"`` and ``error`` set; the engine has already freed its blocks and the rest
of the batch went on. It reaches ``on_outputs`` like any other (the worker answers that request
alone: a final chunk with ``finish_reason="error"``, or an error reply to its prefill) and is
logged here (``request_failed``). ``on_failure`` is only for a step that failed as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from tandem.protocol.messages import KvEvent

if TYPE_CHECKING:
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import LLMEngine, RequestOutput
    from tandem.kvbm.manager import ManagerStats

__all__ = ["MAX_BURST_S", "MAX_BURST_STEPS", "STALLED_BACKOFF_S", "EngineClient", "EngineSnapshot"]

T = TypeVar("T")

#: How long the step loop waits before retrying a stalled step, unless woken earlier (s).
STALLED_BACKOFF_S = 0.005
#: Mock engine: the longest a burst of back-to-back steps (no simulated time left to wait out)
#: runs before the loop yields and the burst's tokens are sent (s; divided among the process's
#: CPU-bound workers); and the most steps in one.
MAX_BURST_S = 0.001
MAX_BURST_STEPS = 16


@dataclass(frozen=True)
class EngineSnapshot:
    """Engine state as of the last step (read by heartbeats without touching the engine)."""

    stats: ManagerStats | None = None
    num_running: int = 0
    waiting_prefill_tokens: int = 0


class EngineClient:
    """One engine, its calls serialized, its step loop.

    Args:
        config: the engine settings (``config.engine`` picks model or mock).
        on_events: called on the loop thread with each batch of KV events, in engine order.
        log: a structlog logger.
    """

    #: The engine clients of this process whose last step was CPU-bound (share MAX_BURST_S).
    _cpu_bound: ClassVar[set[int]] = set()

    def __init__(self, config: EngineConfig, on_events: Callable[[list[KvEvent]], None], log: Any) -> None:
        self.config = config
        self.mock = config.engine == "mock"
        self.log = log
        self._on_events = on_events
        self._engine: LLMEngine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._end_burst = False
        self._snapshot_value = EngineSnapshot()

    @property
    def engine(self) -> LLMEngine:
        """The engine (``RuntimeError`` before :meth:`start`)."""
        if self._engine is None:
            raise RuntimeError("engine not started")
        return self._engine

    @property
    def started(self) -> bool:
        return self._engine is not None

    # ---- life cycle -------------------------------------------------------------------------------

    async def start(self) -> LLMEngine:
        """Build the engine: on the engine thread for the model (loads weights), inline for mock."""
        from tandem.engine.engine import LLMEngine

        self._loop = asyncio.get_running_loop()
        if self.mock:
            engine = LLMEngine(self.config)
        else:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
            engine = await self._loop.run_in_executor(self._executor, LLMEngine, self.config)
        self._engine = engine
        self._snapshot_value = await self.call(self._snapshot)
        return engine

    @property
    def snapshot(self) -> EngineSnapshot:
        """Engine state for heartbeats: as of the last step (model engine, read without touching
        the engine thread), or now (mock engine: it runs on this thread)."""
        if self.mock and self._engine is not None:
            return self._snapshot()
        return self._snapshot_value

    def start_loop(
        self,
        on_outputs: Callable[[list[RequestOutput]], Awaitable[None]],
        on_failure: Callable[[str], Awaitable[None]],
        on_flush: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Start the step loop: ``await on_outputs(outputs)`` after each step that produced
        any, then ``await on_flush()`` unless the step is part of a burst that goes on (mock
        engine, see the module docstring); ``await on_failure(message)`` after a step raised as
        a whole (the loop keeps going). A request that failed alone arrives in ``on_outputs``
        (``finish_reason="error"``, see the module docstring)."""
        self._task = asyncio.get_running_loop().create_task(
            self._run(on_outputs, on_failure, on_flush), name="engine-loop"
        )

    async def close(self) -> None:
        """Stop the step loop and the engine thread (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=5.0)
        EngineClient._cpu_bound.discard(id(self))
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    # ---- calls ------------------------------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` where the engine runs, then queue the KV events it caused."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("engine not started")
        if self.mock:
            try:
                return fn(*args, **kwargs)
            finally:
                self._hand_over_events()
        executor = self._executor
        if executor is None:
            raise RuntimeError("engine stopped")

        def job() -> T:
            try:
                return fn(*args, **kwargs)
            finally:
                self._hand_over_events()

        return await loop.run_in_executor(executor, job)

    def wake(self) -> None:
        """New work (or freed blocks): let the step loop run."""
        self._wake.set()

    def end_burst(self) -> None:
        """Something of the current step must go out now: yield (and flush) after it."""
        self._end_burst = True

    async def abort(self, request_id: str) -> bool:
        """``engine.abort``; errors are logged, never raised. Wakes the step loop."""
        if self._engine is None:
            return False
        try:
            aborted = bool(await self.call(self._engine.abort, request_id))
        except Exception as exc:
            self.log.exception("abort_failed", request_id=request_id, error=repr(exc))
            return False
        self.wake()  # freed blocks may let waiting requests run; the abort output is reported
        return aborted

    async def release_pinned(self, request_id: str) -> None:
        """``engine.release_pinned``; errors are logged, never raised. Wakes the step loop."""
        if self._engine is None:
            return
        try:
            await self.call(self._engine.release_pinned, request_id)
        except Exception as exc:
            self.log.exception("release_pinned_failed", request_id=request_id, error=repr(exc))
        self.wake()

    async def copy_blocks(self, src_ids: list[int], dst_ids: list[int]) -> None:
        """``engine.copy_blocks`` (a tensor copy for the model, nothing for the mock)."""
        await self.call(self.engine.copy_blocks, src_ids, dst_ids)

    # ---- internals --------------------------------------------------------------------------------

    def _hand_over_events(self) -> None:
        """Where the engine runs: drain the block manager's events to ``on_events`` in order."""
        engine, loop = self._engine, self._loop
        if engine is None or loop is None:
            return
        events = engine.kv.take_events()
        if not events:
            return
        if self.mock:
            self._on_events(events)
        else:
            with contextlib.suppress(RuntimeError):  # loop already closed (teardown)
                loop.call_soon_threadsafe(self._on_events, events)

    def _snapshot(self) -> EngineSnapshot:
        engine = self.engine
        return EngineSnapshot(
            stats=engine.kv.stats(),
            num_running=engine.num_running,
            waiting_prefill_tokens=engine.num_waiting_prefill_tokens(),
        )

    def _step_job(self) -> tuple[list[RequestOutput], bool, bool, float, EngineSnapshot | None]:
        """One step: (outputs, more work, computed anything, simulated s, snapshot or None for
        the mock engine, whose snapshot is taken when read)."""
        engine = self.engine
        outputs = engine.step()
        return (
            outputs,
            engine.has_unfinished(),
            engine.last_step_tokens > 0,
            engine.last_step_simulated_s,
            None if self.mock else self._snapshot(),
        )

    async def _run(
        self,
        on_outputs: Callable[[list[RequestOutput]], Awaitable[None]],
        on_failure: Callable[[str], Awaitable[None]],
        on_flush: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        burst_t0 = budget_s = 0.0
        burst_steps = 0
        #: Mock: when the last waited-out pass ended on the simulated device, and its length.
        paced_until: float | None = None
        paced_s = 0.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            t0 = time.perf_counter()
            if paced_until is not None:
                # The simulated device started this pass when the last one ended: handing the
                # last pass's outputs over (publishing its tokens) overlapped with it, as a real
                # engine's output processing overlaps its next forward pass. At most one pass
                # of overlap: a loop late by more than that starts the pass now.
                if t0 - paced_until <= paced_s:
                    t0 = paced_until
                paced_until = None
            try:
                outputs, more, progressed, simulated_s, snapshot = await self.call(self._step_job)
            except Exception as exc:
                self.log.exception("engine_step_failed", error=repr(exc))
                await on_failure(f"engine step failed: {type(exc).__name__}: {exc}")
                if on_flush is not None:
                    await on_flush()
                burst_steps = 0
                continue
            if snapshot is not None:
                self._snapshot_value = snapshot
            for out in outputs:
                if out.error is not None:
                    self.log.warning("request_failed", request_id=out.request_id, error=out.error)
            if self.mock:
                now = time.perf_counter()
                wait_s = simulated_s - (now - t0)
                cpu_bound = EngineClient._cpu_bound
                if wait_s <= 0 and more and progressed:
                    # CPU-bound, nothing simulated to wait out: report at once and, within the
                    # burst's bounds and unless something must go out now, run the next step
                    # without yielding; the burst's tokens leave together.
                    cpu_bound.add(id(self))
                    if burst_steps == 0:
                        burst_t0 = t0
                        budget_s = MAX_BURST_S / len(cpu_bound)
                    burst_steps += 1
                    self._end_burst = False
                    if outputs:
                        await on_outputs(outputs)
                    self._wake.set()
                    if not self._end_burst and burst_steps < MAX_BURST_STEPS and now - burst_t0 < budget_s:
                        continue
                    burst_steps = 0
                    if on_flush is not None:
                        await on_flush()
                    await asyncio.sleep(0)  # other workers, the NATS flusher, new requests
                    continue
                cpu_bound.discard(id(self))
                burst_steps = 0
                # The simulated duration of the step (at least a yield: inline steps must not
                # starve the other workers of this loop).
                await asyncio.sleep(max(0.0, wait_s))
                if more and progressed:
                    paced_until, paced_s = t0 + simulated_s, simulated_s
            if more:
                if not outputs and not progressed:
                    # Work exists but nothing could run (e.g. waiting for pinned or importing
                    # blocks): back off instead of spinning; new work or a release wakes us.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), STALLED_BACKOFF_S)
                self._wake.set()
            if outputs:
                await on_outputs(outputs)
            if on_flush is not None:
                await on_flush()
