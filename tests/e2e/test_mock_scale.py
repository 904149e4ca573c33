"""Many mock workers end to end: the launcher starts 8 prefill + 24 decode mock workers (Dynamo-style
mocker: real scheduler, KV block manager, prefix cache and KV events; no model; no simulated
delay), hosted 8 to a process, and the real frontend, router and indexer route to them.

Checked: every worker registers (as ``engine="mock"``); every request completes with exactly
``max_tokens`` tokens through the disaggregated path (prefill worker → simulated KV transfer →
decode worker); a seeded request gives the same tokens twice, on whichever workers it lands; a
repeated long prompt is routed to the prefill worker that caches it (KV events → indexer →
``kv`` policy) and reports cached tokens; every pool is intact and idle afterwards; the launcher
stops everything.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.conftest import Stack, log_tails, start_stack
from tests.e2e.test_e2e import worker_state

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

NUM_PREFILL = 8
NUM_DECODE = 24
MAX_TOKENS = 8
MODEL = "smollm2-135m-instruct"
WORDS = ("amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "iris", "juniper")


def _prompt(i: int) -> str:
    """A ~600-token prompt of its own: nothing shared with the others beyond a few tokens, so
    every one is prefilled remotely (uncached on any decode worker)."""
    words = [WORDS[(i * 7 + j * (i + 3)) % len(WORDS)] for j in range(300)]
    return f"Request {i}: " + " ".join(f"{w}{(i * 31 + j) % 97}" for j, w in enumerate(words))


def _body(prompt: str, seed: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "seed": seed,
        "ignore_eos": True,
        "return_token_ids": True,
    }


async def _complete(session: aiohttp.ClientSession, stack: Stack, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(f"{stack.base_url}/v1/completions", json=body) as resp:
        text = await resp.text()
        assert resp.status == 200, f"HTTP {resp.status}: {text}\n{log_tails(stack.log_dir)}"
        reply: dict[str, Any] = await resp.json()
        return reply


@pytest.fixture(scope="module")
async def scale_run(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    log_dir: Path = tmp_path_factory.mktemp("mock-scale")
    args = [
        "--engine", "mock", "--speedup-ratio", "1000000",
        "--prefill", str(NUM_PREFILL), "--decode", str(NUM_DECODE), "--workers-per-process", "8",
        "--num-gpu-blocks-override", "512",
    ]  # fmt: skip
    stack = await asyncio.to_thread(
        start_stack, args, namespace="e2e-mock", nats_url=nats_url, log_dir=log_dir, ready_timeout_s=120
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            prompts = [_prompt(i) for i in range(24)]
            concurrent = await asyncio.gather(*(_complete(session, stack, _body(p, 7)) for p in prompts))
            # Same prompt and seed again, after the first round's KV events reached the indexer.
            await asyncio.sleep(1.0)
            repeat = await _complete(session, stack, _body(prompts[0], 7))
        infos, stats = await worker_state(nats_url, "e2e-mock")
    finally:
        exit_code = await asyncio.to_thread(stack.stop)
    await asyncio.sleep(0.5)
    return {
        "concurrent": concurrent,
        "repeat": repeat,
        "infos": infos,
        "stats": stats,
        "exit_code": exit_code,
        "leftovers": stack.leftovers(),
        "log_dir": log_dir,
        "output": stack.output(),
    }


def test_every_worker_registered_as_mock(scale_run: dict[str, Any]) -> None:
    infos = scale_run["infos"]
    assert len(infos) == NUM_PREFILL + NUM_DECODE
    assert sum(1 for i in infos.values() if i.role == "prefill") == NUM_PREFILL
    assert all(i.engine == "mock" for i in infos.values())
    assert f"({NUM_PREFILL + NUM_DECODE} workers)" in scale_run["output"]


def test_every_request_completed_disaggregated(scale_run: dict[str, Any]) -> None:
    for reply in scale_run["concurrent"]:
        choice = reply["choices"][0]
        assert len(choice["token_ids"]) == MAX_TOKENS and choice["finish_reason"] == "length"
        ext = reply["tandem"]
        assert ext["prefill_worker"].startswith("prefill-"), ext
        assert ext["decode_worker"].startswith("decode-"), ext
        assert ext["kv_transfer"]["blocks"] + ext["kv_transfer"]["reused_blocks"] > 0, ext
    decode_workers = {r["tandem"]["decode_worker"] for r in scale_run["concurrent"]}
    assert len(decode_workers) > 1  # load spreads over the decode workers


def test_seeded_tokens_do_not_depend_on_the_worker(scale_run: dict[str, Any]) -> None:
    first, again = scale_run["concurrent"][0], scale_run["repeat"]
    assert first["choices"][0]["token_ids"] == again["choices"][0]["token_ids"]


def test_repeated_prompt_hits_the_prefix_cache(scale_run: dict[str, Any]) -> None:
    first, again = scale_run["concurrent"][0], scale_run["repeat"]
    assert again["tandem"]["cached_tokens"] > 0, again["tandem"]
    # Routed to a worker that holds the prompt: the prefill worker that computed it, or the
    # decode worker that imported it (then the few uncached tokens are prefilled locally).
    assert again["tandem"]["prefill_worker"] in (
        first["tandem"]["prefill_worker"],
        first["tandem"]["decode_worker"],
    )


def test_pools_intact_and_idle(scale_run: dict[str, Any]) -> None:
    stats = scale_run["stats"]
    assert len(stats) == NUM_PREFILL + NUM_DECODE
    for wid, st in stats.items():
        assert st.integrity_ok, f"{wid}: {st.integrity_error}"
        assert (st.in_use_blocks, st.pinned_blocks, st.pending_transfers) == (0, 0, 0), (wid, st)
    assert sum(st.kv_events_published for st in stats.values()) > 0


def test_launcher_stopped_everything(scale_run: dict[str, Any]) -> None:
    assert scale_run["exit_code"] == 0, log_tails(scale_run["log_dir"])
    assert scale_run["leftovers"] == []
