"""The Llama text model of a LLaVA checkpoint, in plain torch, shaped for XLA.

Three entry points, each traced into one graph per bucket pair:
- `prefill`: chunks of several prompts packed as `[C]` tokens; their keys and values
  are written to the paged cache, then every token attends over the step's context
  blocks `[K]` (the prompts' blocks, one after another), masked to its own prompt
  and to earlier positions. A chunk thus sees its cached prefix and earlier chunks.
- `decode`: one token for each of `[B]` sequences, attending over its block table
  `[B, M]`, masked to its context length.
- `mixed`: both in one pass, for a step that decodes half a batch or more (padded to B)
  and also prefills: the B + C rows go through each weight once; only attention is split
  in two.
Positions, block ids and masks are tensors; the only Python ints are bucket sizes.
Numerics follow transformers' Llama (RMSNorm in float32, rotate-half RoPE, GQA),
so greedy tokens match `LlavaForConditionalGeneration.generate`. Mistral's and Qwen2's text
models are the same computation (Qwen2 with biases on q/k/v; `text_config.check_text_config`
says which configs qualify), and the RoPE variants differ only in their cos/sin tables
(`decoder_service/rope.py`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from decoder_service.kv_cache import PagedKVCache
from decoder_service.text_config import check_text_config, projection_biases


# XLA:CPU's dot kernel reads the weight in place and streams all of it once per eight rows
# of activations; blocks of this many output columns (four of its 48-column panels) fit the
# L2 cache, so the later passes hit it. Cut this way, the down projection (its weight is
# the widest input) made a 12-layer MLP chain 10-22 % faster at 16-144 rows, for three
# more dots a layer (docs/benchmarks.md, Issue 13, fifteenth and sixteenth sessions). Each
# dot is a kernel, and each kernel costs the process three memory maps (docs/decoder.md):
# wider models, whose blocks would neither fit the cache nor be few, stay whole.
CPU_DOT_COLUMNS = 192
CPU_DOT_MAX_BLOCKS = 4
# The LM head has too many columns for a dot a block. Stacked as [blocks, in, columns] it is
# one batched dot, whose batch loop runs a block's columns for every row before the next
# block: the weight streams from memory once instead of once per eight rows, where a block
# fits the core's L2 cache (the runner reads its size from the host). A 768 x 30,528 head so
# made a batch-16 decode step ~5 % faster on a 2 MiB L2, 8 and fewer rows the same; on a
# 1 MiB L2, where a block does not fit, stacked and whole ran alike (docs/benchmarks.md,
# Issue 13, seventeenth and eighteenth sessions).
CPU_HEAD_COLUMNS = 512


class Linear(nn.Module):
    """y = x @ weight (+ bias), with `weight` stored [in, out]: transposed from torch's
    [out, in]. Checkpoint weights are transposed on load. XLA:CPU emits a much faster dot
    for this layout at small batch (measured here, a 768 x 30528 head at batch 2: 122 ms as
    `F.linear`, 19 ms as `x @ w`); on TPU the layout is XLA's choice either way.

    `cut_columns` may store the weight as column blocks instead, one dot each, the outputs
    concatenated; `stack_columns` as `[blocks, in, width]`, one batched dot. Either way every
    output is the same sum over the same inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.blocks: nn.ParameterList | None = None  # the weight's column blocks, once cut
        self.stacked: nn.Parameter | None = None  # [blocks, in, width], once stacked

    def cut_columns(self, width: int, max_blocks: int) -> None:
        """Stores the weight as blocks of at most `width` output columns, after loading; left
        whole where one block holds it all, or where it would take more than `max_blocks`."""
        if self.blocks is not None or not 1 < -(-self.weight.shape[1] // width) <= max_blocks:
            return
        self.blocks = nn.ParameterList(nn.Parameter(block.contiguous(), requires_grad=False)
                                       for block in self.weight.data.split(width, dim=1))
        del self.weight

    def stack_columns(self, width: int, cache_bytes: int) -> None:
        """Stores the weight as `[blocks, in, width]` column blocks (the last one zero-padded),
        one batched dot for all of them, after loading. Left whole where one block holds it,
        where a block would not fit `cache_bytes`, or where it is not float32 (in bfloat16,
        XLA:CPU's batched dot rounds unlike its plain one: greedy tokens would drift from
        transformers')."""
        if self.blocks is not None or self.stacked is not None:
            return
        fan_in, out = self.weight.shape
        if (self.weight.dtype != torch.float32 or out <= width
                or fan_in * width * self.weight.element_size() > cache_bytes):
            return
        blocks = -(-out // width)
        padded = F.pad(self.weight.data, (0, blocks * width - out))
        self.stacked = nn.Parameter(padded.view(fan_in, blocks, width).transpose(0, 1).contiguous(),
                                    requires_grad=False)
        del self.weight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"  # state dicts keep torch's [out, in] convention
        if key in state_dict:
            state_dict[key] = state_dict[key].t().contiguous()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.blocks is None and self.stacked is None:  # once cut or stacked, it holds those
            destination[prefix + "weight"] = destination[prefix + "weight"].t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stacked is not None:
            rows = x.reshape(-1, x.shape[-1])
            y = torch.bmm(rows[None].expand(self.stacked.shape[0], -1, -1), self.stacked)
            y = y.transpose(0, 1).reshape(*x.shape[:-1], -1)[..., :self.out_features]
        elif self.blocks is None:
            y = x @ self.weight
        else:
            y = torch.cat([x @ block for block in self.blocks], dim=-1)
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


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [N, heads, head_dim]; cos, sin: [N, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class ChunkRows(NamedTuple):
    """Prompt chunks packed as C rows (device tensors)."""

    embeds: torch.Tensor  # [C, hidden], images already merged
    positions: torch.Tensor  # [C]
    write_blocks: torch.Tensor  # [C]
    write_offsets: torch.Tensor  # [C]
    query_seq: torch.Tensor  # [C]: which prompt of the step a token belongs to
    context_blocks: torch.Tensor  # [K]: the prompts' blocks, one after another
    key_seq: torch.Tensor  # [K * block_size]
    key_positions: torch.Tensor  # [K * block_size]: a key's position in its prompt
    last_index: torch.Tensor  # [P]: each prompt's last row in the chunk

    def mask(self) -> torch.Tensor:
        """[C, K * block_size]: a token sees its own prompt's keys up to its position."""
        return ((self.key_seq[None, :] == self.query_seq[:, None])
                & (self.key_positions[None, :] <= self.positions[:, None]))


class DecodeRows(NamedTuple):
    """One token for each of B sequences (device tensors)."""

    token_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    write_blocks: torch.Tensor  # [B]
    write_offsets: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, M]
    context_lens: torch.Tensor  # [B]
    key_positions: torch.Tensor  # [M * block_size]: 0..A-1

    def allowed(self, num_kv_heads: int) -> torch.Tensor:
        """[kv * B, 1, A]: a sequence sees its keys below its context length."""
        b = self.token_ids.shape[0]
        allowed = self.key_positions[None, :] < self.context_lens[:, None]  # [B, A]
        return allowed[None, :, None, :].expand(num_kv_heads, b, 1, -1).reshape(num_kv_heads * b, 1, -1)


class Attention(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        bias, o_bias = projection_biases(cfg)
        self.q_proj = Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=o_bias)

    def qkv(self, x, cos, sin):
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend_chunks(self, q, mask, cache: PagedKVCache, layer: int, context_blocks):
        """Packed prompt chunks. q: [C, heads, D]; mask: [C, K * block_size] bool, True where
        query t may attend key s. Returns [C, heads * D]."""
        keys, values = cache.gather(layer, context_blocks)  # [kv, S, D], S = K * block_size
        t, kv, group = q.shape[0], self.num_kv_heads, self.num_heads // self.num_kv_heads
        s = keys.shape[1]
        # One batch dim (kv_heads); a group's queries share their K/V head, so they stack as
        # rows (GQA without materialising repeated K/V).
        q = q.view(t, kv, group, self.head_dim).permute(1, 2, 0, 3).reshape(kv, group * t, self.head_dim)
        scores = torch.bmm(q, keys.transpose(1, 2)).float() * self.scale  # [kv, G*C, S]
        scores = scores.view(kv, group, t, s).masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = scores.softmax(dim=-1).to(values.dtype).view(kv, group * t, s)
        out = torch.bmm(probs, values).view(kv, group, t, self.head_dim)  # [kv, G, C, D]
        return out.permute(2, 0, 1, 3).reshape(t, -1)

    def attend_decodes(self, q, allowed, cache: PagedKVCache, layer: int, block_tables):
        """One token per sequence. q: [B, heads, D]; block_tables: [B, M]; allowed:
        [kv * B, 1, M * block_size] bool. Returns [B, heads * D]."""
        b, kv, group = q.shape[0], self.num_kv_heads, self.num_heads // self.num_kv_heads
        keys, values = cache.gather(layer, block_tables.reshape(-1))  # [kv, B * A, D]
        # One batch dim (kv_heads * B) for both products: XLA:CPU runs such a bmm ~1.5-2x
        # faster than the two-batch-dim einsum; on TPU both lower to the same dot.
        keys, values = keys.reshape(kv * b, -1, self.head_dim), values.reshape(kv * b, -1, self.head_dim)
        q = q.view(b, kv, group, self.head_dim).transpose(0, 1).reshape(kv * b, group, self.head_dim)
        scores = torch.bmm(q, keys.transpose(1, 2)).float() * self.scale  # [kv*B, G, A]
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        out = torch.bmm(scores.softmax(dim=-1).to(values.dtype), values)  # [kv*B, G, D]
        return out.view(kv, b, -1).transpose(0, 1).reshape(b, -1)


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

    def __init__(self, cfg, max_len: int | None = None) -> None:
        """`max_len`: the positions the replica serves, where known (see `check_text_config`)."""
        super().__init__()
        check_text_config(cfg, max_len)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.head_dim = self.layers[0].self_attn.head_dim
        self.num_kv_heads = cfg.num_key_value_heads

    def cut_down_projections(self, width: int = CPU_DOT_COLUMNS,
                             max_blocks: int = CPU_DOT_MAX_BLOCKS) -> None:
        """Every MLP's down projection as column blocks (`Linear.cut_columns`): where the dots
        run on XLA's CPU backend, whose kernel streams each weight once per eight rows."""
        for layer in self.layers:
            layer.mlp.down_proj.cut_columns(width, max_blocks)

    def stack_head(self, cache_bytes: int, width: int = CPU_HEAD_COLUMNS) -> None:
        """The head as stacked column blocks (`Linear.stack_columns`) where a block fits
        `cache_bytes` (the host core's L2 cache): where the dots run on XLA's CPU backend."""
        self.lm_head.stack_columns(width, cache_bytes)

    def prefill(self, c: ChunkRows, cos_table, sin_table, cache: PagedKVCache) -> torch.Tensor:
        """Returns logits [P, vocab] of the tokens at `c.last_index` [P]."""
        mask = c.mask()
        h = self._layers(c.embeds, c.positions, c.write_blocks, c.write_offsets, cos_table,
                         sin_table, cache,
                         lambda attn, i, q: attn.attend_chunks(q, mask, cache, i, c.context_blocks))
        return self.lm_head(self.norm(h.index_select(0, c.last_index))).float()

    def decode(self, d: DecodeRows, cos_table, sin_table, cache: PagedKVCache) -> torch.Tensor:
        """Returns logits [B, vocab]."""
        allowed = d.allowed(self.num_kv_heads)
        h = self._layers(self.embed_tokens(d.token_ids), d.positions, d.write_blocks,
                         d.write_offsets, cos_table, sin_table, cache,
                         lambda attn, i, q: attn.attend_decodes(q, allowed, cache, i, d.block_tables))
        return self.lm_head(self.norm(h)).float()

    def mixed(self, d: DecodeRows, c: ChunkRows, cos_table, sin_table,
              cache: PagedKVCache) -> torch.Tensor:
        """A decode batch and prompt chunks in one pass: their B + C rows share every weight
        read (projections, MLP, head); only attention is split, each part over its own
        blocks. Returns logits [B + P, vocab]: the decodes', then the chunks' last tokens'."""
        b = d.token_ids.shape[0]
        allowed, mask = d.allowed(self.num_kv_heads), c.mask()

        def attend(attn: Attention, i: int, q: torch.Tensor) -> torch.Tensor:
            return torch.cat((attn.attend_decodes(q[:b], allowed, cache, i, d.block_tables),
                              attn.attend_chunks(q[b:], mask, cache, i, c.context_blocks)))
        h = self._layers(torch.cat((self.embed_tokens(d.token_ids), c.embeds)),
                         torch.cat((d.positions, c.positions)),
                         torch.cat((d.write_blocks, c.write_blocks)),
                         torch.cat((d.write_offsets, c.write_offsets)),
                         cos_table, sin_table, cache, attend)
        rows = torch.cat((h[:b], h[b:].index_select(0, c.last_index)))
        return self.lm_head(self.norm(rows)).float()

    def _layers(self, h, positions, write_blocks, write_offsets, cos_table, sin_table,
                cache: PagedKVCache, attend) -> torch.Tensor:
        """Runs every layer over rows `h` [N, hidden]: each writes its keys and values into the
        cache, then `attend(attention, layer, q [N, heads, D])` -> [N, heads * D]."""
        cos, sin = cos_table[positions], sin_table[positions]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = attn.qkv(layer.input_layernorm(h), cos, sin)
            cache.write(i, write_blocks, write_offsets, k, v)
            h = h + attn.o_proj(attend(attn, i, q))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h
