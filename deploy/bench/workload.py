"""Benchmark workloads: seeded chat requests with images drawn from a pool of real photos.

Every image slot is either *new* (a fresh crop of a pool photo, so its bytes, and any
server-side cache key, have not been seen in this run) or a *repeat* of an image an earlier
request already sent, byte for byte (a cache hit for a server that caches image embeddings or
prefix KV). Which, is one of three modes:

- `repeat_ratio`: each slot repeats a random earlier image with that probability;
- `image_pool_size` N: every slot is one of N images, in shuffled rounds (each image once per
  round), so after the first N slots every one is a repeat;
- `questions_per_image` Q: each new image is asked about by Q consecutive requests (first
  sight, then Q - 1 repeats), as in a multi-turn chat about one picture.

Prompts (the "questions") are drawn per request and never repeat within a workload, so a
repeated image always comes with different text. Images are JPEG-encoded once, before the
run, so the client's timings hold no encoding work.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

# Short, common English words: prompts of a known word count that any tokenizer splits.
_WORDS = ("the quick brown fox jumps over lazy dog picture image photo describe what where "
          "color light shape left right small large near far sky water tree house street "
          "person animal food table window red green blue yellow white black bright dark "
          "old new round square soft hard warm cold").split()


@lru_cache(maxsize=1)
def photo_pool() -> tuple[np.ndarray, ...]:
    """Real photographs shipped with scikit-image and scikit-learn (no download), as RGB
    uint8 arrays [H, W, 3] of different sizes and content."""
    from skimage import color, data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry",
             "hubble_deep_field", "retina")
    photos = [getattr(data, name)() for name in names]
    photos += list(load_sample_images().images)  # china.jpg, flower.jpg
    rgb = [p if p.ndim == 3 else (color.gray2rgb(p)) for p in photos]
    return tuple(np.ascontiguousarray(p[..., :3], dtype=np.uint8) for p in rgb)


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 32
    images_per_request: int = 1
    repeat_ratio: float = 0.0  # probability that an image slot repeats an earlier image
    prompt_words: int = 32
    output_tokens: int = 32
    image_max_side: int = 448  # crops are resized so that their longer side is at most this
    image_pool_size: int = 0  # > 0: every image is one of this many (see the module docstring)
    questions_per_image: int = 1  # consecutive requests asking about each new image
    seed: int = 0

    def __post_init__(self):
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1; got {self.num_requests}")
        if self.images_per_request < 0:
            raise ValueError(f"images_per_request must be >= 0; got {self.images_per_request}")
        if not 0.0 <= self.repeat_ratio <= 1.0:
            raise ValueError(f"repeat_ratio must be in [0, 1]; got {self.repeat_ratio}")
        if self.prompt_words < 1 or self.output_tokens < 1:
            raise ValueError("prompt_words and output_tokens must be >= 1")
        if self.image_max_side < 32:
            raise ValueError(f"image_max_side must be >= 32; got {self.image_max_side}")
        if self.image_pool_size < 0 or self.questions_per_image < 1:
            raise ValueError("image_pool_size must be >= 0 and questions_per_image >= 1; got "
                             f"{self.image_pool_size} and {self.questions_per_image}")
        modes = (self.repeat_ratio > 0) + (self.image_pool_size > 0) + (self.questions_per_image > 1)
        if modes > 1:
            raise ValueError("choose one way to repeat images: repeat_ratio, image_pool_size or "
                             "questions_per_image")


@dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt: str
    image_urls: tuple[str, ...]  # data: URLs
    image_ids: tuple[int, ...]  # which unique image each slot holds
    num_repeated_images: int  # slots that repeat an image sent by an earlier request

    @property
    def all_images_repeated(self) -> bool:
        return bool(self.image_urls) and self.num_repeated_images == len(self.image_urls)

    def messages(self) -> list[dict]:
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in self.image_urls]
        return [{"role": "user", "content": parts + [{"type": "text", "text": self.prompt}]}]


@dataclass
class Workload:
    spec: WorkloadSpec
    requests: list[BenchRequest] = field(default_factory=list)
    num_unique_images: int = 0

    def summary(self) -> dict:
        slots = sum(len(r.image_urls) for r in self.requests)
        repeated = sum(r.num_repeated_images for r in self.requests)
        return {"num_requests": len(self.requests), "images_per_request": self.spec.images_per_request,
                "repeat_ratio": self.spec.repeat_ratio, "prompt_words": self.spec.prompt_words,
                "output_tokens": self.spec.output_tokens, "image_max_side": self.spec.image_max_side,
                "image_pool_size": self.spec.image_pool_size,
                "questions_per_image": self.spec.questions_per_image,
                "seed": self.spec.seed, "num_unique_images": self.num_unique_images,
                "repeated_image_fraction": repeated / slots if slots else 0.0,
                "mean_image_bytes": (sum(len(u) for r in self.requests for u in r.image_urls) * 3 / 4
                                     / slots if slots else 0.0)}


def _crop(rng: np.random.Generator, photo: np.ndarray, max_side: int) -> bytes:
    """A random crop covering 40-100% of each side, resized to `max_side`, as JPEG bytes."""
    from PIL import Image

    height, width = photo.shape[:2]
    crop_h = int(height * rng.uniform(0.4, 1.0))
    crop_w = int(width * rng.uniform(0.4, 1.0))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def build_workload(spec: WorkloadSpec, salt: int = 0) -> Workload:
    """The same spec (and salt) gives the same requests, byte for byte. A different `salt`
    gives different images and prompts (warm-up requests use one, so they prime no cache)."""
    rng = np.random.default_rng([spec.seed, salt])
    pool = photo_pool()
    urls: list[str] = []  # unique images, in the order they were first made
    seen: set[bytes] = set()

    def new_image() -> int:
        jpeg = _crop(rng, pool[int(rng.integers(0, len(pool)))], spec.image_max_side)
        while jpeg in seen:  # astronomically rare; a repeat must never pass for new
            jpeg = _crop(rng, pool[int(rng.integers(0, len(pool)))], spec.image_max_side)
        seen.add(jpeg)
        urls.append(_data_url(jpeg))
        return len(urls) - 1

    image_pool = [new_image() for _ in range(spec.image_pool_size)]
    rounds: list[int] = []  # the pool's images still to send in this round
    prompts: set[str] = set()
    distinct_prompts = len(_WORDS) ** spec.prompt_words
    sent: set[int] = set()
    workload = Workload(spec)
    for index in range(spec.num_requests):
        ids = []
        for slot in range(spec.images_per_request):
            if image_pool:
                if not rounds:
                    rounds = [image_pool[i] for i in rng.permutation(len(image_pool))]
                ids.append(rounds.pop())
            elif index % spec.questions_per_image:  # the same image(s) as the request before
                ids.append(workload.requests[-1].image_ids[slot])
            elif sent and rng.random() < spec.repeat_ratio:
                ids.append(sorted(sent)[int(rng.integers(0, len(sent)))])
            else:
                ids.append(new_image())
        repeated = sum(i in sent for i in ids)
        sent.update(ids)
        prompt = _prompt(rng, spec.prompt_words)
        while prompt in prompts and len(prompts) < distinct_prompts:  # a new question each time
            prompt = _prompt(rng, spec.prompt_words)
        prompts.add(prompt)
        workload.requests.append(BenchRequest(index, prompt, tuple(urls[i] for i in ids), tuple(ids),
                                              repeated))
    workload.num_unique_images = len(sent)
    return workload


def _prompt(rng: np.random.Generator, num_words: int) -> str:
    return " ".join(_WORDS[i] for i in rng.choice(len(_WORDS), size=num_words))
