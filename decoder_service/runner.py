"""Model runner: weights, the paged KV cache and the compiled steps on the device.

Compile discipline (after vLLM's TPU model runner):
- inputs are prepared on the host (`decoder_service.inputs`), padded to buckets, and
  moved to the device once per graph call; outputs come back as one packed tensor;
- a graph is embed (+ image merge), layers, sampling. Inside it there is no `.item()`,
  no `.cpu()`, no boolean-mask indexing, no data-dependent shape;
- `warm_up` runs every (chunk tokens, context blocks) prefill graph and every (batch,
  blocks) decode graph once, from `DecoderShapes`, the lists the runtime pads to;
- after warm-up the compile guard checks every call; a new graph is a bug.
The runner makes no policy decisions: the scheduler chooses what runs.
Not thread-safe: one engine thread calls it.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from decoder_service.config import DecoderConfig, DecoderShapes, KVGeometry, derive_shapes
from decoder_service.inputs import DecodeInputs, PrefillInputs
from decoder_service.kv_cache import PagedKVCache
from decoder_service.llama import LlamaTextModel, rotary_table
from decoder_service.sampler import index_tensors, sample
from runtime.checkpoint import Checkpoint, text_state_dict
from runtime.compile_guard import CompileGuard
from runtime.device import Device

log = logging.getLogger(__name__)


def load_text_model(checkpoint: Checkpoint, dtype: torch.dtype) -> LlamaTextModel:
    model = LlamaTextModel(checkpoint.config.text_config)
    tensors = {k.removeprefix("language_model."): v for k, v in text_state_dict(checkpoint).items()}
    model.load_state_dict(tensors, strict=True)
    return model.to(dtype).eval()


def kv_geometry(text_config, dtype: torch.dtype) -> KVGeometry:
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return KVGeometry(num_layers=text_config.num_hidden_layers,
                      num_kv_heads=text_config.num_key_value_heads or heads, head_dim=head_dim,
                      dtype_bytes=torch.empty(0, dtype=dtype).element_size())


class ModelRunner:
    def __init__(self, config: DecoderConfig, checkpoint: Checkpoint, device: Device) -> None:
        text = checkpoint.config.text_config
        self.device = device
        self.dtype = getattr(torch, config.dtype)
        self.shapes: DecoderShapes = derive_shapes(config, text.max_position_embeddings,
                                                   kv_geometry(text, self.dtype))
        self.vocab_size = int(text.vocab_size)
        self.hidden_size = int(text.hidden_size)
        self.model = load_text_model(checkpoint, self.dtype).to(device.torch_device)
        cos, sin = rotary_table(self.model.head_dim, self.shapes.max_model_len, self.model.rope_theta)
        self.cos, self.sin = cos.to(device.torch_device), sin.to(device.torch_device)
        # Constant index vectors, made once: torch.arange on the XLA device costs ms per call.
        positions = self.shapes.max_blocks_per_seq * self.shapes.block_size
        self.key_positions = torch.arange(positions).to(device.torch_device)
        self.sampler_indices = index_tensors(self.vocab_size, device.torch_device)
        self.cache = PagedKVCache(num_layers=len(self.model.layers), num_blocks=self.shapes.num_blocks,
                                  block_size=self.shapes.block_size,
                                  num_kv_heads=self.model.num_kv_heads, head_dim=self.model.head_dim,
                                  dtype=self.dtype, device=device.torch_device)
        # Materialise weights, tables and cache as device data now: left pending, they would
        # fold into the first warm-up graph, which then differs from the same step at run time.
        device.sync()
        self.guard = CompileGuard(device, strict=config.strict_compile, name="decoder")
        self.warmup_seconds = 0.0

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device.torch_device)

    @torch.no_grad()
    def _prefill(self, x: PrefillInputs) -> torch.Tensor:
        d = self._to_device
        embeds = self.model.embed_tokens(d(x.token_ids))
        embeds = torch.where(d(x.is_image)[:, None], d(x.image_rows).to(embeds.dtype), embeds)
        logits = self.model.prefill(embeds, d(x.positions), d(x.write_blocks), d(x.write_offsets),
                                    d(x.query_seq), d(x.context_blocks), d(x.key_seq),
                                    d(x.key_positions), d(x.last_index), self.cos, self.sin, self.cache)
        return sample(logits, **x.sampling.to(self.device.torch_device), **self.sampler_indices)

    @torch.no_grad()
    def _decode(self, x: DecodeInputs) -> torch.Tensor:
        d = self._to_device
        attended = x.block_tables.shape[1] * self.shapes.block_size
        logits = self.model.decode(d(x.token_ids), d(x.positions), d(x.write_blocks),
                                   d(x.write_offsets), d(x.block_tables), d(x.context_lens),
                                   self.key_positions[:attended], self.cos, self.sin, self.cache)
        return sample(logits, **x.sampling.to(self.device.torch_device), **self.sampler_indices)

    def prefill(self, inputs: PrefillInputs) -> np.ndarray:
        """Runs one prefill graph; returns sampled rows [max_prefill_seqs, ...] (`sampler.sample`)."""
        return self._run(self._prefill, inputs, "prefill tokens=%d context_blocks=%d" % inputs.graph)

    def decode(self, inputs: DecodeInputs) -> np.ndarray:
        """Runs one decode graph; returns sampled rows [batch bucket, ...]."""
        return self._run(self._decode, inputs, "decode batch=%d blocks=%d" % inputs.graph)

    def _run(self, trace, inputs, what: str) -> np.ndarray:
        with self.guard.step(what):
            out = trace(inputs)
            self.device.sync()
            return out.cpu().numpy()

    def warm_up(self) -> None:
        """Compiles every graph the runtime can ask for, logging one line per graph."""
        shapes = self.shapes
        self.guard.start_warmup()
        started = time.perf_counter()
        prefill, decode = shapes.prefill_graphs(), shapes.decode_graphs()
        log.info("decoder: compiling %d prefill graphs and %d decode graphs", len(prefill), len(decode))
        for tokens, blocks in prefill:
            t0 = time.perf_counter()
            self.prefill(PrefillInputs.padding(tokens, blocks, shapes, self.hidden_size, self.vocab_size))
            log.info("decoder:   -- prefill tokens=%d context_blocks=%d: %.2f s", tokens, blocks,
                     time.perf_counter() - t0)
        for batch, blocks in decode:
            t0 = time.perf_counter()
            self.decode(DecodeInputs.padding(batch, blocks, self.vocab_size))
            log.info("decoder:   -- decode batch=%d blocks=%d: %.2f s", batch, blocks,
                     time.perf_counter() - t0)
        self.guard.mark_warm()
        self.warmup_seconds = time.perf_counter() - started
        log.info("decoder: warm-up finished in %.2f s (%d compilations)", self.warmup_seconds,
                 self.guard.warmup_compilations)
