"""Runs the vision encoder on the device at fixed item-batch buckets.

Compile discipline (after vLLM's TPU model runner):
- every batch is padded on the host to a bucket from `buckets` (zero pixels in the
  padded rows; each image attends only to itself, so padding cannot change real rows);
- one transfer in (the padded pixel batch) and one out (the whole padded output,
  sliced on the host), with no `.item()`, masking or data-dependent shape between;
- `warm_up()` runs every bucket once through the same `_step` the runtime uses, logging
  its compile seconds, then marks the compile guard warm; after each later step the
  guard checks that nothing compiled (during that step: the counter is process-wide).

Not thread-safe: warm-up runs first, then a single thread (the batcher's worker) calls `run`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from encoder_service.vision_model import VisionEncoder
from runtime.buckets import pad_to_bucket, split_into_buckets, validate_buckets
from runtime.compile_guard import CompileGuard
from runtime.device import Device

log = logging.getLogger(__name__)


@dataclass
class BucketStats:
    batches: int = 0
    items: int = 0
    padding_rows: int = 0


class EncoderRunner:
    def __init__(self, model: VisionEncoder, device: Device, buckets: Sequence[int],
                 guard: CompileGuard) -> None:
        self.device = device
        self.buckets = validate_buckets(buckets, "item-batch buckets")
        self.guard = guard
        with guard.compiling():  # device work outside a step still excludes other threads' steps
            self.model = model.to(device.torch_device)
        self.pixel_shape = (3, model.image_size, model.image_size)
        self.output_shape = (model.tokens_per_image, model.hidden_size)
        self.bucket_stats = {bucket: BucketStats() for bucket in self.buckets}
        self.warmup_seconds: dict[int, float] = {}

    def warm_up(self) -> dict[int, float]:
        """Compiles every bucket; returns {bucket: seconds}. Logs one line each and a total."""
        log.info("encoder: compiling the vision encoder for item-batch buckets %s on %s",
                 list(self.buckets), self.device.describe())
        self.guard.start_warmup()
        start = time.perf_counter()
        for bucket in self.buckets:
            began = time.perf_counter()
            with self.guard.compiling():
                out = self._step(np.zeros((bucket, *self.pixel_shape), np.float32))
            if out.shape != (bucket, *self.output_shape):
                raise ValueError(f"the vision encoder made {out.shape} for {bucket} images, "
                                 f"expected {(bucket, *self.output_shape)}")
            self.warmup_seconds[bucket] = time.perf_counter() - began
            log.info("encoder:   -- image items: %d, compiled in %.2f s", bucket,
                     self.warmup_seconds[bucket])
        self.guard.mark_warm()
        log.info("encoder: compiled %d buckets (%d graphs) in %.2f s", len(self.buckets),
                 self.guard.warmup_compilations, time.perf_counter() - start)
        return dict(self.warmup_seconds)

    def run(self, pixels: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One [3, S, S] float32 array per image -> one [tokens_per_image, hidden_size] each.

        More images than the largest bucket run as several steps; the last is padded."""
        results: list[np.ndarray] = []
        start = 0
        for count in split_into_buckets(len(pixels), self.buckets):
            bucket = pad_to_bucket(count, self.buckets)
            batch = np.zeros((bucket, *self.pixel_shape), np.float32)  # padded rows stay zero
            for row, image in enumerate(pixels[start:start + count]):
                if image.shape != self.pixel_shape:
                    raise ValueError(f"pixels of shape {image.shape}; the encoder takes {self.pixel_shape}")
                batch[row] = image
            with self.guard.step(f"encoder bucket {bucket} ({count} items)"):
                out = self._step(batch)
            results.extend(out[row].copy() for row in range(count))  # padding rows dropped on the host
            stats = self.bucket_stats[bucket]
            stats.batches += 1
            stats.items += count
            stats.padding_rows += bucket - count
            start += count
        return results

    def _step(self, batch: np.ndarray) -> np.ndarray:
        # batch: [bucket, 3, S, S] -> [bucket, tokens_per_image, hidden_size]
        with torch.no_grad():
            pixels = torch.from_numpy(batch).to(self.device.torch_device)
            out = self.model(pixels)
            self.device.sync()
            return out.cpu().numpy()

    def stats(self) -> dict:
        return {
            "buckets": {b: vars(s).copy() for b, s in self.bucket_stats.items()},
            "warmup_seconds": dict(self.warmup_seconds),
            "warmup_compilations": self.guard.warmup_compilations,
            "compilations_after_warmup": self.guard.compilations_after_warmup,
        }
