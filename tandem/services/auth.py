"""NATS security: client credentials/TLS options, and the per-service permission model.

Two halves:

* **Client side** — :class:`NatsAuth` holds how a process authenticates to NATS (user + password
  file, or a ``.creds`` file) and whether it uses TLS. It is one config dataclass, so its fields
  are flags (``--nats-user``, ``--nats-password-file``, ``--nats-creds``, ``--nats-tls-ca``,
  ``--nats-tls-cert``, ``--nats-tls-key``, ``--nats-inbox-prefix``) that every service takes
  (:func:`tandem.services.runtime.common_parser`) and the launcher hands on; the password itself
  is never a flag (it would show in ``ps``): it comes from the file or from ``$NATS_PASSWORD``.
  :meth:`NatsAuth.connect_options` turns it into ``nats.connect`` keyword arguments.
* **Server side** — :func:`permissions` says what each role may publish and subscribe to, from
  the subject names in :class:`tandem.protocol.Subjects`; :func:`server_config` renders users and
  their permissions as a nats-server config (``authorization { users = [...] }``), and
  :func:`write_credentials` writes it and one ``<user>.password`` file per user (0600, in a 0700
  directory). The launcher does this for its embedded server (per-service users, random
  passwords, a fresh set every start); ``python -m tandem.services.auth --out DIR`` does it for
  ``docker compose`` (see ``docker-compose.yml``).

Every user's inbox prefix is ``_INBOX.<user>`` (nats-py ``inbox_prefix``), and a user may only
subscribe to its own ``_INBOX.<user>.>``: replies (and the frontend's token streams) can only be
read by the connection that asked. What the model enforces and what it cannot is in
``docs/security.md``.

No torch, no nats import: the launcher and the compose helper use it as is.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import ssl
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.config import add_arguments, from_namespace, option
from tandem.protocol.subjects import DEFAULT_NAMESPACE, Subjects

__all__ = [
    "AUTH_ENV",
    "CLIENT_USER",
    "FRONTEND_USER",
    "LAUNCHER_USER",
    "PASSWORD_ENV",
    "ROLES",
    "NatsAuth",
    "NatsUser",
    "Permissions",
    "ResponsePermission",
    "add_auth_arguments",
    "auth_env_defaults",
    "deployment_users",
    "inbox_prefix",
    "new_password",
    "password_file",
    "permissions",
    "redact_url",
    "server_config",
    "user_name",
    "write_credentials",
]

#: The frontend's user: routers and workers may publish token chunks into its inboxes only.
FRONTEND_USER = "frontend"
#: The launcher's own user (supervisor / operator): registry, health and stats, JetStream setup.
LAUNCHER_USER = "launcher"
#: The default credential handed to API users: the public ``{ns}.v1.>`` subjects only.
CLIENT_USER = "client"
#: The roles :func:`permissions` knows.
ROLES = ("frontend", "router", "indexer", "worker", "client", "launcher")

#: Environment variables the client-side options default to (``NATS_PASSWORD`` holds the password
#: itself and is read at connect time; it is never a flag).
AUTH_ENV = {
    "nats_user": "NATS_USER",
    "nats_password_file": "NATS_PASSWORD_FILE",
    "nats_creds": "NATS_CREDS",
    "nats_tls_ca": "NATS_TLS_CA",
    "nats_tls_cert": "NATS_TLS_CERT",
    "nats_tls_key": "NATS_TLS_KEY",
}
PASSWORD_ENV = "NATS_PASSWORD"
#: ``--jetstream-replicas`` default of every service and of the launcher with ``--nats-url``.
JETSTREAM_REPLICAS_ENV = "TANDEM_JETSTREAM_REPLICAS"

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


# ---- client side ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NatsAuth:
    """How one process authenticates to NATS (all optional: none = anonymous, plain TCP).

    Raises ``ValueError`` for a combination that cannot work (a TLS key without a certificate,
    a password file without a user, both a user and a ``.creds`` file).
    """

    nats_user: str | None = option(
        None,
        help="NATS user (default $NATS_USER); its password comes from --nats-password-file or "
        "$NATS_PASSWORD, never from the command line",
    )
    nats_password_file: str | None = option(
        None, help="file holding the NATS user's password (default $NATS_PASSWORD_FILE)"
    )
    nats_creds: str | None = option(
        None,
        help="NATS .creds file (user JWT + nkey seed, for a server with decentralized auth; needs "
        "the nkeys package) (default $NATS_CREDS)",
    )
    nats_tls_ca: str | None = option(None, help="CA bundle to verify the NATS server's TLS certificate")
    nats_tls_cert: str | None = option(None, help="client TLS certificate for NATS (mutual TLS)")
    nats_tls_key: str | None = option(None, help="private key of --nats-tls-cert")
    nats_inbox_prefix: str | None = option(
        None,
        help="inbox prefix of this connection (default _INBOX.<user> with --nats-user, else _INBOX); "
        "the server lets a user subscribe to its own inboxes only",
    )

    def __post_init__(self) -> None:
        if self.nats_password_file and not self.nats_user:
            raise ValueError("--nats-password-file needs --nats-user")
        if self.nats_user and self.nats_creds:
            raise ValueError("--nats-user and --nats-creds are two ways to log in: give one")
        if self.nats_tls_key and not self.nats_tls_cert:
            raise ValueError("--nats-tls-key needs --nats-tls-cert")
        if self.nats_tls_cert and not self.nats_tls_key:
            raise ValueError("--nats-tls-cert needs --nats-tls-key")
        if self.nats_inbox_prefix is not None and not all(
            _TOKEN.fullmatch(t) for t in self.nats_inbox_prefix.split(".")
        ):
            raise ValueError(f"bad --nats-inbox-prefix {self.nats_inbox_prefix!r}")

    @property
    def configured(self) -> bool:
        """True when any option is set (the process does not connect anonymously over TCP with
        the default inbox prefix)."""
        return any(
            (self.nats_user, self.nats_creds, self.nats_tls_ca, self.nats_tls_cert, self.nats_inbox_prefix)
        )

    def password(self, env: Mapping[str, str] | None = None) -> str | None:
        """The password: the file's first line, else ``$NATS_PASSWORD``; None without a user.

        Raises ``OSError`` if the file cannot be read.
        """
        if not self.nats_user:
            return None
        if self.nats_password_file:
            text = Path(self.nats_password_file).read_text(encoding="utf-8")
            lines = text.splitlines()
            return lines[0].strip() if lines else ""
        return (os.environ if env is None else env).get(PASSWORD_ENV)

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client TLS context (server verified against ``nats_tls_ca`` or the system store;
        client certificate when given), or None when no TLS option is set."""
        if not (self.nats_tls_ca or self.nats_tls_cert):
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.nats_tls_ca)
        if self.nats_tls_cert:
            ctx.load_cert_chain(self.nats_tls_cert, self.nats_tls_key)
        return ctx

    def connect_options(self, env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``: ``user``/``password``, ``user_credentials``,
        ``tls`` and ``inbox_prefix`` as configured (an empty dict when nothing is).

        Raises ``OSError`` for an unreadable password file and ``RuntimeError`` when a ``.creds``
        file is given but the ``nkeys`` package (which signs the server's nonce) is missing.
        """
        opts: dict[str, Any] = {}
        if self.nats_user:
            opts["user"] = self.nats_user
            password = self.password(env)
            if password is not None:
                opts["password"] = password
        if self.nats_creds:
            try:
                import nkeys  # noqa: F401
            except ImportError:
                raise RuntimeError("--nats-creds needs the nkeys package (pip install nkeys)") from None
            opts["user_credentials"] = self.nats_creds
        ctx = self.ssl_context()
        if ctx is not None:
            opts["tls"] = ctx
        prefix = self.nats_inbox_prefix or (inbox_prefix(self.nats_user) if self.nats_user else None)
        if prefix:
            opts["inbox_prefix"] = prefix
        return opts

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NatsAuth:
        """From parsed arguments (missing attributes keep their defaults: nothing set)."""
        return from_namespace(cls, args)

    @classmethod
    def for_user(cls, user: str, password_file: str | Path) -> NatsAuth:
        """A user + password file (what the launcher hands each process it starts)."""
        return cls(nats_user=user, nats_password_file=str(password_file))


def auth_env_defaults(env: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """Flag defaults for :class:`NatsAuth` from the environment (``$NATS_USER`` …)."""
    source = os.environ if env is None else env
    return {name: source.get(var) or None for name, var in AUTH_ENV.items()}


def add_auth_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, env: Mapping[str, str] | None = None
) -> None:
    """Add the :class:`NatsAuth` flags to ``parser`` (defaults from the environment)."""
    add_arguments(parser, NatsAuth, defaults=auth_env_defaults(env))


def redact_url(url: str) -> str:
    """``url`` with any password in it replaced by ``***`` (for logs)."""
    return re.sub(r"(//[^:/@\s]+:)[^@/\s]+@", r"\1***@", url)


def server_list(url: str) -> list[str]:
    """The server URLs in ``url``: one URL, or several comma-separated (a cluster's nodes, as
    ``--nats-url`` takes them). Raises ``ValueError`` when there is none."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise ValueError(f"no NATS server URL in {url!r}")
    return servers


def inbox_prefix(user: str) -> str:
    """The inbox prefix of ``user``'s connections: ``_INBOX.<user>``."""
    return f"_INBOX.{user}"


def user_name(process_name: str) -> str:
    """A NATS user name (one subject token) for a launcher process name:
    ``decode-0..63`` → ``decode-0-63``."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", re.sub(r"\.+", "-", process_name))
    if not name:
        raise ValueError(f"no user name for process {process_name!r}")
    return name


def new_password() -> str:
    """A random password (192 bits, URL-safe characters)."""
    return secrets.token_urlsafe(24)


# ---- server side: the permission model ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponsePermission:
    """nats-server ``allow_responses``: publish up to ``max_msgs`` messages to the reply subject
    of each request this user received, within ``expires`` (a Go duration) of receiving it."""

    max_msgs: int = 1
    expires: str = "10m"


@dataclass(frozen=True, slots=True)
class Permissions:
    """What a user may publish and subscribe to (allow lists; anything else is refused)."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    responses: ResponsePermission | None = None


@dataclass(frozen=True)
class NatsUser:
    """One user of the server config (``repr`` hides the password)."""

    name: str
    password: str = field(repr=False)
    permissions: Permissions

    def __post_init__(self) -> None:
        if not _TOKEN.fullmatch(self.name):
            raise ValueError(f"NATS user names are one subject token ([A-Za-z0-9_-]+): {self.name!r}")
        if not self.password or any(c in self.password for c in '"\\\n\r'):
            raise ValueError(f"unusable password for NATS user {self.name!r}")


#: Replies a service sends to the requests it serves (health, overlap, prefill result, Ack,
#: stats: one each). The expiry bounds the server's bookkeeping of reply subjects.
SERVICE_RESPONSES = ResponsePermission(max_msgs=1, expires="10m")
#: A worker's replies may come late (a prefill queued behind others).
WORKER_RESPONSES = ResponsePermission(max_msgs=1, expires="1h")


def _kv_stream(s: Subjects) -> str:
    return f"KV_{s.instances_bucket}"


def _jetstream_setup(s: Subjects) -> list[str]:
    """:func:`tandem.services.runtime.ensure_jetstream`: look the KV-events stream and the
    instances bucket up, and create them when missing (only these two names)."""
    names = (s.kv_events_stream, _kv_stream(s))
    return [f"$JS.API.STREAM.{op}.{n}" for n in names for op in ("INFO", "CREATE")]


def _stream_reader(stream: str) -> list[str]:
    """Read ``stream`` through ephemeral consumers (ordered push consumers, ``kv.get``)."""
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.API.CONSUMER.DELETE.{stream}.*",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.FC.{stream}.>",
    ]


def snapshot_bucket(s: Subjects) -> str:
    """The indexer's snapshot object store (:func:`tandem.services.indexer_snapshot.snapshot_bucket`,
    restated here so this module needs no indexer import; a unit test keeps them equal)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{s.ns}-indexer-snapshot")


def _object_store(bucket: str) -> list[str]:
    """Create, read and replace objects in object store ``bucket`` (stream ``OBJ_<bucket>``)."""
    stream = f"OBJ_{bucket}"
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.CREATE.{stream}",
        f"$JS.API.STREAM.PURGE.{stream}",
        *_stream_reader(stream),
        f"$O.{bucket}.>",
    ]


def _health_served(s: Subjects, service: str) -> list[str]:
    return [s.health(service), f"{s.health(service)}.>"]


def permissions(
    role: str,
    subjects: Subjects,
    *,
    user: str,
    instance_ids: Sequence[str] = (),
    frontend_user: str = FRONTEND_USER,
) -> Permissions:
    """The permissions of ``user`` acting as ``role`` (one of :data:`ROLES`) in ``subjects``' namespace.

    ``instance_ids``: the workers a worker user hosts. Every role subscribes only to its own
    inboxes (``_INBOX.<user>.>``). Summary (``{ns}`` = namespace; see ``docs/security.md``):

    * frontend — serves ``{ns}.v1.>``; publishes RouteRequests, Cancel, health/liveness probes,
      and replies to any ``_INBOX.>`` (the API clients' inboxes).
    * router — serves ``{ns}.router.>`` and Cancel; the only one to publish to
      ``{ns}.worker.*.prefill|generate|cancel``; the indexer query; token chunks into the
      frontend's inboxes.
    * indexer — serves ``{ns}.indexer.overlap``; reads the KV-events stream; owns its snapshot
      object store (``{ns}-indexer-snapshot``).
    * worker — serves its own ``{ns}.worker.<id>.>`` and Cancel; publishes its own KV events
      (``{ns}.kv.events.<id>``) and registry keys (``$KV.<bucket>.<id>``), request completion to
      the routers, token chunks into the frontend's inboxes, and (mock transport) KV-transfer
      notifications to ``{ns}.worker.*.kv_notify``.
    * client — publishes ``{ns}.v1.>`` only.
    * launcher — JetStream setup, registry read and delete (a dead worker's entry), health and
      worker stats probes.

    Raises ``ValueError`` for an unknown role.
    """
    s = subjects
    ns = s.ns
    inbox = f"{inbox_prefix(user)}.>"
    frontend_inboxes = f"{inbox_prefix(frontend_user)}.>"
    registry_read = _stream_reader(_kv_stream(s))
    probes = [f"{ns}.health.>", f"{ns}.worker.*.health"]
    if role == "frontend":
        return Permissions(
            publish=(
                s.router_generate,
                s.cancel,
                *probes,
                "_INBOX.>",
                *_jetstream_setup(s),
                *registry_read,
            ),
            subscribe=(inbox, f"{ns}.v1.>", *_health_served(s, "frontend")),
        )
    if role == "router":
        return Permissions(
            publish=(
                s.indexer_overlap,
                s.worker_prefill("*"),
                s.worker_generate("*"),
                s.worker_cancel("*"),
                *probes,
                frontend_inboxes,
                *_jetstream_setup(s),
                *registry_read,
            ),
            subscribe=(inbox, f"{ns}.router.>", s.cancel, *_health_served(s, "router")),
            responses=SERVICE_RESPONSES,
        )
    if role == "indexer":
        return Permissions(
            publish=(
                *_jetstream_setup(s),
                *registry_read,
                *_stream_reader(s.kv_events_stream),
                *_object_store(snapshot_bucket(s)),
            ),
            subscribe=(inbox, s.indexer_overlap, *_health_served(s, "indexer")),
            responses=SERVICE_RESPONSES,
        )
    if role == "worker":
        if not instance_ids:
            raise ValueError("a worker user needs the instance ids it hosts")
        own_pub: list[str] = []
        own_sub: list[str] = []
        for iid in instance_ids:
            if not _TOKEN.fullmatch(iid):
                raise ValueError(f"instance ids are one subject token: {iid!r}")
            own_pub += [s.kv_events(iid), f"$KV.{s.instances_bucket}.{iid}"]
            own_sub += [f"{ns}.worker.{iid}.>", f"{s.health('worker')}.{iid}"]
        return Permissions(
            publish=(
                *own_pub,
                s.request_finished,
                s.prefill_finished,
                f"{ns}.worker.*.kv_notify",
                frontend_inboxes,
                *_jetstream_setup(s),
                *registry_read,
            ),
            subscribe=(inbox, *own_sub, s.cancel, s.health("worker")),
            responses=WORKER_RESPONSES,
        )
    if role == "client":
        return Permissions(publish=(f"{ns}.v1.>",), subscribe=(inbox,))
    if role == "launcher":
        return Permissions(
            publish=(
                *_jetstream_setup(s),
                *registry_read,
                f"$KV.{s.instances_bucket}.*",
                *probes,
                s.worker_debug("*"),
            ),
            subscribe=(inbox,),
        )
    raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_quote(v) for v in values) + "]"


def server_config(users: Sequence[NatsUser], *, header: str = "") -> str:
    """A nats-server config holding only an ``authorization`` block with ``users``.

    Listen address and JetStream stay on the server's command line. No ``no_auth_user``:
    a client without valid credentials is refused. Raises ``ValueError`` for duplicate names.
    """
    names = [u.name for u in users]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate NATS user names: {sorted(n for n in names if names.count(n) > 1)}")
    lines = [f"# {line}" for line in header.splitlines()]
    lines += ["authorization {", "  users = ["]
    for u in users:
        p = u.permissions
        perms = [
            f"publish: {{ allow: {_list(p.publish)} }}" if p.publish else 'publish: { deny: [">"] }',
            f"subscribe: {{ allow: {_list(p.subscribe)} }}" if p.subscribe else 'subscribe: { deny: [">"] }',
        ]
        if p.responses is not None:
            perms.append(
                f"allow_responses: {{ max: {p.responses.max_msgs}, expires: {_quote(p.responses.expires)} }}"
            )
        lines.append(f"    {{ user: {_quote(u.name)}, password: {_quote(u.password)},")
        lines.append("      permissions: {")
        lines += [f"        {perm}" for perm in perms]
        lines.append("      } }")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def write_private(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path``, readable by its owner only (0600, also when the
    file existed with other permissions): passwords, keys, configs that hold secrets."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data.encode("utf-8") if isinstance(data, str) else data)
    finally:
        os.close(fd)


def write_credentials(directory: str | Path, users: Sequence[NatsUser], *, header: str = "") -> Path:
    """Write ``nats.conf`` (:func:`server_config`) and ``<user>.password`` per user into
    ``directory`` (created 0700; files 0600). Returns the config's path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    conf = d / "nats.conf"
    write_private(conf, server_config(users, header=header))
    for u in users:
        write_private(d / f"{u.name}.password", u.password + "\n")
    return conf


def password_file(directory: str | Path, user: str) -> Path:
    """Where :func:`write_credentials` puts ``user``'s password."""
    return Path(directory) / f"{user}.password"


# ---- python -m tandem.services.auth: credentials for a deployment (docker compose) -------------------


def deployment_users(
    namespace: str,
    workers: Sequence[str],
    clients: Sequence[str] = (CLIENT_USER,),
    passwords: Mapping[str, str] | None = None,
) -> list[NatsUser]:
    """Users for a deployment with one indexer, router and frontend user, one user per worker
    id in ``workers`` (user = instance id), the ``clients``, and the launcher/operator user.
    ``passwords`` keeps existing passwords (by user); the others are new."""
    s = Subjects(namespace)
    old = passwords or {}

    def user(name: str, role: str, ids: Sequence[str] = ()) -> NatsUser:
        perms = permissions(role, s, user=name, instance_ids=ids)
        return NatsUser(name, old.get(name) or new_password(), perms)

    users = [user("indexer", "indexer"), user("router", "router"), user(FRONTEND_USER, "frontend")]
    users += [user(user_name(w), "worker", [w]) for w in workers]
    users += [user(c, "client") for c in clients]
    users.append(user(LAUNCHER_USER, "launcher"))
    return users


def main(argv: Sequence[str] | None = None) -> int:
    """Write a nats-server config and per-user password files (existing passwords are kept, so
    running it again only refreshes the permissions)."""
    p = argparse.ArgumentParser(
        prog="python -m tandem.services.auth",
        description="Write nats.conf (users + permissions) and <user>.password files for a tandem "
        "deployment: users indexer, router, frontend, launcher, one per --worker, one per --client.",
    )
    p.add_argument("--out", required=True, help="directory for nats.conf and the password files")
    p.add_argument("--namespace", default=os.environ.get("TANDEM_NAMESPACE", DEFAULT_NAMESPACE))
    p.add_argument("--worker", action="append", default=[], help="a worker instance id (repeat)")
    p.add_argument("--client", action="append", default=[], help=f"a client user (default {CLIENT_USER})")
    args = p.parse_args(argv)
    out = Path(args.out)
    existing: dict[str, str] = {}
    if out.is_dir():
        for path in out.glob("*.password"):
            lines = path.read_text(encoding="utf-8").splitlines()
            if lines and lines[0].strip():
                existing[path.stem] = lines[0].strip()
    try:
        users = deployment_users(args.namespace, args.worker, args.client or [CLIENT_USER], existing)
    except ValueError as e:
        p.error(str(e))
    conf = write_credentials(out, users, header=f"tandem namespace {args.namespace!r}; written by {p.prog}")
    print(f"wrote {conf} and {len(users)} password files ({', '.join(u.name for u in users)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
