"""Mock workers, many per process: ``python -m tandem.services.worker --engine mock --num-workers N``.

Two real processes against the session's nats-server: one hosting 8 workers of role ``both``
(``mw-<x>-0..7``), one hosting 2 decode workers (``md-<x>-0..1``). No model, no torch, no NIXL:
the mock engine (real scheduler, KV block manager, prefix cache and KV events; synthetic tokens;
simulated step times) and the simulated KV transport (time = bytes / bandwidth). Checked: one
registry entry per worker; every worker serves prefill and generate; disaggregated requests end
to end — between two workers of one process (in-process notification), across processes
(notification over NATS) and a ``both`` worker importing its own prefill (in-pool copy) — with
the right tokens, KV transfer figures and simulated timing; Cancel frees pinned KV; KV events on
JetStream; pools intact and nothing pinned afterwards; SIGTERM stops every worker cleanly.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats.errors
import pytest
import structlog
from nats.aio.client import Client as NatsClient
from nats.js.errors import KeyNotFoundError

from tandem.engine.config import EngineConfig
from tandem.engine.engine import RequestOutput
from tandem.kvbm.hashing import compute_block_hashes
from tandem.protocol import Subjects
from tandem.protocol.messages import (
    Ack,
    Cancel,
    DecodeRequest,
    ErrorReply,
    InstanceInfo,
    KvEventBatch,
    KvStored,
    PrefillRequest,
    PrefillResult,
    SamplingParams,
    TokenChunk,
    WorkerStats,
    WorkerStatsRequest,
    decoder,
    encode,
)
from tandem.services.worker.engine_client import MAX_BURST_STEPS, EngineClient

REPO = Path(__file__).resolve().parents[2]
BLOCK = 16
NUM_BOTH = 8
NUM_DECODE = 2
BANDWIDTH_GBPS = 2.0  # simulated: 1 GB takes 0.5 s
KV_TTL_S = 3.0
# SmolLM2-135M bf16: 30 layers x 2 x 3 KV heads x 64 x 2 B = 23040 B per token.
BLOCK_NBYTES = 23040 * BLOCK

PREFILL_REPLY = decoder(PrefillResult | ErrorReply)
GENERATE_REPLY = decoder(Ack | ErrorReply)
STATS_REPLY = decoder(WorkerStats | ErrorReply)
CHUNK = decoder(TokenChunk)


@dataclass
class Mock:
    subjects: Subjects
    both: list[str]  # role both, one process
    decode: list[str]  # role decode, another process
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _cmd(nats_url: str, ns: str, role: str, first_id: str, n: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tandem.services.worker",
        "--engine",
        "mock",
        "--role",
        role,
        "--num-workers",
        str(n),
        "--instance-id",
        first_id,
        "--nats-url",
        nats_url,
        "--namespace",
        ns,
        "--num-gpu-blocks-override",
        "256",
        "--kv-transfer-bandwidth",
        str(BANDWIDTH_GBPS),
        "--kv-ttl-s",
        str(KV_TTL_S),
        "--heartbeat-s",
        "0.5",
        "--shutdown-grace-s",
        "2",
        "--drain-timeout-s",
        "2",
    ]


@pytest.fixture(scope="module")
def mock(nats_url: str) -> Iterator[Mock]:
    """Start the two processes; at teardown SIGTERM whatever still runs and require exit 0."""
    ns = f"tm{uuid.uuid4().hex[:6]}"
    x = uuid.uuid4().hex[:4]
    tmp = Path(tempfile.mkdtemp(prefix="tandem-mock-worker-"))
    both = [f"mw-{x}-{i}" for i in range(NUM_BOTH)]
    dec = [f"md-{x}-{i}" for i in range(NUM_DECODE)]
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp / "both.log", tmp / "decode.log"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        for log, cmd in zip(
            logs,
            [_cmd(nats_url, ns, "both", both[0], NUM_BOTH), _cmd(nats_url, ns, "decode", dec[0], NUM_DECODE)],
            strict=True,
        ):
            with log.open("wb") as out:
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO))
        yield Mock(Subjects(ns), both, dec, procs, logs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(30))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(None)
        if any(c != 0 for c in codes):
            pytest.fail(f"mock worker processes exited with {codes}:\n" + "\n".join(_tail(p) for p in logs))
        shutil.rmtree(tmp, ignore_errors=True)


async def stats(nc: NatsClient, m: Mock, iid: str) -> WorkerStats:
    msg = await nc.request(m.subjects.worker_debug(iid), encode(WorkerStatsRequest()), timeout=10)
    reply = STATS_REPLY.decode(msg.data)
    assert isinstance(reply, WorkerStats), reply
    return reply


@pytest.fixture
async def workers(mock: Mock, nc: NatsClient) -> Mock:
    """The processes once every worker is in the instances bucket."""
    deadline = time.monotonic() + 60
    want = set(mock.both + mock.decode)
    while True:
        for proc, log in zip(mock.procs, mock.logs, strict=True):
            if proc.poll() is not None:
                pytest.fail(f"mock worker process exited with {proc.returncode}:\n{_tail(log)}")
        try:
            bucket = await nc.jetstream().key_value(mock.subjects.instances_bucket)
            keys = set(await bucket.keys())
        except Exception:
            keys = set()
        if want <= keys:
            return mock
        assert time.monotonic() < deadline, f"not registered: {sorted(want - keys)}"
        await asyncio.sleep(0.1)


def rid() -> str:
    return f"r-{uuid.uuid4().hex[:10]}"


def prompt(n: int, salt: int = 0) -> list[int]:
    return [(7 * i + 13 * salt) % 40000 + 100 for i in range(n)]


async def prefill(
    nc: NatsClient, m: Mock, iid: str, tokens: list[int], sampling: SamplingParams, request_id: str
) -> PrefillResult | ErrorReply:
    req = PrefillRequest(
        request_id=request_id,
        token_ids=tokens,
        block_hashes=compute_block_hashes(tokens, BLOCK),
        sampling=sampling,
    )
    msg = await nc.request(m.subjects.worker_prefill(iid), encode(req), timeout=30)
    return PREFILL_REPLY.decode(msg.data)


async def decode(
    nc: NatsClient,
    m: Mock,
    iid: str,
    tokens: list[int],
    sampling: SamplingParams,
    request_id: str,
    result: PrefillResult | None = None,
) -> tuple[Ack | ErrorReply, list[TokenChunk]]:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        req = DecodeRequest(
            request_id=request_id,
            token_ids=tokens,
            block_hashes=compute_block_hashes(tokens, BLOCK),
            sampling=sampling,
            reply_to=inbox,
            first_token=result.first_token if result else None,
            kv=result.kv if result else None,
            prefill_worker_id=result.worker_id if result else None,
        )
        msg = await nc.request(m.subjects.worker_generate(iid), encode(req), timeout=10)
        ack = GENERATE_REPLY.decode(msg.data)
        if isinstance(ack, ErrorReply):
            return ack, []
        chunks: list[TokenChunk] = []
        while not chunks or chunks[-1].finish_reason is None:
            chunks.append(CHUNK.decode((await sub.next_msg(timeout=30)).data))
        return ack, chunks
    finally:
        await sub.unsubscribe()


async def disagg(
    nc: NatsClient, m: Mock, p: str, d: str, tokens: list[int], sampling: SamplingParams
) -> tuple[PrefillResult, list[TokenChunk]]:
    request_id = rid()
    res = await prefill(nc, m, p, tokens, sampling, request_id)
    assert isinstance(res, PrefillResult), res
    assert res.kv is not None and res.worker_id == p
    ack, chunks = await decode(nc, m, d, tokens, sampling, request_id, res)
    assert isinstance(ack, Ack) and ack.worker_id == d, ack
    return res, chunks


async def idle(nc: NatsClient, m: Mock, iid: str, within_s: float = 5.0) -> WorkerStats:
    deadline = time.monotonic() + within_s
    while True:
        s = await stats(nc, m, iid)
        if (s.in_use_blocks, s.pinned_blocks, s.pending_transfers) == (
            0,
            0,
            0,
        ) or time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.02)


def assert_clean(s: WorkerStats) -> None:
    assert s.integrity_ok, s.integrity_error
    assert (s.in_use_blocks, s.pinned_blocks, s.pending_transfers) == (0, 0, 0), s
    assert s.free_blocks + s.cached_blocks == s.num_blocks, s


def seeded(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1234, ignore_eos=True)


# ---- tests ----------------------------------------------------------------------------------------


async def test_one_registry_entry_per_worker(workers: Mock, nc: NatsClient) -> None:
    bucket = await nc.jetstream().key_value(workers.subjects.instances_bucket)
    infos = {}
    for iid in workers.both + workers.decode:
        entry = await bucket.get(iid)
        assert entry.value is not None
        infos[iid] = msgspec.msgpack.decode(entry.value, type=InstanceInfo)
    assert {i.instance_id for i in infos.values()} == set(workers.both + workers.decode)
    assert all(i.engine == "mock" and i.kv_transport == "simulated" for i in infos.values())
    assert [infos[i].role for i in workers.both] == ["both"] * NUM_BOTH
    assert [infos[i].role for i in workers.decode] == ["decode"] * NUM_DECODE
    assert len({i.compat_hash for i in infos.values()}) == 1
    assert len({i.nixl_agent_name for i in infos.values()}) == len(infos)
    assert all(i.kv_probe is None for i in infos.values())
    assert all(i.block_nbytes == BLOCK_NBYTES and i.num_blocks == 256 for i in infos.values())
    assert all(time.time() - i.heartbeat_at < 5 for i in infos.values())


async def test_every_worker_serves_prefill_and_generate(workers: Mock, nc: NatsClient) -> None:
    tokens = prompt(40)
    sampling = seeded(5)

    async def one(iid: str) -> None:
        first = await prefill(nc, workers, iid, tokens, SamplingParams(max_tokens=1, seed=1), rid())
        assert isinstance(first, PrefillResult) and first.kv is None and first.finish_reason == "length"
        ack, chunks = await decode(nc, workers, iid, tokens, sampling, rid())
        assert isinstance(ack, Ack) and ack.worker_id == iid
        assert [c.index for c in chunks] == list(range(len(chunks)))
        assert sum(len(c.token_ids) for c in chunks) == 5 and chunks[-1].finish_reason == "length"
        assert all(c.worker_id == iid for c in chunks)

    await asyncio.gather(*(one(i) for i in workers.both))
    ack, chunks = await decode(nc, workers, workers.decode[0], tokens, sampling, rid())
    assert isinstance(ack, Ack) and sum(len(c.token_ids) for c in chunks) == 5
    # Prefill is not served by a decode-only worker.
    req = PrefillRequest(request_id=rid(), token_ids=tokens, block_hashes=[], sampling=sampling)
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request(workers.subjects.worker_prefill(workers.decode[0]), encode(req), timeout=2)


async def test_disaggregated_in_process_matches_local(workers: Mock, nc: NatsClient) -> None:
    """Prefill on one worker, decode on another worker of the same process."""
    tokens = prompt(100, salt=1)
    sampling = seeded(8)
    _, local = await decode(nc, workers, workers.both[7], tokens, sampling, rid())
    expected = [t for c in local for t in c.token_ids]
    res, chunks = await disagg(nc, workers, workers.both[0], workers.both[1], tokens, sampling)
    assert [c.index for c in chunks] == list(range(1, len(chunks) + 1))
    assert [res.first_token] + [t for c in chunks for t in c.token_ids] == expected
    final = chunks[-1]
    assert final.finish_reason == "length" and final.metrics is not None
    assert final.metrics.decode_worker == workers.both[1]
    assert final.metrics.prefill_worker == workers.both[0]
    moved = final.metrics.kv_transfer
    assert moved is not None and moved.reused_blocks == 0
    assert moved.blocks == math.ceil(100 / BLOCK) and moved.bytes == moved.blocks * BLOCK_NBYTES
    assert_clean(await idle(nc, workers, workers.both[0]))  # pinned KV freed by the notification
    assert_clean(await idle(nc, workers, workers.both[1]))


async def test_simulated_transfer_takes_bytes_over_bandwidth(workers: Mock, nc: NatsClient) -> None:
    tokens = prompt(1000, salt=2)  # 63 blocks = 23.2 MB: 11.6 ms at 2 GB/s
    res, chunks = await disagg(nc, workers, workers.both[2], workers.both[3], tokens, seeded(2))
    moved = chunks[-1].metrics.kv_transfer if chunks[-1].metrics else None
    assert moved is not None and moved.blocks == 63
    expected_ms = moved.bytes / (BANDWIDTH_GBPS * 1e9) * 1e3
    assert expected_ms <= moved.ms < expected_ms + 50
    # The mock prefill took its simulated time (Dynamo's polynomial: ~32 ms for 1000 tokens).
    assert res.prefill_ms >= 25


async def test_disaggregated_across_processes(workers: Mock, nc: NatsClient) -> None:
    """Decode in the other process: the notification reaches the prefill worker over NATS."""
    tokens = prompt(70, salt=3)
    sampling = seeded(4)
    res, chunks = await disagg(nc, workers, workers.both[4], workers.decode[1], tokens, sampling)
    assert sum(len(c.token_ids) for c in chunks) == 3 and chunks[-1].finish_reason == "length"
    assert res.kv is not None
    assert_clean(await idle(nc, workers, workers.both[4]))
    assert_clean(await idle(nc, workers, workers.decode[1]))


async def test_both_worker_imports_its_own_prefill(workers: Mock, nc: NatsClient) -> None:
    tokens = prompt(50, salt=4)
    _, chunks = await disagg(nc, workers, workers.both[5], workers.both[5], tokens, seeded(3))
    moved = chunks[-1].metrics.kv_transfer if chunks[-1].metrics else None
    assert moved is not None and moved.blocks + moved.reused_blocks == math.ceil(50 / BLOCK)
    assert_clean(await idle(nc, workers, workers.both[5]))


async def test_cancel_frees_pinned_and_expiry(workers: Mock, nc: NatsClient) -> None:
    tokens = prompt(64, salt=5)
    request_id = rid()
    res = await prefill(nc, workers, workers.both[6], tokens, seeded(4), request_id)
    assert isinstance(res, PrefillResult) and res.kv is not None
    s = await stats(nc, workers, workers.both[6])
    assert s.pinned_blocks == 4 and s.pending_transfers == 1
    await nc.publish(workers.subjects.cancel, encode(Cancel(request_id=request_id)))
    assert_clean(await idle(nc, workers, workers.both[6]))
    # Nobody reads this one: it expires after --kv-ttl-s.
    res = await prefill(nc, workers, workers.both[6], prompt(64, salt=6), seeded(4), rid())
    assert isinstance(res, PrefillResult) and res.kv is not None
    assert (await stats(nc, workers, workers.both[6])).pinned_blocks == 4
    await asyncio.sleep(max(0.0, res.kv.expires_at - time.time()))
    assert_clean(await idle(nc, workers, workers.both[6], within_s=3.0))


async def test_pools_intact_and_kv_events_streamed(workers: Mock, nc: NatsClient) -> None:
    """Runs after the request tests (file order): every pool is clean, events arrived in order."""
    js = nc.jetstream()
    total = 0
    for iid in workers.both + workers.decode:
        s = await idle(nc, workers, iid)
        assert_clean(s)
        total += s.kv_events_published
        if not s.kv_events_published:
            continue
        sub = await js.subscribe(workers.subjects.kv_events(iid), ordered_consumer=True)
        ids: list[int] = []
        stored = 0
        try:
            while len(ids) < s.kv_events_published:
                batch = msgspec.msgpack.decode((await sub.next_msg(timeout=10)).data, type=KvEventBatch)
                assert batch.worker_id == iid
                ids += [e.event_id for e in batch.events]
                stored += sum(isinstance(e.data, KvStored) for e in batch.events)
        finally:
            await sub.unsubscribe()
        assert ids == list(range(len(ids))) and stored > 0
    assert total > 0


async def test_sigterm_stops_every_worker(workers: Mock, nc: NatsClient) -> None:
    bucket = await nc.jetstream().key_value(workers.subjects.instances_bucket)
    for proc in workers.procs:
        proc.send_signal(signal.SIGTERM)
    codes = [await asyncio.to_thread(proc.wait, 30) for proc in workers.procs]
    assert codes == [0, 0], "\n".join(_tail(p) for p in workers.logs)
    for iid in workers.both + workers.decode:
        with pytest.raises(KeyNotFoundError):
            await bucket.get(iid)


# ---- the engine loop's bursts (in process, no NATS) ----------------------------------------------


class _Loop:
    """Records what the engine loop hands over: ``("out", request_id, tokens)`` and ``"flush"``."""

    def __init__(self, client: EngineClient, *, end_on_first: bool = False) -> None:
        self.client = client
        self.end_on_first = end_on_first
        self.events: list[tuple[str, str, list[int]] | str] = []
        self.done = asyncio.Event()
        self.seen: set[str] = set()

    async def on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self.events.append(("out", out.request_id, list(out.new_token_ids)))
            if self.end_on_first and out.request_id not in self.seen:
                self.client.end_burst()
            self.seen.add(out.request_id)
            if out.finish_reason is not None:
                self.done.set()

    async def on_failure(self, message: str) -> None:
        raise AssertionError(message)

    async def on_flush(self) -> None:
        self.events.append("flush")

    def outputs_per_flush(self) -> list[int]:
        """Outputs handed over between consecutive flushes."""
        counts, n = [], 0
        for e in self.events:
            if e == "flush":
                if n:
                    counts.append(n)
                n = 0
            else:
                n += 1
        return counts


async def _run_engine(speedup: float, *, end_on_first: bool = False) -> _Loop:
    """One 40-token request through a mock engine's step loop."""
    config = EngineConfig(engine="mock", speedup_ratio=speedup, num_blocks=64, max_num_seqs=4)
    client = EngineClient(config, lambda _events: None, structlog.get_logger("test"))
    loop = _Loop(client, end_on_first=end_on_first)
    await client.start()
    client.start_loop(loop.on_outputs, loop.on_failure, loop.on_flush)
    try:
        await client.call(client.engine.add_request, "b1", prompt(20), seeded(40))
        client.wake()
        async with asyncio.timeout(30):
            await loop.done.wait()
    finally:
        await client.close()
    return loop


