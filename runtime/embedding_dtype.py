"""How an embedding is stored in the object store, in the decoder's dtype.

numpy has no bfloat16, so a bfloat16 embedding travels as the raw 16-bit patterns in
an int16 array of the same shape (`EmbeddingMeta.dtype` says "bfloat16"); torch does
the rounding on the way in (imported then: the router and the CLI use this module
and never load torch); widening is a shift. Half the bytes of float32 in the
encoder's cache, the object store and the transfer to the decoder.
"""

from __future__ import annotations

import numpy as np

EMBEDDING_DTYPES = ("float32", "bfloat16")
_ITEM_BYTES = {"float32": 4, "bfloat16": 2}


def check_dtype(dtype: str) -> str:
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"embedding dtype must be one of {', '.join(EMBEDDING_DTYPES)}; got {dtype!r}")
    return dtype


def embedding_bytes(num_tokens: int, hidden_size: int, dtype: str) -> int:
    """What one stored [num_tokens, hidden_size] embedding costs."""
    return num_tokens * hidden_size * _ITEM_BYTES[check_dtype(dtype)]


def to_stored(array: np.ndarray, dtype: str) -> np.ndarray:
    """A float32 [tokens, hidden] array as it is stored in `dtype`."""
    if check_dtype(dtype) == "float32":
        return np.ascontiguousarray(array, np.float32)
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(torch.bfloat16).view(
        torch.int16).numpy()


def to_float32(stored: np.ndarray, dtype: str) -> np.ndarray:
    """A stored embedding widened back to float32 (exact: bfloat16 is float32's top half)."""
    if check_dtype(dtype) == "float32":
        return np.asarray(stored, np.float32)
    if stored.dtype != np.int16:
        raise ValueError(f"a bfloat16 embedding is stored as int16 bit patterns, got {stored.dtype}")
    return (stored.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
