"""MockExecutor: the engine with no model, Dynamo-mocker style (``EngineConfig(engine="mock")``).

Everything but the forward pass is real: the same :class:`~tandem.engine.scheduler.Scheduler`
(continuous batching, chunked prefill, preemption), the same
:class:`~tandem.kvbm.manager.KvCacheManager` (block pool, prefix cache, Dynamo-compatible block
hashes and KV events), so the KV indexer and the router see exactly what a real worker would
publish. The executor only invents the sampled tokens and says how long the step would have
taken on the simulated hardware (:attr:`MockExecutor.last_step_simulated_s`); the engine never
sleeps, its async caller waits.

No torch anywhere on this path (``import tandem.engine.engine`` does not import it either).

Timing model (source: Dynamo's mocker, ``ai-dynamo/dynamo``)
------------------------------------------------------------
Read from the newest snapshot the public code index holds (workspace version 1.2.0, 2026): the
1.6.1 tag itself was not available here (the repository snapshot is too large to fetch, and the
index stores no 1.6.x file versions; from 1.5 on the docs say timing lives in the
``aisimulate_core::engine`` crate, whose source the index does not hold). Files:

* ``lib/mocker/src/common/perf_model.rs`` — ``polynomial_prefill_time`` /
  ``polynomial_decode_time`` (``PerfModel::Polynomial``, the default):

  - prefill ``16.50142 + 1.518344e-2·T + 4.209989e-7·T²`` ms, ``T`` = new (uncached) prompt
    tokens of the whole batch (``batch_size × (isl − prefix)``), 0 ms when ``T == 0``;
  - decode ``max(1, 5.74 + 54.01·u − 25.74·u²)`` ms with ``u = min(1, active_kv_tokens /
    total_kv_tokens)``.

* ``lib/mocker/src/scheduler/vllm/core.rs`` — ``execute_pass_internal``,
  ``predict_prefill_duration``, ``emit_ready_tokens``, ``scale_decode_time``: one scheduler pass
  lasts **prefill time + decode time** (a sum; each part is 0 when absent):

  - prefill part: over the requests that computed prompt tokens this pass (chunks included),
    ``T = batch_count × (mean_isl − mean_prefix)`` where ``isl`` = prompt position reached and
    ``prefix`` = prompt tokens already computed or cached, i.e. the pass's uncached prompt
    tokens (Dynamo's integer means can round this down by < ``batch_count`` tokens; we use the
    exact sum). Zero on a decode worker.
  - decode part: only if some request *decodes* this pass, i.e. emits a token without computing
    prompt tokens in it; zero on a prefill worker ("the first decode token is produced as part
    of the prefill forward pass"). A request whose prefill completes in the pass emits its first
    token as part of the prefill too, on an aggregated worker as well: measured on ai-dynamo
    1.6.1's mocker (``--speedup-ratio 1``, one request at a time, streamed), TTFT is the same
    with ``--decode-speedup-ratio 1e6`` as without (73 / 773 / 3021 prompt tokens: 24 / 34 / 65
    ms either way), so its first pass carries no decode time. (The 1.2.0 source read above
    counted such a request as "ready" and charged decode time for it; 1.6.1 does not.)
    ``active_kv_tokens = num_active_blocks × block_size`` (blocks holding references: in use by
    requests, held for a transfer) measured after the pass's allocations, ``total_kv_tokens =
    num_gpu_blocks × block_size``: so ``u`` = used blocks / total blocks (cached-but-free blocks
    do not count).
  - each part is divided by ``speedup_ratio`` (decode also by ``decode_speedup_ratio``, 1 by
    default; not exposed here).

* ``lib/mocker/src/common/utils.rs`` — ``compute_prefill_handoff_delay_ms``: on a prefill
  worker, when a request completes, the KV hand-off takes ``prompt_tokens × kv_bytes_per_token /
  (kv_transfer_bandwidth GB/s × 1e9)`` s; not divided by ``speedup_ratio`` (see
  :func:`kv_transfer_delay_s`).

Older Dynamo (``lib/llm/src/mocker/scheduler.rs``, 0.x) summed a per-request prefill cost
(batch-chunked) and always added the decode time of the pass; the layout moved to
``lib/mocker`` later, with the semantics above.

Mapping onto tandem: Dynamo's worker types are per worker, ours per request. A request that
computes prompt tokens in a pass (a prefill chunk, the final one included, or a recompute after
preemption) counts as prefilling in that pass, never as decoding; a ``prefill_only`` request
never decodes. Every other request that samples a token counts as decoding. An imported
request (decode side) never schedules prompt tokens, so it adds no prefill time; after a
preemption its recompute does count (real work, unlike Dynamo's decode worker which never
charges prefill). ``u`` = ``kv.stats().in_use / num_blocks``
(pinned blocks included: Dynamo's held source blocks are active too).
"""

from __future__ import annotations

