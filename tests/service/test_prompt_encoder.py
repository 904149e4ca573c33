"""PromptEncoder.encode_async: long chat prompts reuse the cached pieces (the frontend used to
tokenize every prompt over TOKENIZE_IN_THREAD_CHARS in full, ~10 ms of CPU per 4000-token
prompt), with the same ids as a plain encode, and only long new text goes to a thread."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tandem.engine.tokenizer import Tokenizer
from tandem.services.frontend import batch_encode, preprocess
from tandem.services.frontend.preprocess import TOKENIZE_IN_THREAD_CHARS, Preprocessor, PromptEncoder

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from tandem.engine.weights import prepare_model

    model_dir: Path = prepare_model()
    return Tokenizer(model_dir)


def _system(n_chars: int) -> str:
    """A system prompt of ``n_chars`` characters with no special token in it (one piece)."""
    words = [f"Grüße 🚀 {i} the quick brown fox jumps\n\n over the lazy dog." for i in range(n_chars // 20)]
    return " ".join(words)[:n_chars]


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Characters sent to each worker-thread tokenization (0 calls: none)."""
    calls: list[int] = []
    real = asyncio.to_thread

    async def counting(fn: Any, *args: Any, **kw: Any) -> Any:
        if fn is batch_encode.encode_texts:
            calls.append(sum(len(p) for p in args[1]))
        return await real(fn, *args, **kw)

    monkeypatch.setattr(preprocess.asyncio, "to_thread", counting)
    return calls


async def test_long_chat_prompts_reuse_cached_pieces(tokenizer: Tokenizer, threads: list[int]) -> None:
    enc = PromptEncoder(tokenizer)
    assert enc.caching
    system = {"role": "system", "content": _system(TOKENIZE_IN_THREAD_CHARS + 4000)}
    chat: list[dict[str, str]] = [system]
    for turn in range(3):
        chat.append({"role": "user", "content": f"[turn {turn}] what is {turn} + {turn}? " * 20})
        text = tokenizer.apply_chat_template(chat)
        assert len(text) > TOKENIZE_IN_THREAD_CHARS
        misses = enc.misses
        assert await enc.encode_async(text, thread_chars=TOKENIZE_IN_THREAD_CHARS) == tokenizer.encode(text)
        if turn == 0:
            assert len(threads) == 1 and threads[0] > TOKENIZE_IN_THREAD_CHARS  # the new system prompt
        else:
            assert len(threads) == 1  # only short new pieces, tokenized inline
            assert enc.misses - misses <= 3  # the new user message (and the previous reply)
        chat.append({"role": "assistant", "content": f"It is {2 * turn}."})
    # the same again: everything cached, nothing tokenized
    misses = enc.misses
    assert await enc.encode_async(text, thread_chars=0) == tokenizer.encode(text)
    assert enc.misses == misses and len(threads) == 1


async def test_encode_async_matches_encode_on_random_texts(tokenizer: Tokenizer) -> None:
    import random

    rnd = random.Random(3)
    words = [
        "Hello",
        " world",
        "\n",
        "  ",
        " é",
        "🚀",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_",
    ]
    a, b = PromptEncoder(tokenizer), PromptEncoder(tokenizer, max_entries=4)
    for _ in range(200):
        text = "".join(rnd.choice(words) for _ in range(rnd.randint(0, 60)))
        thread_chars = rnd.choice([0, 10, 1 << 20])
        assert await a.encode_async(text, thread_chars=thread_chars) == tokenizer.encode(text), text
        assert await b.encode_async(text, thread_chars=thread_chars) == tokenizer.encode(text), text
    assert len(b._cache) <= 4


async def test_prepare_async_long_chat_uses_the_cache(tokenizer: Tokenizer, threads: list[int]) -> None:
    pre = Preprocessor(tokenizer, model_name=MODEL, max_model_len=32768, block_size=lambda: 16)
    system = _system(TOKENIZE_IN_THREAD_CHARS + 100)
    for turn in range(3):
        body = json.dumps(
            {
                "model": MODEL,
                "max_tokens": 4,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"question {turn}"},
                ],
            }
        ).encode()
        threaded = await pre.prepare_async("chat", body)
        inline = pre.prepare("chat", body)
        assert threaded.token_ids == inline.token_ids and threaded.block_hashes == inline.block_hashes
    assert len(threads) == 1  # the system prompt once, then from the cache


async def test_warm_up_runs_the_request_path_and_leaves_the_caches(
    tokenizer: Tokenizer, threads: list[int]
) -> None:
    pre = Preprocessor(tokenizer, model_name=MODEL, max_model_len=32768, block_size=lambda: 16)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hello there, 12 cats."}]})
    before = pre.prepare("chat", body.encode())
    cached = dict(pre.encoder._cache)
    assert await pre.warm_up() > 0
    assert len(threads) == 1 and pre.batcher.batches == 1  # the worker thread and the batch call ran
    assert dict(pre.encoder._cache) == cached  # no warm-up piece stored, none evicted
    after = await pre.prepare_async("chat", body.encode())
    assert (after.token_ids, after.block_hashes) == (before.token_ids, before.block_hashes)
