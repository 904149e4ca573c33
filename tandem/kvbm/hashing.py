"""Dynamo-compatible KV block hashes.

A prompt is cut into blocks of ``block_size`` tokens; only *full* blocks are hashed (the partial
tail block never is). Two hashes exist per block:

* **local hash** — ``XXH3-64(u32_le(tokens of the block), seed)``: identifies the block's own
  tokens. ``seed`` is :data:`BLOCK_HASH_SEED` (1337), salted by the LoRA adapter name if any
  (:func:`lora_seed`).
* **sequence hash** — ``seq[0] = local[0]`` and
  ``seq[i] = XXH3-64(u64_le(seq[i-1]) || u64_le(local[i]), 1337)``: identifies the block *and
  its whole prefix*, so it is the key of the prefix cache, of KV events and of the indexer's
  radix tree. ``block_hashes`` everywhere in tandem means sequence hashes.

These are exactly the hashes of NVIDIA Dynamo 1.6.1 (``compute_block_hash_for_seq`` and the
``block_hash``/``tokens_hash``/``parent_hash`` of its KV events), checked against the vectors in
``tests/unit/test_hashing.py``, so tandem's KV events can be read by a Dynamo KV router and
vice versa. Hashes are unsigned 64-bit Python ints.
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import xxhash

if TYPE_CHECKING:
    import numpy.typing as npt

BLOCK_HASH_SEED = 1337
"""Seed of every local and sequence hash (Dynamo's ``XXH3_SEED``)."""

TokenIds: TypeAlias = "Sequence[int] | npt.NDArray[Any]"
"""Token ids: a sequence of ints or a 1-D numpy integer array."""

_U64 = 1 << 64
_PAIR = struct.Struct("<QQ")
_xxh3_64 = xxhash.xxh3_64_intdigest

# ``array("I")`` packs Python ints in C; it is 4 bytes wide on every platform tandem targets.
if array.array("I").itemsize != 4:  # pragma: no cover - exotic ABI
    raise ImportError("tandem.kvbm.hashing needs a 4-byte C unsigned int")


def lora_seed(lora_name: str | None) -> int:
    """Seed of the local hashes for requests using LoRA adapter ``lora_name``.

    ``None`` or ``""`` (no adapter) gives :data:`BLOCK_HASH_SEED`; otherwise
    ``(1337 + XXH3-64(utf8(lora_name), seed=0)) mod 2**64`` (Dynamo). The sequence-hash chain
    itself is always seeded with 1337: the adapter enters through the local hashes.
    """
    if not lora_name:
        return BLOCK_HASH_SEED
    return (BLOCK_HASH_SEED + _xxh3_64(lora_name.encode("utf-8"), seed=0)) % _U64


def pack_tokens(token_ids: TokenIds) -> bytes:
    """Token ids as consecutive little-endian uint32 (4 bytes per token).

    Vectorized (``array``/numpy, no per-token Python loop). Raises ``ValueError`` if a token id
    is outside ``[0, 2**32)``.
    """
    if hasattr(token_ids, "dtype"):  # numpy array (or alike): convert without a Python loop
        import numpy as np

        arr = np.asarray(token_ids)
        if arr.size and (arr.min() < 0 or arr.max() >= 1 << 32):
            raise ValueError("token ids must be in [0, 2**32)")
        return arr.astype("<u4", copy=False).tobytes()
    try:
        packed = array.array("I", token_ids)
    except OverflowError:
        raise ValueError("token ids must be in [0, 2**32)") from None
    except TypeError as e:
        raise ValueError(f"token ids must be ints: {e}") from None
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        packed.byteswap()
    return packed.tobytes()


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def compute_local_hashes(token_ids: TokenIds, block_size: int, seed: int = BLOCK_HASH_SEED) -> list[int]:
    """Local hashes of the full blocks of ``token_ids``.

    Returns ``len(token_ids) // block_size`` hashes; the trailing partial block (if any) is not
    hashed. ``seed``: :data:`BLOCK_HASH_SEED` or :func:`lora_seed` of the request's adapter.
    Raises ``ValueError`` on a non-positive ``block_size`` or a token id outside ``[0, 2**32)``.
    """
    _check_block_size(block_size)
    n_blocks = len(token_ids) // block_size
    if n_blocks == 0:
        return []
    data = memoryview(pack_tokens(token_ids[: n_blocks * block_size]))
    stride = 4 * block_size
    return [_xxh3_64(data[i : i + stride], seed=seed) for i in range(0, n_blocks * stride, stride)]


def sequence_hash(parent: int | None, local_hash: int) -> int:
    """Sequence hash of a block with local hash ``local_hash`` whose preceding block has
    sequence hash ``parent`` (``None`` for the first block of a sequence)."""
    if parent is None:
        return local_hash
    return _xxh3_64(_PAIR.pack(parent, local_hash), seed=BLOCK_HASH_SEED)


def compute_sequence_hashes(local_hashes: Sequence[int], parent: int | None = None) -> list[int]:
    """Chain local hashes into sequence hashes.

    ``parent``: sequence hash of the block before ``local_hashes[0]`` (``None`` = these start
    the sequence), so a sequence can be extended block by block as generation goes on.
    Returns one sequence hash per local hash.
    """
    out: list[int] = []
    prev = parent
    for local in local_hashes:
        prev = sequence_hash(prev, local)
        out.append(prev)
    return out


def compute_block_hashes(token_ids: TokenIds, block_size: int, lora_name: str | None = None) -> list[int]:
    """Sequence hashes of the full blocks of ``token_ids`` (what ``block_hashes`` fields carry).

    ``len(token_ids) // block_size`` hashes. Raises ``ValueError`` like
    :func:`compute_local_hashes`.
    """
    return compute_sequence_hashes(compute_local_hashes(token_ids, block_size, lora_seed(lora_name)))


__all__ = [
    "BLOCK_HASH_SEED",
    "TokenIds",
    "compute_block_hashes",
    "compute_local_hashes",
    "compute_sequence_hashes",
    "lora_seed",
    "pack_tokens",
    "sequence_hash",
]
