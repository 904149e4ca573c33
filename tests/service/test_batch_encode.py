"""BatchEncoder: concurrent callers' texts are tokenized in shared batch calls off the loop,
with exactly ``tokenizer.encode``'s ids; a failing batch fails each of its callers."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from tandem.engine.tokenizer import Tokenizer
from tandem.services.frontend.batch_encode import BatchEncoder


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from tandem.engine.weights import prepare_model

    model_dir: Path = prepare_model()
    return Tokenizer(model_dir)


def _texts(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    words = ["Grüße", " 🚀", " the", "\n\n", "  x", "12345", " <|im_end|>", " quick", " fox"]
    return ["".join(rnd.choice(words) for _ in range(rnd.randint(0, 400))) for _ in range(n)]


async def test_concurrent_callers_share_batches_and_get_encode_ids(tokenizer: Tokenizer) -> None:
    enc = BatchEncoder(tokenizer)
    groups = [_texts(3, seed) for seed in range(8)]  # 8 requests arriving together
    results = await asyncio.gather(*(enc.encode(g) for g in groups))
    for group, ids in zip(groups, results, strict=True):
        assert ids == [tokenizer.encode(t) for t in group]
    assert enc.texts == 24
    assert enc.batches <= 2  # not one call per request
    assert await enc.encode([]) == []


async def test_a_failing_batch_fails_its_callers_and_the_next_batch_works(tokenizer: Tokenizer) -> None:
    class Broken:
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            raise RuntimeError("tokenizer broke")

    enc = BatchEncoder(Broken())  # type: ignore[arg-type]
    outcomes = await asyncio.gather(enc.encode(["a"]), enc.encode(["b"]), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes), outcomes
    good = BatchEncoder(tokenizer)
    assert await good.encode(["hello world"]) == [tokenizer.encode("hello world")]


async def test_a_cancelled_caller_does_not_break_the_batch(tokenizer: Tokenizer) -> None:
    enc = BatchEncoder(tokenizer)
    texts = _texts(4, 99)
    gone = asyncio.create_task(enc.encode(texts[:2]))
    kept = asyncio.create_task(enc.encode(texts[2:]))
    await asyncio.sleep(0)
    gone.cancel()
    assert await kept == [tokenizer.encode(t) for t in texts[2:]]
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_a_text_sent_by_several_callers_is_encoded_once(tokenizer: Tokenizer) -> None:
    enc = BatchEncoder(tokenizer)
    shared = _texts(1, 7)[0] + " shared system prompt"
    groups = [[shared, f"user {i}"] for i in range(6)]  # a burst of sessions, one system prompt
    results = await asyncio.gather(*(enc.encode(g) for g in groups))
    for group, ids in zip(groups, results, strict=True):
        assert ids == [tokenizer.encode(t) for t in group]
    assert enc.texts == 7  # the shared text once, each user text once
    results[0][0].append(-1)  # every caller owns its lists
    assert results[1][0] == tokenizer.encode(shared)