async def test_engine_loop_bursts_only_without_simulated_time() -> None:
    """No simulated time to wait out: several steps' outputs per flush (one chunk per request);
    with the timing model on, a flush after every step, as before."""
    fast = await _run_engine(1e6)
    assert sum(fast.outputs_per_flush()) == 40
    assert 1 < max(fast.outputs_per_flush()) <= MAX_BURST_STEPS
    timed = await _run_engine(1.0)  # decode steps of >= 1 ms simulated: each one waited out
    assert timed.outputs_per_flush() == [1] * 40


async def test_engine_loop_end_burst_flushes_that_step() -> None:
    """What must go out now (here: a request's first token) ends the burst after its step."""
    loop = await _run_engine(1e6, end_on_first=True)
    first = loop.events[0]
    assert isinstance(first, tuple) and first[:2] == ("out", "b1") and len(first[2]) == 1
    assert loop.events[1] == "flush"
    assert sum(loop.outputs_per_flush()) == 40


async def test_engine_loop_overlaps_output_handling_with_the_next_pass() -> None:
    """Handing a pass's outputs over (publishing) overlaps the next simulated pass, as a real
    engine's output processing overlaps its next forward pass: 40 steps whose outputs each take
    3 ms of CPU to hand over last about their simulated time, not that plus 40 × 3 ms."""
    config = EngineConfig(engine="mock", speedup_ratio=1.0, num_blocks=64, max_num_seqs=4)
    client = EngineClient(config, lambda _events: None, structlog.get_logger("test"))
    simulated: list[float] = []
    done = asyncio.Event()

    async def on_outputs(outputs: list[RequestOutput]) -> None:
        simulated.append(client.engine.last_step_simulated_s)
        end = time.perf_counter() + 0.003  # the CPU work of publishing this pass's tokens
        while time.perf_counter() < end:
            pass
        if any(o.finish_reason is not None for o in outputs):
            done.set()

    async def on_failure(message: str) -> None:
        raise AssertionError(message)

    await client.start()
    client.start_loop(on_outputs, on_failure)
    try:
        await client.call(client.engine.add_request, "p1", prompt(20), seeded(40))
        t0 = time.perf_counter()
        client.wake()
        async with asyncio.timeout(30):
            await done.wait()
        elapsed = time.perf_counter() - t0
    finally:
        await client.close()
    assert len(simulated) == 40
    total = sum(simulated)
    assert total - 0.005 < elapsed < total + 0.06, (elapsed, total)  # not total + 0.12 s