import struct
import weakref
from dataclasses import dataclass

import xxhash

from tandem.engine.config import EngineConfig, ModelConfig
from tandem.engine.executor import TokenResult, check_copy
from tandem.engine.scheduler import SchedulerOutput, Sequence
from tandem.kvbm.manager import KvCacheManager

#: Dynamo mocker's default prefill polynomial ``(c0, c1, c2)``: ``c0 + c1·T + c2·T²`` ms over the
#: pass's uncached prompt tokens ``T`` (``perf_model.rs``).
PREFILL_POLY_MS: tuple[float, float, float] = (16.50142, 1.518344e-2, 4.209989e-7)
#: Dynamo mocker's default decode polynomial ``(c0, c1, c2)``: ``max(1, c0 + c1·u + c2·u²)`` ms
#: over the KV utilisation ``u`` in ``[0, 1]`` (``perf_model.rs``).
DECODE_POLY_MS: tuple[float, float, float] = (5.74, 54.01, -25.74)
#: Floor of a decode pass (ms): token-emitting passes never collapse onto one timestamp.
DECODE_MIN_MS = 1.0

_U64 = (1 << 64) - 1
_TOKEN_HASH_SEED = 0x70C3_4D0C  # domain separator: not block hashes, not sampling uniforms


def prefill_time_ms(num_tokens: int) -> float:
    """Dynamo's polynomial prefill time (ms) of a pass computing ``num_tokens`` uncached prompt
    tokens; 0.0 for ``num_tokens <= 0``."""
    if num_tokens <= 0:
        return 0.0
    c0, c1, c2 = PREFILL_POLY_MS
    t = float(num_tokens)
    return max(0.0, c0 + c1 * t + c2 * t * t)


def decode_time_ms(kv_usage: float) -> float:
    """Dynamo's polynomial decode time (ms) of a pass at KV utilisation ``kv_usage`` (used /
    total blocks; clamped to ``[0, 1]``): ``max(1, 5.74 + 54.01·u − 25.74·u²)``."""
    u = min(1.0, max(0.0, kv_usage))
    c0, c1, c2 = DECODE_POLY_MS
    return max(DECODE_MIN_MS, c0 + c1 * u + c2 * u * u)


def kv_transfer_delay_s(num_tokens: int, kv_bytes_per_token: int, bandwidth_gb_s: float) -> float:
    """Simulated KV hand-off time (s) of ``num_tokens`` tokens at ``bandwidth_gb_s`` GB/s
    (1e9 bytes/s), as Dynamo's ``compute_prefill_handoff_delay_ms``; 0.0 when the bandwidth is
    not positive (transfer simulation off). Not scaled by ``speedup_ratio`` (as in Dynamo)."""
    if bandwidth_gb_s <= 0 or num_tokens <= 0:
        return 0.0
    return num_tokens * kv_bytes_per_token / (bandwidth_gb_s * 1e9)


@dataclass(frozen=True)
class PassCost:
    """The simulated cost of one executed step.

    Attributes:
        prefill_tokens: uncached prompt tokens computed (tokens; Dynamo's ``T``).
        num_prefill_seqs: sequences that computed prompt tokens.
        num_decode_seqs: sequences that emitted a token without computing prompt tokens this
            pass (decoding; never ``prefill_only``).
        kv_usage: used / total KV blocks after the step's allocations (Dynamo's ``u``).
        prefill_ms: :func:`prefill_time_ms` of ``prefill_tokens`` (ms, unscaled).
        decode_ms: :func:`decode_time_ms` of ``kv_usage`` if anything decoded, else 0 (ms,
            unscaled).
        simulated_s: ``(prefill_ms + decode_ms) / 1000 / speedup_ratio`` (s).
    """

    prefill_tokens: int
    num_prefill_seqs: int
    num_decode_seqs: int
    kv_usage: float
    prefill_ms: float
    decode_ms: float
    simulated_s: float


def pass_cost(out: SchedulerOutput, kv_usage: float, speedup_ratio: float = 1.0) -> PassCost:
    """The Dynamo-mocker cost of step ``out`` at KV utilisation ``kv_usage`` (see the module
    docstring). Raises ``ValueError`` if ``speedup_ratio`` is not positive."""
    if not speedup_ratio > 0:
        raise ValueError(f"speedup_ratio must be positive, got {speedup_ratio}")
    prefill_tokens = 0
    num_prefill = 0
    num_decode = 0
    for item in out.scheduled:
        seq = item.seq
        p = seq.num_prompt_tokens
        prompt = min(item.start + item.num_tokens, p) - min(item.start, p)
        if prompt > 0:
            prefill_tokens += prompt
            num_prefill += 1
        elif item.samples and not seq.prefill_only:
            num_decode += 1
    prefill_ms = prefill_time_ms(prefill_tokens)
    decode_ms = decode_time_ms(kv_usage) if num_decode else 0.0
    return PassCost(
        prefill_tokens=prefill_tokens,
        num_prefill_seqs=num_prefill,
        num_decode_seqs=num_decode,
        kv_usage=kv_usage,
        prefill_ms=prefill_ms,
        decode_ms=decode_ms,
        simulated_s=(prefill_ms + decode_ms) / 1e3 / speedup_ratio,
    )


