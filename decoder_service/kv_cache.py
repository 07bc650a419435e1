"""Paged KV cache: a pool of fixed-size blocks per layer, written and read by block id.

Per layer, keys and values are `[num_kv_heads, num_blocks, block_size, head_dim]`.
Heads lead so that gathering the blocks of B sequences (`index_select` on dim 1)
yields `[kv_heads, B * blocks, block_size, head_dim]`, which is already the
`[kv_heads * B, positions, head_dim]` operand of a one-batch-dim attention matmul:
no transpose of the gathered keys. Block ids and offsets are device tensors, so a
write is one scatter whose shape depends only on the step's bucket. The host's
`BlockManager` decides which block is whose; block 0 takes padded rows' writes.
"""

from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_kv_heads, num_blocks, block_size, head_dim)
        self.block_size = block_size
        self._heads = torch.arange(num_kv_heads).to(device)[:, None]  # made once: arange is slow on XLA
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Every layer's keys, then every layer's values: the state a replayed step updates."""
        return [*self.keys, *self.values]

    def replace(self, tensors: list[torch.Tensor]) -> None:
        """Takes a step's new state (`tensors`' order); the old tensors' buffers were donated."""
        n = len(self.keys)
        self.keys, self.values = list(tensors[:n]), list(tensors[n:])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def write(self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        # blocks, offsets: [N]; k, v: [N, kv_heads, head_dim]
        index = (self._heads, blocks[None, :], offsets[None, :])  # broadcasts to [kv_heads, N]
        self.keys[layer].index_put_(index, k.transpose(0, 1))
        self.values[layer].index_put_(index, v.transpose(0, 1))

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """blocks: [M] -> keys, values [kv_heads, M * block_size, head_dim]."""
        k = self.keys[layer].index_select(1, blocks)
        v = self.values[layer].index_select(1, blocks)
        return k.flatten(1, 2), v.flatten(1, 2)
