"""Block hashes: Dynamo 1.6.1 vectors, an independent per-token reference, input validation."""

from __future__ import annotations

import json
import random
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash

from tandem.kvbm.hashing import (
    BLOCK_HASH_SEED,
    compute_block_hashes,
    compute_local_hashes,
    compute_sequence_hashes,
    lora_seed,
    pack_tokens,
    sequence_hash,
)

# Dynamo 1.6.1 vectors, verbatim from /work/shared/data/dynamo_hash_vectors_sample.json
# (tokens, block_size, lora_name, local_hashes, seq_hashes).
DYNAMO_VECTORS: list[tuple[list[int], int, str | None, list[int], list[int]]] = [
    ([110250], 16, None, [], []),
    (
        [
            0,
            4294967295,
            1,
            57263,
            73882,
            24859,
            65668,
            139608,
            38525,
            19331,
            86559,
            26398,
            82889,
            53602,
            125045,
        ],
        16,
        None,
        [],
        [],
    ),
    (
        [
            0,
            4294967295,
            1,
            104549,
            299,
            87329,
            85250,
            16510,
            148769,
            37354,
            117432,
            4265854110,
            128263,
            144511,
            32718,
            141632,
        ],
        16,
        None,
        [11609804264507162437],
        [11609804264507162437],
    ),
    (
        [
            0,
            4294967295,
            1,
            63466,
            49647,
            8643,
            68172,
            23546,
            34137,
            10129,
            141715,
            137513,
            61735,
            109949,
            118112,
            93681,
            2631883398,
        ],
        16,
        None,
        [9601212414315694538],
        [9601212414315694538],
    ),
    (
        [
            0,
            4294967295,
            1,
            97533,
            87172,
            16303,
            38366,
            57350,
            2923108076,
            2727303856,
            150982,
            23994,
            30420,
            92928119,
            48489,
            125628,
            16013,
            5972,
            26607,
            18351,
            78921,
            47269,
            2006313350,
            102570,
            93993,
            123264,
            149361,
            53323,
            15217,
            41473,
            89735,
        ],
        16,
        None,
        [2311657986244552003],
        [2311657986244552003],
    ),
    (
        [
            0,
            4294967295,
            1,
            107454,
            133326,
            93625,
            65780,
            3260,
            20728,
            11979,
            35346,
            126308,
            75465,
            34693,
            101716,
            21161,
            1436244341,
            117475,
            148937,
            8269,
            148759,
            12263,
            16747,
            41336,
            127733,
            18,
            129651,
            122392,
            1783001626,
            21880,
            34215,
            105333,
        ],
        16,
        None,
        [2732702319323284930, 2557020814903913150],
        [2732702319323284930, 13171840566765343526],
    ),
    ([110250], 64, None, [], []),
    (
        [
            0,
            4294967295,
            1,
            57263,
            73882,
            24859,
            65668,
            139608,
            38525,
            19331,
            86559,
            26398,
            82889,
            53602,
            125045,
        ],
        64,
        None,
        [],
        [],
    ),
    (
        [
            0,
            4294967295,
            1,
            104549,
            299,
            87329,
            85250,
            16510,
            148769,
            37354,
            117432,
            4265854110,
            128263,
            144511,
            32718,
            141632,
        ],
        64,
        None,
        [],
        [],
    ),
    ([110250], 16, "adapter-a", [], []),
    ([110250], 16, "my-lora-7", [], []),
    ([110250], 64, "adapter-a", [], []),
]

SHARED_VECTORS = Path("/work/shared/data/dynamo_hash_vectors_sample.json")


