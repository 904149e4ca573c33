"""The worker (``python -m tandem.services.worker``): engine, KV block pool, scheduler, KV transport.

Modules, one concern each:

* :mod:`.config` — :class:`WorkerConfig`, the source of the worker's own flags (light import:
  no NATS, no torch; the launcher uses it); the engine's are ``EngineConfig``'s.
* :mod:`.requests` — the request table: one :class:`~.requests.WorkerRequest` per request in an
  explicit :class:`~.requests.Phase`.
* :mod:`.engine_client` — :class:`~.engine_client.EngineClient`, the only caller of
  ``LLMEngine``: engine thread (model) or inline steps with simulated timing (mock).
* :mod:`.prefill` — the prefill role and the pinned KV's fate (notification, expiry, cancel).
* :mod:`.decode` — the decode role: import over a KV transport, token chunks, NIXL warm-up.
* :mod:`.kv_events` — :class:`~.kv_events.KvEventPublisher`, KV events to JetStream.
* :mod:`.service` — :class:`~.service.Worker` (wiring, registration, stats, shutdown) and
  :class:`~.service.WorkerHost` (N workers in one process), ``build_parser`` / ``main``.

Life cycle of a request
=======================

Prefill role (``worker_prefill(id)``: PrefillRequest → PrefillResult):

1. *received* — refused with 503 while draining, 409 if the id is in the table; else a
   WorkerRequest enters the table in phase PREFILLING.
2. *scheduled* — ``engine.add_request(prefill_only=True)`` (a ``ValueError`` → ErrorReply 400);
   the engine loop steps it (chunked prefill over several steps for long prompts; a mock step
   waits its simulated duration).
3. *first token* — the engine loop resolves the request's future with its output. If the
   request already finished (stop token, ``max_tokens == 1``) nothing is pinned and the reply is
   ``PrefillResult(finish_reason=..., kv=None)``; the entry leaves the table.
4. *PINNED* — otherwise the engine pinned the prompt's blocks; the reply carries
   ``KvTransferParams`` (transport name + metadata, block ids, descriptors, ``expires_at``).
5. *freed* — on the transport's notification ``request_id`` (the decode side finished its
   READ), on expiry (``--kv-ttl-s``, a warning) or on ``Cancel``: ``engine.release_pinned``; the
   entry is FINISHED and leaves the table.

Decode role (``worker_generate(id)``: DecodeRequest → Ack, then TokenChunk* to ``reply_to``):

1. *received* — validated (``kv.compat_hash`` must equal ours, else 409; shape checks → 400;
   an id already in the table → 409, except a ``both`` worker's own PINNED prefill); answered
   with ``Ack`` at once.
2. *IMPORTING* — ``engine.import_request`` allocates blocks for the prompt, reusing cached
   prefix blocks; the KV transport READs the blocks it lacks (``blocks[num_reused:]``) from the
   same positions of the remote descriptors, notification = ``request_id`` (sent even when
   nothing is read, so the prefill side always frees). The transport: NIXL (model), simulated
   (mock: ``bytes / --kv-transfer-bandwidth``, no bytes), or an in-pool copy when the KV is this
   worker's own (role ``both``). Failure → the imported blocks are freed and a final error chunk
   is sent. (Without ``kv`` the request is prefilled here instead and starts RUNNING, first
   chunk ``index`` 0.)
3. *RUNNING* — ``engine.activate_imported``; one TokenChunk per engine step, ``index`` from 1
   (the router sent chunk 0 with the first token).
4. *FINISHED* — the final chunk carries ``finish_reason`` and ``metrics`` (decode worker, KV
   transfer blocks/bytes/ms, reused blocks), then ``RequestFinished`` goes to the router.
   ``Cancel`` → ``engine.abort`` and a final chunk with ``finish_reason="abort"``.

KV events: after every engine call the events the block manager emitted go, in order, to the
worker's KvEventPublisher, which publishes ``KvEventBatch`` to ``kv_events(id)`` via JetStream.

Shutdown: see :mod:`.service` (unregister → grace → drain transfers → close → drain NATS;
at most about 30 s by default, under the launcher's 40 s stop grace). Exit code 0; a start-up
failure (e.g. NIXL cannot load for the model engine: there is no fallback) exits 1.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import WorkerConfig, worker_ids

if TYPE_CHECKING:
    from .requests import Phase, RequestTable, WorkerRequest, finish_reason
    from .service import SERVICE, Worker, WorkerHost, build_parser, main, parse_args

_LAZY = {
    "Phase": ".requests",
    "RequestTable": ".requests",
    "WorkerRequest": ".requests",
    "finish_reason": ".requests",
    "SERVICE": ".service",
    "Worker": ".service",
    "WorkerHost": ".service",
    "build_parser": ".service",
    "main": ".service",
    "parse_args": ".service",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


__all__ = [
    "SERVICE",
    "Phase",
    "RequestTable",
    "Worker",
    "WorkerConfig",
    "WorkerHost",
    "WorkerRequest",
    "build_parser",
    "finish_reason",
    "main",
    "parse_args",
    "worker_ids",
]
