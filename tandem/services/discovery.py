"""Discovery: the ``{ns}-instances`` JetStream KV bucket as a live registry of workers.

* :class:`InstanceRegistry` — watch the bucket (routers, frontends, the indexer, decode workers
  watching their NIXL peers), with staleness sweeps and a re-sync after NATS reconnects.
* :class:`WorkerRegistration` — a worker's heartbeat into it.

The bucket itself is created by :func:`tandem.services.runtime.ensure_jetstream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from tandem.protocol import Subjects
from tandem.protocol.messages import InstanceInfo, encode
from tandem.services.messaging import decode_as, probe_liveness
from tandem.services.runtime import HEARTBEAT_INTERVAL_S, INSTANCE_TTL_S, ensure_jetstream

#: How long a stale entry's worker gets to answer a direct health probe (seconds).
STALE_PROBE_TIMEOUT_S = 1.0

__all__ = ["InstanceCallback", "InstanceRegistry", "WorkerRegistration"]

_log = structlog.get_logger("tandem.runtime")


InstanceCallback = Callable[[InstanceInfo], Awaitable[None]]


class InstanceRegistry:
    """Live view of the ``{ns}-instances`` bucket: ``instance_id -> InstanceInfo``.

    :meth:`start` loads the current entries (returns once the initial values are in) and keeps
    watching. An entry disappears on delete/purge, or when its ``heartbeat_at`` (Unix seconds,
    the worker's clock) is more than ``ttl_s`` seconds old (checked every ``sweep_interval_s``).
    Callbacks (``on_added`` when an id appears, ``on_removed`` when it goes) run in the watcher
    task, in order; their exceptions are logged.

    A stale entry is probed before it goes: its worker's health subject
    (``{ns}.worker.<id>.health``) is asked directly, and a worker that answers stays (its
    heartbeats are what is late, not the worker: a JetStream cluster electing a new leader for
    the bucket stalls puts and the watch for seconds). An answer to a stale entry also re-syncs the
    watch, which may be stuck. No responders or no answer within :data:`STALE_PROBE_TIMEOUT_S`:
    it goes.

    Reconnects: while the NATS connection is down nothing is swept (workers cannot heartbeat
    either). Once it is back the registry re-syncs: a fresh watcher loads the bucket again
    (entries deleted meanwhile go, new ones come), and stale heartbeats are forgiven for
    ``ttl_s`` so the workers have time to beat again. Without this a 2 s NATS restart emptied
    every router's worker list ~8 s later.
    """

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        *,
        ttl_s: float = INSTANCE_TTL_S,
        sweep_interval_s: float = 0.5,
        replicas: int = 1,
    ) -> None:
        self._js = js
        self._subjects = subjects
        #: JetStream replicas of the bucket if this registry has to create it.
        self._replicas = replicas
        self.ttl_s = ttl_s
        self._sweep_interval_s = sweep_interval_s
        self._instances: dict[str, InstanceInfo] = {}
        self._added_cbs: list[InstanceCallback] = []
        self._removed_cbs: list[InstanceCallback] = []
        self._changed = asyncio.Condition()
        self._watcher: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._watch_task: asyncio.Task[None] | None = None
        self._log = _log.bind(bucket=subjects.instances_bucket)
        # JetStreamContext keeps its connection as ``_nc``: its state gates the sweep.
        self._nc: NatsClient | None = getattr(js, "_nc", None)
        self._grace_until = 0.0
        #: Per instance: stale but answered a probe, so kept until then (monotonic seconds).
        self._vouched_until: dict[str, float] = {}
        #: Times the registry re-synced (after a reconnect, or a stale entry that was alive).
        self.resyncs = 0
        #: Stale entries kept because their worker answered a probe.
        self.probes_answered = 0

    # -- queries
    @property
    def instances(self) -> dict[str, InstanceInfo]:
        """Current instances (a copy)."""
        return dict(self._instances)

    @property
    def view(self) -> Mapping[str, InstanceInfo]:
        """Current instances, not copied: read it at once (it changes as the watch runs)."""
        return self._instances

    def get(self, instance_id: str) -> InstanceInfo | None:
        return self._instances.get(instance_id)

    def __len__(self) -> int:
        return len(self._instances)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._instances

    def on_added(self, cb: InstanceCallback) -> None:
        """Call ``await cb(info)`` whenever a new instance id appears (not on every heartbeat)."""
        self._added_cbs.append(cb)

    def on_removed(self, cb: InstanceCallback) -> None:
        """Call ``await cb(last_info)`` whenever an instance goes (delete, purge or stale heartbeat)."""
        self._removed_cbs.append(cb)

    async def wait_for(
        self,
        predicate: Callable[[dict[str, InstanceInfo]], bool],
        timeout: float,  # noqa: ASYNC109
    ) -> None:
        """Wait until ``predicate(instances)`` is true. Raises ``TimeoutError`` after ``timeout`` s."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self._instances))

    # -- life cycle
    async def start(self, *, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Create the bucket if needed, load the current entries and start watching.

        Raises ``TimeoutError`` if the initial values do not arrive within ``timeout`` seconds.
        """
        initial = asyncio.Event()
        await self._open_watch(initial)
        self._tasks.append(asyncio.create_task(self._sweep(), name="registry-sweep"))
        try:
            async with asyncio.timeout(timeout):
                await initial.wait()
        except TimeoutError:
            await self.stop()
            raise

    async def _open_watch(self, initial: asyncio.Event, *, resync: bool = False) -> None:
        kv = await ensure_jetstream(self._js, self._subjects, replicas=self._replicas)
        self._watcher = await kv.watchall()
        self._watch_task = asyncio.create_task(self._watch(initial, resync=resync), name="registry-watch")

    async def _close_watch(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
            self._watcher = None
        task, self._watch_task = self._watch_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait([task], timeout=2.0)

    async def resync(self) -> None:
        """Reload the bucket with a fresh watcher (after a reconnect): ids missing from it are
        removed, new ones added; heartbeats are forgiven for ``ttl_s``. Errors are logged and
        retried at the next sweep."""
        self._grace_until = time.monotonic() + self.ttl_s
        await self._close_watch()
        self.resyncs += 1
        try:
            await self._open_watch(asyncio.Event(), resync=True)
        except Exception as e:
            self._log.warning("registry_resync_failed", error=repr(e))
            self._resync_needed = True
            return
        self._log.info("registry_resynced", instances=len(self._instances))

    _resync_needed = False

    async def stop(self) -> None:
        """Stop watching (idempotent). The last known instances stay readable."""
        await self._close_watch()
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    async def _watch(self, initial: asyncio.Event, *, resync: bool = False) -> None:
        watcher = self._watcher
        seen: set[str] | None = set() if resync else None
        async for entry in watcher:
            if entry is None:  # initial values delivered
                initial.set()
                if seen is not None:
                    for iid in [i for i in self._instances if i not in seen]:
                        await self._remove(iid, reason="gone_after_reconnect")
                    seen = None
                continue
            if seen is not None:
                seen.add(entry.key)
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                await self._remove(entry.key, reason="deleted")
                continue
            try:
                info = decode_as(InstanceInfo, entry.value)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                self._log.warning("bad_instance_entry", key=entry.key, error=str(e))
                continue
            if info.instance_id != entry.key:
                # Permissions let a worker write only its own key: an entry naming another id
                # would let it impersonate that worker.
                self._log.warning("instance_entry_key_mismatch", key=entry.key, instance_id=info.instance_id)
                continue
            if self._is_stale(info, time.time()):
                await self._remove(entry.key, reason="stale")
                continue
            await self._put(info)
        initial.set()

    def _is_stale(self, info: InstanceInfo, now: float) -> bool:
        mono = time.monotonic()
        if mono < self._grace_until or mono < self._vouched_until.get(info.instance_id, 0.0):
            return False
        return now - info.heartbeat_at > self.ttl_s

    async def _probe(self, stale: list[InstanceInfo]) -> list[bool | None]:
        """Ask each stale entry's worker directly whether it is alive (see the class docstring)."""
        nc = self._nc
        if nc is None:
            return [None] * len(stale)
        return list(
            await asyncio.gather(
                *(
                    probe_liveness(nc, self._subjects.worker_health(i.instance_id), STALE_PROBE_TIMEOUT_S)
                    for i in stale
                )
            )
        )

    async def _sweep(self) -> None:
        was_down = False
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            nc = self._nc
            if nc is not None and not nc.is_connected:
                was_down = True  # nobody can heartbeat now: sweep nothing
                continue
            if was_down or self._resync_needed:
                was_down = self._resync_needed = False
                await self.resync()
            now = time.time()
            stale = [info for info in self._instances.values() if self._is_stale(info, now)]
            if not stale:
                continue
            alive = await self._probe(stale)
            for info, answer in zip(stale, alive, strict=True):
                iid = info.instance_id
                if self._instances.get(iid) is not info:
                    continue  # a heartbeat (or a delete) came while probing
                if answer:
                    self.probes_answered += 1
                    self._vouched_until[iid] = time.monotonic() + self.ttl_s
                    self._resync_needed = True  # it beats, yet the watch did not deliver it
                    self._log.warning("instance_stale_but_alive", instance_id=iid)
                else:
                    await self._remove(iid, reason="heartbeat_timeout" if answer is False else "unresponsive")

    async def _put(self, info: InstanceInfo) -> None:
        is_new = info.instance_id not in self._instances
        self._instances[info.instance_id] = info
        if is_new:
            self._log.info("instance_added", instance_id=info.instance_id, role=info.role)
            await self._run_callbacks(self._added_cbs, info)
        async with self._changed:
            self._changed.notify_all()

    async def _remove(self, instance_id: str, *, reason: str) -> None:
        self._vouched_until.pop(instance_id, None)
        info = self._instances.pop(instance_id, None)
        if info is None:
            return
        self._log.info("instance_removed", instance_id=instance_id, reason=reason)
        await self._run_callbacks(self._removed_cbs, info)
        async with self._changed:
            self._changed.notify_all()

    async def _run_callbacks(self, cbs: Iterable[InstanceCallback], info: InstanceInfo) -> None:
        for cb in cbs:
            try:
                await cb(info)
            except Exception as e:
                self._log.exception("registry_callback_failed", instance_id=info.instance_id, error=repr(e))


class WorkerRegistration:
    """A worker's heartbeat: put ``info_factory()`` (with ``heartbeat_at`` = now) under its
    instance id every ``interval_s`` seconds; delete the entry on :meth:`stop`.
    """

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        info_factory: Callable[[], InstanceInfo],
        *,
        interval_s: float = HEARTBEAT_INTERVAL_S,
        replicas: int = 1,
    ) -> None:
        self._js = js
        self._subjects = subjects
        self._replicas = replicas
        self._info_factory = info_factory
        self.interval_s = interval_s
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._key: str | None = None

    async def start(self) -> None:
        """Put the first entry (so the worker is discoverable when this returns) and start beating.

        Raises the JetStream error if the first put fails.
        """
        self._kv = await ensure_jetstream(self._js, self._subjects, replicas=self._replicas)
        await self._beat()
        self._task = asyncio.create_task(self._loop(), name="worker-heartbeat")

    async def _beat(self) -> None:
        if self._kv is None:
            return
        info = msgspec.structs.replace(self._info_factory(), heartbeat_at=time.time())
        self._key = info.instance_id
        await self._kv.put(info.instance_id, encode(info))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self._beat()
            except Exception as e:  # transient (reconnecting); next beat retries
                _log.warning("heartbeat_failed", error=repr(e))
                with contextlib.suppress(Exception):  # a restarted server may have lost the bucket
                    self._kv = await ensure_jetstream(self._js, self._subjects, replicas=self._replicas)

    async def stop(self) -> None:
        """Stop beating and delete the entry (idempotent; errors are logged)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._kv is not None and self._key is not None:
            try:
                await self._kv.delete(self._key)
            except Exception as e:
                _log.warning("unregister_failed", instance_id=self._key, error=repr(e))
        self._kv = None
