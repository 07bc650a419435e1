"""The encoder service's settings: one frozen dataclass, validated and derived on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.buckets import power_of_two_buckets
from runtime.cpu_priority import CPU_PRIORITIES
from runtime.device import DEVICE_KINDS
from runtime.embedding_dtype import check_dtype
from runtime.limits import MAX_IMAGE_BYTES

MiB = 1 << 20


@dataclass(frozen=True)
class EncoderConfig:
    model: str  # checkpoint directory or hub id; becomes the embeddings' model_id
    device: str = "xla"
    max_batch_items: int = 8  # largest item-batch bucket; buckets are 1, 2, 4, ... up to it
    # A batch gathers items from other requests until none has arrived for `batch_wait_s` and
    # no image is still being preprocessed, for at most `batch_max_wait_s` after its first
    # item: a burst of requests becomes one batch (encoder_service/batcher.py).
    batch_wait_s: float = 0.025
    batch_max_wait_s: float = 0.1
    encoder_cache_bytes: int = 512 * MiB  # LRU budget for cached embeddings; 0 disables the cache
    embedding_dtype: str = "float32"  # how embeddings are stored and sent: the decoder's dtype
    max_image_bytes: int = MAX_IMAGE_BYTES  # encoded size limit per image, the router's too
    max_image_pixels: int = 40_000_000  # width * height limit, checked before decoding
    preprocess_threads: int = 2  # threads that decode and preprocess images
    # "idle": once warm, the replica's threads compute only on CPU cycles nothing else wants
    # (SCHED_IDLE): on a host whose cores it shares with a decoder, the decoder's steps no longer
    # slow down while images are encoded, and new images wait longer (runtime/cpu_priority.py).
    # Encoder replicas only: the colocated layout runs both halves on the same threads.
    cpu_priority: str = "normal"
    full_warmup: bool = False  # compile every bucket before serving (else the largest, then the
    # rest when idle)
    strict_compile: bool = False  # raise on a compilation after warm-up (tests) instead of logging
    buckets: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty checkpoint path or hub id, got {self.model!r}")
        if self.device not in DEVICE_KINDS:
            raise ValueError(f"device must be one of {', '.join(DEVICE_KINDS)}; got {self.device!r}")
        check_dtype(self.embedding_dtype)
        if self.cpu_priority not in CPU_PRIORITIES:
            raise ValueError(f"cpu_priority must be one of {', '.join(CPU_PRIORITIES)}; "
                             f"got {self.cpu_priority!r}")
        _require_int(self, "max_batch_items", minimum=1)
        _require_int(self, "encoder_cache_bytes", minimum=0)
        _require_int(self, "max_image_bytes", minimum=1)
        _require_int(self, "max_image_pixels", minimum=1)
        _require_int(self, "preprocess_threads", minimum=1)
        if not isinstance(self.batch_wait_s, (int, float)) or not 0 <= self.batch_wait_s <= 1:
            raise ValueError(f"batch_wait_s must be between 0 and 1 second, got {self.batch_wait_s!r}")
        if (not isinstance(self.batch_max_wait_s, (int, float))
                or not self.batch_wait_s <= self.batch_max_wait_s <= 1):
            raise ValueError(f"batch_max_wait_s must be between batch_wait_s and 1 second, "
                             f"got {self.batch_max_wait_s!r}")
        object.__setattr__(self, "buckets", power_of_two_buckets(self.max_batch_items))


def _require_int(config: EncoderConfig, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
