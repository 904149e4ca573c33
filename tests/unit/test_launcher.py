"""The launcher's pure planning (flags → process list) and its process plumbing."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

from tandem.engine.config import EngineConfig
from tandem.services import launch_client, launcher, nats_embedded, processes
from tandem.services.frontend.config import FrontendConfig
from tandem.services.launcher import (
    LaunchConfig,
    LaunchError,
    ProcessSpec,
    child_env,
    parse_args,
    plan_processes,
    stop_groups,
    threads_per_worker,
)

NATS = "nats://127.0.0.1:4999"


def _flag(spec: ProcessSpec, name: str) -> str | None:
    """Value following ``name`` in the spec's arguments (None if absent)."""
    args = list(spec.args)
    return args[args.index(name) + 1] if name in args else None


# ---- parsing -----------------------------------------------------------------------------------


def test_defaults_are_one_prefill_one_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NATS_URL", raising=False)
    monkeypatch.delenv("TANDEM_NAMESPACE", raising=False)
    cfg = parse_args([])
    assert (cfg.prefill, cfg.decode, cfg.aggregated) == (1, 1, False)
    assert (cfg.host, cfg.port, cfg.engine.dtype, cfg.engine.kv_cache_gb) == (
        "127.0.0.1",
        8000,
        "bfloat16" if launcher.EngineConfig().dtype == "bfloat16" else "float32",
        1.0,
    )
    assert cfg.namespace == "tandem"
    assert cfg.nats_url is None
    assert cfg.engine.num_threads is None
    assert cfg.engine.engine == "model" and cfg.per_process == 1
    assert not cfg.smoke


def test_env_supplies_nats_url_and_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "nats://10.0.0.1:4222")
    monkeypatch.setenv("TANDEM_NAMESPACE", "staging")
    cfg = parse_args([])
    assert cfg.nats_url == "nats://10.0.0.1:4222"
    assert cfg.namespace == "staging"


def test_all_flags_parse() -> None:
    cfg = parse_args(
        [
            "--prefill", "2", "--decode", "3", "--port", "9000", "--host", "0.0.0.0",
            "--kv-cache-gb", "0.5", "--threads", "4", "--dtype", "float32", "--namespace", "ns1",
            "--smoke", "--log-dir", "/tmp/x", "--disagg-min-tokens", "0", "--ready-timeout", "30",
        ]
    )  # fmt: skip
    assert (cfg.prefill, cfg.decode, cfg.port, cfg.host) == (2, 3, 9000, "0.0.0.0")
    e = cfg.engine
    assert (e.kv_cache_gb, e.num_threads, e.dtype, cfg.namespace) == (0.5, 4, "float32", "ns1")
    assert cfg.smoke and cfg.log_dir == "/tmp/x" and cfg.router.disagg_min_tokens == 0
    assert cfg.ready_timeout == 30


def test_mock_engine_and_router_mode_flags() -> None:
    cfg = parse_args(
        ["--engine", "mock", "--prefill", "64", "--decode", "192", "--speedup-ratio", "1e6",
         "--router-mode", "round-robin", "--num-gpu-blocks-override", "4096"]
    )  # fmt: skip
    assert (cfg.engine.engine, cfg.engine.speedup_ratio, cfg.engine.num_blocks) == ("mock", 1e6, 4096)
    assert cfg.router.router_mode == "round-robin"
    assert cfg.num_workers == 256 and cfg.per_process == launcher.MOCK_WORKERS_PER_PROCESS


@pytest.mark.parametrize(
    "argv",
    [
        ["--aggregated", "--prefill", "1"],
        ["--decode", "0"],
        ["--prefill", "0"],
        ["--port", "0"],
        ["--port", "70000"],
        ["--kv-cache-gb", "0"],
        ["--threads", "0"],
        ["--dtype", "float64"],
        ["--namespace", "a.b"],
        ["--workers-per-process", "4"],
        ["--engine", "mock", "--workers-per-process", "0"],
        ["--router-mode", "fastest"],
        ["--disagg-min-tokens", "-1"],
        ["--decode-max-num-batched-tokens", "0"],
        ["--aggregated", "--decode-max-num-batched-tokens", "64"],
        ["--bogus"],
    ],
)
def test_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


