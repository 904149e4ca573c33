"""Model and engine configuration.

:class:`ModelConfig` mirrors the architecture fields of the prepared ``config.json`` (written by
:func:`tandem.engine.weights.prepare_model`, HF ``LlamaConfig`` key names). :class:`EngineConfig`
holds the serving knobs of one worker (dtype, KV block geometry, batch limits, threads, device).
This module does not import torch, so light processes (frontend, router) can use it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

#: Bytes per element of the dtypes the engine supports (names as in ``torch.<name>``).
DTYPE_NBYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a llama-family causal LM.

    Sizes are element counts; ``rope_theta`` is the RoPE base frequency; ``rms_norm_eps`` the
    epsilon added to the mean square in RMSNorm; ``max_position_embeddings`` the trained context
    length in tokens.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int
    eos_token_id: int

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a HF-style config dict; unknown keys are ignored.

        ``head_dim`` defaults to ``hidden_size // num_attention_heads`` and
        ``tie_word_embeddings`` to False (the HF defaults). A list ``eos_token_id`` uses its first
        entry. Raises ``ValueError`` if a required key is missing.
        """
        data = dict(data)
        if "head_dim" not in data and "hidden_size" in data and "num_attention_heads" in data:
            data["head_dim"] = data["hidden_size"] // data["num_attention_heads"]
        data.setdefault("tie_word_embeddings", False)
        if isinstance(data.get("eos_token_id"), list):
            data["eos_token_id"] = data["eos_token_id"][0]
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if data.get(n) is None]
        if missing:
            raise ValueError(f"model config is missing {missing}")
        return cls(**{n: data[n] for n in names})

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelConfig:
        """Read ``<model_dir>/config.json``. Raises ``FileNotFoundError`` or ``ValueError``."""
        path = Path(model_dir) / "config.json"
        with path.open(encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def kv_bytes_per_token(self, dtype: str) -> int:
        """KV cache bytes one token occupies across all layers (K and V) in ``dtype``."""
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * _nbytes(dtype)


def _nbytes(dtype: str) -> int:
    try:
        return DTYPE_NBYTES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPE_NBYTES)}") from None


@dataclass
class EngineConfig:
    """Settings of one engine (one worker's model, KV cache and scheduler).

    Attributes:
        model_dir: prepared model directory (see :func:`tandem.engine.weights.prepare_model`).
        dtype: weights, activations and KV cache dtype: ``"bfloat16"`` or ``"float32"``
            (``"float16"`` is accepted too, meant for CUDA).
        block_size: tokens per KV block.
        num_blocks: KV blocks to allocate; ``None`` derives it from ``kv_cache_gb``.
        kv_cache_gb: KV cache budget in GiB (2**30 bytes), used when ``num_blocks`` is None.
        max_num_seqs: most sequences in one batch.
        max_num_batched_tokens: most tokens (prefill + decode) in one forward pass.
        max_model_len: longest sequence (prompt + output) in tokens; ``None`` means the model's
            ``max_position_embeddings``.
        enable_prefix_caching: reuse KV blocks of identical prompt prefixes.
        num_threads: torch intra-op threads; ``None`` keeps torch's default.
        device: torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    """

    model_dir: str | Path
    dtype: str = "bfloat16"
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gb: float = 1.0
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    num_threads: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        _nbytes(self.dtype)
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.num_blocks is None and not self.kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb must be positive, got {self.kv_cache_gb}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"num_threads must be positive, got {self.num_threads}")

    @property
    def dtype_nbytes(self) -> int:
        """Bytes per element of :attr:`dtype`."""
        return _nbytes(self.dtype)

    def block_nbytes(self, model: ModelConfig) -> int:
        """Bytes of one KV block (all layers, K and V):
        ``num_layers * 2 * block_size * kv_heads * head_dim * dtype_bytes``."""
        return self.block_size * model.kv_bytes_per_token(self.dtype)

    def resolve_num_blocks(self, model: ModelConfig) -> int:
        """:attr:`num_blocks` if set, else ``floor(kv_cache_gb * 2**30 / block_nbytes)``.

        Raises ``ValueError`` if the budget does not hold a single block.
        """
        if self.num_blocks is not None:
            return self.num_blocks
        n = math.floor(self.kv_cache_gb * 2**30 / self.block_nbytes(model))
        if n < 1:
            raise ValueError(
                f"kv_cache_gb={self.kv_cache_gb} holds no KV block of {self.block_nbytes(model)} bytes"
            )
        return n

    def resolve_max_model_len(self, model: ModelConfig) -> int:
        """:attr:`max_model_len` if set, else the model's ``max_position_embeddings``.

        Raises ``ValueError`` if it exceeds ``max_position_embeddings``.
        """
        if self.max_model_len is None:
            return model.max_position_embeddings
        if self.max_model_len > model.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's "
                f"max_position_embeddings={model.max_position_embeddings}"
            )
        return self.max_model_len
