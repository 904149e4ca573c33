"""Tokenizer, chat template and incremental detokenizer of a prepared model directory.

Reads ``tokenizer.json`` (`tokenizers` library), ``tokenizer_config.json`` and
``chat_template.jinja``, as written by :func:`tandem.engine.weights.prepare_model`. The chat
template is rendered like HF transformers does it: a sandboxed jinja2 environment with
``trim_blocks`` and ``lstrip_blocks``, variables ``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token`` and the helper ``raise_exception(message)``.

With ``fast_encoder=True``, text holding no added-token strings is encoded by a checked tiktoken
encoder (:mod:`tandem.engine.fast_bpe`: same ids, ~3× faster) when the tokenizer is a
byte-level BPE it supports; otherwise by the ``tokenizers`` library as always.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HfTokenizer
from tokenizers import __version__ as tokenizers_version

from tandem.engine import fast_bpe

_REPLACEMENT_CHAR = "\ufffd"


class ChatTemplateError(ValueError):
    """The chat template rejected the messages (``raise_exception`` in the template) or failed."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


class Tokenizer:
    """Text ↔ token ids for a prepared model directory.

    ``fast_encoder``: build the tiktoken encoder for :meth:`encode_ordinary` (~1 s at
    construction for its check; :attr:`fast_encoder_status` says whether it is used and why
    not). ``verdict_dir``: where that check's passed verdicts are recorded and looked up
    (:func:`tandem.engine.fast_bpe.build`; None = always check). Raises ``FileNotFoundError``
    if ``tokenizer.json`` is missing.
    """

    def __init__(
        self, model_dir: str | Path, *, fast_encoder: bool = False, verdict_dir: str | Path | None = None
    ) -> None:
        model_dir = Path(model_dir)
        tokenizer_json = (model_dir / "tokenizer.json").read_text(encoding="utf-8")
        self._tk = _HfTokenizer.from_str(tokenizer_json)
        config_path = model_dir / "tokenizer_config.json"
        self._config: dict[str, Any] = (
            json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        )
        template_path = model_dir / self._config.get("chat_template_file", "chat_template.jinja")
        self.chat_template: str | None = (
            template_path.read_text(encoding="utf-8")
            if template_path.is_file()
            else self._config.get("chat_template")
        )
        self.bos_token: str | None = self._config.get("bos_token")
        self.eos_token: str | None = self._config.get("eos_token")
        self.add_bos_token = bool(self._config.get("add_bos_token", False))
        self.add_eos_token = bool(self._config.get("add_eos_token", False))
        self.bos_token_id: int | None = self._token_id(self.bos_token)
        self.eos_token_id: int | None = self._token_id(self.eos_token)
        self.vocab_size: int = self._tk.get_vocab_size(with_added_tokens=True)
        #: ids of special (control) tokens, e.g. ``<|im_start|>``; dropped by ``skip_special_tokens``
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, tok in self._tk.get_added_tokens_decoder().items() if tok.special
        )
        #: The checked tiktoken encoder of :meth:`encode_ordinary` (None: ``tokenizers`` only).
        self.fast_encoder: fast_bpe.FastBPE | None = None
        #: Starts with "ok" when :attr:`fast_encoder` is used (checked now, or vouched for by a
        #: recorded verdict), else why not ("off" when not asked for).
        self.fast_encoder_status = "off"
        if fast_encoder:
            self.fast_encoder, self.fast_encoder_status = fast_bpe.build(
                tokenizer_json,
                self.encode_batch,
                verdict_dir=None if verdict_dir is None else Path(verdict_dir),
                reference_version=f"tokenizers {tokenizers_version}",
            )

    def _token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        index = self._tk.token_to_id(token)
        if index is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return int(index)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``) become
        their ids. ``add_special_tokens`` adds BOS/EOS where ``tokenizer_config.json`` says so
        (SmolLM2: neither)."""
        ids: list[int] = self._tk.encode(text, add_special_tokens=False).ids
        return self.with_special_tokens(ids) if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each of ``texts`` (no BOS/EOS): one ``tokenizers`` batch call, the
        GIL released and the texts spread over the cores. For a worker thread."""
        return [e.ids for e in self._tk.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_ordinary(self, text: str) -> list[int]:
        """:meth:`encode` of ``text`` that holds none of the added tokens' strings (the caller
        splits those out; here they would be encoded as plain text): by :attr:`fast_encoder`
        when there is one."""
        if self.fast_encoder is not None:
            return self.fast_encoder.encode(text)
        return self.encode(text)

    def encode_ordinary_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode_ordinary` of each of ``texts`` (GIL released; for a worker thread)."""
        if self.fast_encoder is not None:
            return self.fast_encoder.encode_batch(texts)
        return self.encode_batch(texts)

    def with_special_tokens(self, ids: list[int]) -> list[int]:
        """``ids`` with BOS/EOS added where ``tokenizer_config.json`` says so (what
        :meth:`encode` does with ``add_special_tokens``; SmolLM2: neither)."""
        if self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        if self.add_eos_token and self.eos_token_id is not None:
            ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; bytes that do not form complete UTF-8 characters become U+FFFD."""
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise ValueError("this model has no chat template")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        return env.from_string(self.chat_template)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}]``) with the model's template.

        ``extra`` variables are passed to the template. Returns the prompt text (encode it
        with :meth:`encode`; special tokens in it map to their ids).

        Raises:
            ValueError: no template, a message is malformed.
            ChatTemplateError: the template raised or failed to render.
        """
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"message {i} needs a string 'role'")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e


class IncrementalDetokenizer:
    """Turns a growing stream of token ids into text, emitting only complete characters.

    Byte-level BPE tokens can end inside a multi-byte UTF-8 character; decoding such a prefix
    yields a trailing U+FFFD. :meth:`add` decodes the tokens since the last clean character
    boundary, emits the new text up to (not including) any trailing U+FFFD, and keeps the rest
    for later, so every emitted piece is final. :meth:`flush` emits what is held at the end of
    the stream (an incomplete character stays U+FFFD). A genuine U+FFFD at the very end of the
    text is held until more text or :meth:`flush`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._window_start = 0  # token index at a clean character boundary
        self._window_emitted = 0  # characters of the window's decoded text already emitted
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    @property
    def token_ids(self) -> list[int]:
        """All ids added so far."""
        return list(self._ids)

    def add(self, ids: Sequence[int]) -> str:
        """Append ``ids`` and return the newly complete text (possibly ``""``)."""
        self._ids.extend(ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (incomplete characters become U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        window = self._tok.decode(self._ids[self._window_start :], self._skip)
        stable = window if final else window.rstrip(_REPLACEMENT_CHAR)
        new = stable[self._window_emitted :]
        if len(stable) == len(window):  # clean boundary: start a fresh window after these tokens
            self._window_start = len(self._ids)
            self._window_emitted = 0
        else:
            self._window_emitted = len(stable)
        if new:
            self._pieces.append(new)
        return new
