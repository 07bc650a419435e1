import pytest

from runtime.buckets import (
    pad_to_bucket,
    padding_waste,
    power_of_two_buckets,
    split_into_buckets,
    validate_buckets,
)

BUCKETS = (1, 2, 4, 8)


@pytest.mark.parametrize("n, expected", [(0, 1), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8)])
def test_pad_to_bucket_picks_smallest_that_fits(n, expected):
    assert pad_to_bucket(n, BUCKETS) == expected


def test_pad_to_bucket_above_max_names_the_sizes():
    with pytest.raises(ValueError, match="size 9 exceeds the largest bucket 8"):
        pad_to_bucket(9, BUCKETS)


def test_pad_to_bucket_rejects_negative():
    with pytest.raises(ValueError, match="negative"):
        pad_to_bucket(-1, BUCKETS)


def test_power_of_two_buckets_always_ends_at_max():
    assert power_of_two_buckets(8) == (1, 2, 4, 8)
    assert power_of_two_buckets(1) == (1,)
    assert power_of_two_buckets(12) == (1, 2, 4, 8, 12)
    assert power_of_two_buckets(512, min_size=16) == (16, 32, 64, 128, 256, 512)
    with pytest.raises(ValueError):
        power_of_two_buckets(4, min_size=8)
    with pytest.raises(ValueError):
        power_of_two_buckets(4, min_size=0)


@pytest.mark.parametrize("n, chunks", [(0, []), (3, [3]), (8, [8]), (9, [8, 1]), (24, [8, 8, 8]), (19, [8, 8, 3])])
def test_split_into_buckets_covers_every_item(n, chunks):
    assert split_into_buckets(n, BUCKETS) == chunks
    assert sum(split_into_buckets(n, BUCKETS)) == n


def test_padding_waste_counts_only_the_last_chunk():
    assert padding_waste(19, BUCKETS) == 1  # 8 + 8 + (3 -> 4)
    assert padding_waste(5, BUCKETS) == 3
    assert padding_waste(16, BUCKETS) == 0


@pytest.mark.parametrize("bad", [(), (0, 1), (2, 2), (4, 2)])
def test_validate_buckets_rejects_bad_lists(bad):
    with pytest.raises(ValueError):
        validate_buckets(bad)
