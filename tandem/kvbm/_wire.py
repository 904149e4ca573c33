"""Fast decoding of :class:`~tandem.protocol.messages.KvEventBatch` payloads for the KV indexer.

The indexer decodes every KV event message of every worker, so it uses lighter mirrors of the
protocol Structs: same msgpack wire format, same tags and fields, same validation
(``msgspec.DecodeError`` / ``msgspec.ValidationError`` on exactly the payloads the protocol
decoder rejects), but declared ``gc=False`` so that the hundreds of thousands of block Structs a
busy indexer decodes per second are never tracked by Python's cyclic garbage collector. (Decoded
messages hold only ints, strings and lists of them: they cannot form reference cycles.)
``apply`` of both radix trees (:mod:`tandem.kvbm.radix`) accepts these events as well as the
protocol ones. With the native tree the indexer first tries its C parser
(``NativeRadixTree.parse``), which takes exactly the payloads tandem's encoder writes and answers
None for anything else; this decoder then accepts or rejects them.

Tags are taken from the protocol classes, so the two cannot drift apart silently; the unit tests
also check that both decoders agree.
"""

from __future__ import annotations

import msgspec

from tandem.protocol import messages as _m


def _tag(cls: type[msgspec.Struct]) -> str:
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


class FastStoredBlock(
    msgspec.Struct, gc=False, omit_defaults=True, tag_field="kind", tag=_tag(_m.StoredBlock)
):
    """Mirror of :class:`~tandem.protocol.messages.StoredBlock` (sequence and local hash, u64)."""

    block_hash: int
    tokens_hash: int


class FastStored(msgspec.Struct, gc=False, omit_defaults=True, tag_field="kind", tag=_tag(_m.KvStored)):
    """Mirror of :class:`~tandem.protocol.messages.KvStored`."""

    blocks: list[FastStoredBlock]
    parent_hash: int | None = None


class FastRemoved(msgspec.Struct, gc=False, omit_defaults=True, tag_field="kind", tag=_tag(_m.KvRemoved)):
    """Mirror of :class:`~tandem.protocol.messages.KvRemoved` (sequence hashes)."""

    block_hashes: list[int]


class FastCleared(msgspec.Struct, gc=False, omit_defaults=True, tag_field="kind", tag=_tag(_m.KvCleared)):
    """Mirror of :class:`~tandem.protocol.messages.KvCleared`."""


class FastKvEvent(msgspec.Struct, gc=False, omit_defaults=True, tag_field="kind", tag=_tag(_m.KvEvent)):
    """Mirror of :class:`~tandem.protocol.messages.KvEvent`."""

    event_id: int
    data: FastStored | FastRemoved | FastCleared


class FastKvEventBatch(
    msgspec.Struct, gc=False, omit_defaults=True, tag_field="kind", tag=_tag(_m.KvEventBatch)
):
    """Mirror of :class:`~tandem.protocol.messages.KvEventBatch`."""

    worker_id: str
    events: list[FastKvEvent]


_decoder = msgspec.msgpack.Decoder(FastKvEventBatch)


def decode_kv_event_batch(data: bytes | bytearray | memoryview) -> FastKvEventBatch:
    """Decode a msgpack ``KvEventBatch`` payload (as :func:`tandem.protocol.messages.encode`
    writes it). Raises ``msgspec.DecodeError`` / ``msgspec.ValidationError`` on bad input, and
    ``UnicodeDecodeError`` for a string that is not UTF-8 (msgspec raises that one as is)."""
    return _decoder.decode(data)


__all__ = [
    "FastCleared",
    "FastKvEvent",
    "FastKvEventBatch",
    "FastRemoved",
    "FastStored",
    "FastStoredBlock",
    "decode_kv_event_batch",
]
