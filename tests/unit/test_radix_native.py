"""The native KV-indexer core (tandem/kvbm/_radix_native.c): built where it can be, identical to the
pure-Python tree on random event streams, and a payload parser that never crashes and only ever
accepts what msgspec decodes to the same values. (test_radix.py runs every tree test on both.)"""

from __future__ import annotations

import importlib
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import types
from array import array
from typing import Any

import msgspec
import pytest
import structlog

from tandem.kvbm import radix
from tandem.kvbm._wire import FastRemoved, FastStored, decode_kv_event_batch
from tandem.kvbm.hashing import compute_block_hashes
from tandem.kvbm.radix import (
    NATIVE_AVAILABLE,
    BaseRadixTree,
    NativeRadixTree,
    PyRadixTree,
    make_radix_tree,
)
from tandem.protocol import Subjects
from tandem.protocol.messages import (
    KvCleared,
    KvEvent,
    KvEventBatch,
    KvRemoved,
    KvStored,
    OverlapQuery,
    StoredBlock,
    encode,
)
from tandem.services.indexer import KvIndexer

U64 = (1 << 64) - 1
BS = 4


def test_extension_is_built_where_a_compiler_exists() -> None:
    """``pip install -e .`` (scripts/setup) builds the optional extension whenever a C compiler is
    present: missing it there means the build broke silently (the pure-Python fallback hides it)."""
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler: the pure-Python tree is the one in use")
    if not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        pytest.skip("no Python headers (python3-dev): the pure-Python tree is the one in use")
    assert NATIVE_AVAILABLE, (
        f"a C compiler exists ({compiler}) but tandem.kvbm._radix_native is not importable: "
        "rebuild with `.venv/bin/python -m pip install --no-deps -e .` and read its warnings"
    )


native_only = pytest.mark.skipif(not NATIVE_AVAILABLE, reason="tandem.kvbm._radix_native not built")


def _native() -> Any:
    return importlib.import_module("tandem.kvbm._radix_native")


# ---- selection ---------------------------------------------------------------------------------


def test_impl_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_RADIX", "python")
    assert type(make_radix_tree()) is PyRadixTree
    assert type(make_radix_tree("python")) is PyRadixTree
    monkeypatch.setenv("TANDEM_RADIX", "bogus")
    with pytest.raises(ValueError, match="TANDEM_RADIX"):
        make_radix_tree()
    monkeypatch.delenv("TANDEM_RADIX")
    want = NativeRadixTree if NATIVE_AVAILABLE else PyRadixTree
    assert type(make_radix_tree()) is want and type(make_radix_tree("auto")) is want
    if NATIVE_AVAILABLE:
        assert type(make_radix_tree("native")) is NativeRadixTree
    else:
        with pytest.raises(RuntimeError):
            make_radix_tree("native")


def test_env_var_forces_python_at_import() -> None:
    code = "from tandem.kvbm import radix as r; print(r.NATIVE, r.RadixTree.__name__, r.NATIVE_AVAILABLE)"
    env = {**os.environ, "TANDEM_RADIX": "python"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "PyRadixTree", str(NATIVE_AVAILABLE)]
    env.pop("TANDEM_RADIX")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[:2] == (
        ["True", "NativeRadixTree"] if NATIVE_AVAILABLE else ["False", "PyRadixTree"]
    )
    assert (radix.RadixTree is NativeRadixTree) == radix.NATIVE


# ---- differential: native == pure Python -------------------------------------------------------


def _compare(a: BaseRadixTree, b: BaseRadixTree, queries: list[list[int]]) -> None:
    assert a.num_blocks() == b.num_blocks()
    assert a.block_masks() == b.block_masks()  # same slots: same bit positions
    assert a.sequence_starts() == b.sequence_starts()
    assert a.workers() == b.workers()
    for w in a.workers():
        assert a.worker_num_blocks(w) == b.worker_num_blocks(w)
        assert a.last_event_id(w) == b.last_event_id(w)
    assert (a.gaps, a.unknown_parent_events, a.unknown_removed_blocks) == (
        b.gaps,
        b.unknown_parent_events,
        b.unknown_removed_blocks,
    )
    for q in queries:
        assert a.find_matches(q) == b.find_matches(q)


