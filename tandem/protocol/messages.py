"""Every internal NATS payload, as msgspec Structs encoded with msgpack.

Nothing else in tandem defines a wire format. Conventions:

* Token ids are ``int`` (vocabulary ids, < 2**32). Block hashes are unsigned 64-bit ints
  (Dynamo-compatible, see :mod:`tandem.kvbm.hashing`); ``block_hashes`` lists are *sequence*
  hashes of the full blocks of a prompt, in order.
* Sizes are bytes unless the name says tokens or blocks; durations are milliseconds (``_ms``);
  wall-clock instants are Unix seconds (``_at``).
* A request/reply answer is ``Reply | ErrorReply`` (tagged union): callers decode with
  :func:`decoder` for the union and check ``isinstance(x, ErrorReply)``.
* ``request_id`` is on every request-scoped message; trace context rides in NATS headers
  (``traceparent``), never in payloads.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec

PROTOCOL_VERSION = 1

Role = Literal["prefill", "decode", "both"]
FinishReason = Literal["stop", "length", "abort", "error"]


class Message(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="kind"):
    """Base of every internal message."""


# ---- errors -------------------------------------------------------------------------------------


class ErrorReply(Message, tag="error"):
    """Error answer to any internal request.

    ``code`` follows HTTP semantics (400 bad request, 404 unknown, 409 conflict,
    500 internal, 503 unavailable, 504 timeout) so the frontend can map it directly.
    """

    code: int
    message: str
    request_id: str = ""
    type: str = "invalid_request_error"
    #: For 429/503 (busy): seconds after which a retry may succeed; the frontend sends it as
    #: HTTP ``Retry-After``. None = no hint.
    retry_after_s: float | None = None


# ---- sampling -----------------------------------------------------------------------------------


class SamplingParams(Message):
    """Per-request sampling and stopping.

    ``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters.
    Randomness is a pure function of ``(seed, position)``; ``seed=None`` means the router
    assigns one, so a request's tokens never depend on which worker ran it.
    Stop *strings* are applied by the frontend (which detokenizes); workers stop on
    ``stop_token_ids`` (eos unless ``ignore_eos``) and ``max_tokens`` (new tokens).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False


# ---- frontend → router ---------------------------------------------------------------------------


class RouteRequest(Message, tag="route"):
    """A tokenized request. Token chunks go straight to ``reply_to`` (the frontend inbox).

    ``block_hashes``: sequence hashes of the prompt's full blocks (computed once, by the
    frontend, with the workers' block size).
    """

    request_id: str
    model: str
    token_ids: list[int]
    block_hashes: list[int]
    sampling: SamplingParams
    reply_to: str


class Cancel(Message, tag="cancel"):
    """Stop a request wherever it is (router, prefill, decode); frees its KV blocks."""

    request_id: str
    reason: str = "client"


# ---- router ↔ indexer ---------------------------------------------------------------------------


class OverlapQuery(Message, tag="overlap_query"):
    request_id: str
    block_hashes: list[int]


class OverlapScores(Message, tag="overlap_scores"):
    """``scores[worker_id]`` = number of leading prompt blocks that worker holds (blocks)."""

    request_id: str
    scores: dict[str, int]
    tree_blocks: int = 0


# ---- KV transfer -------------------------------------------------------------------------------


class KvTransferParams(Message):
    """What a decode worker needs to READ a prefilled request's KV through NIXL.

    ``block_ids``: the prefill worker's block ids holding the prompt KV, in token order
    (``ceil(num_tokens / block_size)`` blocks; the last may be partial).
    ``descriptors``: ``(addr, nbytes, dev_id)`` per block, in the same order; the decode side
    coalesces runs that are contiguous on both sides. ``block_nbytes``: bytes of one block
    (all layers, K and V). ``compat_hash``: model/dtype/block size/layout fingerprint — the
    decode side refuses a transfer whose hash differs from its own. The prefill worker frees
    the blocks when it gets the NIXL notification ``request_id`` or at ``expires_at``.
    """

    agent_name: str
    agent_metadata: bytes
    block_ids: list[int]
    descriptors: list[tuple[int, int, int]]
    block_nbytes: int
    num_tokens: int
    block_hashes: list[int]
    compat_hash: str
    expires_at: float


