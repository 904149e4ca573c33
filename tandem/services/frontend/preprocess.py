"""Stage 1 of the pipeline: an OpenAI request body → a :class:`PreparedRequest`.

Parse and validate (:mod:`tandem.protocol.openai`), check the model, refuse a prompt too long
to fit before tokenizing it (:attr:`Preprocessor.max_prompt_chars`), tokenize (chat template for
chat messages, text or token ids for completion prompts), apply the context limit and the
``max_tokens`` defaults, build the :class:`~tandem.protocol.messages.SamplingParams` and hash
the prompt's full blocks once. Everything here raises :class:`OpenAIError` (400/404) and
touches neither NATS nor HTTP.

Event loop: :meth:`Preprocessor.prepare_async` parses a body larger than
:data:`PARSE_IN_THREAD_BYTES` in a worker thread, and tokenizes more than
:data:`TOKENIZE_IN_THREAD_CHARS` of new text off the loop through a
:class:`~tandem.services.frontend.batch_encode.BatchEncoder`: the new text of the requests that
arrive together goes to a worker thread as one GIL-releasing batch call, so a burst of requests
is tokenized in parallel instead of one after the other on the loop, and a long prompt (up to
~0.5 s of tokenizing at the character limit) or a huge conversation does not stall the other
requests; :meth:`Preprocessor.prepare` does everything inline.

Chat prompts are encoded by a :class:`PromptEncoder`: the tokenizer splits text at its special
tokens (``<|im_start|>``, ``<|im_end|>``) and encodes the pieces between them independently, so
the ids of each piece (a message of a conversation, a system prompt) are cached and only new
pieces are encoded — in :meth:`~Preprocessor.prepare_async` too, however long the prompt: a
multi-turn conversation or a shared 4000-token system prompt repeats most of the text, and
tokenizing it again was the frontend's largest cost per request (~10 ms of CPU at ~4000 tokens).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import msgspec

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
from tandem.services.frontend.batch_encode import BatchEncoder, encode_texts

__all__ = [
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "GREEDY_TEMPERATURE",
    "PARSE_IN_THREAD_BYTES",
    "TOKENIZE_IN_THREAD_CHARS",
    "PreparedRequest",
    "Preprocessor",
    "PromptEncoder",
    "RequestKind",
]

#: OpenAI's default ``max_tokens`` for the legacy completions endpoint.
DEFAULT_COMPLETION_MAX_TOKENS = 16
#: A ``temperature`` below this samples greedily (sent as 0.0), as vLLM does (``_SAMPLING_EPS``).
GREEDY_TEMPERATURE = 1e-5
#: New text longer than this (characters) is tokenized off the event loop by
#: :meth:`Preprocessor.prepare_async`, batched with the other requests' new text
#: (:class:`~tandem.services.frontend.batch_encode.BatchEncoder`; ~1.5 ms of tokenizing on one
#: core; shorter text costs less inline than the hand-off to the thread).
TOKENIZE_IN_THREAD_CHARS = 1024
#: Bodies larger than this (bytes) are parsed in a worker thread by
#: :meth:`Preprocessor.prepare_async` (a few ms of decoding and validating on one core).
PARSE_IN_THREAD_BYTES = 64 * 1024
#: Characters one token can cover when the tokenizer's vocabulary cannot be read.
FALLBACK_CHARS_PER_TOKEN = 128

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
    """What differs between the two request kinds once the body is parsed (not yet tokenized).

    Exactly one of ``text`` (to tokenize) and ``token_ids`` (given by the client) is set.
    """

    req: ChatCompletionRequest | CompletionRequest
    text: str | None
    token_ids: list[int] | None
    #: Add the tokenizer's BOS/EOS (completion text) rather than encode as is (chat template).
    add_special_tokens: bool
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
    ``tokenizer.encode``. Pieces are encoded by ``tokenizer.encode_ordinary`` (the checked
    tiktoken encoder of :mod:`tandem.engine.fast_bpe` when the tokenizer has one).
    """

    #: Texts the self-check encodes both ways (added tokens next to spaces, newlines, text).
    PROBES = (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi  there !<|im_end|>\n",
        " a<|im_end|> b <|im_start|>\n\n<|endoftext|>12345 x",
        "<s> </s><unk>[INST] hi [/INST]<|eot_id|>",
    )

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        max_entries: int = 4096,
        max_chars: int = 8 << 20,
        batcher: BatchEncoder | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        #: Where :meth:`encode_async` sends text to tokenize off the loop (None: a thread each).
        self.batcher = batcher
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

    async def encode_async(self, text: str, *, thread_chars: int = 0) -> list[int]:
        """:meth:`encode`, with the pieces that are not cached tokenized in a worker thread when
        they are more than ``thread_chars`` characters together (the tokenizer's GIL-releasing
        batch call), inline otherwise. A long prompt is usually a long cached prefix (a system
        prompt, earlier turns) plus a short new message: only that message is tokenized. Same
        ids as :meth:`encode`."""
        split = self._split
        if split is None:
            if len(text) > thread_chars:
                return (await self._off_loop([text], ordinary=False))[0]
            return self.encode(text)
        parts = split.split(text)
        cache = self._cache
        new: dict[str, None] = {}  # uncached pieces, in order, once each
        for i in range(0, len(parts), 2):
            piece = parts[i]
            if piece and piece not in cache:
                new[piece] = None
        if new and sum(map(len, new)) > thread_chars:
            pieces = list(new)
            encoded = await self._off_loop(pieces, ordinary=True)
            fresh = dict(zip(pieces, encoded, strict=True))
        else:
            fresh = {}
        ids: list[int] = []
        for i, piece in enumerate(parts):
            if i % 2:
                ids.append(self._added[piece])
            elif piece:
                got = fresh.get(piece)
                if got is None:
                    ids += self._piece(piece)
                else:
                    self.misses += 1
                    self._store(piece, got)
                    ids += got
        return ids

    async def _off_loop(self, texts: list[str], *, ordinary: bool) -> list[list[int]]:
        """Ids of ``texts`` from a worker thread; ``ordinary``: they hold no added-token strings."""
        if self.batcher is not None and (ordinary or not self.batcher.ordinary):
            return await self.batcher.encode(texts)
        return await asyncio.to_thread(encode_texts, self.tokenizer, texts, ordinary=ordinary)

    def _piece(self, piece: str) -> list[int]:
        cache = self._cache
        ids = cache.get(piece)
        if ids is not None:
            cache.move_to_end(piece)
            self.hits += 1
            return ids
        self.misses += 1
        ids = self._encode_piece(piece)
        self._store(piece, ids)
        return ids

    def _encode_piece(self, piece: str) -> list[int]:
        """Ids of a piece between special tokens: the tokenizer's ``encode_ordinary`` (the
        checked tiktoken encoder when it has one), else ``encode``."""
        ordinary = getattr(self.tokenizer, "encode_ordinary", None)
        if ordinary is not None:
            return list(ordinary(piece))
        return list(self.tokenizer.encode(piece, add_special_tokens=False))

    def _store(self, piece: str, ids: list[int]) -> None:
        """Cache the ids of ``piece`` (most recent; the least recent go beyond the limits)."""
        if len(piece) > self.max_chars // 4:
            return
        cache = self._cache
        if piece in cache:
            cache.move_to_end(piece)
            return
        cache[piece] = ids
        self._chars += len(piece)
        while len(cache) > self.max_entries or self._chars > self.max_chars:
            old, _ = cache.popitem(last=False)
            self._chars -= len(old)


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
        #: Tokenizes the new text of concurrent requests together, off the loop.
        self.batcher = BatchEncoder(tokenizer, ordinary=True)
        self.encoder = PromptEncoder(tokenizer, batcher=self.batcher)
        #: Characters one token covers at most (the longest vocabulary entry).
        self.max_token_chars = _max_token_chars(tokenizer)
        #: A prompt (completion text, or chat message contents together) longer than this,
        #: characters, cannot fit in the context: refused before it is tokenized. Exact, never a
        #: false refusal: a byte-level vocabulary entry of ``k`` characters covers ``k`` bytes,
        #: and a character is at least one byte.
        self.max_prompt_chars = max_model_len * self.max_token_chars

    async def warm_up(self) -> float:
        """Run the request path once on a synthetic chat request, so the first client request
        does not pay the one-time costs; returns the seconds it took.

        Measured on this CPU, the first ``prepare_async`` of a process took ~22 ms against ~3 ms
        for the next ones: the Hugging Face tokenizer sets up its thread pool on the first batch
        call, the chat template and the validators run for the first time, the worker thread is
        started. The synthetic text is short and its pieces are not cached
        (:class:`PromptEncoder` stores nothing here), so the caches are left as they were.
        """
        t0 = time.perf_counter()
        text = "Warm-up: tokenize this 123 text, and hash its blocks. " * 8
        # Validation and the chat template, as a request runs them (the model name is ours).
        body = msgspec.json.encode(
            {"model": self.model_name, "messages": [{"role": "user", "content": "warm up"}]}
        )
        self.parse("chat", body)
        ids = (await self.batcher.encode([text]))[0]  # the worker thread and the batch call
        ids += self.tokenizer.encode(text, add_special_tokens=False)  # the inline call
        compute_block_hashes(ids, max(1, self._block_size()))
        return time.perf_counter() - t0

    def prepare(self, kind: RequestKind, body: bytes, arrived: float | None = None) -> PreparedRequest:
        """Validate and tokenize a request body inline; raises :class:`OpenAIError` (400/404)."""
        arrived = time.perf_counter() if arrived is None else arrived
        prompt = self.parse(kind, body)
        if prompt.token_ids is not None:
            token_ids = prompt.token_ids
        elif prompt.add_special_tokens:
            token_ids = list(self.tokenizer.encode(prompt.text or "", add_special_tokens=True))
        else:
            token_ids = self.encoder.encode(prompt.text or "")
        return self._finish(kind, prompt, token_ids, arrived)

    async def prepare_async(
        self, kind: RequestKind, body: bytes, arrived: float | None = None
    ) -> PreparedRequest:
        """:meth:`prepare` with the heavy parts in a worker thread, so the event loop keeps
        serving meanwhile: a body over :data:`PARSE_IN_THREAD_BYTES` is also parsed there (JSON,
        validation, chat template: Python code, which yields the GIL to the loop every few ms),
        more than :data:`TOKENIZE_IN_THREAD_CHARS` of text to tokenize is tokenized there (with
        the tokenizer's GIL-releasing call; for a chat prompt, only its pieces the
        :class:`PromptEncoder` has not cached count). Same ids, same errors."""
        arrived = time.perf_counter() if arrived is None else arrived
        if len(body) > PARSE_IN_THREAD_BYTES:
            prompt = await asyncio.to_thread(self.parse, kind, body)
        else:
            prompt = self.parse(kind, body)
        text = prompt.text
        if prompt.token_ids is not None:
            token_ids = prompt.token_ids
        elif not prompt.add_special_tokens:  # chat: cached pieces, the new ones off the loop
            token_ids = await self.encoder.encode_async(text or "", thread_chars=TOKENIZE_IN_THREAD_CHARS)
        elif text is not None and len(text) > TOKENIZE_IN_THREAD_CHARS:
            token_ids = self.tokenizer.with_special_tokens((await self.batcher.encode([text]))[0])
        else:
            token_ids = list(self.tokenizer.encode(text or "", add_special_tokens=True))
        return self._finish(kind, prompt, token_ids, arrived)

    def parse(self, kind: RequestKind, body: bytes) -> _Prompt:
        """Validate the body, check the model and the prompt's length in characters, apply the
        chat template; nothing is tokenized yet. Raises :class:`OpenAIError` (400/404)."""
        return self._chat(body) if kind == "chat" else self._completion(body)

    def _finish(
        self, kind: RequestKind, prompt: _Prompt, token_ids: list[int], arrived: float
    ) -> PreparedRequest:
        req = prompt.req
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
        temperature = 1.0 if req.temperature is None else req.temperature
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0 if temperature < GREEDY_TEMPERATURE else temperature,
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

    def _check_chars(self, chars: int, param: str) -> None:
        """400 ``context_length_exceeded`` when ``chars`` characters cannot fit in the context."""
        if chars > self.max_prompt_chars:
            raise OpenAIError(
                400,
                f"The prompt is {chars} characters; this model's context is {self.max_model_len} tokens "
                f"and no prompt longer than {self.max_prompt_chars} characters fits in it.",
                param=param,
                code="context_length_exceeded",
            )

    def _chat(self, body: bytes) -> _Prompt:
        req = decode_chat_request(body)
        self._check_model(req.model)
        if len(req.messages) > self.max_model_len:  # every message renders to some tokens
            raise OpenAIError(
                400,
                f"The conversation has {len(req.messages)} messages; this model's context is "
                f"{self.max_model_len} tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        self._check_chars(sum(len(m["content"]) for m in messages), "messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # a template may reject a conversation (e.g. role order)
            raise OpenAIError(400, f"Could not apply the chat template: {e}", param="messages") from None
        return _Prompt(
            req=req,
            text=text,
            token_ids=None,
            add_special_tokens=False,
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
        text: str | None = None
        token_ids: list[int] | None = None
        if isinstance(prompt, str):
            self._check_chars(len(prompt), "prompt")
            text = prompt
        else:
            if len(prompt) >= self.max_model_len:  # before looking at every id
                raise OpenAIError(
                    400,
                    f"The prompt is {len(prompt)} tokens; this model's context is {self.max_model_len} "
                    "tokens (the prompt must leave room for at least one new token).",
                    param="prompt",
                    code="context_length_exceeded",
                )
            self._check_vocab(prompt)
            token_ids = prompt
        return _Prompt(
            req=req,
            text=text,
            token_ids=token_ids,
            add_special_tokens=True,
            requested=req.max_tokens,
            max_tokens_param="max_tokens",
            prompt_param="prompt",
            id_prefix="cmpl",
            default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS,
        )

    def _check_vocab(self, token_ids: Iterable[int]) -> None:
        vocab = getattr(self.tokenizer, "vocab_size", None)
        if isinstance(vocab, int) and max(token_ids, default=-1) >= vocab:
            raise OpenAIError(400, f"Token ids must be below the vocabulary size ({vocab}).", param="prompt")


def _max_token_chars(tokenizer: Tokenizer) -> int:
    """The longest vocabulary entry of ``tokenizer``, characters (at least 1); for a tokenizer
    whose vocabulary cannot be read, :data:`FALLBACK_CHARS_PER_TOKEN`."""
    hf = getattr(tokenizer, "_tk", None)  # the wrapped tokenizers.Tokenizer
    get_vocab = getattr(hf, "get_vocab", None)
    if get_vocab is None:
        return FALLBACK_CHARS_PER_TOKEN
    try:
        vocab = get_vocab(with_added_tokens=True)
        return max(1, max((len(t) for t in vocab), default=1))
    except Exception:
        return FALLBACK_CHARS_PER_TOKEN