def random_token(seed: int, position: int, vocab_size: int, eos_token_id: int) -> int:
    """The mock's "random" token at ``position`` (index in the sequence) of a request seeded
    ``seed``: a pure function of its arguments (XXH3-64), uniform over ``[0, vocab_size)`` minus
    the eos token (unless the vocabulary is only eos)."""
    h = xxhash.xxh3_64_intdigest(struct.pack("<QQ", seed & _U64, position & _U64), seed=_TOKEN_HASH_SEED)
    if not 0 <= eos_token_id < vocab_size or vocab_size == 1:
        return h % vocab_size
    token = h % (vocab_size - 1)
    return token + 1 if token >= eos_token_id else token


class MockExecutor:
    """Executes scheduled steps without a model (see the module docstring for the timing).

    Tokens (``config.mock_tokens``), both a pure function of the request and the position of the
    token, so a request gives the same tokens on any worker, aggregated or disaggregated
    (``prefill_only`` → ``import_request``), batched or alone, preempted or not:

    * ``"random"``: :func:`random_token` of ``(sampling seed, position)``; never the eos token.
    * ``"echo"``: the prompt repeated cyclically (output token ``i`` = ``prompt[i % len]``), the
      eos token skipped (a chat prompt holds eos as ``<|im_end|>``); an all-eos prompt falls back
      to "random".

    Like Dynamo's mocker, a request therefore runs to ``max_tokens`` (or ``max_model_len``)
    whatever ``ignore_eos`` says; a token in the request's own ``stop_token_ids`` still stops it
    ("stop") if it comes up. Temperature, top-k and top-p are ignored.

    Args:
        config: engine settings (``speedup_ratio``, ``mock_tokens``).
        model_config: the shape it pretends to run (``vocab_size``, ``eos_token_id``).
        num_blocks: KV pool size (blocks), for :meth:`copy_blocks` checks.

    Attributes:
        kv_cache: always None (no KV bytes exist).
        last_step_simulated_s: simulated duration of the last :meth:`execute` (s, already divided
            by ``speedup_ratio``).
        last_pass: the :class:`PassCost` of the last :meth:`execute` (None before the first).
    """

    kv_cache: None = None

    def __init__(self, config: EngineConfig, model_config: ModelConfig, num_blocks: int) -> None:
        self.speedup_ratio = config.speedup_ratio
        self.mock_tokens = config.mock_tokens
        self.vocab_size = model_config.vocab_size
        self.eos_token_id = model_config.eos_token_id
        self.num_blocks = num_blocks
        self.last_step_simulated_s = 0.0
        self.last_pass: PassCost | None = None
        self._echo: weakref.WeakKeyDictionary[Sequence, list[int]] = weakref.WeakKeyDictionary()

    def execute(self, out: SchedulerOutput, kv: KvCacheManager) -> list[TokenResult]:
        """Pick the tokens of ``out`` and set :attr:`last_step_simulated_s` (see the class).

        A sequence whose token cannot be picked (:meth:`token_at` raised) gets the exception in
        its slot; the others their tokens. Raises ``ValueError`` if ``out`` is empty.
        """
        if out.is_empty:
            raise ValueError("nothing scheduled")
        usage = kv.stats().in_use / kv.num_blocks
        self.last_pass = pass_cost(out, usage, self.speedup_ratio)
        self.last_step_simulated_s = self.last_pass.simulated_s
        results: list[TokenResult] = []
        for item in out.scheduled:
            if not item.samples:
                results.append(None)
                continue
            try:
                results.append(self.token_at(item.seq, item.start + item.num_tokens))
            except Exception as exc:
                results.append(exc)
        return results

    def token_at(self, seq: Sequence, position: int) -> int:
        """The token the mock samples at ``position`` (>= the prompt length) of ``seq``."""
        if self.mock_tokens == "echo":
            source = self._echo.get(seq)
            if source is None:
                source = [t for t in seq.token_ids[: seq.num_prompt_tokens] if t != self.eos_token_id]
                self._echo[seq] = source
            if source:
                return source[(position - seq.num_prompt_tokens) % len(source)]
        return random_token(seq.sampling.seed or 0, position, self.vocab_size, self.eos_token_id)

    def copy_blocks(self, src_ids: list[int], dst_ids: list[int]) -> None:
        """No KV bytes to copy: only checks the ids (``ValueError`` on different lengths,
        ``IndexError`` outside ``[0, num_blocks)``)."""
        check_copy(src_ids, dst_ids, self.num_blocks)