class KvTransferStats(Message):
    """KV actually moved for one request (after decode reused the blocks it already held)."""

    blocks: int = 0
    bytes: int = 0
    ms: float = 0.0
    reused_blocks: int = 0


# ---- router → prefill worker --------------------------------------------------------------------


class PrefillRequest(Message, tag="prefill"):
    request_id: str
    token_ids: list[int]
    block_hashes: list[int]
    sampling: SamplingParams


class PrefillResult(Message, tag="prefill_result"):
    """The first token plus (unless the request already finished) the pinned KV.

    ``kv is None`` iff ``finish_reason`` is set (first token was a stop token or
    ``max_tokens == 1``): nothing is pinned then.
    """

    request_id: str
    worker_id: str
    first_token: int
    cached_tokens: int
    prefill_ms: float
    kv: KvTransferParams | None = None
    finish_reason: FinishReason | None = None


# ---- router → decode worker ---------------------------------------------------------------------


class RequestMetrics(Message):
    """Where and how a request ran; carried on the final TokenChunk."""

    prefill_worker: str = ""
    decode_worker: str = ""
    cached_tokens: int = 0
    prefill_ms: float = 0.0
    kv_transfer: KvTransferStats | None = None


class DecodeRequest(Message, tag="decode"):
    """Generate for a request; stream TokenChunks to ``reply_to``.

    With ``kv`` set: the prompt was prefilled remotely; ``first_token`` was already sent to the
    client, and the worker READs the KV and continues from position ``len(token_ids)``.
    With ``kv`` None: the worker prefills locally (aggregated / short prompts) and emits the
    first token itself.
    """

    request_id: str
    token_ids: list[int]
    block_hashes: list[int]
    sampling: SamplingParams
    reply_to: str
    first_token: int | None = None
    kv: KvTransferParams | None = None
    prefill_worker_id: str | None = None
    metrics: RequestMetrics = msgspec.field(default_factory=lambda: RequestMetrics())


class Ack(Message, tag="ack"):
    """A component accepted a request; chunks follow on its ``reply_to``.

    A decode worker answers a ``DecodeRequest`` with it (``service="worker"``). The router also
    publishes it to the request's ``reply_to``: on receipt (``service="router"``, ``worker_id`` =
    the router's instance id) and once a decode worker acked (``service="worker"``). The frontend
    uses the latest one to know whose liveness to probe while the stream is silent (see
    ``tandem.services.frontend.token_stream``).
    """

    request_id: str
    worker_id: str
    service: Literal["router", "worker"] = "worker"


class TokenChunk(Message, tag="chunk"):
    """New tokens for a request, in order. ``index`` counts chunks from 0 per request.

    The last chunk has ``finish_reason`` set (and ``metrics``); ``error`` is set iff
    ``finish_reason == "error"``.
    """

    request_id: str
    index: int
    token_ids: list[int]
    worker_id: str = ""
    finish_reason: FinishReason | None = None
    error: ErrorReply | None = None
    metrics: RequestMetrics | None = None


# ---- KV events (Dynamo-compatible shapes) -------------------------------------------------------


class StoredBlock(Message):
    block_hash: int  # sequence hash
    tokens_hash: int  # local hash


class KvStored(Message, tag="stored"):
    """Blocks became cached. ``parent_hash``: sequence hash of the block before ``blocks[0]``
    (None at the root of a sequence)."""

    blocks: list[StoredBlock]
    parent_hash: int | None = None


class KvRemoved(Message, tag="removed"):
    block_hashes: list[int]


class KvCleared(Message, tag="cleared"):
    pass


KvEventData = KvStored | KvRemoved | KvCleared


