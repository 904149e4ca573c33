"""KvCacheManager: per-request block tables on top of the :class:`BlockPool`.

The only KV object the engine touches. A request's life, in vLLM v1 ``KVCacheManager`` terms:

1. :meth:`KvCacheManager.begin` — find the longest cached prefix (full blocks whose sequence
   hash *and* tokens match) and take references on those blocks. Returns the number of cached
   tokens, capped so the last prompt token is always computed (the model needs its logits).
2. :meth:`KvCacheManager.grow` — before each step, make sure the request has blocks for all the
   tokens it will hold after the step (all-or-nothing; ``False`` means preempt or wait).
3. :meth:`KvCacheManager.commit` — register the blocks that are full and computed *by the end
   of the step* in the prefix cache, extending the request's sequence hashes from its token ids
   as generation goes on (so generated text is cacheable too). Emits ``KvStored``. The
   scheduler calls it when it schedules the step, as vLLM v1 caches blocks in
   ``allocate_slots``: a request admitted later in the same step takes those blocks as a prefix
   hit, and the forward pass writes every layer's K/V before any attention reads it, so the
   hit reads what its owner writes in the same pass. If the step then fails for the owner,
   :meth:`KvCacheManager.uncommit` takes the registration back.
4. :meth:`KvCacheManager.free` — release the blocks, last block first, so the deepest blocks are
   evicted first. A preempted request is simply freed and ``begin`` again later: its committed
   blocks are likely still cached.

Disaggregation adds two hand-offs. On the prefill worker, :meth:`KvCacheManager.pin` moves a
finished prefill's blocks to a holder keyed by request id while a decode worker READs them via
NIXL; :meth:`KvCacheManager.unpin` releases them on the NIXL notification (or expiry). On the
decode worker, :meth:`KvCacheManager.import_blocks` reuses the cached prefix and allocates the
blocks to READ into.

Units: ``num_tokens``/``num_computed_tokens`` are tokens; block tables are lists of block ids in
token order (block ``i`` holds tokens ``[i*B, (i+1)*B)``). Input errors raise ``KeyError``
(unknown/duplicate request id) or ``ValueError`` (bad sizes, hashes, block ids).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from tandem.kvbm.hashing import compute_local_hashes, lora_seed, sequence_hash
from tandem.kvbm.pool import BlockPool, PoolIntegrityError
from tandem.protocol.messages import KvEvent


@dataclass(frozen=True, slots=True)
class ManagerStats:
    """Block counts (blocks). ``free + cached + in_use == num_blocks``; ``pinned`` blocks are a
    subset of ``in_use`` (distinct blocks held by pinned transfers)."""

    num_blocks: int
    free: int
    cached: int
    in_use: int
    pinned: int
    requests: int = 0
    pinned_requests: int = 0


@dataclass(slots=True)
class _Request:
    block_ids: list[int] = field(default_factory=list)
    # Hashes of the request's full blocks known so far (same length); extended by commit().
    seq_hashes: list[int] = field(default_factory=list)
    local_hashes: list[int] = field(default_factory=list)
    # Leading blocks already registered in the prefix cache (or skipped as duplicates).
    num_committed_blocks: int = 0
    hash_seed: int = 0


class KvCacheManager:
    """Block tables of the requests of one engine, and the prefix cache they share.

    ``num_blocks`` blocks of ``block_size`` tokens. With ``enable_prefix_caching=False`` nothing
    is ever hit or registered and no KV events are emitted. Not thread-safe.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        *,
        max_pending_events: int = 100_000,
    ) -> None:
        self.pool = BlockPool(
            num_blocks, block_size, enable_prefix_caching, max_pending_events=max_pending_events
        )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._requests: dict[str, _Request] = {}
        self._pinned: dict[str, list[int]] = {}

    # ---- queries -------------------------------------------------------------------------------

    def num_free_blocks(self) -> int:
        """Blocks allocatable now: free plus cached-but-unreferenced (evictable)."""
        return self.pool.num_free_blocks()

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def is_pinned(self, request_id: str) -> bool:
        return request_id in self._pinned

    def block_table(self, request_id: str) -> list[int]:
        """The request's block ids in token order (a copy). ``KeyError`` if unknown."""
        return list(self._get(request_id).block_ids)

    def num_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """How many more blocks :meth:`grow` needs to hold ``num_tokens`` tokens."""
        return max(0, self._blocks_for(num_tokens) - len(self._get(request_id).block_ids))

    def lookup_prefix(
        self,
        token_ids: Sequence[int],
        block_hashes: Sequence[int] | None = None,
        *,
        lora_name: str | None = None,
    ) -> int:
        """Number of leading full blocks of ``token_ids`` cached now (blocks, not tokens).

        Takes no references and changes nothing. Not capped: :meth:`begin` reuses at most
        ``(len(token_ids) - 1) // block_size`` of them. ``block_hashes``: as in :meth:`begin`.
        """
        seq, _ = self._hashes(token_ids, block_hashes, lora_seed(lora_name))
        return len(self._find_cached(token_ids, seq, len(seq)))

    def stats(self) -> ManagerStats:
        ps = self.pool.stats()
        pinned = len({b for blocks in self._pinned.values() for b in blocks})
        return ManagerStats(
            num_blocks=ps.num_blocks,
            free=ps.free,
            cached=ps.cached,
            in_use=ps.in_use,
            pinned=pinned,
            requests=len(self._requests),
            pinned_requests=len(self._pinned),
        )

    # ---- request life cycle --------------------------------------------------------------------

    def begin(
        self,
        request_id: str,
        token_ids: Sequence[int],
        block_hashes: Sequence[int] | None = None,
        *,
        lora_name: str | None = None,
        local_hashes: Sequence[int] | None = None,
    ) -> int:
        """Start (or restart after preemption) a request: take refs on its cached prefix.

        ``token_ids``: every token the request has (prompt, plus generated tokens when resuming
        a preempted request); must be non-empty. ``block_hashes``: sequence hashes of (a prefix
        of) its full blocks as computed by the frontend, or None to compute them here; they are
        checked against ``token_ids`` (``ValueError`` on mismatch: wrong block size or LoRA).
        ``local_hashes``: the local hashes matching ``block_hashes`` one for one, computed by
        the caller from these very tokens with this block size (the engine does at
        ``add_request``): then neither is computed again, only the blocks past them (the
        generated tokens of a resumed request) are hashed.

        Returns the number of cached tokens: a multiple of ``block_size``, at most
        ``len(token_ids) - 1`` so the last token is always computed. The request then owns
        those blocks; call :meth:`grow` for the rest. ``KeyError`` if the request already has
        blocks.
        """
        if request_id in self._requests:
            raise KeyError(f"request {request_id!r} already has blocks (free it first)")
        if len(token_ids) == 0:
            raise ValueError(f"request {request_id!r}: token_ids is empty")
        seed = lora_seed(lora_name)
        seq, local = self._hashes(token_ids, block_hashes, seed, local_hashes)
        max_hit = (len(token_ids) - 1) // self.block_size
        hits = self._find_cached(token_ids, seq, max_hit)
        self.pool.touch(hits)
        self._requests[request_id] = _Request(
            block_ids=hits,
            seq_hashes=seq,
            local_hashes=local,
            num_committed_blocks=len(hits),
            hash_seed=seed,
        )
        return len(hits) * self.block_size

    def grow(self, request_id: str, num_tokens: int) -> bool:
        """Ensure the request has blocks for ``num_tokens`` tokens in total.

        Allocates ``ceil(num_tokens / block_size) - len(block_table)`` blocks (evicting cached
        blocks LRU-first if needed). Returns False, changing nothing, if not enough blocks are
        free or evictable. Never shrinks. ``KeyError`` if unknown, ``ValueError`` if
        ``num_tokens < 0``.
        """
        req = self._get(request_id)
        need = self._blocks_for(num_tokens) - len(req.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free_blocks():
            return False
        req.block_ids.extend(self.pool.allocate(need))
        return True

    def commit(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the request's blocks that are full and computed (or will be by the end of
        the step being scheduled); emit ``KvStored``.

        ``token_ids``: all the request's tokens so far (the ones passed to :meth:`begin`
        followed by everything generated); ``num_computed_tokens``: how many of them have KV in
        the request's blocks (tokens). Blocks ``[committed, num_computed_tokens // B)`` are
        hashed (extending the sequence-hash chain) and registered; the partial last block never
        is. Cheap when no block became full. ``ValueError`` if ``num_computed_tokens`` exceeds
        ``len(token_ids)`` or the tokens the blocks can hold.
        """
        req = self._get(request_id)
        bs = self.block_size
        if not 0 <= num_computed_tokens <= len(token_ids):
            raise ValueError(
                f"request {request_id!r}: num_computed_tokens {num_computed_tokens} not in "
                f"[0, len(token_ids)={len(token_ids)}]"
            )
        if num_computed_tokens > len(req.block_ids) * bs:
            raise ValueError(
                f"request {request_id!r}: {num_computed_tokens} computed tokens but only "
                f"{len(req.block_ids)} blocks ({len(req.block_ids) * bs} tokens); call grow() first"
            )
        n_full = num_computed_tokens // bs
        start = req.num_committed_blocks
        if n_full <= start:
            return
        if not self.enable_prefix_caching:
            req.num_committed_blocks = n_full
            return
        known = len(req.seq_hashes)
        if n_full > known:  # generated tokens filled new blocks: extend the chain
            new_local = compute_local_hashes(token_ids[known * bs : n_full * bs], bs, req.hash_seed)
            prev = req.seq_hashes[-1] if req.seq_hashes else None
            for local in new_local:
                prev = sequence_hash(prev, local)
                req.seq_hashes.append(prev)
            req.local_hashes.extend(new_local)
        self.pool.cache_blocks(
            req.block_ids[start:n_full],
            req.seq_hashes[start:n_full],
            req.local_hashes[start:n_full],
            token_ids[start * bs : n_full * bs],
            req.seq_hashes[start - 1] if start > 0 else None,
        )
        req.num_committed_blocks = n_full

    def uncommit(self, request_id: str, num_tokens: int) -> list[str]:
        """Take back the registration of the request's blocks past its first ``num_tokens``
        tokens: the step that was to compute them failed, so their KV is garbage.

        Unregisters the blocks this request registered from block ``num_tokens // B`` on (a
        block registered under another request's hash, or skipped as a duplicate, is left
        alone) and emits ``KvRemoved`` for them. Returns the ids of the *other* requests
        holding any of those blocks — they took them as a prefix hit in the same step, so
        their KV is invalid too (the caller fails them). ``KeyError`` if unknown.
        """
        req = self._get(request_id)
        first = max(0, num_tokens) // self.block_size
        if first >= req.num_committed_blocks:
            return []
        dropped = [
            bid
            for i, bid in enumerate(req.block_ids[first : req.num_committed_blocks], start=first)
            if i < len(req.seq_hashes) and self.pool.block_hash(bid) == req.seq_hashes[i]
        ]
        req.num_committed_blocks = first
        if not dropped:
            return []
        self.pool.uncache_blocks(dropped)
        gone = set(dropped)
        return [
            rid for rid, r in self._requests.items() if rid != request_id and not gone.isdisjoint(r.block_ids)
        ]

    def free(self, request_id: str) -> None:
        """Release all the request's blocks, last block first, and forget it. ``KeyError`` if
        unknown. Registered blocks stay cached (evictable) for later prefix hits."""
        req = self._requests.pop(request_id, None)
        if req is None:
            raise KeyError(f"unknown request {request_id!r}")
        self.pool.release(req.block_ids)

    def pin(self, request_id: str) -> list[int]:
        """Hand the request's blocks to a pinned holder (same references) and return them.

        Used on a prefill worker while a decode worker READs the KV: the request itself is gone
        (``KeyError`` from its other methods) but the blocks stay in use until
        :meth:`unpin`. Call :meth:`commit` first so the blocks are cached once unpinned.
        ``KeyError`` if the request is unknown or something is already pinned under its id.
        """
        if request_id in self._pinned:
            raise KeyError(f"request {request_id!r} is already pinned")
        req = self._requests.pop(request_id, None)
        if req is None:
            raise KeyError(f"unknown request {request_id!r}")
        self._pinned[request_id] = req.block_ids
        return list(req.block_ids)

    def unpin(self, request_id: str, *, missing_ok: bool = False) -> None:
        """Release the blocks pinned by :meth:`pin` (on the NIXL notification or at expiry).

        ``KeyError`` if nothing is pinned under ``request_id``, unless ``missing_ok`` (for when
        the notification and the expiry race).
        """
        blocks = self._pinned.pop(request_id, None)
        if blocks is None:
            if missing_ok:
                return
            raise KeyError(f"nothing pinned for request {request_id!r}")
        self.pool.release(blocks)

    def import_blocks(
        self,
        request_id: str,
        token_ids: Sequence[int],
        block_hashes: Sequence[int] | None,
        num_tokens: int,
        *,
        lora_name: str | None = None,
    ) -> tuple[list[int], int] | None:
        """Blocks for a request prefilled elsewhere, whose KV will be READ into them.

        Reuses every leading full block of the first ``num_tokens`` tokens that is cached here
        (no cap: nothing is recomputed), allocates the rest of ``ceil(num_tokens / B)`` blocks.
        Returns ``(block_table, num_reused_blocks)``: the caller transfers the KV of
        ``block_table[num_reused_blocks:]`` and then calls ``commit(request_id, token_ids,
        num_tokens)``. Returns None, changing nothing, if not enough blocks are free.
        ``KeyError`` if the request already has blocks; ``ValueError`` unless
        ``1 <= num_tokens <= len(token_ids)`` or if ``block_hashes`` disagree with the tokens.
        """
        if request_id in self._requests:
            raise KeyError(f"request {request_id!r} already has blocks (free it first)")
        if not 1 <= num_tokens <= len(token_ids):
            raise ValueError(
                f"request {request_id!r}: num_tokens {num_tokens} not in [1, len(token_ids)={len(token_ids)}]"
            )
        seed = lora_seed(lora_name)
        seq, local = self._hashes(token_ids, block_hashes, seed)
        hits = self._find_cached(token_ids, seq, num_tokens // self.block_size)
        need = self._blocks_for(num_tokens) - len(hits)
        # Hits that are cached (refcount 0) stop being allocatable once we take them.
        available = self.pool.num_free_blocks() - sum(1 for b in hits if self.pool.is_evictable(b))
        if need > available:
            return None
        self.pool.touch(hits)
        block_ids = hits + self.pool.allocate(need)
        self._requests[request_id] = _Request(
            block_ids=block_ids,
            seq_hashes=seq,
            local_hashes=local,
            num_committed_blocks=len(hits),
            hash_seed=seed,
        )
        return list(block_ids), len(hits)

    # ---- cache-wide ----------------------------------------------------------------------------

    def take_events(self) -> list[KvEvent]:
        """Pending KV events (``KvStored``/``KvRemoved``/``KvCleared``), oldest first; drained."""
        return self.pool.take_events()

    def clear(self) -> None:
        """Drop every cached block and emit ``KvCleared``. Running and pinned requests keep their
        blocks (unregistered: they are freed, not cached, when released)."""
        self.pool.clear()

    def check_integrity(self) -> None:
        """Raise :class:`PoolIntegrityError` unless the pool is consistent and every block's
        refcount equals the number of request tables and pinned holders that list it."""
        self.pool.check_integrity()
        errors: list[str] = []
        refs: Counter[int] = Counter()
        for rid, req in self._requests.items():
            if len(set(req.block_ids)) != len(req.block_ids):
                errors.append(f"request {rid!r} lists a block twice")
            if len(req.seq_hashes) != len(req.local_hashes):
                errors.append(
                    f"request {rid!r} has {len(req.seq_hashes)} seq / {len(req.local_hashes)} local hashes"
                )
            if req.num_committed_blocks > min(len(req.block_ids), len(req.seq_hashes)):
                errors.append(f"request {rid!r} committed {req.num_committed_blocks} blocks beyond its table")
            refs.update(req.block_ids)
        for rid, blocks in self._pinned.items():
            if len(set(blocks)) != len(blocks):
                errors.append(f"pinned request {rid!r} lists a block twice")
            refs.update(blocks)
        for block in self.pool.blocks:
            if block.ref_cnt != refs[block.block_id]:
                errors.append(
                    f"block {block.block_id} has refcount {block.ref_cnt} but {refs[block.block_id]} holders"
                )
        if errors:
            raise PoolIntegrityError("; ".join(errors[:20]))

    # ---- helpers -------------------------------------------------------------------------------

    def _get(self, request_id: str) -> _Request:
        req = self._requests.get(request_id)
        if req is None:
            raise KeyError(f"unknown request {request_id!r}")
        return req

    def _blocks_for(self, num_tokens: int) -> int:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def _hashes(
        self,
        token_ids: Sequence[int],
        block_hashes: Sequence[int] | None,
        seed: int,
        local_hashes: Sequence[int] | None = None,
    ) -> tuple[list[int], list[int]]:
        """(sequence hashes, local hashes) of the full blocks of ``token_ids``, checking the
        caller's ``block_hashes`` (a prefix of the sequence hashes) against them, or, given the
        matching ``local_hashes`` too (see :meth:`begin`), extending both past them."""
        if not self.enable_prefix_caching:
            return [], []
        bs = self.block_size
        n_full = len(token_ids) // bs
        seq: list[int] = []
        local: list[int] = []
        trusted = False
        if local_hashes is not None and block_hashes is not None:
            trusted = len(local_hashes) == len(block_hashes) <= n_full
            if trusted:
                seq, local = list(block_hashes), list(local_hashes)
        more = compute_local_hashes(token_ids[len(local) * bs : n_full * bs], bs, seed)
        prev = seq[-1] if seq else None
        for h in more:
            prev = sequence_hash(prev, h)
            seq.append(prev)
        local += more
        if trusted:
            return seq, local
        if block_hashes is not None:
            n = len(block_hashes)
            if n > len(seq) or list(block_hashes) != seq[:n]:
                raise ValueError(
                    f"block_hashes ({n}) do not match the {len(seq)} full blocks of token_ids "
                    f"(block size {self.block_size}; different block size or LoRA?)"
                )
        return seq, local

    def _find_cached(self, token_ids: Sequence[int], seq_hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Leading cached block ids, at most ``max_blocks`` (no references taken)."""
        bs = self.block_size
        hits: list[int] = []
        for i in range(min(max_blocks, len(seq_hashes))):
            block_id = self.pool.get_cached(seq_hashes[i], token_ids[i * bs : (i + 1) * bs])
            if block_id is None:
                break
            hits.append(block_id)
        return hits


__all__ = ["KvCacheManager", "ManagerStats", "PoolIntegrityError"]