@native_only
@pytest.mark.parametrize("seed", range(4))
def test_random_streams_give_identical_results(seed: int) -> None:
    """Random stores (also with lost parents, duplicates, hashes 0 and 2**64-1), removals, clears,
    worker removals and restarts from up to 80 workers (masks of two words and more), events lost
    and out of order, half of the native side's events through its payload parser: both trees
    answer every query alike and hold the same blocks, counts and counters throughout."""
    rng = random.Random(seed)
    trunks = [[rng.randrange(3) for _ in range(BS * rng.randrange(1, 5))] for _ in range(6)]
    seqs = [
        [*rng.choice(trunks), *(rng.randrange(3) for _ in range(BS * rng.randrange(0, 6)))] for _ in range(40)
    ]
    hashes = [compute_block_hashes(s, BS) for s in seqs]
    edge = [[0, 1, U64], [U64, 0], [0]]
    universe = [h for h in hashes if h] + edge
    workers = [f"w{i}" for i in range(80 if seed % 2 else 12)]
    py, nat = PyRadixTree(), NativeRadixTree()
    next_id = dict.fromkeys(workers, 0)
    known: dict[str, list[int]] = {w: [] for w in workers}
    for step in range(1200):
        w = rng.choice(workers)
        r = rng.random()
        if r < 0.5:
            seq = rng.choice(universe)
            start = rng.randrange(len(seq))
            stop = rng.randrange(start + 1, len(seq) + 1)
            blocks = seq[start:stop] * (2 if rng.random() < 0.05 else 1)
            parent = None if start == 0 else seq[start - 1]
            data: KvStored | KvRemoved | KvCleared = KvStored(
                blocks=[StoredBlock(block_hash=h, tokens_hash=rng.getrandbits(64)) for h in blocks],
                parent_hash=parent,
            )
            known[w].extend(blocks)
        elif r < 0.8:
            pool = known[w] or [rng.getrandbits(64)]
            data = KvRemoved(block_hashes=[rng.choice(pool) for _ in range(rng.randrange(0, 5))])
        elif r < 0.85:
            data = KvCleared()
        elif r < 0.9:
            py.remove_worker(w)
            nat.remove_worker(w)
            next_id[w] = 0
            continue
        else:
            data = KvStored(blocks=[], parent_hash=rng.choice([None, 7]))
        if rng.random() < 0.05:
            next_id[w] += rng.randrange(1, 3)  # lost events: a gap
        if rng.random() < 0.02:
            next_id[w] = 0  # restart-like id
        ev = KvEvent(event_id=next_id[w], data=data)
        next_id[w] += 1
        gap_py = py.apply(w, ev)
        if rng.random() < 0.5:
            parsed = nat.parse(encode(KvEventBatch(worker_id=w, events=[ev])))
            assert parsed is not None and parsed[0] == w and len(parsed[1]) == 1
            gap_nat = nat.apply_parsed(w, *parsed[1][0])
        else:
            gap_nat = nat.apply(w, ev)
        assert gap_py == gap_nat
        if step % 20 == 0:
            queries = [rng.choice(hashes) for _ in range(8)] + edge + [[], [12345]]
            queries += [q[:k] for q in queries[:3] for k in range(len(q))]
            _compare(py, nat, queries)
    _compare(py, nat, hashes + edge)
    py.check_integrity()
    nat.check_integrity()
    for w in workers:
        py.remove_worker(w)
        nat.remove_worker(w)
    assert nat.num_blocks() == 0 and nat.block_masks() == {} and nat._t.capacity() == 4096  # shrunk


