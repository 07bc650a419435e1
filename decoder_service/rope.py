"""Rotary position tables from a Llama text config, computed once on the host.

The decoder reads cos/sin rows by position (`llama.apply_rotary`), so each RoPE variant it
serves (`text_config.STATIC_ROPE_TYPES`, and `dynamic` within `max_position_embeddings`) is
just another table: `default` computed here, the scalings' inverse frequencies and attention
factor from `transformers.modeling_rope_utils`, the functions transformers' own Llama calls.
"""

from __future__ import annotations

import torch

from decoder_service.text_config import check_rope, rope_type


def rotary_table(cfg, head_dim: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_len, head_dim] float32, as transformers' Llama computes them."""
    check_rope(cfg, max_len)
    kind = rope_type(cfg)
    if kind == "default":
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq, scale = 1.0 / (theta ** exponents), 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale
