"""The frontend's wiring: :class:`Frontend` (shared by both entry points) and the process ``main``.

:class:`Frontend` holds what the HTTP app (:mod:`.http`) and the public NATS subjects
(:mod:`.nats_api`) share: the NATS connection, the instance registry (block size for hashing,
readiness), the :class:`~.preprocess.Preprocessor`, and the pipeline that runs a prepared
request (:meth:`Frontend.token_stream` → :meth:`Frontend.generation` → :mod:`.render`).
:func:`main` is ``python -m tandem.services.frontend``; its flags come from
:class:`~.config.FrontendConfig`. The request life cycle is in the package docstring.

Shutdown (hooks on :class:`~tandem.services.runtime.ServiceBase`, run LIFO): stop the public
NATS subscriptions, then stop HTTP (in-flight HTTP requests finish, bounded by
``HTTP_SHUTDOWN_TIMEOUT_S``), then the runtime drains the tracker's NATS request tasks, then
:meth:`Frontend.close` stops the registry watcher.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections import Counter
from collections.abc import AsyncGenerator
from pathlib import Path

from aiohttp import web
from nats.aio.client import Client as NatsClient

from tandem.config import add_arguments, from_namespace
from tandem.engine.paths import verdict_dir
from tandem.engine.tokenizer import Tokenizer
from tandem.kvbm.hashing import compute_block_hashes
from tandem.protocol import Subjects
from tandem.protocol.messages import Health, HealthRequest, SamplingParams
from tandem.protocol.openai import ModelCard, ModelList
from tandem.services.discovery import InstanceRegistry
from tandem.services.frontend.config import FrontendConfig
from tandem.services.frontend.edge import Admission
from tandem.services.frontend.generation import Generation
from tandem.services.frontend.http import create_app
from tandem.services.frontend.migration import MigratingStream
from tandem.services.frontend.nats_api import PublicNatsApi
from tandem.services.frontend.output import TextOutput
from tandem.services.frontend.preprocess import PreparedRequest, Preprocessor, RequestKind
from tandem.services.frontend.render import renderer_for, stream_batches, stream_chunks
from tandem.services.frontend.token_stream import InboxMux, TokenStream
from tandem.services.messaging import RemoteError, TaskTracker, probe_liveness, request
from tandem.services.observability import get_logger
from tandem.services.runtime import ServiceBase, common_parser, run_service

__all__ = ["HTTP_SHUTDOWN_TIMEOUT_S", "Frontend", "build_parser", "main", "parse_args"]

#: Seconds in-flight HTTP requests get to finish at shutdown.
HTTP_SHUTDOWN_TIMEOUT_S = 8.0

_log = get_logger("tandem.frontend")


class Frontend:
    """Everything the HTTP app and the NATS subjects share: validation, tokenizing, routing.

    ``config.model_name`` must be set. ``start()`` starts the instance registry (unless one is
    passed in) and subscribes the public NATS subjects; ``stop_intake()`` unsubscribes them;
    ``close()`` also stops the registry if this frontend started it.
    """

    def __init__(
        self,
        nc: NatsClient,
        subjects: Subjects,
        tokenizer: Tokenizer,
        config: FrontendConfig,
        *,
        registry: InstanceRegistry | None = None,
        tracker: TaskTracker | None = None,
        instance_id: str = "",
    ) -> None:
        if config.model_name is None:
            raise ValueError("FrontendConfig.model_name must be set (main() derives it from the model dir)")
        self.nc = nc
        self.subjects = subjects
        self.tokenizer = tokenizer
        self.config = config
        self.model_name: str = config.model_name
        self.instance_id = instance_id or f"frontend-{uuid.uuid4().hex[:8]}"
        self.tracker = tracker if tracker is not None else TaskTracker()
        self._registry = registry
        self._owns_registry = registry is None
        self._warned_sizes: set[int] = set()
        self.preprocessor = Preprocessor(
            tokenizer,
            model_name=self.model_name,
            max_model_len=config.max_model_len,
            block_size=self.block_size,
        )
        #: Completion requests in flight, HTTP and NATS together (``--max-inflight``; :mod:`.edge`).
        self.admission = Admission(config.max_inflight)
        #: The key clients must send (``Authorization: Bearer``), None = no key (:mod:`.edge`).
        self.api_key: str | None = config.resolved_api_key()
        self.nats_api = PublicNatsApi(self)
        #: The inboxes of this frontend's token streams (one wildcard subscription).
        self.inbox = InboxMux.of(nc)

    @property
    def registry(self) -> InstanceRegistry:
        """The instance registry (discovery); available once :meth:`start` ran."""
        if self._registry is None:
            raise RuntimeError("Frontend not started")
        return self._registry

    @property
    def eos_ids(self) -> frozenset[int]:
        """Token ids that end generation unless ``ignore_eos``."""
        return self.preprocessor.eos_ids

    # -- life cycle
    async def start(self) -> None:
        """Start discovery, subscribe the inboxes, warm the preprocessor up
        (:meth:`~.preprocess.Preprocessor.warm_up`) and serve the public NATS subjects (queue
        group ``frontend``)."""
        if self._registry is None:
            self._registry = InstanceRegistry(self.nc.jetstream(), self.subjects)
            await self._registry.start()
        await self.inbox.start()
        # Pay the request path's one-time costs now, not in the first client's TTFT. A failure
        # here is the requests' to report (each gets its own error), not a reason not to start.
        try:
            took = await self.preprocessor.warm_up()
            _log.debug("preprocessor_warmed_up", ms=round(took * 1e3, 1))
        except Exception as e:
            _log.warning("preprocessor_warm_up_failed", error=repr(e))
        await self.nats_api.start()

    async def stop_intake(self) -> None:
        """Unsubscribe the public NATS subjects (idempotent)."""
        await self.nats_api.stop()

    async def close(self) -> None:
        """Stop intake, unsubscribe the inboxes and, if this frontend started it, the registry
        watcher."""
        await self.stop_intake()
        await self.inbox.stop()
        if self._owns_registry and self._registry is not None:
            await self._registry.stop()

    # -- discovery
    def block_size(self) -> int:
        """Block size for hashing: the most common one the registered workers advertise."""
        sizes = Counter(i.block_size for i in self.registry.instances.values() if i.block_size > 0)
        if not sizes:
            return self.config.default_block_size
        if len(sizes) > 1 and set(sizes) != self._warned_sizes:
            self._warned_sizes = set(sizes)
            _log.warning("mixed_block_sizes", sizes=dict(sizes))
        return sizes.most_common(1)[0][0]

    async def readiness(self) -> tuple[bool, list[str]]:
        """``(ready, problems)``: router and indexer health, prefill/decode-capable workers."""
        problems: list[str] = []

        async def probe(service: str) -> None:
            try:
                h = await request(
                    self.nc,
                    self.subjects.health(service),
                    HealthRequest(),
                    Health,
                    timeout=self.config.health_timeout_s,
                )
            except (RemoteError, TimeoutError) as e:
                problems.append(f"{service} does not answer health ({e})")
                return
            if not h.ready:
                problems.append(f"{service} is not ready ({h.detail or 'no detail'})")

        await asyncio.gather(probe("router"), probe("indexer"))
        roles = [i.role for i in self.registry.instances.values()]
        if not any(r in ("prefill", "both") for r in roles):
            problems.append("no prefill-capable worker is registered")
        if not any(r in ("decode", "both") for r in roles):
            problems.append("no decode-capable worker is registered")
        return not problems, problems

    def models(self) -> ModelList:
        """The served model list."""
        return ModelList(
            data=[
                ModelCard(
                    id=self.model_name, created=self.config.created, max_model_len=self.config.max_model_len
                )
            ]
        )

    # -- the pipeline
    def prepare(self, kind: RequestKind, body: bytes, arrived: float | None = None) -> PreparedRequest:
        """Validate and tokenize a request body; raises :class:`OpenAIError` (400/404)."""
        return self.preprocessor.prepare(kind, body, arrived)

    async def prepare_async(
        self, kind: RequestKind, body: bytes, arrived: float | None = None
    ) -> PreparedRequest:
        """:meth:`prepare` with a long prompt tokenized off the event loop (what both entry
        points use); raises :class:`OpenAIError` (400/404)."""
        return await self.preprocessor.prepare_async(kind, body, arrived)

    def token_stream(self, prepared: PreparedRequest) -> MigratingStream:
        """The transport of ``prepared`` (not started): attempt 0, migrated on a lost worker up to
        ``--migration-limit`` times (:mod:`.migration`)."""
        p = prepared
        block_size = self.block_size()

        def attempt(
            request_id: str, token_ids: list[int], sampling: SamplingParams, index_base: int
        ) -> TokenStream:
            hashes = (
                p.block_hashes if token_ids is p.token_ids else compute_block_hashes(token_ids, block_size)
            )
            return TokenStream(
                self.nc,
                self.subjects,
                request_id=request_id,
                model=p.model,
                token_ids=token_ids,
                block_hashes=hashes,
                sampling=sampling,
                chunk_timeout_s=self.config.chunk_timeout_s,
                index_base=index_base,
                inbox=self.inbox,
                liveness=self.liveness,
                liveness_interval_s=self.config.liveness_interval_s,
            )

        return MigratingStream(
            attempt(p.request_id, p.token_ids, p.sampling, 0), attempt, self.config.migration_limit
        )

    async def liveness(self, service: str, instance_id: str, request_id: str) -> bool | None:
        """Whether the ``service`` (``"router"`` or ``"worker"``) instance holding a stream still
        serves ``request_id``: True (it does), False (no responders: gone; or it answered that it
        does not hold the request: lost, e.g. its chunks were lost in a NATS restart), None (no
        answer within the liveness interval). See :mod:`.token_stream`."""
        if service == "worker":
            subject = self.subjects.worker_health(instance_id)
        else:
            subject = self.subjects.health_instance(service, instance_id)
        return await probe_liveness(self.nc, subject, self.config.liveness_interval_s, request_id)

    def generation(self, prepared: PreparedRequest) -> Generation:
        """A :class:`Generation` for ``prepared`` (use with ``async with``)."""
        return Generation(prepared, self.token_stream(prepared), TextOutput(self.tokenizer, prepared.stops))

    async def complete(self, prepared: PreparedRequest) -> bytes:
        """Run a non-streaming request; returns the response JSON. Raises :class:`OpenAIError`."""
        parts: list[str] = []
        async with self.generation(prepared) as gen:
            while (text := await gen.next_text()) is not None:
                parts.append(text)
        return renderer_for(prepared.kind).response(prepared, "".join(parts), gen)

    async def stream(self, prepared: PreparedRequest) -> AsyncGenerator[bytes, None]:
        """Run a streaming request; yields each chunk's JSON (no SSE framing, no ``[DONE]``).

        Raises :class:`OpenAIError` (possibly after some chunks). Close it (``aclosing``) when
        abandoning it early: that cancels the request.
        """
        async with (
            self.generation(prepared) as gen,
            contextlib.aclosing(stream_chunks(gen, renderer_for(prepared.kind))) as chunks,
        ):
            async for data in chunks:
                yield data

    async def stream_batches(self, prepared: PreparedRequest) -> AsyncGenerator[list[bytes], None]:
        """:meth:`stream` in batches of the chunks already there, the last one ending with
        :data:`~.render.DONE` (see :func:`~.render.stream_batches`): one write per batch."""
        async with (
            self.generation(prepared) as gen,
            contextlib.aclosing(stream_batches(gen, renderer_for(prepared.kind))) as batches,
        ):
            async for batch in batches:
                yield batch


# ---- process ------------------------------------------------------------------------------------------


def model_name_of(model_dir: Path) -> str:
    """``prepared.json``'s model name, else the directory name."""
    try:
        name = json.loads((model_dir / "prepared.json").read_text()).get("model")
    except (OSError, ValueError):
        name = None
    return name if isinstance(name, str) and name else model_dir.name


