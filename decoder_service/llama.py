"""The Llama text model of a LLaVA checkpoint, in plain torch, shaped for XLA.

Two entry points, each traced into one graph per bucket:
- `prefill`: packed prompts of several sequences, `[T]` tokens, attention within each
  prompt only (segment ids), keys/values written to the cache at (slot, position).
- `decode`: one token for each of `[B]` sequences, attending over the first
  `attention_len` cache positions of its slot.
Positions, slots and segment ids are tensors; the only Python ints are bucket sizes.
Numerics follow transformers' Llama (RMSNorm in float32, rotate-half RoPE, GQA),
so greedy tokens match `LlavaForConditionalGeneration.generate`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from decoder_service.kv_cache import KVCache


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

    def prefill(self, x, cos, sin, mask, cache: KVCache, layer: int, slots, positions):
        # x: [T, hidden]; mask: [T, T] bool, True where query t may attend key s
        q, k, v = self._qkv(x, cos, sin)
        cache.write(layer, slots, positions, k, v)
        t, kv, group = x.shape[0], self.num_kv_heads, self.num_heads // self.num_kv_heads
        # As in decode: one batch dim (kv_heads); a group's queries share their K/V head, so they
        # stack as rows (GQA without materialising repeated K/V).
        q = q.view(t, kv, group, self.head_dim).permute(1, 2, 0, 3)
        q = q.reshape(kv, group * t, self.head_dim)
        k, v = k.permute(1, 0, 2), v.permute(1, 0, 2)  # [kv, T, D]
        scores = torch.bmm(q, k.transpose(1, 2)).float() * self.scale  # [kv, G*T, T]
        scores = scores.view(kv, group, t, t).masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = scores.softmax(dim=-1).to(v.dtype).view(kv, group * t, t)
        out = torch.bmm(probs, v).view(kv, group, t, self.head_dim)  # [kv, G, T, D]
        return self.o_proj(out.permute(2, 0, 1, 3).reshape(t, -1))

    def decode(self, x, cos, sin, mask, cache: KVCache, layer: int, slots, positions, attention_len):
        # x: [B, hidden]; mask: [B, attention_len] bool over cache positions
        q, k, v = self._qkv(x, cos, sin)
        cache.write(layer, slots, positions, k, v)
        keys, values = cache.read(layer, slots, attention_len)  # [B, kv_heads, A, D]
        # One batch dim (B * kv_heads) for both products: XLA:CPU runs such a bmm ~1.5-2x
        # faster than the two-batch-dim einsum; on TPU both lower to the same dot.
        b, a, group = x.shape[0], attention_len, self.num_heads // self.num_kv_heads
        keys = keys.reshape(b * self.num_kv_heads, a, self.head_dim)
        values = values.reshape(b * self.num_kv_heads, a, self.head_dim)
        q = q.reshape(b * self.num_kv_heads, group, self.head_dim)
        scores = torch.bmm(q, keys.transpose(1, 2)).float() * self.scale  # [B*kv, G, A]
        allowed = mask[:, None, None, :].expand(b, self.num_kv_heads, 1, a).reshape(-1, 1, a)
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        out = torch.bmm(scores.softmax(dim=-1).to(values.dtype), values)  # [B*kv, G, D]
        return self.o_proj(out.reshape(b, -1))


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

    def prefill(self, embeds, positions, slots, segments, last_index, cos_table, sin_table,
                cache: KVCache) -> torch.Tensor:
        """embeds: [T, hidden] (images already merged); returns logits [P, vocab] of the
        tokens at `last_index` [P]."""
        cos, sin = cos_table[positions], sin_table[positions]
        mask = (segments[:, None] == segments[None, :]) & (positions[None, :] <= positions[:, None])
        h = embeds
        for i, layer in enumerate(self.layers):
            h = h + layer.self_attn.prefill(layer.input_layernorm(h), cos, sin, mask, cache, i,
                                            slots, positions)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.norm(h.index_select(0, last_index))).float()

    def decode(self, token_ids, positions, slots, key_positions, cos_table, sin_table,
               cache: KVCache) -> torch.Tensor:
        """token_ids, positions, slots: [B]; key_positions: [attention_len], 0..A-1 (a static
        length: one graph per attention-length bucket). Returns logits [B, vocab]."""
        attention_len = key_positions.shape[0]
        cos, sin = cos_table[positions], sin_table[positions]
        mask = key_positions[None, :] <= positions[:, None]
        h = self.embed_tokens(token_ids)
        for i, layer in enumerate(self.layers):
            h = h + layer.self_attn.decode(layer.input_layernorm(h), cos, sin, mask, cache, i,
                                           slots, positions, attention_len)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.norm(h)).float()
