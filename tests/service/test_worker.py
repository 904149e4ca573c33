"""The worker process end to end: a prefill-role and a decode-role worker as real subprocesses
(``python -m tandem.services.worker``), a real nats-server, the real model and real NIXL READs.

Checks the disaggregated dance (PrefillRequest → KV descriptors → DecodeRequest → NIXL READ →
TokenChunks) against an in-process greedy run, the NIXL warm-up on registration, the KV bytes
moved, prefix reuse on the decode side, pool integrity afterwards, KV events in JetStream,
discovery entries, bad input (400), compat-hash mismatch (409), cancel (running decode and pinned
KV), pinned-KV expiry, and a clean SIGTERM shutdown (exit code 0).
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
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.errors import KeyNotFoundError

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
from tandem.services.runtime import connect

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BLOCK = 16
DTYPE = "float32"
KV_TTL_S = 5.0  # short, so the expiry test is quick; transfers here take milliseconds
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a "
    "single step. All that glitters is not gold, and not all those who wander are lost. The "
    "capital of France is"
)

PREFILL_REPLY = decoder(PrefillResult | ErrorReply)
GENERATE_REPLY = decoder(Ack | ErrorReply)
STATS_REPLY = decoder(WorkerStats | ErrorReply)
CHUNK = decoder(TokenChunk)


@dataclass
class Topology:
    ns: str
    subjects: Subjects
    prefill_id: str
    decode_id: str
    model_dir: Path
    procs: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]


def _log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from tandem.engine.weights import prepare_model

    return prepare_model()


def worker_cmd(role: str, iid: str, nats_url: str, ns: str, model_dir: Path) -> list[str]:
    """Command line of a small, single-threaded fp32 worker."""
    return [
        sys.executable,
        "-m",
        "tandem.services.worker",
        "--role",
        role,
        "--instance-id",
        iid,
        "--nats-url",
        nats_url,
        "--namespace",
        ns,
        "--model-dir",
        str(model_dir),
        "--dtype",
        DTYPE,
        "--kv-cache-gb",
        "0.1",
        "--threads",
        "1",
    ]


def start_worker(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a worker process with stdout and stderr going to ``log``."""
    env = {**os.environ, "NIXL_LOG_LEVEL": "WARN"}
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def topology(nats_url: str, model_dir: Path) -> Iterator[Topology]:
    """Start the two workers; at teardown SIGTERM them and require exit code 0."""
    ns = f"tw{uuid.uuid4().hex[:6]}"
    suffix = uuid.uuid4().hex[:4]
    ids = {"prefill": f"p-{suffix}", "decode": f"d-{suffix}"}
    tmp = Path(tempfile.mkdtemp(prefix="tandem-worker-test-"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    try:
        for role, iid in ids.items():
            logs[iid] = tmp / f"{iid}.log"
            cmd = [
                *worker_cmd(role, iid, nats_url, ns, model_dir),
                "--kv-ttl-s",
                str(KV_TTL_S),
                "--heartbeat-s",
                "0.5",
                "--shutdown-grace-s",
                "5",
                "--drain-timeout-s",
                "5",
            ]
            procs[iid] = start_worker(cmd, logs[iid])
        topo = Topology(ns, Subjects(ns), ids["prefill"], ids["decode"], model_dir, procs, logs)
        yield topo
    finally:
        codes: dict[str, int | None] = {}
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for iid, proc in procs.items():
            try:
                codes[iid] = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                codes[iid] = None
        bad = {iid: c for iid, c in codes.items() if c != 0}
        if bad:
            tails = "\n".join(f"--- {iid}\n{_log_tail(logs[iid])}" for iid in bad)
            pytest.fail(f"workers did not exit cleanly: {bad}\n{tails}")
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
async def nc(nats_url: str) -> AsyncIterator[NatsClient]:
    client = await connect(nats_url, "test-worker")
    try:
        yield client
    finally:
        await client.close()


async def stats(nc: NatsClient, topo: Topology, iid: str) -> WorkerStats:
    msg = await nc.request(topo.subjects.worker_debug(iid), encode(WorkerStatsRequest()), timeout=30)
    reply = STATS_REPLY.decode(msg.data)
    assert isinstance(reply, WorkerStats), reply
    return reply


async def _wait_ready(topology: Topology, nc: NatsClient) -> None:
    """Until every worker of ``topology`` answers its stats subject (fails if one exits)."""
    deadline = time.monotonic() + 300
    for iid, proc in topology.procs.items():
        while True:
            if proc.poll() is not None:
                pytest.fail(f"worker {iid} exited with {proc.returncode}:\n{_log_tail(topology.logs[iid])}")
            if time.monotonic() > deadline:
                pytest.fail(f"worker {iid} not ready:\n{_log_tail(topology.logs[iid])}")
            try:
                await stats(nc, topology, iid)
                break
            except Exception:
                await asyncio.sleep(0.5)


@pytest.fixture(scope="module")
async def workers(topology: Topology, nc: NatsClient) -> Topology:
    """The topology once both workers answer their stats subject."""
    await _wait_ready(topology, nc)
    return topology


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from tandem.engine.tokenizer import Tokenizer

    return Tokenizer(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Any:
    """An in-process engine with the workers' settings: the expected greedy tokens."""
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model_dir=model_dir, dtype=DTYPE, num_blocks=160, num_threads=1))

    def run(prompt: list[int], sampling: SamplingParams = GREEDY) -> list[int]:
        return list(engine.generate([prompt], sampling)[0])

    return run


def rid() -> str:
    return f"r-{uuid.uuid4().hex[:10]}"


async def prefill(
    nc: NatsClient, topo: Topology, prompt: list[int], sampling: SamplingParams, request_id: str
) -> PrefillResult | ErrorReply:
    req = PrefillRequest(
        request_id=request_id,
        token_ids=prompt,
        block_hashes=compute_block_hashes(prompt, BLOCK),
        sampling=sampling,
    )
    msg = await nc.request(topo.subjects.worker_prefill(topo.prefill_id), encode(req), timeout=120)
    return PREFILL_REPLY.decode(msg.data)


async def collect(sub: Any, within_s: float = 120.0) -> list[TokenChunk]:
    """Chunks from ``sub`` until the final one."""
    chunks: list[TokenChunk] = []
    deadline = time.monotonic() + within_s
    while True:
        msg = await sub.next_msg(timeout=max(0.1, deadline - time.monotonic()))
        chunk = CHUNK.decode(msg.data)
        chunks.append(chunk)
        if chunk.finish_reason is not None:
            return chunks


async def decode(
    nc: NatsClient,
    topo: Topology,
    prompt: list[int],
    sampling: SamplingParams,
    request_id: str,
    result: PrefillResult | None,
) -> tuple[Ack | ErrorReply, list[TokenChunk]]:
    """Send a DecodeRequest (with the prefill's KV if ``result``) and collect its chunks."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        req = DecodeRequest(
            request_id=request_id,
            token_ids=prompt,
            block_hashes=compute_block_hashes(prompt, BLOCK),
            sampling=sampling,
            reply_to=inbox,
            first_token=result.first_token if result else None,
            kv=result.kv if result else None,
            prefill_worker_id=result.worker_id if result else None,
        )
        msg = await nc.request(topo.subjects.worker_generate(topo.decode_id), encode(req), timeout=30)
        ack = GENERATE_REPLY.decode(msg.data)
        if isinstance(ack, ErrorReply):
            return ack, []
        return ack, await collect(sub)
    finally:
        await sub.unsubscribe()


async def disagg(
    nc: NatsClient, topo: Topology, prompt: list[int], sampling: SamplingParams = GREEDY
) -> tuple[PrefillResult, list[TokenChunk]]:
    request_id = rid()
    res = await prefill(nc, topo, prompt, sampling, request_id)
    assert isinstance(res, PrefillResult), res
    assert res.kv is not None and res.finish_reason is None
    ack, chunks = await decode(nc, topo, prompt, sampling, request_id, res)
    assert isinstance(ack, Ack), ack
    assert ack.worker_id == topo.decode_id
    return res, chunks


async def wait_idle(nc: NatsClient, topo: Topology, iid: str, within_s: float = 10.0) -> WorkerStats:
    """Stats once nothing is in use or pinned (pinned blocks free asynchronously)."""
    deadline = time.monotonic() + within_s
    while True:
        s = await stats(nc, topo, iid)
        if (s.in_use_blocks == 0 and s.pinned_blocks == 0 and s.pending_transfers == 0) or (
            time.monotonic() > deadline
        ):
            return s
        await asyncio.sleep(0.05)


def assert_clean(s: WorkerStats) -> None:
    assert s.integrity_ok, s.integrity_error
    assert s.in_use_blocks == 0, s
    assert s.pinned_blocks == 0, s
    assert s.pending_transfers == 0, s
    assert s.free_blocks + s.cached_blocks == s.num_blocks, s


# ---- tests ----------------------------------------------------------------------------------------


async def test_registered_in_bucket(workers: Topology, nc: NatsClient) -> None:
    kv = await nc.jetstream().key_value(workers.subjects.instances_bucket)
    infos = {}
    for iid in (workers.prefill_id, workers.decode_id):
        entry = await kv.get(iid)
        assert entry.value is not None
        infos[iid] = msgspec.msgpack.decode(entry.value, type=InstanceInfo)
    p, d = infos[workers.prefill_id], infos[workers.decode_id]
    assert (p.role, d.role) == ("prefill", "decode")
    assert p.compat_hash == d.compat_hash and p.compat_hash
    assert p.block_size == BLOCK and p.block_nbytes == d.block_nbytes > 0
    assert p.num_blocks > 0 and p.nixl_metadata and p.nixl_agent_name != d.nixl_agent_name
    assert time.time() - p.heartbeat_at < 10
    assert (p.engine, p.kv_transport, d.engine, d.kv_transport) == ("model", "nixl", "model", "nixl")
    assert p.kv_probe is not None and p.kv_probe[1] == p.block_nbytes and d.kv_probe is None


async def test_decode_worker_warms_up_its_connection(workers: Topology) -> None:
    """The decode worker connected to the prefill worker when it registered (and READ its probe
    block), so the first request's READ does not pay the UCX set-up."""
    log = workers.logs[workers.decode_id]
    deadline = time.monotonic() + 30
    while "kv_peer_connected" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, _log_tail(log)
        await asyncio.sleep(0.2)
    text = log.read_text(errors="replace")
    assert f'"peer": "{workers.prefill_id}"' in text
    assert "kv_peer_probe_failed" not in text and "kv_peer_connect_failed" not in text, _log_tail(log)


async def test_disaggregated_matches_local_greedy(
    workers: Topology, nc: NatsClient, tokenizer: Any, reference: Any
) -> None:
    prompt = tokenizer.encode(PROMPT_TEXT)
    assert len(prompt) > 2 * BLOCK
    res, chunks = await disagg(nc, workers, prompt)
    kv = res.kv
    assert kv is not None
    n_blocks = math.ceil(len(prompt) / BLOCK)
    assert kv.num_tokens == len(prompt) and len(kv.block_ids) == len(kv.descriptors) == n_blocks
    assert [c.index for c in chunks] == list(range(1, len(chunks) + 1))
    tokens = [res.first_token] + [t for c in chunks for t in c.token_ids]
    assert tokens == reference(prompt)
    final = chunks[-1]
    assert final.finish_reason == "length" and final.error is None
    assert final.metrics is not None and final.metrics.decode_worker == workers.decode_id
    moved = final.metrics.kv_transfer
    assert moved is not None
    assert moved.blocks == n_blocks - moved.reused_blocks
    assert moved.bytes == moved.blocks * kv.block_nbytes
    assert moved.reused_blocks == 0  # fresh prompt: the decode worker caches none of it


async def test_shared_prefix_moves_fewer_blocks(
    workers: Topology, nc: NatsClient, tokenizer: Any, reference: Any
) -> None:
    base = tokenizer.encode("Once upon a time, in a small village by the sea, there lived an old " * 4)
    first = base[: 3 * BLOCK] + tokenizer.encode(" fisherman who told stories.")
    second = base[: 3 * BLOCK] + tokenizer.encode(" baker who made the best bread in town.")
    _, chunks1 = await disagg(nc, workers, first)
    m1 = chunks1[-1].metrics
    assert m1 is not None and m1.kv_transfer is not None
    res2, chunks2 = await disagg(nc, workers, second)
    m2 = chunks2[-1].metrics
    assert m2 is not None and m2.kv_transfer is not None and res2.kv is not None
    assert res2.cached_tokens >= 3 * BLOCK  # the prefill worker reused its own cache too
    assert m2.kv_transfer.reused_blocks == 3
    assert m2.kv_transfer.blocks == math.ceil(len(second) / BLOCK) - 3
    assert m2.kv_transfer.blocks < m1.kv_transfer.blocks
    assert m2.kv_transfer.bytes == m2.kv_transfer.blocks * res2.kv.block_nbytes
    tokens = [res2.first_token] + [t for c in chunks2 for t in c.token_ids]
    assert tokens == reference(second)


async def test_local_prefill_on_decode_worker(
    workers: Topology, nc: NatsClient, tokenizer: Any, reference: Any
) -> None:
    prompt = tokenizer.encode("Water boils at a temperature of")
    ack, chunks = await decode(nc, workers, prompt, GREEDY, rid(), None)
    assert isinstance(ack, Ack), ack
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [t for c in chunks for t in c.token_ids] == reference(prompt)
    metrics = chunks[-1].metrics
    assert metrics is not None and metrics.kv_transfer is None
    assert metrics.prefill_worker == metrics.decode_worker == workers.decode_id


async def test_first_token_finishes(workers: Topology, nc: NatsClient, tokenizer: Any) -> None:
    prompt = tokenizer.encode(PROMPT_TEXT)
    res = await prefill(nc, workers, prompt, SamplingParams(max_tokens=1, temperature=0.0), rid())
    assert isinstance(res, PrefillResult), res
    assert res.finish_reason == "length" and res.kv is None
    assert_clean(await wait_idle(nc, workers, workers.prefill_id))


async def test_malformed_payload_and_bad_prompt(workers: Topology, nc: NatsClient, tokenizer: Any) -> None:
    for subject in (
        workers.subjects.worker_prefill(workers.prefill_id),
        workers.subjects.worker_generate(workers.decode_id),
    ):
        msg = await nc.request(subject, b"\xc1 not msgpack", timeout=10)
        reply = msgspec.msgpack.decode(msg.data, type=ErrorReply)
        assert reply.code == 400
    # engine ValueError: empty prompt
    res = await prefill(nc, workers, [], GREEDY, rid())
    assert isinstance(res, ErrorReply) and res.code == 400, res
    ack, chunks = await decode(nc, workers, [], GREEDY, rid(), None)
    assert isinstance(ack, Ack)
    assert chunks[-1].finish_reason == "error" and chunks[-1].error is not None
    assert chunks[-1].error.code == 400
    # still serving
    _, chunks2 = await disagg(nc, workers, tokenizer.encode("Hello there, how are you doing today?"))
    assert chunks2[-1].finish_reason == "length"


async def test_compat_hash_mismatch_is_409(workers: Topology, nc: NatsClient, tokenizer: Any) -> None:
    prompt = tokenizer.encode("Compatibility hashes protect the KV layout from mismatched workers.")
    request_id = rid()
    res = await prefill(nc, workers, prompt, GREEDY, request_id)
    assert isinstance(res, PrefillResult) and res.kv is not None
    res.kv.compat_hash = "0000000000000000"
    ack, _ = await decode(nc, workers, prompt, GREEDY, request_id, res)
    assert isinstance(ack, ErrorReply) and ack.code == 409, ack
    # the router would now cancel: that frees the pinned blocks at once
    assert (await stats(nc, workers, workers.prefill_id)).pinned_blocks > 0
    await nc.publish(workers.subjects.cancel, encode(Cancel(request_id=request_id)))
    assert_clean(await wait_idle(nc, workers, workers.prefill_id))


async def test_kv_from_an_unregistered_source_is_403(
    workers: Topology, nc: NatsClient, tokenizer: Any
) -> None:
    """A DecodeRequest whose descriptors name an agent other than the registered prefill
    worker's (a forgery pointing the READ at foreign memory) is refused before any READ."""
    prompt = tokenizer.encode("Only registered prefill workers may be read from, nobody else.")
    request_id = rid()
    res = await prefill(nc, workers, prompt, GREEDY, request_id)
    assert isinstance(res, PrefillResult) and res.kv is not None
    good_kv = res.kv
    res.kv = msgspec.structs.replace(good_kv, agent_name="tandem-intruder")
    ack, _ = await decode(nc, workers, prompt, GREEDY, request_id, res)
    assert isinstance(ack, ErrorReply) and ack.code == 403, ack
    res.kv, res.worker_id = good_kv, "no-such-prefill-worker"
    ack, _ = await decode(nc, workers, prompt, GREEDY, request_id, res)
    assert isinstance(ack, ErrorReply) and ack.code == 403, ack
    await nc.publish(workers.subjects.cancel, encode(Cancel(request_id=request_id)))
    assert_clean(await wait_idle(nc, workers, workers.prefill_id))
    assert_clean(await wait_idle(nc, workers, workers.decode_id))


async def test_cancel_running_decode_frees_blocks(workers: Topology, nc: NatsClient, tokenizer: Any) -> None:
    prompt = tokenizer.encode("Write a very long story about a dragon:")
    request_id = rid()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        req = DecodeRequest(
            request_id=request_id,
            token_ids=prompt,
            block_hashes=compute_block_hashes(prompt, BLOCK),
            sampling=SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True),
            reply_to=inbox,
        )
        msg = await nc.request(workers.subjects.worker_generate(workers.decode_id), encode(req), timeout=30)
        assert isinstance(GENERATE_REPLY.decode(msg.data), Ack)
        first = CHUNK.decode((await sub.next_msg(timeout=60)).data)
        assert first.finish_reason is None
        assert (await stats(nc, workers, workers.decode_id)).in_use_blocks > 0
        await nc.publish(workers.subjects.cancel, encode(Cancel(request_id=request_id)))
        rest = await collect(sub, within_s=30)
    finally:
        await sub.unsubscribe()
    assert rest[-1].finish_reason == "abort"
    assert sum(len(c.token_ids) for c in [first, *rest]) < 500
    assert_clean(await wait_idle(nc, workers, workers.decode_id))


