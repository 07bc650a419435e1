"""Shape buckets: the one place that decides which padded sizes exist.

XLA compiles one graph per input shape, so every size a service runs is padded
up to a bucket from a short sorted list. Warm-up walks exactly these lists and
runtime pads with exactly these functions; there is no second copy of the rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


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


def cheapest_split(n: int, cost: Mapping[int, float]) -> list[int]:
    """Chunk sizes that cover n items at the least total cost, largest first, where a chunk
    of up to b items runs as one call of bucket b costing `cost[b]` (padded rows included).

    Padding up is not always cheapest: where a call's cost grows with its rows (a CPU), two
    smaller buckets can cost less than the padded larger one; where each call has a large
    fixed cost (a TPU), padding wins. Measured costs decide. Ties go to fewer calls.

    >>> cheapest_split(6, {1: 0.39, 2: 0.59, 4: 1.03, 8: 1.84})  # 4 + 2 rows: 1.62 < 1.84
    [4, 2]
    >>> cheapest_split(7, {1: 0.39, 2: 0.59, 4: 1.03, 8: 1.84})  # 4 + 2 + 1: 2.01 > 1.84
    [7]
    >>> cheapest_split(6, {1: 5.0, 2: 5.1, 4: 5.2, 8: 5.4})  # a fixed cost per call: pad
    [6]
    """
    if n < 0:
        raise ValueError(f"cannot split a negative size ({n})")
    if not cost:
        raise ValueError("cheapest_split needs the cost of at least one bucket")
    best: list[tuple[float, int]] = [(0.0, 0)]  # per item count: (total cost, calls)
    chunk = [0]
    for k in range(1, n + 1):
        options = [((best[k - min(b, k)][0] + c, best[k - min(b, k)][1] + 1), min(b, k))
                   for b, c in cost.items()]
        (total, take) = min(options, key=lambda option: (option[0], -option[1]))
        best.append(total)
        chunk.append(take)
    chunks = []
    while n:
        chunks.append(chunk[n])
        n -= chunk[n]
    return sorted(chunks, reverse=True)


def padding_waste(n: int, buckets: Sequence[int]) -> int:
    """Padded rows run for n real ones, across all chunks of `split_into_buckets`."""
    return sum(pad_to_bucket(c, buckets) - c for c in split_into_buckets(n, buckets))
