"""The `splitserve` command line: flags reach the app's arguments, sizes parse, bad ones say why."""

import argparse

import pytest

from deploy.cli import _bytes, build_parser


def test_sizes_parse_with_binary_and_decimal_units():
    assert _bytes("268435456") == 2**28
    assert _bytes("256MiB") == 2**28 and _bytes("16GiB") == 16 * 2**30
    assert _bytes("1.5GB") == 1_500_000_000 and _bytes(" 64 kib ") == 64 * 1024
    for bad in ("lots", "12 parsecs", "-5", "MiB"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a size in bytes"):
            _bytes(bad)


def test_decoder_flags_parse():
    args = build_parser().parse_args(["serve", "--kv-cache-bytes", "64MiB", "--max-num-batched-tokens",
                                      "512", "--max-chunk-tokens-while-decoding", "64",
                                      "--no-prefix-caching", "--full-warmup",
                                      "--encoder-cpu-priority", "idle", "--no-mixed-graphs"])
    assert args.kv_cache_bytes == 64 * 2**20 and args.max_num_batched_tokens == 512
    assert args.max_chunk_tokens_while_decoding == 64
    assert args.no_prefix_caching and args.full_warmup and args.encoder_cpu_priority == "idle"
    assert args.no_mixed_graphs
    defaults = build_parser().parse_args(["serve"])
    assert defaults.kv_cache_bytes is None and not defaults.no_prefix_caching
    assert not defaults.no_mixed_graphs
    assert defaults.max_chunk_tokens_while_decoding is None  # DecoderConfig's default decides
    assert defaults.encoder_cpu_priority is None  # EncoderConfig's default decides
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--encoder-cpu-priority", "low"])


def test_bench_flags_reach_the_workload():
    from deploy.cli import _bench_config

    pool = _bench_config(build_parser().parse_args(["bench", "--image-pool-size", "8"])).workload
    pairs = _bench_config(build_parser().parse_args(["bench", "--questions-per-image", "2"])).workload
    assert pool.image_pool_size == 8 and pairs.questions_per_image == 2
    both = build_parser().parse_args(["bench", "--image-pool-size", "8", "--questions-per-image", "2"])
    with pytest.raises(ValueError, match="choose one way to repeat images"):
        _bench_config(both)
