"""The KV block pool, kept on the host: allocation, reference counts and the prefix cache.

Pure bookkeeping over block ids; the tensors live in `kv_cache.PagedKVCache`.
Block 0 is the null block: never handed out, it absorbs the writes of padded rows
and pads block tables. Called only from the engine thread.

Prefix cache: a full block is named by a hash chain, `hash(parent, its token ids,
the images overlapping it)`, where an image is its full-width cache key (the
encoder's) and the offset into the image at which the block starts to overlap it.
Image placeholders are one repeated token id, so without the keys two different
pictures would share blocks. A computed full block is registered under its hash;
when its last user releases it, it stays cached and becomes evictable (LRU). A new
sequence takes the longest chain of cached blocks and computes only the rest.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import msgpack

from decoder_service.sequence import Sequence

NULL_BLOCK = 0


def block_hash(parent: bytes, token_ids: list[int], images: list[tuple[str, int]]) -> bytes:
    """One link of the chain. `images`: (cache key, offset into the image) per overlapping image."""
    payload = msgpack.packb([parent, token_ids, images])
    return hashlib.blake2b(payload, digest_size=16).digest()


def extend_block_hashes(seq: Sequence, block_size: int, num_full: int) -> list[bytes]:
    """Extends `seq.block_hashes` to its first `num_full` full blocks; returns them."""
    hashes = seq.block_hashes
    for i in range(len(hashes), num_full):
        start, end = i * block_size, (i + 1) * block_size
        images = [(span.key, span.image_offset + max(span.start, start) - span.start)
                  for span in seq.images
                  if span.start < end and start < span.start + span.length]
        parent = hashes[-1] if hashes else b""
        hashes.append(block_hash(parent, seq.token_ids(start, end).tolist(), images))
    return hashes[:num_full]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs the null block and at least one more, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(1, num_blocks))  # hold nothing worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; LRU first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        # Prompt tokens looked up in the prefix cache when a request is first admitted, and of
        # those, found cached. A preempted sequence finding its own blocks again is not a hit.
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take (free, or cached and evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def match_prefix(self, hashes: list[bytes]) -> list[int]:
        """Cached blocks for the longest prefix of `hashes` (nothing taken yet)."""
        blocks = []
        if self.enable_prefix_caching:
            for h in hashes:
                block = self._block_of.get(h)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def blocks_to_admit(self, cached: list[int], new_blocks: int) -> int:
        """Free blocks a sequence would consume: its new blocks plus cached ones now evictable."""
        return new_blocks + sum(1 for b in cached if b in self._evictable)

    def acquire(self, cached: list[int]) -> None:
        """Takes cached blocks for a sequence being admitted."""
        for block in cached:
            self._evictable.pop(block, None)
            self._refs[block] += 1

    def count_lookup(self, num_tokens: int, cached_blocks: int) -> None:
        """A new request's prompt of `num_tokens` found `cached_blocks` blocks cached."""
        self.queried_tokens += num_tokens
        self.hit_tokens += cached_blocks * self.block_size

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise RuntimeError(f"asked for {count} KV blocks, {self.num_free} free")  # a scheduler bug
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(block)]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Drops one reference to each block. The tail goes first, so a sequence's later blocks
        are evicted before its prefix, which more requests share."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def register(self, blocks: list[int], hashes: list[bytes]) -> None:
        """Names computed full blocks by their hashes (first come, first named)."""
        if not self.enable_prefix_caching:
            return
        for block, h in zip(blocks, hashes):
            if block not in self._hash_of and h not in self._block_of:
                self._hash_of[block] = h
                self._block_of[h] = block
