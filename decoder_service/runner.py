"""Model runner: weights, KV cache and compiled steps on the device.

Compile discipline (after vLLM's TPU model runner):
- inputs are prepared on the host (`decoder_service.inputs`), padded to buckets, and
  moved to the device once per step; outputs come back as one packed tensor;
- a step is one traced graph: embed (+ image merge), layers, sampling. Inside it there
  is no `.item()`, no `.cpu()`, no boolean-mask indexing, no data-dependent shape;
- `warm_up` runs every (tokens, images) prefill graph and every (batch, attention
  length) decode graph once, from `DecoderShapes`, the lists the runtime pads to;
- after warm-up the compile guard checks every step; a new graph is a bug.
The runner makes no policy decisions: the scheduler chooses what runs.
Not thread-safe: one engine thread calls it.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from decoder_service.config import DecoderConfig, DecoderShapes, derive_shapes
from decoder_service.image_merge import merge_image_rows
from decoder_service.inputs import DecodeInputs, PrefillInputs
from decoder_service.kv_cache import KVCache
from decoder_service.llama import LlamaTextModel, rotary_table
from decoder_service.sampler import SamplingRows, index_tensors, sample
from runtime.checkpoint import Checkpoint, text_state_dict
from runtime.compile_guard import CompileGuard
from runtime.device import Device

log = logging.getLogger(__name__)


def load_text_model(checkpoint: Checkpoint, dtype: torch.dtype) -> LlamaTextModel:
    model = LlamaTextModel(checkpoint.config.text_config)
    tensors = {k.removeprefix("language_model."): v for k, v in text_state_dict(checkpoint).items()}
    model.load_state_dict(tensors, strict=True)
    return model.to(dtype).eval()


class ModelRunner:
    def __init__(self, config: DecoderConfig, checkpoint: Checkpoint, device: Device) -> None:
        text = checkpoint.config.text_config
        tokens_per_image = int(checkpoint.config.image_seq_length)
        self.shapes: DecoderShapes = derive_shapes(config, text.max_position_embeddings, tokens_per_image)
        self.device = device
        self.dtype = getattr(torch, config.dtype)
        self.vocab_size = int(text.vocab_size)
        self.hidden_size = int(text.hidden_size)
        self.image_token_id = checkpoint.image_token_id
        self.model = load_text_model(checkpoint, self.dtype).to(device.torch_device)
        cos, sin = rotary_table(self.model.head_dim, self.shapes.max_model_len, self.model.rope_theta)
        self.cos, self.sin = cos.to(device.torch_device), sin.to(device.torch_device)
        # Constant index vectors, made once: torch.arange on the XLA device costs ms per call.
        self.key_positions = torch.arange(self.shapes.max_model_len).to(device.torch_device)
        self.sampler_indices = index_tensors(self.vocab_size, device.torch_device)
        self.cache = KVCache(num_layers=len(self.model.layers), num_slots=config.max_num_seqs,
                             max_model_len=self.shapes.max_model_len,
                             num_kv_heads=self.model.num_kv_heads, head_dim=self.model.head_dim,
                             dtype=self.dtype, device=device.torch_device)
        # Materialise weights, tables and cache as device data now: left pending, they would
        # fold into the first warm-up graph, which then differs from the same step at run time.
        device.sync()
        self.guard = CompileGuard(device, strict=config.strict_compile, name="decoder")
        self.warmup_seconds = 0.0

    @property
    def scratch_slot(self) -> int:
        return self.cache.scratch_slot

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device.torch_device)

    @torch.no_grad()
    def _prefill(self, inputs: PrefillInputs) -> torch.Tensor:
        d = self._to_device
        token_ids = d(inputs.token_ids)
        embeds = self.model.embed_tokens(token_ids)
        if inputs.image_rows is not None:
            embeds = merge_image_rows(embeds, d(inputs.image_rows), d(inputs.row_index),
                                      d(inputs.is_image))
        logits = self.model.prefill(embeds, d(inputs.positions), d(inputs.slots), d(inputs.segments),
                                    d(inputs.last_index), self.cos, self.sin, self.cache)
        return sample(logits, **inputs.sampling.to(self.device.torch_device), **self.sampler_indices)

    @torch.no_grad()
    def _decode(self, inputs: DecodeInputs) -> torch.Tensor:
        d = self._to_device
        logits = self.model.decode(d(inputs.token_ids), d(inputs.positions), d(inputs.slots),
                                   self.key_positions[:inputs.attention_len], self.cos, self.sin,
                                   self.cache)
        return sample(logits, **inputs.sampling.to(self.device.torch_device), **self.sampler_indices)

    def prefill(self, inputs: PrefillInputs) -> np.ndarray:
        """Runs one prefill step; returns sampled rows [max_prefill_seqs, ...] (`sampler.sample`)."""
        return self._run(self._prefill, inputs, "prefill tokens=%d image_rows=%d" % inputs.graph)

    def decode(self, inputs: DecodeInputs) -> np.ndarray:
        """Runs one decode step; returns sampled rows [batch bucket, ...]."""
        return self._run(self._decode, inputs, f"decode batch={len(inputs.token_ids)} "
                                               f"attention_len={inputs.attention_len}")

    def _run(self, trace, inputs, what: str) -> np.ndarray:
        with self.guard.step(what):
            out = trace(inputs)
            self.device.sync()
            return out.cpu().numpy()

    def warm_up(self) -> None:
        """Compiles every graph the runtime can ask for, logging one line per graph."""
        shapes, scratch = self.shapes, self.scratch_slot
        self.guard.start_warmup()
        started = time.perf_counter()
        graphs = shapes.prefill_graphs()
        log.info("decoder: compiling %d prefill graphs and %d decode graphs", len(graphs),
                 len(shapes.decode_graphs()))
        for tokens, images in graphs:
            t0 = time.perf_counter()
            rows = images * shapes.tokens_per_image
            self.prefill(PrefillInputs(
                token_ids=np.zeros(tokens, np.int64), positions=np.zeros(tokens, np.int64),
                slots=np.full(tokens, scratch, np.int64), segments=np.full(tokens, -1, np.int64),
                row_index=np.zeros(tokens, np.int64), is_image=np.zeros(tokens, bool),
                image_rows=np.zeros((rows, self.hidden_size), np.float32) if images else None,
                last_index=np.zeros(shapes.max_prefill_seqs, np.int64),
                sampling=SamplingRows.padding(shapes.max_prefill_seqs, self.vocab_size), num_seqs=0))
            log.info("decoder:   -- prefill tokens=%d images=%d: %.2f s", tokens, images,
                     time.perf_counter() - t0)
        for batch, attention_len in shapes.decode_graphs():
            t0 = time.perf_counter()
            self.decode(DecodeInputs(
                token_ids=np.zeros(batch, np.int64), positions=np.zeros(batch, np.int64),
                slots=np.full(batch, scratch, np.int64), attention_len=attention_len,
                sampling=SamplingRows.padding(batch, self.vocab_size), num_seqs=0))
            log.info("decoder:   -- decode batch=%d attention_len=%d: %.2f s", batch, attention_len,
                     time.perf_counter() - t0)
        self.guard.mark_warm()
        self.warmup_seconds = time.perf_counter() - started
        log.info("decoder: warm-up finished in %.2f s (%d compilations)", self.warmup_seconds,
                 self.guard.warmup_compilations)
