"""A tiktoken encoder for a byte-level BPE ``tokenizer.json``, checked against the original.

Tokenizing is the frontend's largest CPU cost per request. OpenAI's ``tiktoken`` (Rust) encodes
byte-level BPE on one thread in 0.33× the time the Hugging Face ``tokenizers`` library's batch
call takes on 2 cores, and 0.21× its one-text ``encode`` (9.6 vs 3.2 and 2.1 M characters/s;
``scripts/bench_tokenizer.py``). It is
not a different tokenization: for the tokenizers it accepts, :func:`build` returns an encoder
whose ids equal ``tokenizers``' ``encode(text, add_special_tokens=False)`` for text holding no
added-token strings (callers split those out first, as :class:`~tandem.services.frontend.
preprocess.PromptEncoder` does).

Why the ids agree (and what :func:`build` checks before it returns an encoder):

1. **Pre-tokenizing.** ``tokenizers`` splits with the GPT-2 pattern of its ``ByteLevel``
   pre-tokenizer (``use_regex``, no prefix space), optionally after ``Digits(individual_digits)``,
   which isolates every numeric character. tiktoken takes one regex; :data:`GPT2_PATTERN` and
   :data:`GPT2_DIGITS_PATTERN` split the same way (the second adds a single-numeral alternative
   first and lets a whitespace run end before a numeral, as it does at the end of a ``Digits``
   piece). No normalizer is allowed.
2. **Merging.** ``tokenizers`` merges, in each piece, the adjacent pair with the lowest index in
   the merge list; tiktoken the adjacent pair whose concatenation has the lowest rank. With the
   token ids as ranks the two agree when merge ``i`` yields an id that grows with ``i`` (checked
   for every merge) — except where a piece can hold two adjacent tokens whose concatenation is a
   token made by a *different* merge, or is itself a whole-vocabulary token BPE would not build
   (tiktoken looks a whole piece up first). Training by BPE makes neither happen in practice, but
   nothing guarantees it, so :func:`build` encodes every vocabulary entry alone, runs of
   consecutive entries, every character up to U+3000 and probe texts both ways, and refuses the
   encoder on any difference.
3. No byte fallback, dropout, ``unk`` fusion, subword prefix/suffix, or ``ignore_merges``.

Anything else (a SentencePiece/Unigram/WordPiece model, another pre-tokenizer) gets ``None``
with the reason, and callers keep ``tokenizers``.

The check takes ~1 s. Given a ``verdict_dir``, :func:`build` records a passed check there in an
empty file named by :func:`verdict_key` — a digest of the ``tokenizer.json`` text, the
``tiktoken`` and reference library versions and this module's own source — and skips the check
when that file exists: the same inputs give the same ids, and any change to one of them names
another file. The structural checks (1–3) always run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GPT2_DIGITS_PATTERN", "GPT2_PATTERN", "FastBPE", "build", "verdict_key"]

#: Status of an encoder whose check passed in this call, and of one a recorded verdict vouches for.
STATUS_CHECKED = "ok"
STATUS_RECORDED = "ok (check passed before: recorded verdict)"

#: The GPT-2 split pattern, as ``tokenizers``' ``ByteLevel(use_regex=True)`` uses it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
#: ``Digits(individual_digits=True)`` then ``ByteLevel``, as one pattern: a numeral is a piece of
#: its own, and a whitespace run before a numeral is the end of a piece (``(?![^\s\p{N}])``).
GPT2_DIGITS_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

#: Texts the check encodes both ways besides the vocabulary (contractions, digits of several
#: scripts, whitespace runs before numerals and letters, mixed scripts, emoji).
PROBES = (
    "Hello, world! It's 2026-12-03T20:54:15Z; x=12.5e-3, y = -0.75 and 1,000,000 tokens.",
    "  leading  and trailing spaces  \t\ttabs\n\n\nnewlines\r\n crlf   12  ab  3 \n 4\n",
    "they'll we've I'm she'd you're it's 'quoted' ''double'' 'S 'T 'LL",
    "héllo wörld ½ ² ³ ⅷ ３４５ ٣٤٥ ৩ 〇 𝟙𝟚 — “quotes” …",
    "日本語のテキスト、中文文本，한국어 텍스트. Ελληνικά кириллица עברית عربى",
    "emoji 😀👍🏽 👨‍👩‍👧 ZWJ and variation ❤️ \u200b\u200d\u00a0nbsp\u2028\u2029\u3000 ideographic",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\tif x:\n\t\tpass\n",
    "a1b2c3 1a 22bb 333ccc   4444   d 5e5 ½x x½ 1 2  3   4    ",
)


@dataclass(frozen=True)
class FastBPE:
    """A checked tiktoken encoder with the original tokenizer as fallback.

    tiktoken needs every byte in its vocabulary; a byte-level vocabulary may lack some (SmolLM2
    lacks six control characters and the lead bytes of code points U+40000–U+BFFFF), which the
    original tokenizer drops. A text holding such a character (:attr:`unencodable`) is encoded
    by :attr:`fallback` instead, so the ids stay the original's.
    """

    #: The ``tiktoken.Encoding`` (ranks = the tokenizer's ids, no special tokens).
    encoding: Any
    #: The split pattern used (:data:`GPT2_PATTERN` or :data:`GPT2_DIGITS_PATTERN`).
    pattern: str
    #: The original tokenizer: texts → ids (no special tokens added).
    fallback: Callable[[list[str]], list[list[int]]]
    #: Matches a character whose UTF-8 bytes are not all in the vocabulary (None: all are).
    unencodable: re.Pattern[str] | None

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, which holds no added-token strings (those are encoded as text).
        Releases the GIL while tiktoken runs."""
        if self.unencodable is not None and self.unencodable.search(text):
            return list(self.fallback([text])[0])
        ids: list[int] = self.encoding.encode_ordinary(text)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each of ``texts``, one after the other in the calling thread (the
        GIL is released inside each; no thread pool is started per call)."""
        return [self.encode(t) for t in texts]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (each byte is shown as one printable char)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _pattern_of(pre: Any) -> str | None:
    """The split pattern equivalent to the ``pre_tokenizer`` config, or None if unsupported."""

    def byte_level(p: Any) -> bool:
        return (
            isinstance(p, dict)
            and p.get("type") == "ByteLevel"
            and p.get("use_regex", True) is True
            and p.get("add_prefix_space", False) is False
        )

    if byte_level(pre):
        return GPT2_PATTERN
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if len(parts) == 1 and byte_level(parts[0]):
            return GPT2_PATTERN
        if (
            len(parts) == 2
            and isinstance(parts[0], dict)
            and parts[0].get("type") == "Digits"
            and parts[0].get("individual_digits") is True
            and byte_level(parts[1])
        ):
            return GPT2_DIGITS_PATTERN
    return None


def _merge_pair(m: Any) -> tuple[str, str] | None:
    if isinstance(m, str):
        a, sep, b = m.partition(" ")
        return (a, b) if sep else None
    if isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
        return m[0], m[1]
    return None


def verdict_key(tokenizer_json: str, reference_version: str) -> str:
    """Hex SHA-256 naming the outcome of :func:`build`'s check for these inputs: the
    ``tokenizer.json`` text, the installed ``tiktoken`` version, ``reference_version`` (the
    reference tokenizer's library and version) and this module's source file."""
    import tiktoken

    h = hashlib.sha256()
    for part in (
        tokenizer_json.encode(),
        str(getattr(tiktoken, "__version__", "")).encode(),
        reference_version.encode(),
        Path(__file__).read_bytes(),
    ):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def build(
    tokenizer_json: str,
    reference: Callable[[list[str]], list[list[int]]],
    *,
    verdict_dir: Path | None = None,
    reference_version: str = "",
) -> tuple[FastBPE | None, str]:
    """A :class:`FastBPE` for the ``tokenizer.json`` text ``tokenizer_json``, checked against
    ``reference`` (the original tokenizer: texts → ids, no special tokens added).

    Returns ``(encoder, status)`` with :data:`STATUS_CHECKED` (or :data:`STATUS_RECORDED` when
    a verdict in ``verdict_dir`` for the same inputs, see :func:`verdict_key`, spared the
    check), or ``(None, reason)`` when the tokenizer is not a supported byte-level BPE,
    ``tiktoken`` is missing, or any checked text encodes differently (the reason names the
    first one). Never raises for an unsupported tokenizer, nor for a ``verdict_dir`` it cannot
    read or write (the check then simply runs). The check takes ~1 s (it encodes ~70k texts
    both ways); a passed one is recorded in ``verdict_dir`` when given.
    """
    try:
        import tiktoken
    except ImportError:  # pragma: no cover - tiktoken is in requirements.txt
        return None, "tiktoken is not installed"
    try:
        spec = json.loads(tokenizer_json)
    except ValueError as e:
        return None, f"tokenizer.json is not JSON: {e}"
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None, f"model type {model.get('type')!r} is not BPE"
    if spec.get("normalizer") is not None:
        return None, "the tokenizer has a normalizer"
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key) not in (None, ""):
            return None, f"BPE {key} is set"
    if model.get("byte_fallback") or model.get("ignore_merges") or model.get("fuse_unk"):
        return None, "BPE byte_fallback / ignore_merges / fuse_unk is set"
    pattern = _pattern_of(spec.get("pre_tokenizer"))
    if pattern is None:
        return None, "the pre-tokenizer is not GPT-2 byte-level (optionally after Digits)"
    vocab: dict[str, int] = model.get("vocab") or {}
    added = {t.get("content") for t in spec.get("added_tokens") or []}
    byte_of = _byte_decoder()
    ranks: dict[bytes, int] = {}
    for token, index in vocab.items():
        if token in added:
            continue
        try:
            ranks[bytes(byte_of[ch] for ch in token)] = index
        except KeyError:
            return None, f"vocabulary entry {token!r} is not in the byte-level alphabet"
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if any(0x80 <= b <= 0xBF for b in missing):
        return None, "a UTF-8 continuation byte is missing from the vocabulary"
    if len(set(ranks.values())) != len(ranks):
        return None, "two vocabulary entries share an id"
    previous = -1
    for m in model.get("merges") or []:
        pair = _merge_pair(m)
        if pair is None:
            return None, f"merge {m!r} is malformed"
        merged = vocab.get(pair[0] + pair[1])
        if merged is None or merged <= previous:
            return None, f"merge {m!r} does not yield a new, larger id than the one before"
        previous = merged
    try:
        encoding = tiktoken.Encoding("tandem-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except Exception as e:  # tiktoken refuses the ranks (e.g. a byte missing)
        return None, f"tiktoken refused the vocabulary: {e}"
    unencodable = _unencodable(missing)
    fast = FastBPE(encoding, pattern, reference, unencodable)
    verdict = None
    if verdict_dir is not None:
        verdict = verdict_dir / f"fast-bpe-{verdict_key(tokenizer_json, reference_version)[:40]}.ok"
        with contextlib.suppress(OSError):
            if verdict.is_file():
                return fast, STATUS_RECORDED
    texts = _check_texts(ranks, unencodable)
    got = fast.encode_batch(texts)
    want = reference(texts)
    for text, a, b in zip(texts, got, want, strict=True):
        if list(a) != list(b):
            return None, f"tiktoken and tokenizers differ on {text[:60]!r}"
    if verdict is not None:
        with contextlib.suppress(OSError):  # best effort: a read-only cache only costs the check
            verdict.parent.mkdir(parents=True, exist_ok=True)
            verdict.touch()
    return fast, STATUS_CHECKED


def _unencodable(missing: list[int]) -> re.Pattern[str] | None:
    """A character class of the code points whose UTF-8 form holds one of the ``missing``
    bytes (ASCII bytes, or lead bytes; 0xC0, 0xC1 and 0xF5–0xFF never occur in UTF-8)."""
    ranges: list[tuple[int, int]] = []
    for b in missing:
        if b < 0x80:
            ranges.append((b, b))
        elif 0xC2 <= b <= 0xDF:
            ranges.append(((b & 0x1F) << 6, ((b & 0x1F) << 6) + 0x3F))
        elif 0xE0 <= b <= 0xEF:
            ranges.append(((b & 0x0F) << 12, ((b & 0x0F) << 12) + 0xFFF))
        elif 0xF0 <= b <= 0xF4:
            ranges.append(((b & 0x07) << 18, ((b & 0x07) << 18) + 0x3FFFF))
    if not ranges:
        return None
    return re.compile("[" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges) + "]")


def _check_texts(ranks: dict[bytes, int], unencodable: re.Pattern[str] | None) -> list[str]:
    """Every vocabulary entry that is valid UTF-8 alone and in runs of 64 consecutive ids,
    every character below U+3000 between letters and numerals, and :data:`PROBES`."""
    by_id = [t.decode("utf-8", errors="replace") for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    texts = [t for t in by_id if "\ufffd" not in t]
    texts += ["".join(by_id[i : i + 64]) for i in range(0, len(by_id), 64)]
    chars = [chr(c) for c in range(1, 0x3000) if not 0xD800 <= c <= 0xDFFF]
    if unencodable is not None:  # those go to the fallback: keep them out of the runs
        chars = [c for c in chars if not unencodable.match(c)]
    texts += ["a" + "".join(chars[i : i + 256]) + "1 " for i in range(0, len(chars), 256)]
    texts += [f"x{c}1{c}{c}y {c} 2" for c in chars if c.isspace() or not c.isprintable()]
    texts += list(PROBES)
    return texts