async def test_pinned_kv_expires(workers: Topology, nc: NatsClient, tokenizer: Any) -> None:
    prompt = tokenizer.encode("Nobody will ever read this prefilled KV cache, so it must expire.")
    res = await prefill(nc, workers, prompt, GREEDY, rid())
    assert isinstance(res, PrefillResult) and res.kv is not None
    s = await stats(nc, workers, workers.prefill_id)
    assert s.pinned_blocks == len(res.kv.block_ids) and s.pending_transfers == 1
    await asyncio.sleep(max(0.0, res.kv.expires_at - time.time()) + 0.5)
    assert_clean(await wait_idle(nc, workers, workers.prefill_id))


async def test_long_prompt_transfer(
    workers: Topology, nc: NatsClient, tokenizer: Any, reference: Any
) -> None:
    """~1000 tokens: many blocks, coalesced READ; prints the transfer figures."""
    text = " ".join(f"Item {i}: the number {i} squared is {i * i}." for i in range(80))
    prompt = tokenizer.encode(text)[:1000]
    sampling = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    res, chunks = await disagg(nc, workers, prompt, sampling)
    m = chunks[-1].metrics
    assert m is not None and m.kv_transfer is not None and res.kv is not None
    assert m.kv_transfer.bytes == m.kv_transfer.blocks * res.kv.block_nbytes
    assert m.kv_transfer.blocks == math.ceil(len(prompt) / BLOCK) - m.kv_transfer.reused_blocks
    tokens = [res.first_token] + [t for c in chunks for t in c.token_ids]
    assert tokens == reference(prompt, sampling)
    mib = m.kv_transfer.bytes / 2**20
    print(
        f"\nKV transfer for {len(prompt)} tokens: {m.kv_transfer.blocks} blocks, {mib:.1f} MiB in "
        f"{m.kv_transfer.ms:.2f} ms ({mib / 1024 / max(m.kv_transfer.ms / 1e3, 1e-9):.2f} GiB/s); "
        f"prefill {res.prefill_ms:.0f} ms"
    )