class KvEvent(Message):
    """One KV event. ``event_id`` counts up from 0 per worker; gaps mean lost events."""

    event_id: int
    data: KvEventData


class KvEventBatch(Message, tag="kv_events"):
    worker_id: str
    events: list[KvEvent]


# ---- discovery ---------------------------------------------------------------------------------


class WorkerLoad(Message):
    """A worker's load as of its last heartbeat (sequences and blocks)."""

    num_running: int = 0
    num_waiting: int = 0
    used_blocks: int = 0
    pinned_blocks: int = 0
    #: Prompt tokens queued or being prefilled (not yet computed), tokens.
    waiting_prefill_tokens: int = 0


class InstanceInfo(Message, tag="instance"):
    """A worker's entry in the ``{ns}-instances`` KV bucket, refreshed every heartbeat."""

    instance_id: str
    role: Role
    model: str
    block_size: int
    num_blocks: int
    block_nbytes: int
    compat_hash: str
    nixl_agent_name: str
    nixl_metadata: bytes
    heartbeat_at: float
    protocol_version: int = PROTOCOL_VERSION
    load: WorkerLoad = msgspec.field(default_factory=WorkerLoad)
    #: ``"model"`` (a real model) or ``"mock"`` (Dynamo-style mocker: real scheduler and KV
    #: block manager, simulated timing, no KV bytes).
    engine: str = "model"
    #: How the decode side moves this worker's KV: ``"nixl"`` or ``"simulated"`` (mocker).
    kv_transport: str = "nixl"
    #: (added for issue #5, worker; owner: worker) A prefill-capable NIXL worker's descriptor of
    #: one block of its KV pool (``(addr, nbytes, dev_id)``): a decode worker READs it once when
    #: this worker registers, so its first real READ from it runs at full speed (NIXL warm-up,
    #: ``tandem.services.worker.decode``). None: nothing to warm up (simulated, decode-only).
    kv_probe: tuple[int, int, int] | None = None

    @property
    def can_prefill(self) -> bool:
        """Role ``prefill`` or ``both``."""
        return self.role != "decode"

    @property
    def can_decode(self) -> bool:
        """Role ``decode`` or ``both``."""
        return self.role != "prefill"


class WorkerStatsRequest(Message, tag="stats_request"):
    check_integrity: bool = True


class WorkerStats(Message, tag="stats"):
    """Pool state of a worker (blocks), for tests and operators."""

    worker_id: str
    num_blocks: int
    free_blocks: int
    cached_blocks: int
    in_use_blocks: int
    pinned_blocks: int
    integrity_ok: bool
    integrity_error: str = ""
    rss_bytes: int = 0
    pending_transfers: int = 0
    kv_events_published: int = 0


# ---- health -----------------------------------------------------------------------------------


class HealthRequest(Message, tag="health_request"):
    """Health / liveness probe. With ``request_id`` set, the answer's ``holds`` says whether this
    instance still holds that request (a liveness probe for one stream)."""

    request_id: str = ""


class Health(Message, tag="health"):
    """Answer on ``{ns}.health.{service}``: the service is up and serving."""

    service: str
    instance_id: str
    ready: bool = True
    detail: str = ""
    #: Answer to ``HealthRequest.request_id``: the request is still here (None: not asked).
    holds: bool | None = None


# ---- codec -------------------------------------------------------------------------------------

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


def encode(msg: Message) -> bytes:
    """msgpack bytes of a message."""
    return _encoder.encode(msg)


def decoder(tp: Any) -> msgspec.msgpack.Decoder[Any]:
    """A reusable msgpack decoder for ``tp`` (a Struct type or a union of tagged Structs).

    ``decode()`` raises ``msgspec.DecodeError`` / ``msgspec.ValidationError`` on bad input.
    """
    return msgspec.msgpack.Decoder(tp)


