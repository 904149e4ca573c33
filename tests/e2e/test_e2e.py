"""The whole system, as real processes with the real model, started by the launcher.

One disaggregated stack (1 prefill + 1 decode worker) and one aggregated stack (1 worker of role
``both``) answer the same greedy ``/v1/completions`` requests; the in-process engine answers them
too. The tests check that all three agree token for token (the requests ask for
``return_token_ids``) and as text; that the KV bytes reported moved are exactly the blocks the
decode worker lacked times the block size in bytes; that both workers' pools are intact with
nothing left in use afterwards; that one trace id spans all five services; that the launcher
stops everything (exit 0, no orphans); and that ``launcher --smoke`` (HTTP + NATS) passes.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from tandem.protocol import (
    ErrorReply,
    InstanceInfo,
    SamplingParams,
    Subjects,
    WorkerStats,
    WorkerStatsRequest,
    decoder,
    encode,
)
from tests.conftest import REPO, free_port
from tests.e2e.conftest import CollectedSpan, OtlpCollector, Stack, launcher_env, log_tails, start_stack

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 10
BLOCK_SIZE = 16  # the workers' default --block-size
DISAGG_MIN_TOKENS = 64  # the router's default: shorter uncached prompts skip the prefill worker
KV_CACHE_GB = "0.25"

SHARED_PREFIX = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, an oil-based ink and a wooden screw press adapted from the ones "
    "used to make wine. Within a few decades printing shops had spread to more than two hundred "
    "cities across Europe, books became far cheaper, literacy rose, and new ideas travelled faster "
    "than they ever had before."
)
SUFFIXES = (
    " Scholars often compare this change with the arrival of the internet, because both made it "
    "cheap to copy words and hard to control who read them. Pamphlets, newspapers and scientific "
    "journals all grew out of the new trade, and so did the modern idea of an author who owns a "
    "text. Governments soon tried to license printers, and censors drew up lists of banned "
    "books. In one short sentence, the most important effect of printing was",
    " Printers also had to solve practical problems: casting thousands of identical letters, "
    "mixing ink that would stick to metal, and finding paper that was strong but affordable. "
    "Many early printers went bankrupt, and Gutenberg himself lost his workshop to a creditor. "
    "Others survived by printing indulgences, calendars and grammar books for schools, which "
    "sold steadily year after year. The hardest technical problem for an early printer was",
    " Outside Europe the story was different. Movable type had been invented much earlier in "
    "China and Korea, but writing systems with thousands of characters made it less useful "
    "there than woodblock printing, which stayed common for centuries. Korean printers cast "
    "bronze type for royal editions, and Chinese workshops produced huge encyclopaedias and "
    "novels from carved wooden blocks. Compared with Europe, printing in East Asia developed",
)
SHORT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Here is a list of three fruits: apple, banana, and",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who every "
    "morning walked down to the harbour before sunrise. One day he found",
)
LONG_PROMPT = (
    " ".join(
        f"Step {i}: the engineer checked gauge number {i * 7 % 13} and wrote down a pressure of "
        f"{(i * 37) % 90 + 10} units before moving on."
        for i in range(1, 16)
    )
    + " The next step was"
)


@dataclass
class RunResult:
    """What one stack answered, and its state afterwards."""

    replies: list[dict[str, Any]]
    instances: dict[str, InstanceInfo]
    stats: dict[str, WorkerStats]
    exit_code: int
    leftovers: list[str]
    traced_id: str
    traced_index: int
    log_dir: Path


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from tandem.engine.tokenizer import Tokenizer
    from tandem.engine.weights import prepare_model

    return Tokenizer(prepare_model())


@pytest.fixture(scope="module")
def prompts(tokenizer: Any) -> list[list[int]]:
    """9 prompts from 5 to ~390 tokens; four share a 75-token prefix (three of them with a
    suffix long enough, ≥ 64 tokens beyond the cached prefix, to be prefilled remotely)."""
    texts = [*SHORT_PROMPTS, SHARED_PREFIX + SUFFIXES[0], LONG_PROMPT, SHARED_PREFIX + SUFFIXES[1]]
    texts += [SHARED_PREFIX + SUFFIXES[2], SHARED_PREFIX]
    ids = [tokenizer.encode(t) for t in texts]
    lengths = [len(x) for x in ids]
    assert len(set(lengths)) == len(lengths), f"prompt lengths should differ: {lengths}"
    assert min(lengths) < 16 and max(lengths) > 300, lengths
    return ids


def completion_body(ids: list[int]) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": ids,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }


async def send_all(
    stack: Stack, prompts: list[list[int]], traced_index: int, trace_id: str
) -> list[dict[str, Any]]:
    """The prompts one after the other (deterministic routing and caching); one carries a traceparent."""
    replies = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for i, ids in enumerate(prompts):
            headers = {}
            if i == traced_index:
                headers["traceparent"] = f"00-{trace_id}-{secrets.token_hex(8)}-01"
            async with session.post(
                f"{stack.base_url}/v1/completions", json=completion_body(ids), headers=headers
            ) as resp:
                text = await resp.text()
                assert resp.status == 200, (
                    f"prompt {i}: HTTP {resp.status}: {text}\n{log_tails(stack.log_dir)}"
                )
                replies.append(await resp.json())
    return replies


async def worker_state(
    nats_url: str, namespace: str
) -> tuple[dict[str, InstanceInfo], dict[str, WorkerStats]]:
    """Instances from the ``{ns}-instances`` bucket, and each worker's stats once it is idle."""
    subjects = Subjects(namespace)
    nc = await nats.connect(nats_url, name="tandem-e2e")
    try:
        kv = await nc.jetstream().key_value(subjects.instances_bucket)
        infos: dict[str, InstanceInfo] = {}
        for key in await kv.keys():
            entry = await kv.get(key)
            if entry.value:
                info = decoder(InstanceInfo).decode(entry.value)
                infos[info.instance_id] = info
        reply_type = decoder(WorkerStats | ErrorReply)
        stats: dict[str, WorkerStats] = {}
        deadline = time.monotonic() + 15
        for wid in infos:
            while True:  # pinned blocks are freed on the NIXL notification: allow a moment
                msg = await nc.request(
                    subjects.worker_debug(wid), encode(WorkerStatsRequest(check_integrity=True)), timeout=10
                )
                reply = reply_type.decode(msg.data)
                assert isinstance(reply, WorkerStats), f"{wid}: {reply}"
                stats[wid] = reply
                idle = reply.in_use_blocks == 0 and reply.pinned_blocks == 0 and reply.pending_transfers == 0
                if idle or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
        return infos, stats
    finally:
        await nc.close()