async def test_pools_clean_and_events_streamed(workers: Topology, nc: NatsClient) -> None:
    """Runs last (file order): every earlier request left both pools clean; events arrived in order."""
    for iid in (workers.prefill_id, workers.decode_id):
        s = await wait_idle(nc, workers, iid)
        assert_clean(s)
        assert s.rss_bytes > 0
        assert s.kv_events_published > 0
        js = nc.jetstream()
        sub = await js.subscribe(workers.subjects.kv_events(iid), ordered_consumer=True)
        event_ids: list[int] = []
        stored = 0
        try:
            while len(event_ids) < s.kv_events_published:
                msg = await sub.next_msg(timeout=10)
                batch = msgspec.msgpack.decode(msg.data, type=KvEventBatch)
                assert batch.worker_id == iid
                event_ids += [e.event_id for e in batch.events]
                stored += sum(isinstance(e.data, KvStored) for e in batch.events)
        finally:
            await sub.unsubscribe()
        assert event_ids == list(range(len(event_ids)))
        assert stored > 0


async def test_sigterm_unregisters_then_drains(workers: Topology, nc: NatsClient, tokenizer: Any) -> None:
    """SIGTERM mid-request: the registry entry goes first, the stream ends, exit code 0."""
    prompt = tokenizer.encode("Count slowly from one to one thousand:")
    request_id = rid()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    proc = workers.procs[workers.decode_id]
    kv = await nc.jetstream().key_value(workers.subjects.instances_bucket)
    try:
        req = DecodeRequest(
            request_id=request_id,
            token_ids=prompt,
            block_hashes=compute_block_hashes(prompt, BLOCK),
            sampling=SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True),
            reply_to=inbox,
        )
        msg = await nc.request(workers.subjects.worker_generate(workers.decode_id), encode(req), timeout=30)
        assert isinstance(GENERATE_REPLY.decode(msg.data), Ack)
        await sub.next_msg(timeout=60)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while True:  # unregistered while the request is still in its grace period
            try:
                await kv.get(workers.decode_id)
            except KeyNotFoundError:
                break
            assert time.monotonic() < deadline, "worker still registered after SIGTERM"
            await asyncio.sleep(0.05)
        rest = await collect(sub, within_s=60)
    finally:
        await sub.unsubscribe()
    assert rest[-1].finish_reason in ("abort", "length")
    assert await asyncio.to_thread(proc.wait, 60) == 0


