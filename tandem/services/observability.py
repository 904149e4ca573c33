"""Logging and tracing shared by every tandem process.

* :func:`setup_logging` / :func:`get_logger` — structlog JSON lines on stderr.
* :func:`setup_tracing` / :func:`get_tracer` / :func:`shutdown_tracing` — the OpenTelemetry
  tracer provider (OTLP/HTTP export when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set).
* :func:`inject_headers` / :func:`extract_context` — trace context in NATS headers
  (``traceparent``), used by :mod:`tandem.services.messaging` on every message.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

__all__ = [
    "extract_context",
    "get_logger",
    "get_tracer",
    "inject_headers",
    "setup_logging",
    "setup_tracing",
    "shutdown_tracing",
]


# ---- logging ----------------------------------------------------------------------------------------


def setup_logging(service: str, level: str = "info") -> None:
    """Configure structlog: one JSON object per line on stderr.

    Every line carries ``service``, ``level``, ``timestamp`` (ISO UTC) and any contextvars bound
    with ``structlog.contextvars.bind_contextvars`` (``serve`` binds ``request_id`` per message).
    ``level``: debug/info/warning/error. Stdlib logging (nats-py) goes to stderr at WARNING+.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")

    def add_service(
        _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict.setdefault("service", service)
        return event_dict

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_service,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(stream=sys.stderr, level=max(numeric, logging.WARNING))


def get_logger(name: str = "tandem") -> Any:
    """A structlog logger (configured by :func:`setup_logging`)."""
    return structlog.get_logger(name)


# ---- tracing ----------------------------------------------------------------------------------------

_provider: TracerProvider | None = None
_tracers: dict[tuple[int, str], trace.Tracer] = {}


def setup_tracing(service: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """Create the tracer provider used by the runtime (resource ``service.name = service``).

    Spans go to an OTLP/HTTP exporter when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (batched), and
    to ``exporter`` when given (synchronously; tests pass an ``InMemorySpanExporter``). With
    neither, nothing would ever read a span, so the sampler records none of its own
    (``ParentBased(ALWAYS_OFF)``: a root span is not sampled, a remote parent's decision is
    kept): spans still exist and trace ids still propagate in ``traceparent``, at a third of
    the cost. Calling it again replaces the runtime's provider; the first call also installs
    it as the OTel global one.
    """
    global _provider
    exporting = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")) or exporter is not None
    resource = Resource.create({"service.name": service})
    provider = (
        TracerProvider(resource=resource)
        if exporting
        else TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_OFF))
    )
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if _provider is None:
        trace.set_tracer_provider(provider)
    _provider = provider
    _tracers.clear()
    return provider


def shutdown_tracing() -> None:
    """Flush and stop the runtime's tracer provider (no-op without one)."""
    if _provider is not None:
        _provider.force_flush(5000)
        _provider.shutdown()


def get_tracer(name: str = "tandem") -> trace.Tracer:
    """Tracer from the runtime's provider (or the OTel global one before :func:`setup_tracing`)."""
    if _provider is None:
        return trace.get_tracer(name)
    key = (id(_provider), name)
    tracer = _tracers.get(key)
    if tracer is None:
        tracer = _tracers[key] = _provider.get_tracer(name)
    return tracer


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Return ``headers`` (a new dict if None) with the current trace context (``traceparent``)."""
    carrier: dict[str, str] = {} if headers is None else headers
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The OTel context carried by NATS ``headers`` (empty context when there is none)."""
    return propagate.extract(dict(headers) if headers else {})