@native_only
def test_table_grows_shrinks_and_widens() -> None:
    """Tens of thousands of blocks (the table rehashes several times), 130 workers (three mask
    words), then removals down to nothing: the native tree matches the Python one at each stage."""
    py, nat = PyRadixTree(), NativeRadixTree()
    rng = random.Random(7)
    chains = [[rng.getrandbits(64) for _ in range(64)] for _ in range(400)]
    ids: dict[str, int] = {}

    def both(w: str, data: KvStored | KvRemoved | KvCleared) -> None:
        ev = KvEvent(event_id=ids.get(w, 0), data=data)
        ids[w] = ev.event_id + 1
        assert py.apply(w, ev) == nat.apply(w, ev)

    for i, chain in enumerate(chains):
        w = f"w{i % 130}"
        both(w, KvStored(blocks=[StoredBlock(block_hash=h, tokens_hash=0) for h in chain], parent_hash=None))
    assert nat._t.words() == 3 and nat._t.capacity() >= 2 * nat.num_blocks()
    _compare(py, nat, chains[:50])
    for i, chain in enumerate(chains):
        w = f"w{i % 130}"
        both(w, KvRemoved(block_hashes=chain[32:] if i % 3 else chain))
    _compare(py, nat, chains[:50])
    nat.check_integrity()
    for i in range(130):
        both(f"w{i}", KvCleared())
    assert nat.num_blocks() == 0 and nat._t.capacity() == 4096
    _compare(py, nat, chains[:5])


@native_only
def test_hashes_outside_u64_wrap_instead_of_failing() -> None:
    """msgspec decodes any msgpack int (-2**63 .. 2**64-1): a misbehaving worker's negative hash
    must not break the native tree. It is taken modulo 2**64 (documented difference)."""
    tree = NativeRadixTree()
    ev = KvEvent(event_id=0, data=KvStored(blocks=[StoredBlock(block_hash=-1, tokens_hash=-5)]))
    assert tree.apply("w", ev) is None
    assert tree.find_matches([U64]) == {"w": 1} == tree.find_matches([-1])
    ev = KvEvent(
        event_id=1, data=KvStored(blocks=[StoredBlock(block_hash=-3, tokens_hash=0)], parent_hash=-2)
    )
    assert tree.apply("w", ev) is None
    assert tree.unknown_parent_events == 1 and tree.num_blocks() == 2
    tree.apply("w", KvEvent(event_id=2, data=KvRemoved(block_hashes=[-(2**63), 2**64 - 1, -3])))
    assert tree.num_blocks() == 0 and tree.unknown_removed_blocks == 1
    assert tree.find_matches(["x", 1.5, None]) == {}  # type: ignore[list-item]


@native_only
def test_table_rejects_misuse() -> None:
    n = _native()
    with pytest.raises(ValueError):
        n.Table(0)
    t = n.Table(1, 99)
    with pytest.raises(ValueError):
        t.store(63, b"", False, None)  # slot 63 of one word is the sequence-start flag
    with pytest.raises(ValueError):
        t.store(-1, b"", False, None)
    with pytest.raises(ValueError):
        t.store(2**80, b"", False, None)
    with pytest.raises(TypeError):
        t.store("0", b"", False, None)
    with pytest.raises(ValueError):
        t.store(0, b"1234567", False, None)  # not whole u64s
    with pytest.raises(TypeError):
        t.store(0, b"", False, "parent")
    with pytest.raises(TypeError):
        t.store(0, b"")
    with pytest.raises(TypeError):
        t.set_name(0, b"bytes")
    with pytest.raises(TypeError):
        t.find(5)
    with pytest.raises(ValueError):
        t.widen(0)
    with pytest.raises(TypeError):
        n.parse("not bytes")
    # A block held by a slot that has no name: an error, not a crash.
    t.store(0, array("Q", [5]).tobytes(), True, None)
    with pytest.raises(RuntimeError, match="no name"):
        t.find([5])
    t.set_name(0, "a")
    assert t.find([5]) == {"a": 1} and t.find((5, 6)) == {"a": 1} and t.find(iter([5])) == {"a": 1}
    # Unaligned buffers of any kind work.
    raw = bytearray(b"x" + array("Q", [5, 6]).tobytes())
    assert t.store(0, memoryview(raw)[1:], False, 5) == (1, True)
    assert t.find([5, 6]) == {"a": 2}
    t.widen(2)
    assert t.find([5, 6]) == {"a": 2} and t.names()[:2] == ["a", None] and len(t.names()) == 127
    assert t.remove(0, memoryview(raw)[1:]) == 2 and t.size() == 0


