"""The Llama text model of a LLaVA checkpoint, in plain torch, shaped for XLA.

Two entry points, each traced into one graph per bucket pair:
- `prefill`: chunks of several prompts packed as `[C]` tokens; their keys and values
  are written to the paged cache, then every token attends over the step's context
  blocks `[K]` (the prompts' blocks, one after another), masked to its own prompt
  and to earlier positions. A chunk thus sees its cached prefix and earlier chunks.
- `decode`: one token for each of `[B]` sequences, attending over its block table
  `[B, M]`, masked to its context length.
Positions, block ids and masks are tensors; the only Python ints are bucket sizes.
Numerics follow transformers' Llama (RMSNorm in float32, rotate-half RoPE, GQA),
so greedy tokens match `LlavaForConditionalGeneration.generate`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from decoder_service.kv_cache import PagedKVCache


class Linear(nn.Module):
    """y = x @ weight (+ bias), with `weight` stored [in, out]: transposed from torch's
    [out, in]. Checkpoint weights are transposed on load. XLA:CPU emits a much faster dot
    for this layout at small batch (measured here, a 768 x 30528 head at batch 2: 122 ms as
    `F.linear`, 19 ms as `x @ w`); on TPU the layout is XLA's choice either way."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"  # state dicts keep torch's [out, in] convention
        if key in state_dict:
            state_dict[key] = state_dict[key].t().contiguous()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = destination[prefix + "weight"].t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_table(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_len, head_dim], computed like transformers' default RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [N, heads, head_dim]; cos, sin: [N, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        bias = getattr(cfg, "attention_bias", False)
        self.q_proj = Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=bias)

    def _qkv(self, x, cos, sin):
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def prefill(self, x, cos, sin, mask, cache: PagedKVCache, layer: int, write_blocks,
                write_offsets, context_blocks):
        # x: [C, hidden]; mask: [C, K * block_size] bool, True where query t may attend key s
        q, k, v = self._qkv(x, cos, sin)
        cache.write(layer, write_blocks, write_offsets, k, v)
        keys, values = cache.gather(layer, context_blocks)  # [kv, S, D], S = K * block_size
        t, kv, group = x.shape[0], self.num_kv_heads, self.num_heads // self.num_kv_heads
        s = keys.shape[1]
        # One batch dim (kv_heads); a group's queries share their K/V head, so they stack as
        # rows (GQA without materialising repeated K/V).
        q = q.view(t, kv, group, self.head_dim).permute(1, 2, 0, 3).reshape(kv, group * t, self.head_dim)
        scores = torch.bmm(q, keys.transpose(1, 2)).float() * self.scale  # [kv, G*C, S]
        scores = scores.view(kv, group, t, s).masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = scores.softmax(dim=-1).to(values.dtype).view(kv, group * t, s)
        out = torch.bmm(probs, values).view(kv, group, t, self.head_dim)  # [kv, G, C, D]
        return self.o_proj(out.permute(2, 0, 1, 3).reshape(t, -1))

    def decode(self, x, cos, sin, allowed, cache: PagedKVCache, layer: int, write_blocks,
               write_offsets, block_tables):
        # x: [B, hidden]; block_tables: [B, M]; allowed: [kv * B, 1, M * block_size] bool
        q, k, v = self._qkv(x, cos, sin)
        cache.write(layer, write_blocks, write_offsets, k, v)
        b, kv, group = x.shape[0], self.num_kv_heads, self.num_heads // self.num_kv_heads
        keys, values = cache.gather(layer, block_tables.reshape(-1))  # [kv, B * A, D]
        # One batch dim (kv_heads * B) for both products: XLA:CPU runs such a bmm ~1.5-2x
        # faster than the two-batch-dim einsum; on TPU both lower to the same dot.
        keys, values = keys.reshape(kv * b, -1, self.head_dim), values.reshape(kv * b, -1, self.head_dim)
        q = q.view(b, kv, group, self.head_dim).transpose(0, 1).reshape(kv * b, group, self.head_dim)
        scores = torch.bmm(q, keys.transpose(1, 2)).float() * self.scale  # [kv*B, G, A]
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        out = torch.bmm(scores.softmax(dim=-1).to(values.dtype), values)  # [kv*B, G, D]
        return self.o_proj(out.view(kv, b, -1).transpose(0, 1).reshape(b, -1))


class MLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        bias = getattr(cfg, "mlp_bias", False)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaTextModel(nn.Module):
    """Parameter names match the checkpoint's text half (`runtime.checkpoint.text_state_dict`
    with the `language_model.` prefix dropped)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}: Llama uses silu")
        rope = getattr(cfg, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_type {rope.get('rope_type')!r}")
        self.rope_theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.head_dim = self.layers[0].self_attn.head_dim
        self.num_kv_heads = cfg.num_key_value_heads

    def prefill(self, embeds, positions, write_blocks, write_offsets, query_seq, context_blocks,
                key_seq, key_positions, last_index, cos_table, sin_table,
                cache: PagedKVCache) -> torch.Tensor:
        """embeds: [C, hidden] (images already merged); returns logits [P, vocab] of the
        tokens at `last_index` [P]."""
        cos, sin = cos_table[positions], sin_table[positions]
        mask = (key_seq[None, :] == query_seq[:, None]) & (key_positions[None, :] <= positions[:, None])
        h = embeds
        for i, layer in enumerate(self.layers):
            h = h + layer.self_attn.prefill(layer.input_layernorm(h), cos, sin, mask, cache, i,
                                            write_blocks, write_offsets, context_blocks)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.norm(h.index_select(0, last_index))).float()

    def decode(self, token_ids, positions, write_blocks, write_offsets, block_tables, context_lens,
               key_positions, cos_table, sin_table, cache: PagedKVCache) -> torch.Tensor:
        """token_ids, positions, context_lens: [B]; block_tables: [B, M]; key_positions:
        [M * block_size], 0..A-1. Returns logits [B, vocab]."""
        b = token_ids.shape[0]
        cos, sin = cos_table[positions], sin_table[positions]
        allowed = key_positions[None, :] < context_lens[:, None]  # [B, A]
        allowed = allowed[None, :, None, :].expand(self.num_kv_heads, b, 1, -1).reshape(
            self.num_kv_heads * b, 1, -1)
        h = self.embed_tokens(token_ids)
        for i, layer in enumerate(self.layers):
            h = h + layer.self_attn.decode(layer.input_layernorm(h), cos, sin, allowed, cache, i,
                                           write_blocks, write_offsets, block_tables)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.norm(h)).float()
