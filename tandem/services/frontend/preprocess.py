"""Stage 1 of the pipeline: an OpenAI request body → a :class:`PreparedRequest`.

Parse and validate (:mod:`tandem.protocol.openai`), check the model, tokenize (chat template for
chat messages, text or token ids for completion prompts), apply the context limit and the
``max_tokens`` defaults, build the :class:`~tandem.protocol.messages.SamplingParams` and hash
the prompt's full blocks once. Everything here raises :class:`OpenAIError` (400/404) and
touches neither NATS nor HTTP.

Chat prompts are encoded by a :class:`PromptEncoder`: the tokenizer splits text at its special
tokens (``<|im_start|>``, ``<|im_end|>``) and encodes the pieces between them independently, so
the ids of each piece (a message of a conversation, a system prompt) are cached and only new
pieces are encoded. Multi-turn conversations and shared system prompts repeat most of the text.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from tandem.engine.tokenizer import Tokenizer
from tandem.kvbm.hashing import compute_block_hashes
from tandem.protocol.messages import SamplingParams
from tandem.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    completion_prompt,
    decode_chat_request,
    decode_completion_request,
    stop_list,
)

__all__ = ["DEFAULT_COMPLETION_MAX_TOKENS", "PreparedRequest", "Preprocessor", "PromptEncoder", "RequestKind"]

#: OpenAI's default ``max_tokens`` for the legacy completions endpoint.
DEFAULT_COMPLETION_MAX_TOKENS = 16

RequestKind = Literal["chat", "completion"]


@dataclass
class PreparedRequest:
    """A validated, tokenized request ready to route."""

    kind: RequestKind
    request_id: str
    model: str
    created: int
    token_ids: list[int]
    block_hashes: list[int]
    sampling: SamplingParams
    stops: list[str]
    stream: bool
    include_usage: bool
    return_token_ids: bool
    #: ``time.perf_counter()`` when the request arrived (for ``ttft_ms``).
    arrived: float


@dataclass(frozen=True)
class _Prompt:
    """What differs between the two request kinds once the body is parsed and tokenized."""

    req: ChatCompletionRequest | CompletionRequest
    token_ids: list[int]
    #: New tokens asked for (None: not given).
    requested: int | None
    #: The request field ``requested`` came from, for error messages.
    max_tokens_param: str
    #: The request field holding the prompt, for context-length errors.
    prompt_param: str
    id_prefix: str
    #: ``max_tokens`` when not given; None = the rest of the context.
    default_max_tokens: int | None


class PromptEncoder:
    """``tokenizer.encode(text)`` (no BOS/EOS added) with the ids of the pieces between special
    tokens cached (LRU, at most ``max_entries`` pieces and ``max_chars`` characters in all).

    Exact, not an approximation: a Hugging Face tokenizer first splits the text at its added
    tokens and normalizes, pre-tokenizes and encodes every piece on its own, which is what this
    does too. That holds when every added token matches its literal text (no ``lstrip``,
    ``rstrip`` or ``single_word``; not normalized unless there is no normalizer) and special
    tokens are split out (``encode_special_tokens`` off); otherwise, or for a tokenizer that is
    not a wrapped Hugging Face one, or if a self-check at construction disagrees, it just calls
    ``tokenizer.encode``.
    """

    #: Texts the self-check encodes both ways (added tokens next to spaces, newlines, text).
    PROBES = (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi  there !<|im_end|>\n",
        " a<|im_end|> b <|im_start|>\n\n<|endoftext|>12345 x",
        "<s> </s><unk>[INST] hi [/INST]<|eot_id|>",
    )

    def __init__(self, tokenizer: Tokenizer, *, max_entries: int = 4096, max_chars: int = 8 << 20) -> None:
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._chars = 0
        self.hits = 0
        self.misses = 0
        self._added: dict[str, int] = {}
        self._split: re.Pattern[str] | None = None
        added = _literal_added_tokens(tokenizer)
        if added:
            self._added = added
            longest_first = sorted(added, key=len, reverse=True)  # leftmost-longest, like HF
            self._split = re.compile("(" + "|".join(re.escape(t) for t in longest_first) + ")")
            if any(self.encode(t) != list(tokenizer.encode(t)) for t in self.PROBES):
                self._split = None
            self._cache.clear()
            self._chars = 0

    @property
    def caching(self) -> bool:
        """Whether pieces are cached (False: every call is ``tokenizer.encode``)."""
        return self._split is not None

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` (special tokens written in it become their ids)."""
        split = self._split
        if split is None:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        ids: list[int] = []
        for i, piece in enumerate(split.split(text)):
            if i % 2:
                ids.append(self._added[piece])
            elif piece:
                ids += self._piece(piece)
        return ids

    def _piece(self, piece: str) -> list[int]:
        cache = self._cache
        ids = cache.get(piece)
        if ids is not None:
            cache.move_to_end(piece)
            self.hits += 1
            return ids
        self.misses += 1
        ids = list(self.tokenizer.encode(piece, add_special_tokens=False))
        if len(piece) <= self.max_chars // 4:
            cache[piece] = ids
            self._chars += len(piece)
            while len(cache) > self.max_entries or self._chars > self.max_chars:
                old, _ = cache.popitem(last=False)
                self._chars -= len(old)
        return ids


