"""Every NATS subject, stream and bucket name tandem uses, in one place.

Namespace ``ns`` defaults to ``tandem``; several deployments can share one NATS server by using
different namespaces. See ``docs/design.md`` and the README for who publishes and who subscribes.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_NAMESPACE = "tandem"


@dataclass(frozen=True, slots=True)
class Subjects:
    """Subject names for one namespace.

    Public (OpenAI-shaped JSON, request/reply):
        ``chat_completions``, ``completions``, ``models``.
    Internal (msgspec msgpack, see :mod:`tandem.protocol.messages`):
        ``router_generate`` (RouteRequest, queue group ``router``),
        ``indexer_overlap`` (OverlapQuery → OverlapScores, queue group ``indexer``),
        ``worker_prefill(id)`` (PrefillRequest → PrefillResult),
        ``worker_generate(id)`` (DecodeRequest; TokenChunk* to ``reply_to``),
        ``cancel`` (Cancel, broadcast to router and all workers),
        ``kv_events(id)`` (KvEventBatch, captured by JetStream stream ``kv_events_stream``).
    """

    ns: str = DEFAULT_NAMESPACE

    # ---- public API -------------------------------------------------------------------------
    @property
    def chat_completions(self) -> str:
        return f"{self.ns}.v1.chat.completions"

    @property
    def completions(self) -> str:
        return f"{self.ns}.v1.completions"

    @property
    def models(self) -> str:
        return f"{self.ns}.v1.models"

    # ---- internal ---------------------------------------------------------------------------
    @property
    def router_generate(self) -> str:
        return f"{self.ns}.router.generate"

    @property
    def indexer_overlap(self) -> str:
        return f"{self.ns}.indexer.overlap"

    @property
    def cancel(self) -> str:
        return f"{self.ns}.cancel"

    def health(self, service: str) -> str:
        """Request/reply HealthRequest → Health; queue group = service name."""
        return f"{self.ns}.health.{service}"

    def health_instance(self, service: str, instance_id: str) -> str:
        """Request/reply HealthRequest → Health of one instance (no queue group): the frontend's
        liveness probe of the router replica holding a request."""
        return f"{self.ns}.health.{service}.{instance_id}"

    def worker_prefill(self, instance_id: str) -> str:
        return f"{self.ns}.worker.{instance_id}.prefill"

    def worker_generate(self, instance_id: str) -> str:
        return f"{self.ns}.worker.{instance_id}.generate"

    def worker_cancel(self, instance_id: str) -> str:
        return f"{self.ns}.worker.{instance_id}.cancel"

    def worker_debug(self, instance_id: str) -> str:
        """Request/reply: WorkerStatsRequest → WorkerStats (pool integrity, RSS, counters)."""
        return f"{self.ns}.worker.{instance_id}.stats"

    def worker_health(self, instance_id: str) -> str:
        """Request/reply: HealthRequest → Health, answered on the worker's event loop (not the
        engine thread): the liveness probe of the frontend and router while a stream is silent."""
        return f"{self.ns}.worker.{instance_id}.health"

    def kv_events(self, instance_id: str) -> str:
        return f"{self.ns}.kv.events.{instance_id}"

    @property
    def kv_events_wildcard(self) -> str:
        return f"{self.ns}.kv.events.*"

    @property
    def kv_events_stream(self) -> str:
        """JetStream stream capturing every worker's KV events."""
        return f"{self.ns.upper().replace('-', '_')}_KV_EVENTS"

    @property
    def instances_bucket(self) -> str:
        """JetStream KV bucket: key = instance id, value = msgpack InstanceInfo."""
        return f"{self.ns}-instances"

    # ---- queue groups -----------------------------------------------------------------------
    ROUTER_QUEUE = "router"
    INDEXER_QUEUE = "indexer"
    FRONTEND_QUEUE = "frontend"

    # ---- router: request completion (added for issue #5, routing policy; owner: router) -----
    @property
    def request_finished(self) -> str:
        """RequestFinished, published by decode workers when a request's stream ends; every
        router replica subscribes (no queue group)."""
        return f"{self.ns}.router.finished"

    @property
    def prefill_finished(self) -> str:
        """PrefillFinished, published by a worker when it finished prefilling a request itself;
        every router replica subscribes (no queue group)."""
        return f"{self.ns}.router.prefilled"