# ---- planning ----------------------------------------------------------------------------------


def test_disaggregated_plan_order_roles_and_flags() -> None:
    cfg = LaunchConfig(
        prefill=2, decode=1, namespace="ns", engine=EngineConfig(kv_cache_gb=0.25, dtype="float32")
    )
    specs = plan_processes(cfg, NATS, cpu_count=6)
    assert [s.name for s in specs] == ["indexer", "router", "prefill-0", "prefill-1", "decode-0", "frontend"]
    assert [s.service for s in specs] == ["indexer", "router", "worker", "worker", "worker", "frontend"]
    workers = [s for s in specs if s.service == "worker"]
    assert [s.role for s in workers] == ["prefill", "prefill", "decode"]
    for w in workers:
        assert _flag(w, "--role") == w.role
        assert _flag(w, "--instance-id") == w.name
        assert _flag(w, "--dtype") == "float32"
        assert _flag(w, "--kv-cache-gb") == "0.25"
        assert _flag(w, "--threads") == "2"  # 6 cores / 3 workers
        assert w.env["OMP_NUM_THREADS"] == "2"
    for s in specs:
        assert _flag(s, "--nats-url") == NATS
        assert _flag(s, "--namespace") == "ns"
        assert _flag(s, "--log-level") == "info"
        assert s.argv("py")[:3] == ["py", "-m", f"tandem.services.{s.service}"]
    frontend = specs[-1]
    assert (_flag(frontend, "--host"), _flag(frontend, "--port")) == ("127.0.0.1", "8000")
    assert len({s.name for s in specs}) == len(specs)


def test_aggregated_plan_has_only_both_workers() -> None:
    cfg = parse_args(["--aggregated", "--decode", "2"])
    specs = plan_processes(cfg, NATS, cpu_count=2)
    workers = [s for s in specs if s.service == "worker"]
    assert [(w.name, w.role) for w in workers] == [("worker-0", "both"), ("worker-1", "both")]
    assert all(_flag(w, "--threads") == "1" for w in workers)
    assert cfg.num_workers == 2


def test_decode_workers_can_have_their_own_step_budget() -> None:
    cfg = parse_args(
        ["--max-num-batched-tokens", "1024", "--decode-max-num-batched-tokens", "64", "--decode", "2"]
    )
    specs = {s.name: s for s in plan_processes(cfg, NATS, cpu_count=2)}
    assert _flag(specs["prefill-0"], "--max-num-batched-tokens") == "1024"
    assert _flag(specs["decode-0"], "--max-num-batched-tokens") == "64"
    assert _flag(specs["decode-1"], "--max-num-batched-tokens") == "64"
    default = {s.name: s for s in plan_processes(parse_args([]), NATS, cpu_count=2)}
    assert _flag(default["decode-0"], "--max-num-batched-tokens") == _flag(
        default["prefill-0"], "--max-num-batched-tokens"
    )


def test_explicit_threads_model_dir_and_router_flag() -> None:
    cfg = parse_args(["--threads", "3", "--model-dir", "/m", "--disagg-min-tokens", "0"])
    specs = {s.name: s for s in plan_processes(cfg, NATS, cpu_count=64)}
    assert _flag(specs["prefill-0"], "--threads") == "3"
    assert _flag(specs["decode-0"], "--model-dir") == "/m"
    assert _flag(specs["frontend"], "--model-dir") == "/m"
    assert _flag(specs["router"], "--disagg-min-tokens") == "0"
    assert _flag(specs["indexer"], "--disagg-min-tokens") is None
    assert _flag(specs["router"], "--model-dir") is None


def test_router_flag_absent_by_default() -> None:
    specs = {s.name: s for s in plan_processes(LaunchConfig(), NATS, cpu_count=2)}
    assert "--disagg-min-tokens" not in specs["router"].args