__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Cancel",
    "DecodeRequest",
    "ErrorReply",
    "FinishReason",
    "Health",
    "HealthRequest",
    "InstanceInfo",
    "KvCleared",
    "KvEvent",
    "KvEventBatch",
    "KvEventData",
    "KvRemoved",
    "KvStored",
    "KvTransferParams",
    "KvTransferStats",
    "Message",
    "OverlapQuery",
    "OverlapScores",
    "PrefillRequest",
    "PrefillResult",
    "RequestMetrics",
    "Role",
    "RouteRequest",
    "SamplingParams",
    "StoredBlock",
    "TokenChunk",
    "WorkerLoad",
    "WorkerStats",
    "WorkerStatsRequest",
    "decoder",
    "encode",
]


# ---- router: request completion (added for issue #5, routing policy; owner: router) -------------


class RequestFinished(Message, tag="request_finished"):
    """A decode worker's stream for ``request_id`` ended (any reason: stop, length, abort, error).

    Published by the decode worker on ``Subjects.request_finished`` once the final chunk is out;
    every router replica subscribes (no queue group) and the one that dispatched the request
    stops counting its blocks as that worker's load (``tandem/services/router/active.py``).
    """

    request_id: str
    worker_id: str
    finish_reason: FinishReason | None = None


class PrefillFinished(Message, tag="prefill_finished"):
    """A worker finished prefilling ``request_id`` itself (aggregated / local prefill): its first
    token is out. Published on ``Subjects.prefill_finished``; the router that dispatched the
    request stops counting its prompt tokens as that worker's prefill load (its blocks stay
    counted until :class:`RequestFinished`). Remote prefills need no such message: the router
    sees their ``PrefillResult``."""

    request_id: str
    worker_id: str


__all__ += ["PrefillFinished", "RequestFinished"]


# ---- KV indexer snapshots (added for issue #6, indexer restarts; owner: indexer) -----------------

#: Version of :class:`IndexerSnapshot` (and the :class:`RadixTreeState` inside) this code writes
#: and reads; a snapshot of another version is ignored (the indexer replays the stream instead).
INDEXER_SNAPSHOT_VERSION = 1


class RadixWorkerState(Message, tag="radix_worker"):
    """One worker known to a radix tree: its bit position (``slot``) in the block masks, how many
    blocks it holds (blocks) and the id of its last applied KV event (None: none applied)."""

    worker_id: str
    slot: int
    num_blocks: int
    last_event_id: int | None = None


class RadixTreeState(Message, tag="radix_tree"):
    """Everything :class:`tandem.kvbm.radix.BaseRadixTree` needs to rebuild itself, for either
    implementation (``snapshot()`` / ``restore()``).

    The tree is a flat table ``sequence hash -> workers holding the block`` (a sequence hash
    encodes its whole prefix, so no parent links are needed): ``hashes`` holds one little-endian
    u64 per block, ``masks`` ``mask_words`` little-endian u64 per block in the same order (worker
    slot ``s`` is bit ``s % 64`` of word ``s // 64``), ``roots`` the little-endian u64 hashes of
    the blocks that start a sequence (stored with parent None). The counters carry on the tree's
    anomaly counts (events).
    """

    workers: list[RadixWorkerState]
    mask_words: int
    hashes: bytes
    masks: bytes
    roots: bytes
    gaps: int = 0
    unknown_parent_events: int = 0
    unknown_removed_blocks: int = 0


class IndexerSnapshot(Message, tag="indexer_snapshot"):
    """The KV indexer's state after applying the KV-events stream ``stream`` up to and including
    sequence ``stream_seq`` (and nothing after it), stored in the JetStream object store
    ``{ns}-indexer-snapshot``. A restarting indexer restores ``tree`` and consumes the stream from
    ``stream_seq + 1``, which gives the state of a full replay. ``events``: KV events reflected
    (all time); ``created_at``: Unix seconds; ``indexer_id``: the writer's instance id."""

    version: int
    stream: str
    stream_seq: int
    created_at: float
    indexer_id: str
    events: int
    tree: RadixTreeState


__all__ += ["INDEXER_SNAPSHOT_VERSION", "IndexerSnapshot", "RadixTreeState", "RadixWorkerState"]