def _reference_block_hashes(tokens: list[int], block_size: int, lora_name: str | None) -> tuple[list, list]:
    """Straight transcription of the formulas, one token at a time (no shared code)."""
    seed = 1337
    if lora_name:
        seed = (1337 + xxhash.xxh3_64_intdigest(lora_name.encode(), seed=0)) % 2**64
    local = []
    for i in range(len(tokens) // block_size):
        data = b"".join(struct.pack("<I", t) for t in tokens[i * block_size : (i + 1) * block_size])
        local.append(xxhash.xxh3_64_intdigest(data, seed=seed))
    seq: list[int] = []
    for i, h in enumerate(local):
        seq.append(h if i == 0 else xxhash.xxh3_64_intdigest(struct.pack("<QQ", seq[-1], h), seed=1337))
    return local, seq


def test_vectors_cover_the_cases() -> None:
    assert len(DYNAMO_VECTORS) == 12
    assert {v[1] for v in DYNAMO_VECTORS} == {16, 64}
    assert {v[2] for v in DYNAMO_VECTORS} == {None, "adapter-a", "my-lora-7"}
    assert any(len(v[4]) >= 2 for v in DYNAMO_VECTORS)


@pytest.mark.skipif(not SHARED_VECTORS.exists(), reason="shared vector file not on this machine")
def test_inline_vectors_equal_the_shared_file() -> None:
    shared = json.loads(SHARED_VECTORS.read_text())["vectors"]
    as_tuples = [
        (v["tokens"], v["block_size"], v["lora_name"], v["local_hashes"], v["seq_hashes"]) for v in shared
    ]
    assert as_tuples == DYNAMO_VECTORS


@pytest.mark.parametrize("vec", DYNAMO_VECTORS, ids=lambda v: f"n{len(v[0])}-B{v[1]}-{v[2]}")
def test_dynamo_vectors(vec: tuple) -> None:
    tokens, bs, lora, expected_local, expected_seq = vec
    local = compute_local_hashes(tokens, bs, lora_seed(lora))
    assert local == expected_local
    assert compute_sequence_hashes(local) == expected_seq
    assert compute_block_hashes(tokens, bs, lora) == expected_seq
    assert compute_block_hashes(np.asarray(tokens, dtype=np.int64), bs, lora) == expected_seq


def test_lora_seed() -> None:
    assert lora_seed(None) == lora_seed("") == BLOCK_HASH_SEED == 1337
    s = lora_seed("adapter-a")
    assert s != 1337 and 0 <= s < 2**64
    assert s == (1337 + xxhash.xxh3_64_intdigest(b"adapter-a", seed=0)) % 2**64


@pytest.mark.parametrize("block_size", [1, 3, 16, 64])
def test_matches_per_token_reference(block_size: int) -> None:
    rng = random.Random(block_size)
    for n in (0, 1, block_size - 1, block_size, 5 * block_size + 2, 300):
        tokens = [rng.choice([0, 2**32 - 1, rng.randrange(2**32), rng.randrange(50_000)]) for _ in range(n)]
        for lora in (None, "x"):
            local, seq = _reference_block_hashes(tokens, block_size, lora)
            assert compute_local_hashes(tokens, block_size, lora_seed(lora)) == local
            assert compute_block_hashes(tokens, block_size, lora) == seq
            assert len(seq) == n // block_size  # the partial tail block is never hashed


def test_chain_can_be_extended_from_a_parent() -> None:
    tokens = list(range(16 * 7 + 5))
    local = compute_local_hashes(tokens, 16)
    seq = compute_sequence_hashes(local)
    assert compute_sequence_hashes(local[3:], parent=seq[2]) == seq[3:]
    assert sequence_hash(None, local[0]) == seq[0] == local[0]
    assert sequence_hash(seq[0], local[1]) == seq[1]
    # A different prefix changes every later sequence hash but not the local hashes.
    other = [99, *tokens[1:]]
    assert compute_local_hashes(other, 16)[1:] == local[1:]
    assert all(a != b for a, b in zip(compute_block_hashes(other, 16), seq, strict=True))


def test_pack_tokens_little_endian_u32() -> None:
    assert pack_tokens([1, 2**32 - 1]) == b"\x01\x00\x00\x00\xff\xff\xff\xff"
    assert pack_tokens(np.array([1, 258], dtype=np.int32)) == b"\x01\x00\x00\x00\x02\x01\x00\x00"


@pytest.mark.parametrize("bad", [[-1], [2**32], [1, 2, -5]])
def test_rejects_out_of_range_tokens(bad: list[int]) -> None:
    with pytest.raises(ValueError, match="2\\*\\*32"):
        compute_local_hashes(bad, 1)
    with pytest.raises(ValueError):
        compute_local_hashes(np.array(bad, dtype=np.int64), 1)


@pytest.mark.parametrize("bs", [0, -16, 1.5, True])
def test_rejects_bad_block_size(bs: object) -> None:
    with pytest.raises(ValueError, match="block_size"):
        compute_local_hashes([1, 2, 3], bs)  # type: ignore[arg-type]


def test_hashing_thousands_of_tokens_is_fast() -> None:
    tokens = list(range(8192))
    compute_block_hashes(tokens, 16)
    t0 = time.perf_counter()
    for _ in range(20):
        compute_block_hashes(tokens, 16)
    per_call = (time.perf_counter() - t0) / 20
    assert per_call < 0.02, f"hashing 8192 tokens took {per_call * 1e3:.1f} ms"