def test_mock_workers_share_processes() -> None:
    cfg = parse_args(["--engine", "mock", "--prefill", "3", "--decode", "5", "--workers-per-process", "2"])
    specs = plan_processes(cfg, NATS, cpu_count=2)
    workers = [s for s in specs if s.service == "worker"]
    assert [s.name for s in workers] == [
        "prefill-0..1",
        "prefill-2",
        "decode-0..1",
        "decode-2..3",
        "decode-4",
    ]
    assert [s.instance_ids for s in workers][:2] == [("prefill-0", "prefill-1"), ("prefill-2",)]
    assert _flag(workers[0], "--num-workers") == "2" and _flag(workers[1], "--num-workers") is None
    assert _flag(workers[0], "--instance-id") == "prefill-0"
    assert all(_flag(w, "--engine") == "mock" and _flag(w, "--threads") is None for w in workers)
    assert sum(len(w.instance_ids) for w in workers) == cfg.num_workers


def test_every_service_flag_reaches_its_process() -> None:
    cfg = parse_args(
        ["--engine", "mock", "--block-size", "32", "--max-num-seqs", "8", "--kv-transfer-bandwidth", "5",
         "--router-temperature", "0.5", "--chunk-timeout", "9", "--max-model-len", "4096"]
    )  # fmt: skip
    specs = {s.service: s for s in plan_processes(cfg, NATS, cpu_count=2)}
    assert _flag(specs["worker"], "--block-size") == "32"
    assert _flag(specs["worker"], "--max-num-seqs") == "8"
    assert _flag(specs["worker"], "--kv-transfer-bandwidth") == "5.0"
    assert _flag(specs["router"], "--router-temperature") == "0.5"
    assert _flag(specs["frontend"], "--chunk-timeout") == "9.0"
    assert _flag(specs["frontend"], "--default-block-size") == "32"
    assert _flag(specs["frontend"], "--max-model-len") == "4096"
    assert _flag(specs["worker"], "--max-model-len") == "4096"
    assert _flag(specs["router"], "--block-size") is None


@pytest.mark.parametrize(
    ("workers", "cores", "want"), [(2, 2, 1), (2, 8, 4), (3, 2, 1), (1, 16, 16), (4, None, 1)]
)
def test_threads_per_worker(workers: int, cores: int | None, want: int) -> None:
    assert threads_per_worker(workers, cores) == want


def test_stop_groups_follow_request_path_backwards() -> None:
    specs = plan_processes(LaunchConfig(prefill=1, decode=2), NATS, cpu_count=2)
    groups = stop_groups(specs)
    assert [[s.name for s in g] for g in groups] == [
        ["frontend"],
        ["router"],
        ["prefill-0", "decode-0", "decode-1"],
        ["indexer"],
    ]