@native_only
def test_table_dump_and_load() -> None:
    """dump() → load() copies a table (hash 0's side entry, start flags, any mask width whose extra
    words are 0, unaligned buffers); load() refuses what would corrupt the table and leaves it
    empty."""
    n = _native()
    le = lambda *xs: b"".join(x.to_bytes(8, "little") for x in xs)  # noqa: E731
    t = n.Table(2, 1)
    t.store(0, array("Q", [0, 7, 8]).tobytes(), True, None)
    t.store(100, array("Q", [8, 9]).tobytes(), False, 7)
    hashes, masks, roots = t.dump()
    assert len(hashes) == 4 * 8 and len(masks) == 4 * 16 and roots == le(0)
    counts = n.Table(2, 5).load(hashes, masks, 2, roots)
    assert counts[0] == 3 and counts[100] == 2 and sum(counts) == 5 and len(counts) == 127
    u = n.Table(2, 5)
    raw = bytearray(b"x" + masks)
    u.load(hashes, memoryview(raw)[1:], 2, roots)
    assert sorted(u.items()) == sorted(t.items())
    # One word per block into a two-word table, and three words whose last one is 0.
    one = n.Table(2, 3)
    assert one.load(le(5, 6), le(1, 3), 1, le(5))[:2] == [2, 1]
    three = n.Table(1, 3)
    assert three.load(le(5), le(1, 0, 0), 3, b"")[0] == 1
    for args, what in [
        ((le(5), le(1, 1), 2, b""), "past the last slot"),  # word 1 of a one-word table
        ((le(5), le(1 << 63), 1, b""), "past the last slot"),  # the start flag's bit
        ((le(5), le(0), 1, b""), "no slot"),
        ((le(5, 5), le(1, 1), 1, b""), "repeats"),
        ((le(5), le(1), 1, le(6)), "sequence start"),
        ((le(5), le(1), 1, b"123"), "lengths"),
        ((le(5), le(1, 1), 1, b""), "lengths"),
        ((le(5), le(1), 0, b""), "words"),
    ]:
        fresh = n.Table(1, 3)
        with pytest.raises(ValueError, match=what):
            fresh.load(*args)
        assert fresh.size() == 0 and fresh.dump() == (b"", b"", b"")
    with pytest.raises(ValueError, match="empty"):
        t.load(hashes, masks, 2, roots)
    with pytest.raises(TypeError):
        n.Table(1).load(le(5), le(1), 1)


# ---- the payload parser --------------------------------------------------------------------------


def _random_batch(rng: random.Random) -> KvEventBatch:
    events = []
    for _ in range(rng.randrange(0, 4)):
        r = rng.random()
        data: KvStored | KvRemoved | KvCleared
        if r < 0.5:
            edge = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, U64]
            data = KvStored(
                blocks=[
                    StoredBlock(
                        block_hash=rng.choice([*edge, rng.getrandbits(64)]), tokens_hash=rng.getrandbits(64)
                    )
                    for _ in range(rng.randrange(0, 18))
                ],
                parent_hash=rng.choice([None, 0, 5, rng.getrandbits(64)]),
            )
        elif r < 0.8:
            data = KvRemoved(
                block_hashes=[
                    rng.getrandbits(rng.choice([7, 16, 32, 64])) for _ in range(rng.randrange(0, 18))
                ]
            )
        else:
            data = KvCleared()
        events.append(KvEvent(event_id=rng.choice([0, 1, 200, 70000, 2**40, U64]), data=data))
    worker = rng.choice(["w", "", "wörker-1", "x" * 40, "y" * 300])
    return KvEventBatch(worker_id=worker, events=events)