async def run_stack(
    args: list[str],
    namespace: str,
    nats_url: str,
    prompts: list[list[int]],
    log_dir: Path,
    collector: OtlpCollector | None,
    traced_index: int,
) -> RunResult:
    stack = await asyncio.to_thread(
        start_stack, args, namespace=namespace, nats_url=nats_url, log_dir=log_dir, collector=collector
    )
    trace_id = secrets.token_hex(16)
    try:
        replies = await send_all(stack, prompts, traced_index, trace_id)
        infos, stats = await worker_state(nats_url, namespace)
    finally:
        exit_code = await asyncio.to_thread(stack.stop)
    await asyncio.sleep(0.5)
    return RunResult(replies, infos, stats, exit_code, stack.leftovers(), trace_id, traced_index, log_dir)


def traced_prompt_index(prompts: list[list[int]]) -> int:
    """A prompt that takes the disaggregated path (the first shared-prefix one)."""
    return next(i for i, p in enumerate(prompts) if len(p) >= 2 * DISAGG_MIN_TOKENS)


@pytest.fixture(scope="module")
async def disagg(
    nats_url: str,
    prompts: list[list[int]],
    otlp_collector: OtlpCollector,
    tmp_path_factory: pytest.TempPathFactory,
) -> RunResult:
    args = ["--prefill", "1", "--decode", "1", "--dtype", "float32", "--kv-cache-gb", KV_CACHE_GB]
    log_dir = tmp_path_factory.mktemp("disagg")
    return await run_stack(
        args, "e2e-disagg", nats_url, prompts, log_dir, otlp_collector, traced_prompt_index(prompts)
    )


