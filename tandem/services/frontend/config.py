"""The frontend's settings: one dataclass that drives its command line and the launcher.

Importable without aiohttp, NATS or torch (only the standard library and :mod:`tandem.config`),
so the launcher can build a :class:`FrontendConfig` and pass it on with
:func:`tandem.config.to_argv`. The flags are derived with :func:`tandem.config.add_arguments`;
``python -m tandem.services.frontend --help`` lists them. The flags every service shares
(``--nats-url``, ``--namespace``, ``--log-level``) come from
:func:`tandem.services.runtime.common_parser`, not from here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tandem.config import option

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CHUNK_TIMEOUT_S",
    "DEFAULT_HEALTH_TIMEOUT_S",
    "DEFAULT_MAX_MODEL_LEN",
    "FrontendConfig",
]

DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_BLOCK_SIZE = 16
DEFAULT_CHUNK_TIMEOUT_S = 120.0
DEFAULT_HEALTH_TIMEOUT_S = 1.0


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
    default_block_size: int = option(
        DEFAULT_BLOCK_SIZE, help="block size for prompt hashing until a worker advertises one, tokens"
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
        if self.default_block_size < 1:
            raise ValueError(f"default_block_size must be at least 1, got {self.default_block_size}")