async def test_both_role_prefills_for_itself(
    nats_url: str, model_dir: Path, nc: NatsClient, tokenizer: Any, reference: Any
) -> None:
    """Role both: local prefill+decode, and a disaggregated request whose KV is its own."""
    ns = f"tw{uuid.uuid4().hex[:6]}"
    iid = f"b-{uuid.uuid4().hex[:4]}"
    log = Path(tempfile.mkdtemp(prefix="tandem-worker-test-")) / f"{iid}.log"
    proc = start_worker(worker_cmd("both", iid, nats_url, ns, model_dir), log)
    topo = Topology(ns, Subjects(ns), iid, iid, model_dir, {iid: proc}, {iid: log})
    try:
        await _wait_ready(topo, nc)
        prompt = tokenizer.encode(PROMPT_TEXT)
        expected = reference(prompt)
        ack, chunks = await decode(nc, topo, prompt, GREEDY, rid(), None)
        assert isinstance(ack, Ack)
        assert [t for c in chunks for t in c.token_ids] == expected
        res, chunks = await disagg(nc, topo, prompt)
        assert [res.first_token] + [t for c in chunks for t in c.token_ids] == expected
        moved = chunks[-1].metrics.kv_transfer if chunks[-1].metrics else None
        assert moved is not None and moved.blocks + moved.reused_blocks == math.ceil(len(prompt) / BLOCK)
        assert_clean(await wait_idle(nc, topo, iid))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 60)
    assert code == 0, _log_tail(log)
    shutil.rmtree(log.parent, ignore_errors=True)


def test_nixl_unavailable_exits_nonzero(nats_url: str, model_dir: Path) -> None:
    """No silent fallback: a worker whose NIXL cannot load exits 1 with a clear log line."""
    env = {**os.environ, "NIXL_PLUGIN_DIR": "/nonexistent-nixl-plugins", "NIXL_LOG_LEVEL": "WARN"}
    cmd = worker_cmd(
        "prefill", f"nonixl-{uuid.uuid4().hex[:4]}", nats_url, f"tw{uuid.uuid4().hex[:6]}", model_dir
    )
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, timeout=300, check=False)
    out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    assert done.returncode == 1, out[-3000:]
    assert "nixl_unavailable" in out
