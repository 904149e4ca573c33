"""Model and engine configuration.

:class:`ModelConfig` mirrors the architecture fields of the prepared ``config.json`` (written by
:func:`tandem.engine.weights.prepare_model`, HF ``LlamaConfig`` key names). :class:`EngineConfig`
holds the serving knobs of one worker (executor, dtype, KV block geometry, batch limits, threads,
device, mock knobs); its fields drive the worker's command line (:mod:`tandem.config`).
:data:`SMOLLM2_135M_CONFIG` is the shape the mock engine assumes when it has no model directory.
This module does not import torch, so light processes (frontend, router) can use it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from tandem.config import option

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


#: SmolLM2-135M(-Instruct)'s architecture, as in its ``config.json``: 30 layers, 9 query / 3 KV
#: heads of 64, vocab 49152, bos 1, eos 2, 8192-token context. The mock engine's shape when it has
#: no model directory (KV bytes per token: 30 * 2 * 3 * 64 * dtype bytes = 23040 in bfloat16).
SMOLLM2_135M_CONFIG = ModelConfig(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (x86 ``avx512_bf16`` / ``amx_bf16``, Arm
    ``bf16``), read from ``/proc/cpuinfo`` (or ``cpuinfo``). Without it torch emulates bf16
    matmuls: measured here on an AMD EPYC without them, a 512-token prefill of SmolLM2-135M took
    12–14 s in bfloat16 and 2.3 s in float32 (one thread)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.partition(":")[2].split())
            if flags & {"avx512_bf16", "amx_bf16", "bf16"}:
                return True
    return False


def resolve_auto_dtype(engine: str, device: str, cpuinfo: str | None = None) -> str:
    """The dtype ``"auto"`` stands for: ``bfloat16`` for the mock engine (its KV sizes model a
    GPU), on CUDA, and on CPUs with native bf16; ``float32`` on other CPUs."""
    if engine == "mock" or device.startswith("cuda") or cpu_has_native_bf16(cpuinfo):
        return "bfloat16"
    return "float32"


def _nbytes(dtype: str) -> int:
    try:
        return DTYPE_NBYTES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPE_NBYTES)}") from None


@dataclass
class EngineConfig:
    """Settings of one engine (one worker's executor, KV cache and scheduler).

    Every field is a :func:`tandem.config.option`, so a worker's command line is derived from
    this class (:func:`tandem.config.add_arguments` / :func:`tandem.config.from_namespace` /
    :func:`tandem.config.to_argv`). Flags are ``--`` + the field name with ``-`` for ``_``
    (except ``--threads``), plus the aliases named below (Dynamo mocker's flag names where they
    mean the same knob).

    Attributes:
        model_dir: prepared model directory (see :func:`tandem.engine.weights.prepare_model`);
            ``None`` lets the caller resolve it. The model engine raises ``ValueError`` without
            one; the mock engine then uses :data:`SMOLLM2_135M_CONFIG`'s shape.
        engine: ``"model"`` runs the real model (:class:`tandem.engine.runner.ModelExecutor`);
            ``"mock"`` runs no model (:class:`tandem.engine.mock.MockExecutor`): same scheduler,
            KV block manager, prefix cache and KV events, synthetic tokens and simulated timing.
        dtype: weights, activations and KV cache dtype: ``"bfloat16"`` or ``"float32"``
            (``"float16"`` is accepted too, meant for CUDA); ``"auto"`` (default) is resolved at
            construction by :func:`resolve_auto_dtype`. The mock engine uses it only to size KV
            blocks (when ``kv_bytes_per_token`` is None).
        block_size: tokens per KV block (Dynamo: ``--block-size``).
        num_blocks: KV blocks to allocate; ``None`` derives it from ``kv_cache_gb``
            (alias ``--num-gpu-blocks-override``, Dynamo's name).
        kv_cache_gb: KV cache budget in GiB (2**30 bytes), used when ``num_blocks`` is None.
        max_num_seqs: most sequences in one batch.
        max_num_batched_tokens: most tokens (prefill + decode) in one forward pass.
        max_model_len: longest sequence (prompt + output) in tokens; ``None`` means the model's
            ``max_position_embeddings``.
        enable_prefix_caching: reuse KV blocks of identical prompt prefixes.
        num_threads: torch intra-op threads; ``None`` keeps torch's default. Flag ``--threads``
            (the worker's historical flag; alias ``--num-threads``). Model engine only.
        device: torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``). Model engine only.
        speedup_ratio: mock engine only: simulated step times are divided by this (> 0; a large
            value means no delay). Dynamo mocker's ``--speedup-ratio``.
        kv_bytes_per_token: mock engine only: KV bytes one token occupies (all layers, K and V),
            which sizes :meth:`block_nbytes` (and so ``num_blocks`` from ``kv_cache_gb``) and
            simulated KV transfers; ``None`` = from the model config and ``dtype``. Dynamo
            mocker's ``--kv-bytes-per-token``. The model engine always uses the real size.
        mock_tokens: mock engine only: ``"random"`` (seeded by the request's sampling seed and
            the token position) or ``"echo"`` (the prompt, repeated). See
            :class:`tandem.engine.mock.MockExecutor`.
        deterministic: model engine: batch-invariant forward pass and logits (vLLM's
            batch-invariant mode, SGLang's ``--enable-deterministic-inference``): a request's
            greedy and seeded tokens do not depend on its co-runners, on how its prompt was
            chunked, on prefix-cache hits or on disaggregation (prefill and decode workers must
            both run with it). Slower; see :mod:`tandem.engine.batch_invariant`. The mock engine
            is deterministic anyway and ignores it.
    """

    model_dir: str | None = option(
        None, help="prepared model directory (default: prepared on first use; mock: config.json only)"
    )
    engine: Literal["model", "mock"] = option(
        "model", help="executor: the real model, or a timing-simulated mock with no weights"
    )
    dtype: str = option(
        "auto",
        help="weights/activations/KV dtype: bfloat16, float32, float16, or auto (bfloat16 where the "
        "CPU/GPU computes it natively, else float32)",
    )
    block_size: int = option(16, help="tokens per KV block (tokens)")
    num_blocks: int | None = option(
        None,
        help="KV blocks to allocate (blocks; default: from --kv-cache-gb)",
        aliases=("--num-gpu-blocks-override",),
    )
    kv_cache_gb: float = option(1.0, help="KV cache budget when --num-blocks is unset (GiB)")
    max_num_seqs: int = option(32, help="most sequences in one batch (sequences)")
    max_num_batched_tokens: int = option(512, help="most tokens computed per step (tokens)")
    max_model_len: int | None = option(
        None, help="longest sequence, prompt + output (tokens; default: the model's context length)"
    )
    enable_prefix_caching: bool = option(True, help="reuse KV blocks of identical prompt prefixes")
    num_threads: int | None = option(
        None,
        help="torch intra-op threads (threads; model engine)",
        flag="--threads",
        aliases=("--num-threads",),
    )
    device: str = option("cpu", help="torch device: cpu, cuda, cuda:1 (model engine)")
    speedup_ratio: float = option(
        1.0, help="mock engine: divide simulated step times by this (> 0; large = no delay)"
    )
    kv_bytes_per_token: int | None = option(
        None, help="mock engine: KV bytes per token (bytes; default: from the model config and dtype)"
    )
    mock_tokens: Literal["random", "echo"] = option(
        "random", help="mock engine: seeded random tokens, or the prompt echoed"
    )
    deterministic: bool = option(
        False,
        help="batch-invariant model engine: greedy and seeded outputs do not depend on batch "
        "composition, chunked prefill, prefix-cache hits or disaggregation (slower)",
    )

    def __post_init__(self) -> None:
        if self.model_dir is not None:
            self.model_dir = str(self.model_dir)  # accept a Path
        if self.engine not in ("model", "mock"):
            raise ValueError(f"engine must be 'model' or 'mock', got {self.engine!r}")
        if self.mock_tokens not in ("random", "echo"):
            raise ValueError(f"mock_tokens must be 'random' or 'echo', got {self.mock_tokens!r}")
        if self.dtype == "auto":
            self.dtype = resolve_auto_dtype(self.engine, self.device)
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
        if not (self.speedup_ratio > 0 and math.isfinite(self.speedup_ratio)):
            raise ValueError(f"speedup_ratio must be positive and finite, got {self.speedup_ratio}")
        if self.kv_bytes_per_token is not None and self.kv_bytes_per_token <= 0:
            raise ValueError(f"kv_bytes_per_token must be positive, got {self.kv_bytes_per_token}")

    @property
    def dtype_nbytes(self) -> int:
        """Bytes per element of :attr:`dtype`."""
        return _nbytes(self.dtype)

    def kv_token_nbytes(self, model: ModelConfig) -> int:
        """KV bytes of one token (all layers, K and V): :attr:`kv_bytes_per_token` for the mock
        engine when set, else ``num_layers * 2 * kv_heads * head_dim * dtype_bytes``."""
        if self.engine == "mock" and self.kv_bytes_per_token is not None:
            return self.kv_bytes_per_token
        return model.kv_bytes_per_token(self.dtype)

    def block_nbytes(self, model: ModelConfig) -> int:
        """Bytes of one KV block (all layers, K and V): ``block_size * kv_token_nbytes(model)``,
        i.e. ``num_layers * 2 * block_size * kv_heads * head_dim * dtype_bytes`` for the model."""
        return self.block_size * self.kv_token_nbytes(model)

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
