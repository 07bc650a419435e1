"""Runs the vision encoder on the device at fixed item-batch buckets.

Compile discipline (after vLLM's TPU model runner):
- every batch is padded on the host to a bucket from `buckets` (zero pixels in the
  padded rows; each image attends only to itself, so padding cannot change real rows);
- one transfer in (the padded pixel batch) and one out (the whole padded output,
  sliced on the host), with no `.item()`, masking or data-dependent shape between;
- `warm_up()` compiles the largest bucket (which every batch fits by padding up) and, unless
  told otherwise, every other bucket, tracing the same graph `_step` runs, logging compile
  seconds, then marks the compile guard warm. It compiles without running (a full batch of
  images through the tower: ~2 s of a 2-core CPU at bucket 8): the step reads its result
  without a step barrier (`Device.read_stateless`), which is how torch_xla keys the warm-up's
  executable. Buckets left out compile later through `compile_next` (the batcher calls it
  when idle), outside any step; a batch
  runs on the smallest compiled bucket that holds it. After warm-up the guard checks that
  nothing compiled inside a step.

Not thread-safe: warm-up runs first, then a single thread (the batcher's worker) calls `run`
and `compile_next`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from encoder_service.vision_model import VisionEncoder
from runtime.buckets import split_into_buckets, validate_buckets
from runtime.compile_guard import CompileGuard
from runtime.device import Device
from runtime.graphs import GraphPlan, WarmupProgress, warmup_reporter

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
        self.plan = GraphPlan([(bucket,) for bucket in self.buckets])
        self.warmup_seconds: dict[int, float] = {}

    def warm_up(self, full: bool = True, progress: WarmupProgress | None = None) -> dict[int, float]:
        """Compiles the largest bucket, which every batch fits, then (with `full`) every other;
        returns {bucket: seconds}. Logs one line each and a total, and tells `progress`
        (graphs compiled, graphs to compile before serving, graphs planned) before and after
        each. Without `full` the rest compile later through `compile_next`, outside any step."""
        log.info("encoder: compiling the vision encoder for item-batch buckets %s on %s",
                 list(self.buckets) if full else [self.buckets[-1]], self.device.describe())
        report = warmup_reporter(progress, lambda: len(self.plan.compiled), len(self.plan.planned), full)
        report()
        self.guard.start_warmup()
        start = time.perf_counter()
        self._compile(self.plan.covering)
        report()
        self.guard.mark_warm()
        while full and self.compile_next():
            report()
        log.info("encoder: compiled %d buckets (%d graphs) in %.2f s", len(self.plan.compiled),
                 self.guard.warmup_compilations, time.perf_counter() - start)
        return dict(self.warmup_seconds)

    def compile_next(self) -> bool:
        """Compiles the smallest bucket not compiled yet; False when none is left."""
        graph = self.plan.next_pending()
        if graph is None:
            return False
        self._compile(graph)
        return True

    def _compile(self, graph: tuple[int]) -> None:
        (bucket,) = graph
        began = time.perf_counter()
        with self.guard.compiling(), torch.no_grad():  # compiled, not run: the step's own graph
            out = self._trace(np.zeros((bucket, *self.pixel_shape), np.float32))
            self.device.compile_only([out])
        if tuple(out.shape) != (bucket, *self.output_shape):
            raise ValueError(f"the vision encoder made {out.shape} for {bucket} images, "
                             f"expected {(bucket, *self.output_shape)}")
        self.plan.mark_compiled(graph)
        self.warmup_seconds[bucket] = time.perf_counter() - began
        log.info("encoder:   -- image items: %d, compiled in %.2f s", bucket, self.warmup_seconds[bucket])

    def run(self, pixels: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One [3, S, S] float32 array per image -> one [tokens_per_image, hidden_size] each.

        More images than the largest bucket run as several steps; the last is padded."""
        results: list[np.ndarray] = []
        start = 0
        for count in split_into_buckets(len(pixels), self.buckets):
            (bucket,) = self.plan.fit((count,))  # pad_to_bucket once every bucket is compiled
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

    def _trace(self, batch: np.ndarray) -> torch.Tensor:
        # batch: [bucket, 3, S, S] -> [bucket, tokens_per_image, hidden_size]
        return self.model(torch.from_numpy(batch).to(self.device.torch_device))

    def _step(self, batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.device.read_stateless(self._trace(batch)).numpy()

    def stats(self) -> dict:
        return {
            "buckets": {b: vars(s).copy() for b, s in self.bucket_stats.items()},
            "warmup_seconds": dict(self.warmup_seconds),
            "warmup_compilations": self.guard.warmup_compilations,
            "graphs_compiled": len(self.plan.compiled), "graphs_planned": len(self.plan.planned),
            "compilations_after_warmup": self.guard.compilations_after_warmup,
        }
