"""The launcher's plan: what it was asked for and which processes that means (pure, no I/O).

:class:`LaunchConfig` holds the launcher's own settings and the config dataclasses of the
services it starts (:mod:`tandem.config`); :func:`build_parser` / :func:`parse_args` derive the
command line from them; :func:`plan_processes` turns a config into :class:`ProcessSpec` s (the
services' flags handed on with :func:`tandem.config.to_argv`); :func:`stop_groups` and
:func:`child_env` say how they are stopped and with which environment. Process plumbing is in
:mod:`tandem.services.launcher`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from tandem.config import add_arguments, from_namespace, option, to_argv
from tandem.engine.config import EngineConfig
from tandem.protocol.subjects import DEFAULT_NAMESPACE, Subjects
from tandem.services.auth import (
    AUTH_ENV,
    CLIENT_USER,
    FRONTEND_USER,
    JETSTREAM_REPLICAS_ENV,
    LAUNCHER_USER,
    PASSWORD_ENV,
    NatsAuth,
    Permissions,
    add_auth_arguments,
    password_file,
    permissions,
    user_name,
)
from tandem.services.frontend.config import DEFAULT_MAX_MODEL_LEN, FrontendConfig
from tandem.services.router.config import RouterConfig
from tandem.services.worker.config import WorkerConfig

#: Mock workers one worker process hosts by default (``--workers-per-process``).
MOCK_WORKERS_PER_PROCESS = 64
#: Stop order: the reverse of the request path (start order is indexer, router, workers, frontend).
STOP_ORDER = ("frontend", "router", "worker", "indexer")
DEFAULT_READY_TIMEOUT_S = 180.0
DEFAULT_STOP_GRACE_S = 40.0
"""Longer than a worker's own shutdown grace (30 s for running requests / pinned KV)."""
#: Services whose failure to *start* (exit before the topology is ready) stops everything.
CORE_SERVICES = ("frontend", "router", "indexer")
#: Restart back-off: the first restart waits this long, each further one in a row twice as long…
RESTART_BACKOFF_S = 0.5
#: … up to this.
RESTART_BACKOFF_MAX_S = 10.0
#: A process that ran at least this long before it exited counts as having started fine: its
#: back-off and its count of restarts in a row start over.
RESTART_STABLE_S = 30.0
DEFAULT_RESTART_LIMIT = 10


def _env_default(name: str, fallback: str | None) -> str | None:
    return os.environ.get(name) or fallback


