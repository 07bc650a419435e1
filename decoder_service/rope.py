"""Rotary position tables from a Llama text config, computed once on the host.

The decoder reads cos/sin rows by position (`llama.apply_rotary`), so a RoPE variant whose
frequencies do not change with the sequence's length is just another table: `default`, and
transformers' `linear`, `llama3` and `yarn` scalings, whose inverse frequencies and attention
factor come from `transformers.modeling_rope_utils` (the functions transformers' own Llama
calls). `dynamic` scaling changes the frequencies only past `max_position_embeddings`, so it
is static when the served length stays within it; past that, and for the other types, the
frequencies depend on each sequence's length and the replica refuses the checkpoint by name.
"""

from __future__ import annotations

import torch

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_type(cfg) -> str:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return rope.get("rope_type", "default")


def check_rope(cfg, max_len: int | None = None) -> None:
    """Raises a ValueError naming the rope_type when its table would change with the length
    (`max_len`: the positions served; None: not known yet, so `dynamic` passes)."""
    kind = rope_type(cfg)
    if kind in STATIC_ROPE_TYPES:
        return
    limit = getattr(cfg, "max_position_embeddings", None)
    if kind == "dynamic" and (max_len is None or (limit is not None and max_len <= limit)):
        return
    raise ValueError(
        f"unsupported rope_type {kind!r}" + (
            f" past max_position_embeddings ({limit}) with max_model_len {max_len}: its "
            "frequencies change with the sequence's length" if kind == "dynamic" else
            f": supported are {', '.join(STATIC_ROPE_TYPES)}, and dynamic within "
            "max_position_embeddings"))


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