@pytest.fixture(scope="module")
async def aggregated(
    disagg: RunResult, nats_url: str, prompts: list[list[int]], tmp_path_factory: pytest.TempPathFactory
) -> RunResult:
    """Started only after the disaggregated stack is gone (2 cores)."""
    args = ["--aggregated", "--decode", "1", "--dtype", "float32", "--kv-cache-gb", KV_CACHE_GB]
    log_dir = tmp_path_factory.mktemp("aggregated")
    return await run_stack(args, "e2e-agg", nats_url, prompts, log_dir, None, -1)


@pytest.fixture(scope="module")
def engine_tokens(aggregated: RunResult, prompts: list[list[int]]) -> list[list[int]]:
    """The in-process engine's greedy continuations, token ids (after both stacks stopped)."""
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import LLMEngine
    from tandem.engine.weights import prepare_model

    engine = LLMEngine(
        EngineConfig(
            model_dir=prepare_model(), dtype="float32", kv_cache_gb=float(KV_CACHE_GB), num_threads=2
        )
    )
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outputs = engine.generate(prompts, sampling)
    assert [len(o) for o in outputs] == [MAX_TOKENS] * len(prompts)
    return [list(o) for o in outputs]


def texts(run: RunResult) -> list[str]:
    return [r["choices"][0]["text"] for r in run.replies]


def token_ids(run: RunResult) -> list[list[int]]:
    return [r["choices"][0]["token_ids"] for r in run.replies]


# ---- tests ---------------------------------------------------------------------------------------


def test_every_request_completed_with_max_tokens(
    disagg: RunResult, aggregated: RunResult, prompts: list[list[int]]
) -> None:
    for run in (disagg, aggregated):
        for ids, reply in zip(prompts, run.replies, strict=True):
            assert reply["usage"]["prompt_tokens"] == len(ids)
            assert reply["usage"]["completion_tokens"] == MAX_TOKENS
            assert reply["choices"][0]["finish_reason"] == "length"


def test_disaggregated_equals_aggregated(disagg: RunResult, aggregated: RunResult) -> None:
    for i, (a, b) in enumerate(zip(token_ids(disagg), token_ids(aggregated), strict=True)):
        assert a == b, f"prompt {i}: disaggregated {a} != aggregated {b}"
    assert texts(disagg) == texts(aggregated)


def test_disaggregated_equals_in_process_engine(
    disagg: RunResult, engine_tokens: list[list[int]], tokenizer: Any
) -> None:
    for i, (a, b) in enumerate(zip(token_ids(disagg), engine_tokens, strict=True)):
        assert a == b, f"prompt {i}: disaggregated {a} != engine {b}"
    assert texts(disagg) == [tokenizer.decode(o, skip_special_tokens=True) for o in engine_tokens]


def test_requests_ran_where_expected(
    disagg: RunResult, aggregated: RunResult, prompts: list[list[int]]
) -> None:
    remote = [r["tandem"] for r in disagg.replies if (r["tandem"].get("kv_transfer") or {}).get("bytes")]
    assert len(remote) >= 4, [r["tandem"] for r in disagg.replies]
    for ext in remote:
        assert (ext["prefill_worker"], ext["decode_worker"]) == ("prefill-0", "decode-0")
    for ids, reply in zip(prompts, disagg.replies, strict=True):
        ext = reply["tandem"]
        assert ext["decode_worker"] == "decode-0"
        if len(ids) < DISAGG_MIN_TOKENS:  # too short to be worth a transfer
            assert not (ext.get("kv_transfer") or {}).get("bytes"), ext
    for reply in aggregated.replies:
        ext = reply["tandem"]
        assert ext["decode_worker"] == "worker-0"
        assert ext.get("prefill_worker") in ("", "worker-0")
        assert not (ext.get("kv_transfer") or {}).get("bytes"), ext


