"""Static KV cache: fixed buffers indexed by (slot, position), written in place.

Per layer, keys and values are `[num_slots + 1, num_kv_heads, max_model_len, head_dim]`:
a slot's rows for one head are contiguous, so a decode step's gather is already the
`[B * kv_heads, positions, head_dim]` operand of its attention matmuls.
Slot `num_slots` is scratch: padded rows of a batch write there, so padding never
touches a live sequence and needs no masking on the write path. Slots and positions
are device tensors, so a write is one scatter whose shape depends only on the batch
bucket.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, *, num_layers: int, num_slots: int, max_model_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_slots + 1, num_kv_heads, max_model_len, head_dim)
        self.num_slots = num_slots
        self.scratch_slot = num_slots
        self._heads = torch.arange(num_kv_heads).to(device)[None, :]  # made once: arange is slow on XLA
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        # slots, positions: [N]; k, v: [N, num_kv_heads, head_dim]
        index = (slots[:, None], self._heads, positions[:, None])  # broadcasts to [N, kv_heads]
        self.keys[layer].index_put_(index, k)
        self.values[layer].index_put_(index, v)

    def read(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `slots` for positions [0, length): [B, kv_heads, length, head_dim].
        `length` is an attention-length bucket (a static size, one graph per bucket)."""
        k = self.keys[layer][:, :, :length].index_select(0, slots)
        v = self.values[layer][:, :, :length].index_select(0, slots)
        return k, v