def test_child_env_passes_otel_through(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ProcessSpec("decode-0", "worker", (), role="decode", env={"OMP_NUM_THREADS": "2"})
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318", "OTEL_SERVICE_NAME": "x"}
    env = child_env(spec, base)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert env["OTEL_SERVICE_NAME"] == "x"
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == "service.instance.id=decode-0"
    # the user's settings win
    env = child_env(spec, {"OMP_NUM_THREADS": "7", "OTEL_RESOURCE_ATTRIBUTES": "a=b"})
    assert env["OMP_NUM_THREADS"] == "7"
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == "a=b,service.instance.id=decode-0"
    env = child_env(spec, {"OTEL_RESOURCE_ATTRIBUTES": "service.instance.id=mine"})
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == "service.instance.id=mine"


def test_usage_text_has_curl_and_nats_example() -> None:
    cfg = LaunchConfig(namespace="demo", frontend=FrontendConfig(port=8123, host="0.0.0.0"))
    text = launch_client.usage_text(cfg, "nats://127.0.0.1:4333", Path("/tmp/logs"))
    assert "http://127.0.0.1:8123/v1" in text
    assert "curl -s http://127.0.0.1:8123/v1/chat/completions" in text
    assert "smollm2-135m-instruct" in text and "What is the capital of France?" in text
    assert "nats://127.0.0.1:4333" in text
    assert "'demo.v1.chat.completions'" in text
    snippet = text.split("<<'EOF'\n", 1)[1].split("\n  EOF", 1)[0]
    compile("\n".join(line[2:] for line in snippet.splitlines()), "<snippet>", "exec")


def test_reply_helpers() -> None:
    reply = {"choices": [{"message": {"role": "assistant", "content": "Paris."}}]}
    assert launch_client.chat_content(reply) == "Paris."
    assert launch_client.chat_content({}) == ""
    assert launch_client.chat_content({"choices": []}) == ""
    ext = {
        "prefill_worker": "prefill-0",
        "decode_worker": "decode-0",
        "prefill_ms": 12.5,
        "kv_transfer": {"blocks": 3, "bytes": 3000, "ms": 0.5, "reused_blocks": 1},
    }
    line = launch_client.describe_extension(ext)
    assert "prefill-0" in line and "decode-0" in line and "3000 B" in line and "1 reused" in line
    assert "no tandem extension" in launch_client.describe_extension(None)


# ---- plumbing (real processes, fast) ---------------------------------------------------------


async def test_embedded_nats_starts_and_stops(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    child, url = await nats_embedded.start_nats(tmp_path, str(store))
    try:
        host, port = url.removeprefix("nats://").split(":")
        socket.create_connection((host, int(port)), timeout=1).close()
        assert (tmp_path / "nats.log").exists()
    finally:
        await processes.stop_children([[child]], grace_s=5)
    assert child.proc.returncode is not None


async def test_stop_children_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    child = processes.spawn("stubborn", "worker", [sys.executable, "-c", code], {}, tmp_path)
    for _ in range(200):  # until the handler is installed
        if "up" in processes.tail(child.log_path):
            break
        await asyncio.sleep(0.02)
    await processes.stop_children([[child]], grace_s=0.3)
    assert child.proc.returncode == -9


async def test_wait_ready_reports_a_dead_child(tmp_path: Path) -> None:
    code = "import sys; print('boom: bad config'); sys.exit(3)"
    child = processes.spawn("router", "router", [sys.executable, "-c", code], {}, tmp_path)
    child.proc.wait(10)
    with pytest.raises(LaunchError, match=r"router exited with status 3(.|\n)*boom: bad config"):
        await launcher.wait_ready("http://127.0.0.1:9/ready", [child], 10, asyncio.Event())
    await processes.stop_children([[child]])


async def test_wait_ready_times_out(tmp_path: Path) -> None:
    child = processes.spawn(
        "sleeper", "worker", [sys.executable, "-c", "import time; time.sleep(30)"], {}, tmp_path
    )
    try:
        with pytest.raises(LaunchError, match="not ready after"):
            await launcher.wait_ready("http://127.0.0.1:9/ready", [child], 0.5, asyncio.Event())
    finally:
        await processes.stop_children([[child]], grace_s=2)


async def test_second_signal_skips_the_grace_period(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    child = processes.spawn("stubborn", "worker", [sys.executable, "-c", code], {}, tmp_path)
    hurry = asyncio.Event()
    hurry.set()
    t0 = asyncio.get_running_loop().time()
    await processes.stop_children([[child]], grace_s=30, hurry=hurry)
    assert child.proc.returncode is not None
    assert asyncio.get_running_loop().time() - t0 < 10


def test_stop_grace_flag() -> None:
    assert parse_args(["--stop-grace", "5"]).stop_grace == 5
    assert parse_args([]).stop_grace == launcher.DEFAULT_STOP_GRACE_S


# ---- NATS credentials --------------------------------------------------------------------------


def test_nats_auth_is_on_by_default_with_one_client(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NATS_URL", "NATS_USER", "NATS_CREDS", "NATS_PASSWORD_FILE"):
        monkeypatch.delenv(var, raising=False)
    cfg = parse_args([])
    assert cfg.nats_auth and cfg.nats_auth_dir is None
    assert cfg.client_users == ["client"]
    assert not cfg.nats.configured
    assert not parse_args(["--no-nats-auth"]).nats_auth
    assert parse_args(["--nats-clients", "alice, bob"]).client_users == ["alice", "bob"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--nats-user", "u"],  # credentials are for an external server
        ["--nats-url", "nats://x:1", "--nats-password-file", "/p"],  # a password file needs a user
        ["--nats-url", "nats://x:1", "--nats-tls-key", "/k"],
        ["--nats-clients", "router"],
        ["--nats-clients", "decode-0"],
        ["--nats-clients", "a.b"],
        ["--restart-limit", "-1"],
    ],
)
def test_bad_security_flags_exit_2(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NATS_URL", raising=False)
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


def test_embedded_auth_gives_each_process_its_own_user() -> None:
    cfg = parse_args(["--engine", "mock", "--prefill", "2", "--decode", "3", "--workers-per-process", "2"])
    specs = plan_processes(cfg, NATS, cpu_count=2, auth_dir="/run/a")
    users = [s.nats_user for s in specs]
    assert users == ["indexer", "router", "prefill-0-1", "decode-0-1", "decode-2", "frontend"]
    for s in specs:
        assert _flag(s, "--nats-user") == s.nats_user
        assert _flag(s, "--nats-password-file") == f"/run/a/{s.nats_user}.password"
    names = [name for name, _ in launcher.plan_users(cfg)]
    assert names == [*users, "launcher", "client"]
    perms = dict(launcher.plan_users(cfg))
    decode = perms["decode-0-1"]
    assert "tandem.kv.events.decode-0" in decode.publish and "tandem.kv.events.decode-1" in decode.publish
    assert "tandem.kv.events.decode-2" not in decode.publish
    assert "tandem.worker.decode-1.>" in decode.subscribe


def test_external_server_credentials_reach_every_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NATS_USER", "NATS_CREDS", "NATS_PASSWORD_FILE"):
        monkeypatch.delenv(var, raising=False)
    cfg = parse_args(
        ["--nats-url", "tls://nats:4222", "--nats-user", "svc", "--nats-password-file", "/s/pw",
         "--nats-tls-ca", "/s/ca.pem"]
    )  # fmt: skip
    for s in plan_processes(cfg, cfg.nats_url or "", cpu_count=2):
        assert _flag(s, "--nats-user") == "svc" and _flag(s, "--nats-password-file") == "/s/pw"
        assert _flag(s, "--nats-tls-ca") == "/s/ca.pem"
        assert s.nats_user is None
    monkeypatch.setenv("NATS_USER", "from-env")
    cfg = parse_args(["--nats-url", "nats://x:1"])
    assert cfg.nats.nats_user == "from-env"


def test_child_env_drops_inherited_credentials_for_generated_users() -> None:
    base = {"NATS_USER": "u", "NATS_PASSWORD": "p", "NATS_CREDS": "/c", "HOME": "/h"}
    spec = ProcessSpec("router", "router", (), nats_user="router")
    env = child_env(spec, base)
    assert "NATS_USER" not in env and "NATS_PASSWORD" not in env and "NATS_CREDS" not in env
    assert env["HOME"] == "/h"
    assert child_env(ProcessSpec("router", "router", ()), base)["NATS_PASSWORD"] == "p"


def test_usage_text_shows_the_client_login() -> None:
    from tandem.services.auth import NatsAuth

    cfg = LaunchConfig()
    client = NatsAuth.for_user("client", "/run/a/client.password")
    text = launch_client.usage_text(cfg, "nats://127.0.0.1:4333", Path("/tmp/logs"), client)
    assert "user='client'" in text and "inbox_prefix='_INBOX.client'" in text
    assert "/run/a/client.password" in text
    snippet = text.split("<<'EOF'\n", 1)[1].split("\n  EOF", 1)[0]
    compile("\n".join(line[2:] for line in snippet.splitlines()), "<snippet>", "exec")


async def test_embedded_nats_with_auth_refuses_anonymous(tmp_path: Path) -> None:
    import nats
    import nats.errors

    cfg = LaunchConfig()
    users = [launcher.NatsUser(n, launcher.new_password(), p) for n, p in launcher.plan_users(cfg)]
    conf = launcher.write_credentials(tmp_path / "auth", users)
    store = tmp_path / "store"
    store.mkdir()
    child, url = await nats_embedded.start_nats(tmp_path, str(store), config=conf)
    try:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(url, allow_reconnect=False, connect_timeout=2)
        await launcher.prepare_jetstream(
            url,
            cfg.namespace,
            launcher.NatsAuth.for_user("launcher", tmp_path / "auth" / "launcher.password"),
        )
    finally:
        await processes.stop_children([[child]], grace_s=5)


# ---- supervision -------------------------------------------------------------------------------


def test_restart_backoff_doubles_to_ten_seconds() -> None:
    assert [launcher.restart_delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def _adopt(sup: processes.Supervisor, name: str, service: str, code: str, tmp_path: Path) -> processes.Child:
    argv = [sys.executable, "-c", code]
    child = processes.spawn(name, service, argv, {}, tmp_path)
    sup.adopt(child, argv, {})
    return child


async def _poll_until(sup: processes.Supervisor, cond: object, limit_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not cond():  # type: ignore[operator]
        assert loop.time() < deadline, "supervisor did not get there in time"
        sup.poll()
        await asyncio.sleep(0.05)


async def test_supervisor_restarts_a_dead_worker_with_back_off(tmp_path: Path) -> None:
    exits: list[str] = []

    async def on_exit(spec: ProcessSpec) -> None:
        exits.append(spec.name)

    sup = processes.Supervisor(tmp_path, restart_limit=3, on_exit=on_exit)
    first = _adopt(
        sup, "decode-0", "worker", "print('up', flush=True); import time; time.sleep(60)", tmp_path
    )
    first.proc.kill()
    first.proc.wait(5)
    await _poll_until(sup, lambda: sup.restarts("decode-0") == 1)
    second = sup.children[0]
    assert second.pid != first.pid and second.alive()
    assert exits == ["decode-0"]
    assert sup.entries[0].in_a_row == 1 and sup.error is None
    log = (tmp_path / "decode-0.log").read_text()
    assert "restart 1 of decode-0" in log  # appended, not truncated
    second.proc.kill()
    second.proc.wait(5)
    t0 = asyncio.get_running_loop().time()
    await _poll_until(sup, lambda: sup.restarts("decode-0") == 2)
    assert asyncio.get_running_loop().time() - t0 >= 0.9  # second restart in a row waits 1 s
    await processes.stop_children([sup.children], grace_s=2)


async def test_supervisor_gives_up_after_the_restart_limit(tmp_path: Path) -> None:
    sup = processes.Supervisor(tmp_path, restart_limit=1)
    _adopt(sup, "decode-0", "worker", "import sys; print('boom'); sys.exit(3)", tmp_path)
    await _poll_until(sup, lambda: sup.failed.is_set())
    assert sup.restarts("decode-0") == 1
    assert sup.error is not None and "giving up on decode-0" in str(sup.error)
    assert "boom" in str(sup.error)


async def test_restart_limit_zero_fails_fast(tmp_path: Path) -> None:
    sup = processes.Supervisor(tmp_path, restart_limit=0)
    sup.ready = True
    _adopt(sup, "prefill-0", "worker", "import sys; sys.exit(1)", tmp_path)
    await _poll_until(sup, lambda: sup.failed.is_set())
    assert sup.restarts("prefill-0") == 0 and "no restarts" in str(sup.error)


async def test_core_service_failing_to_start_is_fatal_then_restarted_once_ready(tmp_path: Path) -> None:
    sup = processes.Supervisor(tmp_path, restart_limit=5)
    _adopt(sup, "router", "router", "import sys; print('bad flag'); sys.exit(2)", tmp_path)
    await _poll_until(sup, lambda: sup.failed.is_set())
    assert "router failed to start" in str(sup.error) and "bad flag" in str(sup.error)

    sup = processes.Supervisor(tmp_path, restart_limit=5)
    child = _adopt(sup, "router", "router", "import time; time.sleep(60)", tmp_path)
    sup.ready = True
    child.proc.kill()
    child.proc.wait(5)
    await _poll_until(sup, lambda: sup.restarts("router") == 1)
    assert sup.error is None and sup.children[0].alive()
    await processes.stop_children([sup.children], grace_s=2)


async def test_a_long_run_resets_the_back_off(tmp_path: Path) -> None:
    sup = processes.Supervisor(tmp_path, restart_limit=1, stable_s=0.3)
    child = _adopt(sup, "decode-0", "worker", "import time; time.sleep(60)", tmp_path)
    sup.entries[0].in_a_row = 1  # as if it had been restarted once already
    await asyncio.sleep(0.4)  # … and then stayed up longer than stable_s
    child.proc.kill()
    child.proc.wait(5)
    await _poll_until(sup, lambda: sup.restarts("decode-0") == 1)
    assert sup.error is None and sup.entries[0].in_a_row == 1
    await processes.stop_children([sup.children], grace_s=2)
