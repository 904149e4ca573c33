"""MigratingStream on scripted attempts: what it re-sends, when, and what reaches the client."""

from __future__ import annotations

from typing import Any

import pytest

from tandem.protocol.messages import SamplingParams, TokenChunk
from tandem.protocol.openai import OpenAIError
from tandem.services.frontend import migration
from tandem.services.frontend.migration import MigratingStream, is_retryable


class FakeAttempt:
    """A TokenStream stand-in: hands out ``script`` items (chunks, or errors to raise)."""

    def __init__(
        self,
        request_id: str,
        token_ids: list[int],
        sampling: SamplingParams,
        index_base: int,
        script: list[Any],
    ) -> None:
        self.request_id = request_id
        self.token_ids = token_ids
        self.sampling = sampling
        self.index_base = index_base
        self.script = list(script)
        self.handed = 0
        self.finished = False
        self.started = False
        self.closed = False
        self.holder = ("worker", "decode-0")
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def next_index(self) -> int:
        return self.index_base + self.handed

    async def start(self) -> None:
        self.started = True
        if self.script and isinstance(self.script[0], OpenAIError) and self.script[0].code == "no_router":
            self._ended = True
            raise self.script.pop(0)

    async def close(self) -> None:
        self.closed = True

    def stop(self, reason: str) -> None:
        self._ended = True

    async def next_chunk(self) -> TokenChunk | None:
        return self._next()

    def poll_chunk(self) -> TokenChunk | None:
        return self._next()

    def _next(self) -> TokenChunk | None:
        if self._ended or not self.script:
            return None
        item = self.script.pop(0)
        if isinstance(item, OpenAIError):
            self._ended = True
            raise item
        tokens, final = item
        chunk = TokenChunk(
            request_id=self.request_id,
            index=self.index_base + self.handed,
            token_ids=tokens,
            finish_reason="length" if final else None,
        )
        self.handed += 1
        if final:
            self.finished = self._ended = True
        return chunk


def lost() -> OpenAIError:
    return OpenAIError(503, "worker gone", code="worker_lost")


class Harness:
    def __init__(self, scripts: list[list[Any]], limit: int = 3, max_tokens: int = 6) -> None:
        self.scripts = scripts
        self.attempts: list[FakeAttempt] = []
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=7)
        first = self.make("req", [1, 2, 3], sampling, 0)
        self.stream = MigratingStream(first, self.make, limit)  # type: ignore[arg-type]

    def make(self, rid: str, token_ids: list[int], sampling: SamplingParams, index_base: int) -> Any:
        a = FakeAttempt(rid, token_ids, sampling, index_base, self.scripts[len(self.attempts)])
        self.attempts.append(a)
        return a

    async def drain(self) -> list[TokenChunk]:
        await self.stream.start()
        out = []
        while (c := await self.stream.next_chunk()) is not None:
            out.append(c)
        await self.stream.close()
        return out


async def test_lost_worker_migrates_with_prompt_plus_generated() -> None:
    h = Harness([[([10], False), ([11, 12], False), lost()], [([13], False), ([14, 15], True)]])
    chunks = await h.drain()
    assert [t for c in chunks for t in c.token_ids] == [10, 11, 12, 13, 14, 15]
    assert [c.index for c in chunks] == [0, 1, 2, 3]  # client indices continue
    first, second = h.attempts
    assert first.closed  # its Cancel goes out
    assert second.request_id == "req.m1"
    assert second.token_ids == [1, 2, 3, 10, 11, 12]
    assert second.sampling.max_tokens == 3 and second.sampling.seed == 7
    assert second.index_base == 2
    assert h.stream.migrations == 1 and h.stream.finished


async def test_limit_reached_raises_the_last_error() -> None:
    h = Harness([[lost()], [lost()]], limit=1)
    with pytest.raises(OpenAIError) as e:
        await h.drain()
    assert e.value.code == "worker_lost"
    assert len(h.attempts) == 2


@pytest.mark.parametrize(
    ("err", "retry"),
    [
        (OpenAIError(400, "bad"), False),
        (OpenAIError(503, "busy", retry_after_s=1.0), False),  # the client's to retry
        (OpenAIError(503, "no worker answered"), True),
        (OpenAIError(502, "KV transfer failed"), True),
        (OpenAIError(504, "prefill timed out"), True),
        (OpenAIError(500, "internal"), False),
        (lost(), True),
    ],
)
async def test_only_retryable_failures_migrate(err: OpenAIError, retry: bool) -> None:
    assert is_retryable(err) is retry
    h = Harness([[([10], False), err], [([11], True)]])
    if retry:
        assert [t for c in await h.drain() for t in c.token_ids] == [10, 11]
    else:
        with pytest.raises(OpenAIError):
            await h.drain()
        assert len(h.attempts) == 1


async def test_poll_defers_a_retryable_failure_to_next_chunk() -> None:
    h = Harness([[([10], False), lost()], [([11], True)]])
    await h.stream.start()
    assert h.stream.poll_chunk() is not None
    assert h.stream.poll_chunk() is None
    assert not h.stream.ended  # the caller must wait, not finish
    chunk = await h.stream.next_chunk()
    assert chunk is not None and chunk.token_ids == [11] and chunk.index == 1


async def test_no_router_is_resent_without_counting(monkeypatch: pytest.MonkeyPatch) -> None:
    no_router = OpenAIError(503, "no responders", code="no_router")
    h = Harness([[no_router], [no_router], [([10], True)]], limit=0)
    chunks = await h.drain()
    assert [c.token_ids for c in chunks] == [[10]]
    assert h.stream.resends == 2 and h.stream.migrations == 0
    assert [a.request_id for a in h.attempts] == ["req", "req.r1", "req.r2"]


async def test_no_router_gives_up_after_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migration, "NO_ROUTER_WAIT_S", 0.0)
    no_router = OpenAIError(503, "no responders", code="no_router")
    h = Harness([[no_router]])
    with pytest.raises(OpenAIError) as e:
        await h.drain()
    assert e.value.code == "no_router"


async def test_unseeded_request_gets_one_seed_for_every_attempt() -> None:
    scripts: list[list[Any]] = [[lost()], [([1], True)]]
    attempts: list[FakeAttempt] = []

    def make(rid: str, token_ids: list[int], sampling: SamplingParams, index_base: int) -> Any:
        a = FakeAttempt(rid, token_ids, sampling, index_base, scripts[len(attempts)])
        attempts.append(a)
        return a

    stream = MigratingStream(make("r", [1], SamplingParams(max_tokens=4), 0), make, 3)  # type: ignore[arg-type]
    await stream.start()
    while await stream.next_chunk() is not None:
        pass
    assert attempts[0].sampling.seed is not None
    assert attempts[1].sampling.seed == attempts[0].sampling.seed