def test_kv_bytes_moved_are_the_blocks_decode_lacked(disagg: RunResult, prompts: list[list[int]]) -> None:
    info = disagg.instances["decode-0"]
    prefill_info = disagg.instances["prefill-0"]
    assert info.block_size == prefill_info.block_size == BLOCK_SIZE
    assert info.block_nbytes == prefill_info.block_nbytes > 0
    reused_any = False
    for i, (ids, reply) in enumerate(zip(prompts, disagg.replies, strict=True)):
        kv = reply["tandem"].get("kv_transfer")
        if not kv or not kv.get("bytes"):
            continue
        prompt_blocks = math.ceil(len(ids) / BLOCK_SIZE)
        assert kv["blocks"] + kv["reused_blocks"] == prompt_blocks, f"prompt {i}: {kv}"
        assert kv["bytes"] == kv["blocks"] * info.block_nbytes, f"prompt {i}: {kv}"
        reused_any |= kv["reused_blocks"] > 0
    # the 2nd and 3rd shared-prefix prompts find the prefix already on the decode worker
    assert reused_any, [r["tandem"] for r in disagg.replies]


def test_pools_intact_and_idle_afterwards(disagg: RunResult, aggregated: RunResult) -> None:
    assert set(disagg.stats) == {"prefill-0", "decode-0"}
    assert set(aggregated.stats) == {"worker-0"}
    for run in (disagg, aggregated):
        for wid, st in run.stats.items():
            assert st.integrity_ok, f"{wid}: {st.integrity_error}"
            assert (st.in_use_blocks, st.pinned_blocks, st.pending_transfers) == (0, 0, 0), st
            assert st.free_blocks + st.cached_blocks == st.num_blocks, st
            assert st.cached_blocks > 0, st  # prefix caching kept something


def test_one_trace_spans_all_five_services(disagg: RunResult, otlp_collector: OtlpCollector) -> None:
    """The request sent with a client ``traceparent`` has spans, under that trace id, from the
    frontend, the router, the indexer, the prefill worker and the decode worker."""
    wanted = {"frontend", "router", "indexer", "prefill-0", "decode-0"}
    deadline = time.monotonic() + 15  # the services flush their span batches when they stop
    while True:
        spans: list[CollectedSpan] = otlp_collector.snapshot()
        by_trace: dict[str, set[str]] = {}
        for span in spans:
            by_trace.setdefault(span.trace_id, set()).add(span.process)
        traced = by_trace.get(disagg.traced_id, set())
        if wanted <= traced or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    complete = [t for t, procs in by_trace.items() if wanted <= procs]
    assert wanted <= traced, (
        f"trace {disagg.traced_id} has spans from {sorted(traced)}, want {sorted(wanted)}; "
        f"{len(spans)} spans in all, {len(complete)} other traces cover all five"
    )
    names = {s.name for s in spans if s.trace_id == disagg.traced_id}
    assert len(names) >= 5, names


def test_launcher_stopped_everything(disagg: RunResult, aggregated: RunResult) -> None:
    for run in (disagg, aggregated):
        assert run.exit_code == 0, f"launcher exit {run.exit_code}\n{log_tails(run.log_dir)}"
        assert run.leftovers == [], run.leftovers


def test_launcher_smoke(aggregated: RunResult, tmp_path: Path) -> None:
    """``launcher --smoke`` with its own embedded nats-server: one HTTP and one NATS request."""
    argv = [
        sys.executable,
        "-m",
        "tandem.services.launcher",
        "--smoke",
        "--port",
        str(free_port()),
        "--dtype",
        "float32",
        "--kv-cache-gb",
        KV_CACHE_GB,
        "--namespace",
        "e2e-smoke",
        "--log-dir",
        str(tmp_path),
    ]
    env = launcher_env(None)
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{out[-4000:]}\n{log_tails(tmp_path)}"
    assert "smoke: OK" in out
    assert "smoke HTTP" in out and "smoke NATS" in out
    assert "nats://127.0.0.1:" in out and "curl -s http://127.0.0.1:" in out
    assert "nats-server (JetStream) at" in out  # its own, embedded