@dataclass(frozen=True)
class LaunchConfig:
    """Everything the launcher was asked for.

    The launcher's own fields are flags (:mod:`tandem.config`); the settings of the processes it
    starts are the services' own config dataclasses, whose flags the launcher takes over
    (:func:`build_parser`) and hands on unchanged (:func:`tandem.config.to_argv`), so no flag is
    restated here. Raises ``ValueError`` on a bad combination.
    """

    prefill: int = option(1, help="prefill-only workers (workers; ignored with --aggregated)")
    decode: int = option(1, help="decode workers, or role 'both' workers with --aggregated (workers)")
    aggregated: bool = option(False, help="no disaggregation: --decode N workers of role 'both'")
    workers_per_process: int | None = option(
        None,
        help="workers hosted by one worker process (mock engine only; default: 1 for the model, "
        f"{MOCK_WORKERS_PER_PROCESS} for mock)",
    )
    namespace: str = option(DEFAULT_NAMESPACE, help="subject namespace (default $TANDEM_NAMESPACE)")
    nats_url: str | None = option(
        None, help="use this NATS server (JetStream on) instead of starting one (default $NATS_URL)"
    )
    nats_port: int | None = option(None, help="embedded nats-server port (default: a free one)")
    nats_cluster: int = option(
        1,
        help="embedded NATS: 1 server, or a local JetStream cluster of this many (3 or 5) with every "
        "stream, bucket and object store replicated (--jetstream-replicas, default the cluster "
        "size): one node can die or restart while the stack keeps serving",
    )
    nats_tls: bool = option(
        False,
        help="embedded NATS: require TLS from every client, with a CA and server certificate "
        "generated into --nats-auth-dir; every process verifies the server against that CA",
    )
    jetstream_replicas: int | None = option(
        None,
        help="replicas of the KV-events stream, the instances bucket and the indexer's snapshot "
        "store (default: --nats-cluster for the embedded server, else $TANDEM_JETSTREAM_REPLICAS or 1)",
    )
    nats_auth: bool = option(
        True,
        help="embedded nats-server: one user per process with a generated password and only the "
        "subjects its role needs (docs/security.md); --no-nats-auth lets anyone connect",
    )
    nats_auth_dir: str | None = option(
        None,
        help="where the embedded server's nats.conf and <user>.password files go (made 0700, files "
        "0600; default: a fresh private temp dir, removed at exit)",
    )
    nats_clients: str = option(
        CLIENT_USER,
        help="comma-separated users for the public NATS API, each with its own password file and "
        "inbox prefix _INBOX.<user> (embedded server with auth)",
    )
    restart_limit: int = option(
        DEFAULT_RESTART_LIMIT,
        help="restarts in a row of a process that keeps exiting (each within "
        f"{RESTART_STABLE_S:.0f} s of its start) before the launcher gives up and stops everything; "
        "0: never restart, any exit stops everything",
    )
    decode_max_num_batched_tokens: int | None = option(
        None,
        help="--max-num-batched-tokens of the decode workers only (tokens per step; default: the "
        "workers' --max-num-batched-tokens). A small budget keeps a decode worker's steps short while "
        "it prefills locally (prompts with fewer than --disagg-min-tokens uncached, or any when the "
        "prefill pool is saturated, --max-prefill-queue-tokens): the prompt goes in small chunks "
        "between decode tokens, so the running streams' inter-token gaps stay small",
    )
    log_level: str = option("info", help="services' log level")
    log_dir: str | None = option(None, help="where <process>.log files go (default: a temp dir)")
    smoke: bool = option(False, help="send one HTTP + one NATS request, then stop")
    ready_timeout: float = option(
        DEFAULT_READY_TIMEOUT_S, help="seconds to wait for GET /ready and every worker's registration"
    )
    stop_grace: float = option(
        DEFAULT_STOP_GRACE_S,
        help="seconds each process gets to exit after SIGTERM before SIGKILL (a second Ctrl-C skips it)",
    )
    engine: EngineConfig = option(default_factory=EngineConfig, cli=False, help="the workers' engine")  # noqa: RUF009
    worker: WorkerConfig = option(default_factory=WorkerConfig, cli=False, help="the workers' service")  # noqa: RUF009
    router: RouterConfig = option(default_factory=RouterConfig, cli=False, help="the router")  # noqa: RUF009
    frontend: FrontendConfig = option(default_factory=FrontendConfig, cli=False, help="the frontend")  # noqa: RUF009
    nats: NatsAuth = option(default_factory=NatsAuth, cli=False, help="credentials for --nats-url")  # noqa: RUF009

    def __post_init__(self) -> None:
        if self.decode < 1:
            raise ValueError("--decode must be at least 1")
        if not self.aggregated and self.prefill < 1:
            raise ValueError("--prefill must be at least 1 (or use --aggregated)")
        if self.nats_port is not None and not 0 < self.nats_port < 65536:
            raise ValueError("--nats-port must be in 1..65535")
        if self.nats_cluster < 1:
            raise ValueError("--nats-cluster must be at least 1")
        if self.nats_url and (self.nats_cluster > 1 or self.nats_tls or self.nats_port is not None):
            raise ValueError(
                "--nats-cluster, --nats-tls and --nats-port are for the embedded server; with "
                "--nats-url list the cluster's URLs (comma-separated) and use --nats-tls-ca"
            )
        if self.nats_cluster > 1 and self.nats_port is not None:
            raise ValueError("--nats-port is for a single embedded server (a cluster picks free ports)")
        if self.jetstream_replicas is not None and not 1 <= self.jetstream_replicas <= 5:
            raise ValueError("--jetstream-replicas must be in 1..5 (JetStream's limit)")
        if not self.nats_url and self.replicas > self.nats_cluster:
            raise ValueError(
                f"--jetstream-replicas {self.replicas} needs at least as many servers (--nats-cluster)"
            )
        if not 0 < self.frontend.port < 65536:
            raise ValueError("--port must be in 1..65535")
        if self.workers_per_process is not None:
            if self.workers_per_process < 1:
                raise ValueError("--workers-per-process must be at least 1")
            if self.workers_per_process > 1 and self.engine.engine != "mock":
                raise ValueError("--workers-per-process > 1 needs --engine mock (one model per process)")
        if self.decode_max_num_batched_tokens is not None:
            if self.decode_max_num_batched_tokens < 1:
                raise ValueError("--decode-max-num-batched-tokens must be at least 1")
            if self.aggregated:
                raise ValueError("--decode-max-num-batched-tokens is for disaggregated decode workers")
        if not self.ready_timeout > 0:
            raise ValueError("--ready-timeout must be positive")
        if self.stop_grace < 0:
            raise ValueError("--stop-grace must be >= 0")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.namespace):
            raise ValueError("--namespace may only hold letters, digits, '-' and '_'")
        if self.restart_limit < 0:
            raise ValueError("--restart-limit must be >= 0")
        if not self.nats_url and self.nats.configured:
            raise ValueError(
                "--nats-user, --nats-creds and --nats-tls-* are for an external server (--nats-url); "
                "the embedded one makes its own credentials"
            )
        clients = self.client_users
        if not clients or not all(re.fullmatch(r"[A-Za-z0-9_-]+", c) for c in clients):
            raise ValueError("--nats-clients: comma-separated names of letters, digits, '-' and '_'")
        if len(set(clients)) != len(clients) or set(clients) & set(_SERVICE_USERS):
            raise ValueError(f"--nats-clients: duplicate names or a service's ({', '.join(_SERVICE_USERS)})")

    # Shorthands for the settings every part of the launcher reads.
    @property
    def replicas(self) -> int:
        """JetStream replicas the processes create streams and buckets with."""
        if self.jetstream_replicas is not None:
            return self.jetstream_replicas
        if self.nats_url:
            return int(os.environ.get(JETSTREAM_REPLICAS_ENV) or 1)
        return self.nats_cluster

    @property
    def host(self) -> str:
        """The frontend's HTTP bind address."""
        return self.frontend.host

    @property
    def port(self) -> int:
        """The frontend's HTTP port."""
        return self.frontend.port

    @property
    def model_dir(self) -> str | None:
        """The prepared model directory workers and frontend load (None: the default one)."""
        return self.engine.model_dir

    @property
    def num_workers(self) -> int:
        """Workers: ``decode`` in aggregated mode, else ``prefill + decode``."""
        return self.decode if self.aggregated else self.prefill + self.decode

    @property
    def client_users(self) -> list[str]:
        """The client users (``--nats-clients``), in order; the first is the one ``--smoke`` uses."""
        return [c.strip() for c in self.nats_clients.split(",") if c.strip()]

    @property
    def per_process(self) -> int:
        """Workers hosted by one worker process."""
        if self.workers_per_process is not None:
            return self.workers_per_process
        return MOCK_WORKERS_PER_PROCESS if self.engine.engine == "mock" else 1


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One process to start: ``python -m tandem.services.<service> <args>``.

    ``name`` is unique in a topology: the log file stem and, for a process hosting one worker,
    its instance id. ``instance_ids`` are the workers a worker process hosts.
    ``env`` holds variables added to the launcher's environment for this process only.
    ``nats_user``: the NATS user it logs in as on the embedded server (None: no generated
    credentials; with ``--nats-url`` it gets the launcher's ``--nats-*`` flags, if any).
    """

    name: str
    service: str
    args: tuple[str, ...]
    role: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    instance_ids: tuple[str, ...] = ()
    nats_user: str | None = None

    def argv(self, python: str = sys.executable) -> list[str]:
        """The full command line."""
        return [python, "-m", f"tandem.services.{self.service}", *self.args]


class LaunchError(RuntimeError):
    """A process failed to start or the topology did not become ready."""


#: NATS users of the services that are not workers (worker users are named after their process).
_SERVICE_USERS = ("indexer", "router", FRONTEND_USER, LAUNCHER_USER)


def restart_delay(in_a_row: int) -> float:
    """Back-off before restarting a process that exited ``in_a_row`` times in a row (>= 1):
    0.5 s, 1 s, 2 s, 4 s, 8 s, then 10 s."""
    return min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2 ** max(0, in_a_row - 1))


def threads_per_worker(num_workers: int, cpu_count: int | None) -> int:
    """Default torch threads per worker: the machine's cores split evenly, at least 1."""
    cores = cpu_count or 1
    return max(1, cores // max(1, num_workers))


#: Fields of the services' configs the launcher sets itself (per process), not as flags.
_WORKER_OWN = ("role", "instance_id", "num_workers")
_FRONTEND_OWN = ("model_dir", "default_block_size", "max_model_len")
_LAUNCHER_DEFAULTS = {"host": "127.0.0.1", "port": 8000}


def build_parser() -> argparse.ArgumentParser:
    """The launcher's command line: its own flags, then the engine's, the workers', the
    router's and the frontend's (each derived from that service's config dataclass)."""
    p = argparse.ArgumentParser(
        prog="python -m tandem.services.launcher",
        description="Start nats-server, the KV indexer, the router, the workers and the frontend "
        "locally, wait until ready, and serve until Ctrl-C.",
    )
    add_arguments(
        p,
        LaunchConfig,
        defaults={
            "namespace": _env_default("TANDEM_NAMESPACE", DEFAULT_NAMESPACE),
            "nats_url": _env_default("NATS_URL", None),
            "prefill": None,
        },
    )
    add_auth_arguments(
        p.add_argument_group("NATS credentials and TLS (with --nats-url; passed to every process)")
    )
    add_arguments(p.add_argument_group("engine (every worker)"), EngineConfig)
    add_arguments(p.add_argument_group("worker"), WorkerConfig, exclude=_WORKER_OWN)
    add_arguments(p.add_argument_group("router"), RouterConfig)
    add_arguments(
        p.add_argument_group("frontend"), FrontendConfig, exclude=_FRONTEND_OWN, defaults=_LAUNCHER_DEFAULTS
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> LaunchConfig:
    """Parse and validate the command line (argparse exits with status 2 on a bad one)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.aggregated and ns.prefill not in (None, 0):
        parser.error("--prefill does not apply with --aggregated (use --decode N for N workers)")
    prefill = 0 if ns.aggregated else (1 if ns.prefill is None else ns.prefill)
    try:
        engine = from_namespace(EngineConfig, ns)
        cfg = from_namespace(
            LaunchConfig,
            ns,
            prefill=prefill,
            engine=engine,
            worker=from_namespace(WorkerConfig, ns),
            router=from_namespace(RouterConfig, ns),
            frontend=from_namespace(
                FrontendConfig,
                ns,
                model_dir=engine.model_dir,
                default_block_size=engine.block_size,
                max_model_len=engine.max_model_len or DEFAULT_MAX_MODEL_LEN,
            ),
            nats=from_namespace(NatsAuth, ns),
        )
        plan_users(cfg)  # client names must not collide with the processes' users
        return cfg
    except (ValueError, TypeError) as e:
        parser.error(str(e))


def _chunks(names: list[str], size: int) -> list[list[str]]:
    return [names[i : i + size] for i in range(0, len(names), size)]


def plan_processes(
    cfg: LaunchConfig,
    nats_url: str,
    cpu_count: int | None = None,
    auth_dir: str | None = None,
    tls_ca: str | None = None,
) -> list[ProcessSpec]:
    """The tandem processes for ``cfg``, in start order (indexer, router, workers, frontend).

    Workers are named (and get the instance id) ``prefill-<i>`` / ``decode-<i>``, or
    ``worker-<i>`` (role ``both``) when aggregated. Model workers get one process each, and
    ``cpu_count`` (default ``os.cpu_count()``) is split between them unless ``--threads`` is set.
    Mock workers are hosted ``cfg.per_process`` to a process (``--num-workers``), which is named
    after its first and last worker (``decode-0..63``).

    ``auth_dir`` (the embedded server's credentials, see :func:`plan_users`): every process logs
    in as its own user (``--nats-user <user> --nats-password-file <auth_dir>/<user>.password``).
    Without it, the launcher's own ``--nats-*`` credential flags (if any) go to every process.
    ``tls_ca``: the embedded server's CA (``--nats-tls``), which every process verifies it with.
    ``--jetstream-replicas`` goes to every process when it is not 1.
    """
    common: tuple[str, ...] = ("--nats-url", nats_url, "--namespace", cfg.namespace)
    common += ("--log-level", cfg.log_level)
    if cfg.replicas != 1:
        common += ("--jetstream-replicas", str(cfg.replicas))
    if auth_dir is None:
        common += tuple(to_argv(cfg.nats))
    if tls_ca is not None:
        common += ("--nats-tls-ca", tls_ca)
    specs = [ProcessSpec("indexer", "indexer", common)]
    specs.append(ProcessSpec("router", "router", (*common, *to_argv(cfg.router))))
    workers: list[tuple[str, list[str]]] = []
    if cfg.aggregated:
        workers.append(("both", [f"worker-{i}" for i in range(cfg.decode)]))
    else:
        workers.append(("prefill", [f"prefill-{i}" for i in range(cfg.prefill)]))
        workers.append(("decode", [f"decode-{i}" for i in range(cfg.decode)]))
    engine = cfg.engine
    env: dict[str, str] = {}
    if engine.engine == "model":
        threads = engine.num_threads or threads_per_worker(
            cfg.num_workers, os.cpu_count() if cpu_count is None else cpu_count
        )
        engine = dataclasses.replace(engine, num_threads=threads)
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    worker_args = to_argv(cfg.worker, exclude=_WORKER_OWN)
    for role, names in workers:
        role_engine = engine
        if role == "decode" and cfg.decode_max_num_batched_tokens is not None:
            role_engine = dataclasses.replace(
                engine, max_num_batched_tokens=cfg.decode_max_num_batched_tokens
            )
        engine_args = to_argv(role_engine)
        for group in _chunks(names, cfg.per_process):
            name = group[0] if len(group) == 1 else f"{group[0]}..{group[-1].rsplit('-', 1)[1]}"
            hosting = ("--num-workers", str(len(group))) if len(group) > 1 else ()
            args = (*common, "--role", role, "--instance-id", group[0], *hosting, *engine_args, *worker_args)
            specs.append(
                ProcessSpec(name, "worker", args, role=role, env=dict(env), instance_ids=tuple(group))
            )
    frontend_args = to_argv(cfg.frontend, exclude=_FRONTEND_OWN, only_changed=False)
    frontend_args += ["--default-block-size", str(engine.block_size)]
    if cfg.model_dir:
        frontend_args += ["--model-dir", cfg.model_dir]
    if engine.max_model_len:
        frontend_args += ["--max-model-len", str(engine.max_model_len)]
    specs.append(ProcessSpec("frontend", "frontend", (*common, *frontend_args)))
    if auth_dir is None:
        return specs
    out = []
    for spec in specs:
        user = user_name(spec.name) if spec.service == "worker" else spec.service
        login = ("--nats-user", user, "--nats-password-file", str(password_file(auth_dir, user)))
        out.append(dataclasses.replace(spec, args=(*spec.args, *login), nats_user=user))
    return out


def plan_users(cfg: LaunchConfig) -> list[tuple[str, Permissions]]:
    """The embedded server's users and their permissions (:func:`tandem.services.auth.permissions`):
    one per process of :func:`plan_processes` (the service's name, or the worker process's name),
    the launcher's own, and the ``--nats-clients``. Passwords are the launcher's business.
    Raises ``ValueError`` when a client name is also a process's user."""
    subjects = Subjects(cfg.namespace)
    users: list[tuple[str, Permissions]] = []
    for spec in plan_processes(cfg, "nats://-", cpu_count=1, auth_dir="-"):
        assert spec.nats_user is not None
        perms = permissions(spec.service, subjects, user=spec.nats_user, instance_ids=spec.instance_ids)
        users.append((spec.nats_user, perms))
    users.append((LAUNCHER_USER, permissions("launcher", subjects, user=LAUNCHER_USER)))
    users += [(c, permissions("client", subjects, user=c)) for c in cfg.client_users]
    names = [name for name, _ in users]
    if len(set(names)) != len(names):
        taken = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"--nats-clients: {', '.join(taken)} is already a process's NATS user")
    return users


class _HasService(Protocol):
    @property
    def service(self) -> str: ...


_S = TypeVar("_S", bound=_HasService)


def stop_groups(items: Sequence[_S]) -> list[list[_S]]:
    """``items`` (process specs or started children) grouped in stop order: frontend, router,
    workers, indexer; anything else (nats) last. Empty groups are dropped."""
    groups = [[s for s in items if s.service == service] for service in STOP_ORDER]
    groups.append([s for s in items if s.service not in STOP_ORDER])
    return [g for g in groups if g]


def child_env(spec: ProcessSpec, base: dict[str, str]) -> dict[str, str]:
    """The environment for one child: ``base`` (OTEL_* passed through as is) plus ``spec.env``.

    Variables the user set win over the launcher's thread defaults. ``service.instance.id`` is
    added to ``OTEL_RESOURCE_ATTRIBUTES`` (unless already there) so traces tell the processes apart.
    A process with its own NATS user (``spec.nats_user``) does not inherit ``$NATS_USER``,
    ``$NATS_PASSWORD``, ``$NATS_CREDS`` … (its flags say who it is).
    """
    env = dict(base)
    if spec.nats_user is not None:
        for var in (*AUTH_ENV.values(), PASSWORD_ENV):
            env.pop(var, None)
    for key, value in spec.env.items():
        env.setdefault(key, value)
    env["PYTHONUNBUFFERED"] = "1"
    attrs = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if "service.instance.id=" not in attrs:
        extra = f"service.instance.id={spec.name}"
        env["OTEL_RESOURCE_ATTRIBUTES"] = f"{attrs},{extra}" if attrs else extra
    return env
