"""The frontend's settings: one dataclass that drives its command line and the launcher.

Importable without aiohttp, NATS or torch (only the standard library and :mod:`tandem.config`),
so the launcher can build a :class:`FrontendConfig` and pass it on with
:func:`tandem.config.to_argv`. The flags are derived with :func:`tandem.config.add_arguments`;
``python -m tandem.services.frontend --help`` lists them. The flags every service shares
(``--nats-url``, ``--namespace``, ``--log-level``) come from
:func:`tandem.services.runtime.common_parser`, not from here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Literal

from tandem.config import option

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CHUNK_TIMEOUT_S",
    "DEFAULT_HEALTH_TIMEOUT_S",
    "DEFAULT_MAX_INFLIGHT",
    "DEFAULT_MAX_MODEL_LEN",
    "DEFAULT_MAX_REQUEST_BYTES",
    "FrontendConfig",
]

DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_BLOCK_SIZE = 16
DEFAULT_CHUNK_TIMEOUT_S = 120.0
DEFAULT_HEALTH_TIMEOUT_S = 1.0
#: Requests (HTTP and public NATS together) one frontend handles at once before answering 429.
DEFAULT_MAX_INFLIGHT = 256
#: Largest request body (HTTP) or payload (public NATS), bytes.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
#: Environment variable holding the API key when ``--api-key`` is not given.
API_KEY_ENV = "TANDEM_API_KEY"


@dataclass(frozen=True, kw_only=True)
class FrontendConfig:
    """Frontend settings; each field is also a ``--flag`` (see the field's help).

    ``model_name`` None means "derive it from the model directory" (``prepared.json``, else the
    directory name); :func:`tandem.services.frontend.service.main` resolves it before building
    the :class:`~tandem.services.frontend.service.Frontend`, which needs it set. Raises
    ``ValueError`` on out-of-range values.
    """

    host: str = option("127.0.0.1", help="HTTP listen address")
    port: int = option(8000, help="HTTP port (0 = any free port)")
    model_dir: str | None = option(None, help="prepared model directory (default: prepare_model())")
    model_name: str | None = option(None, help="served model id (default: from the model dir)")
    max_model_len: int = option(
        DEFAULT_MAX_MODEL_LEN, help="context length, tokens: prompt + new tokens must fit in it"
    )
    chunk_timeout_s: float = option(
        DEFAULT_CHUNK_TIMEOUT_S,
        flag="--chunk-timeout",
        help="seconds without token progress before a request fails with 504",
    )
    health_timeout_s: float = option(
        DEFAULT_HEALTH_TIMEOUT_S,
        flag="--health-timeout",
        help="seconds GET /ready waits for the router's and the indexer's health answers",
    )
    migration_limit: int = option(
        3,
        help="re-issues of a request to another worker when the one serving it is lost "
        "(prompt + tokens so far; Dynamo's --migration-limit; 0 = off)",
    )
    liveness_interval_s: float = option(
        1.0,
        flag="--liveness-interval",
        help="seconds a stream may be silent before the frontend probes the worker or router "
        "holding it (a lost holder migrates the request)",
    )
    default_block_size: int = option(
        DEFAULT_BLOCK_SIZE, help="block size for prompt hashing until a worker advertises one, tokens"
    )
    max_inflight: int = option(
        DEFAULT_MAX_INFLIGHT,
        help="completion requests (HTTP + public NATS) handled at once; more get 429 with "
        "Retry-After at once (0 = unlimited)",
    )
    #: None = from ``$TANDEM_API_KEY`` (resolved at start by :meth:`resolved_api_key`, so the
    #: key never shows in ``--help`` nor in the command lines the launcher builds).
    api_key: str | None = option(
        None,
        help="require 'Authorization: Bearer KEY' on the HTTP API (all but /health and /live) "
        f"and the public NATS subjects (default: ${API_KEY_ENV}; empty = no key)",
    )
    max_request_bytes: int = option(
        DEFAULT_MAX_REQUEST_BYTES,
        help="largest HTTP request body / public NATS payload, bytes (413 above)",
    )
    tokenizer_backend: Literal["auto", "tokenizers"] = option(
        "auto",
        help="prompt tokenizing: 'auto' = tiktoken for a byte-level BPE tokenizer it encodes "
        "identically (checked at start, ~3x faster), else the Hugging Face tokenizers library; "
        "'tokenizers' = always the tokenizers library",
    )
    #: ``created`` of the model card (Unix seconds); set at start, not a flag.
    created: int = option(
        default_factory=lambda: int(time.time()), cli=False, help="model card creation time, Unix s"
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.model_name is not None and not self.model_name:
            raise ValueError("model_name must be non-empty (or None: from the model dir)")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2 tokens, got {self.max_model_len}")
        if not self.chunk_timeout_s > 0:
            raise ValueError(f"chunk_timeout_s must be > 0, got {self.chunk_timeout_s}")
        if not self.health_timeout_s > 0:
            raise ValueError(f"health_timeout_s must be > 0, got {self.health_timeout_s}")
        if self.migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0, got {self.migration_limit}")
        if not self.liveness_interval_s > 0:
            raise ValueError(f"liveness_interval_s must be > 0, got {self.liveness_interval_s}")
        if self.default_block_size < 1:
            raise ValueError(f"default_block_size must be at least 1, got {self.default_block_size}")
        if self.max_inflight < 0:
            raise ValueError(f"max_inflight must be >= 0 (0 = unlimited), got {self.max_inflight}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be at least 1024, got {self.max_request_bytes}")

    def resolved_api_key(self) -> str | None:
        """The API key clients must send: ``api_key``, else ``$TANDEM_API_KEY``; None (or an
        empty string in either) = no key required."""
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV)
        return key or None
