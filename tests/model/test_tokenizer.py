"""Our tokenizer (built from the GGUF without transformers) against transformers' GGUF tokenizer.

Known difference: transformers has no rule for the GGUF's ``smollm`` pre-tokenizer and falls
back to GPT-2's regex alone, while SmolLM2 (HF ``tokenizer.json``, llama.cpp ``smollm``) splits
digits one by one *before* that regex. The two only disagree when a run of whitespace precedes
a digit (``"  1"``: we give ``["ĠĠ", "1"]``, the fallback ``["Ġ", "Ġ", "1"]``). Those texts are
checked against transformers' tokenizer with SmolLM2's pre-tokenizer put back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tandem.engine.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world",
    "",
    " leading space, trailing space ",
    "The year 2024 had 366 days; π ≈ 3.14159, 1,000,000 ≠ 1e6.",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\ttabs\r\n",
    "日本語のテキスト、中文文本 and 한국어 🎉🚀 émoji naïve façade",
    "don't I'll we're they've SHE'S",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "multiple   spaces    and\n\n\nnewlines",
    "{\"json\": [1, 2, 3], 'key': None}",
    "\u200b zero-width, \u00a0nbsp, combining e\u0301",
]
# whitespace runs before digits: where the GGUF fallback pre-tokenizer is wrong for SmolLM2
DIGIT_TEXTS = ["  1", "a\n\n12 b", "x  42", "items:\n\n\n  7. seven", "\t\t9"]


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer(model_dir)


@pytest.fixture(scope="module")
def smollm2_reference(hf_tokenizer: Any) -> Any:
    """transformers' GGUF tokenizer backend with SmolLM2's own pre-tokenizer (digits split
    individually, then byte-level), as in HF's SmolLM2 ``tokenizer.json``."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import pre_tokenizers

    backend = RawTokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return backend


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(tok: Tokenizer, hf_tokenizer: Any, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tokenizer(text, add_special_tokens=False).input_ids
    assert tok.encode(text, add_special_tokens=True) == hf_tokenizer(text, add_special_tokens=True).input_ids
    assert tok.decode(ids) == text
    assert tok.decode(ids) == hf_tokenizer.decode(ids)


@pytest.mark.slow
@pytest.mark.parametrize("text", DIGIT_TEXTS)
def test_digits_follow_smollm2_pre_tokenizer(tok: Tokenizer, smollm2_reference: Any, text: str) -> None:
    ids = tok.encode(text)
    assert ids == smollm2_reference.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


@pytest.mark.slow
def test_digit_split_pinned(tok: Tokenizer) -> None:
    # "ĠĠ" is id 256, "1" is id 33: whitespace run kept whole, then the digit
    assert tok.encode("  1") == [256, 33]
    assert tok.encode("12345") == [33, 34, 35, 36, 37]


@pytest.mark.slow
def test_special_tokens_and_vocab(tok: Tokenizer, hf_tokenizer: Any) -> None:
    assert tok.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert tok.eos_token_id == hf_tokenizer.eos_token_id == 2
    assert tok.vocab_size == len(hf_tokenizer) == 49152
    assert {0, 1, 2} <= tok.special_token_ids
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi! 日本語 ok?"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Count: 1 2 3"},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tok: Tokenizer, hf_tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    want = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == want
    assert tok.encode(ours) == hf_tokenizer(want, add_special_tokens=False).input_ids


def test_chat_template_errors(tmp_path: Path, model_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
        "{% for m in messages %}{{ bos_token }}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    tok = Tokenizer(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x<|im_end|>"
    with pytest.raises(ChatTemplateError, match="first must be user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"content": "no role"}])
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items()}))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_incremental_detokenizer_multibyte(tok: Tokenizer) -> None:
    text = "héllo 日本語 🎉🎉 naïve\n\tend — done… 👩‍👩‍👧"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add([i]) for i in ids]
    assert "".join(pieces) + detok.flush() == text
    assert detok.text == text
    assert all("\ufffd" not in p for p in pieces)
    # at least one character spans several tokens, so some steps emit nothing
    assert "" in pieces
    assert detok.token_ids == ids


def test_incremental_detokenizer_chunks_and_specials(tok: Tokenizer) -> None:
    text = "Answer: 42 ✓ 日本"
    assert tok.eos_token_id is not None
    ids = [*tok.encode(text), tok.eos_token_id]
    for chunk in (1, 2, 3, 7):
        detok = IncrementalDetokenizer(tok)
        out = "".join(detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)) + detok.flush()
        assert out == text  # eos skipped by default
        keep = IncrementalDetokenizer(tok, skip_special_tokens=False)
        out = "".join(keep.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)) + keep.flush()
        assert out == text + "<|im_end|>"


def test_incremental_detokenizer_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🎉")
    detok = IncrementalDetokenizer(tok)
    emitted = detok.add(ids[:-1])  # the emoji's last byte is missing
    assert emitted == "ok "
    assert detok.flush() == "\ufffd"  # the incomplete character comes out as U+FFFD on flush