def _as_parsed(data: bytes) -> Any:
    """What parse() must return for a payload msgspec accepts (or "rejected")."""
    try:
        batch = decode_kv_event_batch(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return "rejected"
    out = []
    for e in batch.events:
        d = e.data
        try:
            if isinstance(d, FastStored):
                out.append(
                    (e.event_id, 0, d.parent_hash, array("Q", [b.block_hash for b in d.blocks]).tobytes())
                )
            elif isinstance(d, FastRemoved):
                out.append((e.event_id, 1, None, array("Q", d.block_hashes).tobytes()))
            else:
                out.append((e.event_id, 2, None, b""))
        except OverflowError:  # a negative hash: parse() must not accept it
            return "negative"
    return batch.worker_id, out


def _check_parse(parse: Any, data: bytes) -> bool:
    """parse(data) is None, or equals msgspec's decoding; True if parsed."""
    got = parse(data)
    if got is None:
        return False
    assert got == _as_parsed(data), data
    return True


@native_only
def test_parser_takes_every_canonical_payload() -> None:
    parse = _native().parse
    rng = random.Random(1)
    for _ in range(3000):
        data = encode(_random_batch(rng))
        assert parse(data) == _as_parsed(data)
        assert parse(bytearray(data)) == parse(memoryview(data))


@native_only
def test_parser_fuzz_never_crashes_and_never_disagrees_with_msgspec() -> None:
    """Random mutations (byte flips, cuts, insertions, splices) of canonical payloads: the parser
    answers None or exactly msgspec's result, never an exception or a different value."""
    parse = _native().parse
    rng = random.Random(2)
    parsed = 0
    corpus = [encode(_random_batch(rng)) for _ in range(200)]
    for i in range(6000):
        m = bytearray(corpus[i % len(corpus)])
        for _ in range(rng.randrange(1, 4)):
            op = rng.random()
            if op < 0.45 and m:
                m[rng.randrange(len(m))] = rng.choice(
                    [rng.randrange(256), 0xC0, 0xCF, 0xDD, 0xDF, 0xDB, 0xFF, 0x00]
                )
            elif op < 0.6 and m:
                del m[rng.randrange(len(m)) :]
            elif op < 0.8:
                m.insert(rng.randrange(len(m) + 1), rng.randrange(256))
            else:
                other = rng.choice(corpus)
                a = rng.randrange(len(other) + 1)
                m[rng.randrange(len(m) + 1) :] = other[a:]
        parsed += _check_parse(parse, bytes(m))
    assert parsed > 100  # some mutations stay valid (e.g. a changed hash byte)


@native_only
def test_parser_every_single_byte_change_and_cut() -> None:
    parse = _native().parse
    batch = KvEventBatch(
        worker_id="w1",
        events=[
            KvEvent(
                event_id=3,
                data=KvStored(blocks=[StoredBlock(block_hash=2**40, tokens_hash=9)], parent_hash=1),
            ),
            KvEvent(event_id=4, data=KvRemoved(block_hashes=[300, 0])),
            KvEvent(event_id=5, data=KvCleared()),
        ],
    )
    data = encode(batch)
    assert _check_parse(parse, data)
    for cut in range(len(data)):
        assert parse(data[:cut]) is None
    for i in range(len(data)):
        for v in range(256):
            _check_parse(parse, data[:i] + bytes([v]) + data[i + 1 :])


@native_only
def test_parser_hostile_lengths_and_shapes() -> None:
    """Lengths far beyond the payload, deep or odd shapes, valid-but-unusual encodings: None (the
    msgspec fallback decides), never a big allocation or a crash."""
    parse = _native().parse
    head = b"\x83\xa4kind\xa9kv_events\xa9worker_id\xa1w\xa6events"
    ev = b"\x83\xa4kind\xa7KvEvent\xa8event_id\x00\xa4data"
    hostile = [
        b"",
        b"\xc0",
        b"\xdf\xff\xff\xff\xff",  # map32 of 4G entries
        head + b"\xdd\xff\xff\xff\xff",  # array32 of 4G events
        head + b"\x91" + ev + b"\x82\xa4kind\xa6stored\xa6blocks\xdd\xff\xff\xff\xff",
        head + b"\x91" + ev + b"\x82\xa4kind\xa7removed\xacblock_hashes\xdd\x7f\xff\xff\xff\x01",
        head + b"\x91" + ev + b"\x81\xa4kind\xa7cleared" + b"\x00",  # trailing byte
        b"\x83\xa4kind\xa9kv_events\xa9worker_id\xdb\xff\xff\xff\xff",  # str32 past the end
        b"\x83\xa4kind\xa9kv_events\xa9worker_id\xa2\xff\xff\xa6events\x90",  # not UTF-8
        b"\x83\xa4kind\xa9kv_events\xa9worker_id\xa3\xed\xa0\x80\xa6events\x90",  # a surrogate
        b"\x84\xa4kind\xa9kv_events\xa4kind\xa9kv_events\xa9worker_id\xa1w\xa6events\x90",  # dup key
        head + b"\x91" + ev + b"\x81\xa4kind\xa7cleared" + b"\xa4more",
        encode(OverlapQuery(request_id="x", block_hashes=[1])),
        b"\x91" * 100000,
    ]
    for data in hostile:
        assert parse(data) is None, data
    # Valid for msgspec, just not in the canonical form: None, then msgspec decodes it.
    reordered = msgspec.msgpack.encode(
        {
            "events": [{"data": {"block_hashes": [1], "kind": "removed"}, "event_id": 0, "kind": "KvEvent"}],
            "worker_id": "w",
            "kind": "kv_events",
        }
    )
    assert parse(reordered) is None and decode_kv_event_batch(reordered).worker_id == "w"
    negative = msgspec.msgpack.encode(
        {
            "kind": "kv_events",
            "worker_id": "w",
            "events": [{"kind": "KvEvent", "event_id": -1, "data": {"kind": "cleared"}}],
        }
    )
    assert parse(negative) is None and decode_kv_event_batch(negative).events[0].event_id == -1
    # Non-fixed-size encodings of the canonical shape are fine: str8 keys, uint64 small ints.
    wide = b"\x83\xd9\x04kind\xa9kv_events\xa9worker_id\xa1w\xa6events\xdc\x00\x01" + (
        b"\x83\xa4kind\xa7KvEvent\xa8event_id\xcf"
        + (7).to_bytes(8, "big")
        + b"\xa4data\x81\xa4kind\xa7cleared"
    )
    assert parse(wide) == ("w", [(7, 2, None, b"")]) == _as_parsed(wide)


# ---- the indexer's two paths ---------------------------------------------------------------------


def _indexer(monkeypatch: pytest.MonkeyPatch, impl: str) -> KvIndexer:
    monkeypatch.setenv("TANDEM_RADIX", impl)
    svc = types.SimpleNamespace(
        js=None, subjects=Subjects("t"), log=structlog.get_logger("t"), jetstream_replicas=1
    )
    ix = KvIndexer(svc)  # type: ignore[arg-type]
    assert impl == ix.tree.IMPL
    return ix


@native_only
def test_indexer_fast_path_equals_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same payloads (canonical, reordered, bad, restarts, gaps, hostile hashes) through an
    indexer on the native tree (C parser, msgspec fallback) and one on the pure-Python tree: the
    same counters and scores."""
    native, python = _indexer(monkeypatch, "native"), _indexer(monkeypatch, "python")
    rng = random.Random(5)
    payloads: list[tuple[str, bytes]] = []
    subject = native.svc.subjects.kv_events
    for i in range(300):
        b = _random_batch(rng)
        b = KvEventBatch(worker_id=f"w{i % 7}", events=b.events)
        payloads.append((subject(b.worker_id), encode(b)))
        if i % 10 == 0:  # the same batch, keys reordered: msgspec takes it, the C parser does not
            raw = msgspec.to_builtins(b)
            payloads.append((subject(b.worker_id), msgspec.msgpack.encode(dict(reversed(list(raw.items()))))))
        if i % 25 == 0:
            payloads.append((payloads[-1][0], payloads[-1][1][:-1]))  # truncated: bad
        if i % 50 == 0:
            payloads.append((subject("w-other"), payloads[-1][1]))  # another worker's subject: bad
    payloads.append((subject("w0"), b"\xc1garbage"))
    with structlog.testing.capture_logs():
        for s, p in payloads:
            native._apply_payload(s, p)
            python._apply_payload(s, p)
    for attr in ("batches", "events", "bad_payloads", "gaps", "restarts"):
        assert getattr(native, attr) == getattr(python, attr), attr
    assert native.bad_payloads >= 13 and native.restarts > 0 and native.gaps > 0
    _compare(native.tree, python.tree, [list(range(k)) for k in range(3)])
    assert native.tree.block_masks() == python.tree.block_masks()
