"""The checked tiktoken encoder (``tandem.engine.fast_bpe``) against the tokenizers library.

Same ids as ``tokenizers`` on text without added tokens — including text tiktoken cannot encode
(bytes missing from the vocabulary go to the fallback) — and refused, with a reason, for any
tokenizer whose pre-tokenizer or merges it cannot reproduce.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from tandem.engine import fast_bpe
from tandem.engine.tokenizer import Tokenizer
from tandem.services.frontend.preprocess import PromptEncoder

TEXTS = [
    "Hello world",
    "",
    "  1  22   333\n\n4444 x  5",
    "The year 2024 had 366 days; π ≈ 3.14159, 1,000,000 ≠ 1e6 ½ ² ٣",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\ttabs\r\n",
    "日本語のテキスト、中文文本 and 한국어 🎉🚀 émoji naïve façade 👨‍👩‍👧",
    "don't I'll we're they've SHE'S 'quoted'",
    "\u200b zero-width, \u00a0nbsp, combining e\u0301 \u2028 \u3000 \x0b\x0c\x1c",
    "control \x04 and \x06 bytes the vocabulary lacks \x13\x14\x16\x1d",
    "a code point U+50000 \U00050000 whose lead byte is missing, and U+10000 \U00010000",
]


@pytest.fixture(scope="module")
def json_text(model_dir: Path) -> str:
    return (model_dir / "tokenizer.json").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer(model_dir)


@pytest.fixture(scope="module")
def fast_tok(model_dir: Path) -> Tokenizer:
    return Tokenizer(model_dir, fast_encoder=True)


def _random_texts(n: int, seed: int) -> list[str]:
    """Mixed scripts, digits, punctuation and whitespace runs, ~200 characters each."""
    rnd = random.Random(seed)
    alphabet = (
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        "     \n\n\t'\".,;:!?-_()[]{}<>/\\|@#$%^&*+=~`"
        "éüßñçøåœ½²³٣日本語中文한국어Ελλкирилица😀🎉\u00a0\u2028\u3000"
    )
    return ["".join(rnd.choice(alphabet) for _ in range(rnd.randrange(1, 400))) for _ in range(n)]


def test_the_bundled_tokenizer_gets_the_fast_encoder(fast_tok: Tokenizer) -> None:
    assert fast_tok.fast_encoder_status == "ok"
    assert fast_tok.fast_encoder is not None
    assert fast_tok.fast_encoder.pattern == fast_bpe.GPT2_DIGITS_PATTERN
    # SmolLM2's vocabulary lacks some bytes: those characters go to the fallback
    assert fast_tok.fast_encoder.unencodable is not None
    assert fast_tok.fast_encoder.unencodable.search("\x04")
    assert not fast_tok.fast_encoder.unencodable.search("plain text 123 日本")


def test_ids_equal_the_tokenizers_library(tok: Tokenizer, fast_tok: Tokenizer) -> None:
    texts = TEXTS + _random_texts(400, seed=7)
    want = [tok.encode(t) for t in texts]
    assert [fast_tok.encode_ordinary(t) for t in texts] == want
    assert fast_tok.encode_ordinary_batch(texts) == want
    assert tok.encode_ordinary_batch(texts) == want  # without the fast encoder: tokenizers
    assert tok.encode_batch(texts) == want


def test_text_with_a_missing_byte_is_encoded_by_the_fallback(tok: Tokenizer, fast_tok: Tokenizer) -> None:
    assert fast_tok.fast_encoder is not None
    for text in ("a\x04b", "x \U00050000 y 12"):
        assert fast_tok.fast_encoder.unencodable is not None
        assert fast_tok.fast_encoder.unencodable.search(text)
        assert fast_tok.encode_ordinary(text) == tok.encode(text)


def test_the_prompt_encoder_gives_plain_encode_ids_with_the_fast_encoder(fast_tok: Tokenizer) -> None:
    enc = PromptEncoder(fast_tok)
    assert enc.caching
    for content in TEXTS:
        prompt = fast_tok.apply_chat_template(
            [{"role": "system", "content": "Be brief. 42"}, {"role": "user", "content": content}]
        )
        assert enc.encode(prompt) == fast_tok.encode(prompt)


def _edited(json_text: str, edit: Any) -> str:
    spec = json.loads(json_text)
    edit(spec)
    return json.dumps(spec)


def _reference(tok: Tokenizer) -> Any:
    return lambda texts: tok.encode_batch(texts)


def test_a_pattern_that_splits_differently_is_caught_by_the_check(tok: Tokenizer, json_text: str) -> None:
    # claim plain GPT-2 splitting (no Digits) while the reference splits digits one by one
    text = _edited(json_text, lambda s: s.update(pre_tokenizer=s["pre_tokenizer"]["pretokenizers"][1]))
    fast, why = fast_bpe.build(text, _reference(tok))
    assert fast is None
    assert why.startswith("tiktoken and tokenizers differ on")


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda s: s["model"].update(type="WordPiece"), "is not BPE"),
        (lambda s: s.update(normalizer={"type": "NFC"}), "normalizer"),
        (lambda s: s["model"].update(byte_fallback=True), "byte_fallback"),
        (lambda s: s["model"].update(dropout=0.1), "dropout"),
        (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer"),
        (lambda s: s["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "pre-tokenizer"),
        (lambda s: s["model"]["merges"].reverse(), "larger id"),
        (lambda s: s["model"]["vocab"].update({"Ġ\u4e00": 5}), "byte-level alphabet"),
    ],
)
def test_unsupported_tokenizers_are_refused_with_a_reason(
    tok: Tokenizer, json_text: str, edit: Any, reason: str
) -> None:
    fast, why = fast_bpe.build(_edited(json_text, edit), _reference(tok))
    assert fast is None
    assert reason in why


def test_malformed_json_is_refused(tok: Tokenizer) -> None:
    fast, why = fast_bpe.build("{not json", _reference(tok))
    assert fast is None and "not JSON" in why


def test_a_passed_check_is_recorded_and_spares_the_next_one(
    tok: Tokenizer, json_text: str, tmp_path: Path, model_dir: Path
) -> None:
    """The verdict names its inputs: the same tokenizer, libraries and check code find it and
    skip the check; another reference version, or a tokenizer that fails, does not."""
    calls: list[int] = []

    def reference(texts: list[str]) -> list[list[int]]:
        calls.append(len(texts))
        return tok.encode_batch(texts)

    fast, why = fast_bpe.build(json_text, reference, verdict_dir=tmp_path, reference_version="v1")
    assert fast is not None and why == fast_bpe.STATUS_CHECKED and calls
    (recorded,) = tmp_path.iterdir()
    assert recorded.name == f"fast-bpe-{fast_bpe.verdict_key(json_text, 'v1')[:40]}.ok"
    calls.clear()
    again, why = fast_bpe.build(json_text, reference, verdict_dir=tmp_path, reference_version="v1")
    assert again is not None and why == fast_bpe.STATUS_RECORDED and not calls
    assert again.encode_batch(TEXTS) == [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    _, why = fast_bpe.build(json_text, reference, verdict_dir=tmp_path, reference_version="v2")
    assert why == fast_bpe.STATUS_CHECKED and calls  # another library version: checked again
    # a tokenizer that fails the check leaves no verdict behind
    bad = _edited(json_text, lambda s: s.update(pre_tokenizer=s["pre_tokenizer"]["pretokenizers"][1]))
    assert fast_bpe.build(bad, reference, verdict_dir=tmp_path)[0] is None
    assert len(list(tmp_path.iterdir())) == 2
    # an unwritable verdict dir only costs the check
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert fast_bpe.build(json_text, reference, verdict_dir=blocked / "sub")[1] == fast_bpe.STATUS_CHECKED
    # the Tokenizer passes it through, naming the tokenizers library's version
    vouched = Tokenizer(model_dir, fast_encoder=True, verdict_dir=tmp_path / "tk")
    assert vouched.fast_encoder_status == fast_bpe.STATUS_CHECKED
    assert Tokenizer(model_dir, fast_encoder=True, verdict_dir=tmp_path / "tk").fast_encoder_status == (
        fast_bpe.STATUS_RECORDED
    )
