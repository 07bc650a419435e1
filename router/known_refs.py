"""The embedding references a router replica remembers, within a byte budget.

Each remembered `EmbeddingRef` keeps its object alive in Ray's object store (after
the encoder evicted it too), so what counts is the bytes of the array it pins,
from its metadata (`runtime.embedding_dtype.embedding_bytes`). Past `capacity_bytes`
the least recently used are dropped; a reference larger than the whole budget is
not kept (0 keeps none: the encoder's affinity routing does the caching).

Not thread-safe: the router's event loop is its only caller.
"""

from __future__ import annotations

from collections import OrderedDict

from runtime.embedding_dtype import embedding_bytes
from runtime.messages import EmbeddingRef


def ref_bytes(ref: EmbeddingRef) -> int:
    return embedding_bytes(ref.meta.num_tokens, ref.meta.hidden_size, ref.meta.dtype)


class KnownRefs:
    def __init__(self, capacity_bytes: int) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"known_refs_bytes must be an integer >= 0, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self.bytes = 0
        self._refs: OrderedDict[str, EmbeddingRef] = OrderedDict()

    def get(self, key: str) -> EmbeddingRef | None:
        ref = self._refs.get(key)
        if ref is not None:
            self._refs.move_to_end(key)
        return ref

    def remember(self, key: str, ref: EmbeddingRef) -> None:
        self.forget(key)
        size = ref_bytes(ref)
        if size > self.capacity_bytes:
            return
        self._refs[key] = ref
        self.bytes += size
        while self.bytes > self.capacity_bytes:
            _, old = self._refs.popitem(last=False)
            self.bytes -= ref_bytes(old)

    def forget(self, key: str) -> None:
        old = self._refs.pop(key, None)
        if old is not None:
            self.bytes -= ref_bytes(old)

    def __len__(self) -> int:
        return len(self._refs)