def _literal_added_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    """``{text: id}`` of the added tokens if every one of them matches exactly its text, else {}."""
    hf = getattr(tokenizer, "_tk", None)  # the wrapped tokenizers.Tokenizer
    get = getattr(hf, "get_added_tokens_decoder", None)
    if get is None or getattr(hf, "encode_special_tokens", False):
        return {}
    try:
        decoder = get()
        has_normalizer = getattr(hf, "normalizer", None) is not None
        out: dict[str, int] = {}
        for tid, tok in decoder.items():
            text = tok.content
            if (
                not isinstance(text, str)
                or not text
                or text in out
                or tok.lstrip
                or tok.rstrip
                or tok.single_word
                or (tok.normalized and has_normalizer)
            ):
                return {}
            out[text] = int(tid)
    except Exception:
        return {}
    return out


class Preprocessor:
    """Validates and tokenizes request bodies for one served model.

    ``block_size`` is called per request: the frontend hashes with the block size the
    registered workers advertise, which can change while it runs.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        model_name: str,
        max_model_len: int,
        block_size: Callable[[], int],
    ) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self._block_size = block_size
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids: frozenset[int] = frozenset([eos]) if isinstance(eos, int) else frozenset()
        self.encoder = PromptEncoder(tokenizer)

    def prepare(self, kind: RequestKind, body: bytes, arrived: float | None = None) -> PreparedRequest:
        """Validate and tokenize a request body; raises :class:`OpenAIError` (400/404)."""
        arrived = time.perf_counter() if arrived is None else arrived
        prompt = self._chat(body) if kind == "chat" else self._completion(body)
        req = prompt.req
        token_ids = prompt.token_ids
        limit = self.max_model_len
        room = limit - len(token_ids)
        if room < 1:
            raise OpenAIError(
                400,
                f"The prompt is {len(token_ids)} tokens; this model's context is {limit} tokens "
                "(the prompt must leave room for at least one new token).",
                param=prompt.prompt_param,
                code="context_length_exceeded",
            )
        requested = prompt.requested
        if requested is None:
            default = prompt.default_max_tokens
            max_tokens = room if default is None else min(default, room)
        elif requested > room:
            raise OpenAIError(
                400,
                f"This model's context is {limit} tokens; the prompt is {len(token_ids)} tokens and "
                f"{requested} new tokens were requested ({len(token_ids) + requested} in total). "
                f"Lower '{prompt.max_tokens_param}' to at most {room}.",
                param=prompt.max_tokens_param,
                code="context_length_exceeded",
            )
        else:
            max_tokens = requested
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k or 0, 0),
            seed=req.seed,
            stop_token_ids=[] if req.ignore_eos else sorted(self.eos_ids),
            ignore_eos=req.ignore_eos,
        )
        return PreparedRequest(
            kind=kind,
            request_id=f"{prompt.id_prefix}-{uuid.uuid4().hex}",
            model=req.model,
            created=int(time.time()),
            token_ids=token_ids,
            block_hashes=compute_block_hashes(token_ids, self._block_size()),
            sampling=sampling,
            stops=stop_list(req.stop),
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            return_token_ids=req.return_token_ids,
            arrived=arrived,
        )

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise OpenAIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )

    def _chat(self, body: bytes) -> _Prompt:
        req = decode_chat_request(body)
        self._check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # a template may reject a conversation (e.g. role order)
            raise OpenAIError(400, f"Could not apply the chat template: {e}", param="messages") from None
        return _Prompt(
            req=req,
            token_ids=self.encoder.encode(text),
            requested=req.effective_max_tokens(),
            max_tokens_param=(
                "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            ),
            prompt_param="messages",
            id_prefix="chatcmpl",
            default_max_tokens=None,
        )

    def _completion(self, body: bytes) -> _Prompt:
        req = decode_completion_request(body)
        self._check_model(req.model)
        prompt = completion_prompt(req)
        if isinstance(prompt, str):
            token_ids = list(self.tokenizer.encode(prompt, add_special_tokens=True))
        else:
            self._check_vocab(prompt)
            token_ids = prompt
        return _Prompt(
            req=req,
            token_ids=token_ids,
            requested=req.max_tokens,
            max_tokens_param="max_tokens",
            prompt_param="prompt",
            id_prefix="cmpl",
            default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS,
        )

    def _check_vocab(self, token_ids: Iterable[int]) -> None:
        vocab = getattr(self.tokenizer, "vocab_size", None)
        if isinstance(vocab, int) and any(t >= vocab for t in token_ids):
            raise OpenAIError(400, f"Token ids must be below the vocabulary size ({vocab}).", param="prompt")
