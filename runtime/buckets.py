"""Shape buckets: the one place that decides which padded sizes exist.

XLA compiles one graph per input shape, so every size a service runs is padded
up to a bucket from a short sorted list. Warm-up walks exactly these lists and
runtime pads with exactly these functions; there is no second copy of the rule.
"""

from __future__ import annotations

from collections.abc import Sequence


def validate_buckets(buckets: Sequence[int], name: str = "buckets") -> tuple[int, ...]:
    """Returns `buckets` as a tuple after checking it is non-empty, positive, strictly increasing."""
    result = tuple(int(b) for b in buckets)
    if not result:
        raise ValueError(f"{name} must not be empty")
    if result[0] < 1:
        raise ValueError(f"{name} must be positive, got {list(result)}")
    if any(a >= b for a, b in zip(result, result[1:])):
        raise ValueError(f"{name} must be strictly increasing, got {list(result)}")
    return result


def pad_to_bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n. n == 0 maps to the smallest bucket (all padding)."""
    if n < 0:
        raise ValueError(f"cannot pad a negative size ({n})")
    for bucket in buckets:
        if bucket >= n:
            return bucket
    raise ValueError(f"size {n} exceeds the largest bucket {buckets[-1]}")


def power_of_two_buckets(max_size: int, min_size: int = 1, *,
                         midpoints_from: int | None = None) -> tuple[int, ...]:
    """min_size, 2*min_size, 4*min_size, ... up to and always including max_size; with
    `midpoints_from`, also 1.5x each bucket from that size on (padding then wastes at most
    a third instead of half: worth its extra graphs where cost grows with the size).

    >>> power_of_two_buckets(8)
    (1, 2, 4, 8)
    >>> power_of_two_buckets(100, min_size=16)
    (16, 32, 64, 100)
    >>> power_of_two_buckets(64, min_size=2, midpoints_from=8)
    (2, 4, 8, 12, 16, 24, 32, 48, 64)
    """
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    if max_size < min_size:
        raise ValueError(f"max_size ({max_size}) must be >= min_size ({min_size})")
    buckets = []
    size = min_size
    while size < max_size:
        buckets.append(size)
        if midpoints_from is not None and size >= midpoints_from and size + size // 2 < max_size:
            buckets.append(size + size // 2)
        size *= 2
    buckets.append(max_size)
    return tuple(buckets)


def split_into_buckets(n: int, buckets: Sequence[int]) -> list[int]:
    """Chunk sizes that cover n items: full largest buckets, then the remainder.

    Only the last chunk may need padding (to `pad_to_bucket(chunk, buckets)`).

    >>> split_into_buckets(19, (1, 2, 4, 8))
    [8, 8, 3]
    """
    if n < 0:
        raise ValueError(f"cannot split a negative size ({n})")
    largest = buckets[-1]
    chunks = [largest] * (n // largest)
    if n % largest:
        chunks.append(n % largest)
    return chunks


def padding_waste(n: int, buckets: Sequence[int]) -> int:
    """Padded rows run for n real ones, across all chunks of `split_into_buckets`."""
    return sum(pad_to_bucket(c, buckets) - c for c in split_into_buckets(n, buckets))