def build_parser() -> argparse.ArgumentParser:
    """The command line: the common service flags plus one flag per :class:`FrontendConfig` field."""
    p = common_parser("frontend", "OpenAI-compatible HTTP API and public NATS subjects.")
    add_arguments(p, FrontendConfig)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, FrontendConfig]:
    """Parse ``argv``; returns the namespace (common flags) and the validated config."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = from_namespace(FrontendConfig, args)
    except ValueError as e:
        parser.error(str(e))
    return args, config


def main(argv: list[str] | None = None) -> int:
    """Run the frontend process until SIGINT/SIGTERM; returns the exit code."""
    args, config = parse_args(argv)

    async def setup(svc: ServiceBase) -> None:
        if config.model_dir:
            model_dir = Path(config.model_dir)
        else:
            from tandem.engine.weights import prepare_model

            model_dir = await asyncio.to_thread(prepare_model)
        tokenizer = await asyncio.to_thread(
            Tokenizer,
            model_dir,
            fast_encoder=config.tokenizer_backend == "auto",
            verdict_dir=verdict_dir(),
        )
        svc.log.info(
            "tokenizer",
            backend="tiktoken" if tokenizer.fast_encoder is not None else "tokenizers",
            fast_encoder=tokenizer.fast_encoder_status,
        )
        cfg = dataclasses.replace(config, model_name=config.model_name or model_name_of(model_dir))
        fe = Frontend(svc.nc, svc.subjects, tokenizer, cfg, tracker=svc.tracker, instance_id=svc.instance_id)
        await fe.start()
        svc.on_close(fe.close)
        runner = web.AppRunner(
            create_app(fe),
            handler_cancellation=True,
            shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT_S,
            access_log=None,
        )
        await runner.setup()
        site = web.TCPSite(runner, cfg.host, cfg.port)
        await site.start()
        # LIFO: stop NATS intake first, then stop HTTP (in-flight HTTP requests finish, bounded).
        svc.on_unregister(runner.cleanup)
        svc.on_unregister(fe.stop_intake)
        svc.log.info("http_listening", host=cfg.host, port=cfg.port, model=cfg.model_name)

    return run_service(setup, "frontend", args)
