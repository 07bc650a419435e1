"""Decoder benchmark: decode tokens/s per batch size, prefill tokens/s, host overhead per
step, and the decode step against its memory-bandwidth floor.

    .venv/bin/python benchmarks/decoder_bench.py --size small [--device xla|cpu] [--json out.json]

It drives the model runner directly (no scheduler), one graph per measured shape;
the first call of a shape compiles it and is reported separately. Prefill is measured
at the step budget's chunk sizes (128 and 256 tokens, the latter with one image).

`--mixed` instead measures a step that decodes a full batch (16 sequences of `--context`
tokens) and prefills one chunk (32, 41, 64, 82, 128 tokens, the end of a prompt of `--context`
tokens): its two graphs (decode, then prefill) against one mixed graph, alternated, and
checks both sample the same tokens. Where the chunk's mixed bucket is a 1.5x midpoint (41
tokens in 48, 82 in 96), the same step padded to the power-of-two bucket is timed too.

`--profile DIR` also traces the last batch's decode step with XLA's profiler and prints its
device time by op kind: the layers' dots and fusions, the head, the sampler (step_profile.py).

`--grammar` instead measures what structured outputs cost: decode tokens/s at batch 16
over `--grammar-steps` steps, with every row under a JSON schema (host: xgrammar fills
each row's bitmask, then accepts the sampled token) against the same loop with none
(the device applies an all-allowed bitmask either way: one graph).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PJRT_DEVICE", "CPU")

from benchmarks.common import copy_bandwidth_gbps, int_list, machine, machine_line  # noqa: E402
from benchmarks.step_profile import breakdown, trace_steps  # noqa: E402
from benchmarks.step_profile import report as profile_report  # noqa: E402
from decoder_service.config import DecoderConfig  # noqa: E402
from decoder_service.inputs import (  # noqa: E402
    build_decode,
    build_mixed,
    build_prefill,
    decode_need,
    mixed_need,
    prefill_need,
)
from decoder_service.sampler import unpack  # noqa: E402
from decoder_service.runner import ModelRunner  # noqa: E402
from decoder_service.scheduler import Chunk  # noqa: E402
from decoder_service.sequence import Sequence, image_spans  # noqa: E402
from runtime.buckets import pad_to_bucket  # noqa: E402
from runtime.messages import SamplingParams  # noqa: E402
from deploy.demo_checkpoint import cached_demo_checkpoint  # noqa: E402
from runtime.checkpoint import open_checkpoint  # noqa: E402
from runtime.geometry import geometry_of  # noqa: E402
from runtime.device import open_device  # noqa: E402


def execute_seconds(device) -> float:
    """Total device execution time so far (xla only; 0 elsewhere)."""
    if not device.is_xla:
        return 0.0
    import torch_xla.debug.metrics as met

    data = met.metric_data("ExecuteTime")
    return data[1] / 1e9 if data else 0.0


def timed(fn, device, repeats):
    first_t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - first_t0
    walls, execs = [], []
    for _ in range(repeats):
        e0, t0 = execute_seconds(device), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        execs.append(execute_seconds(device) - e0)
    return first, statistics.median(walls), statistics.median(execs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--device", default="xla")
    parser.add_argument("--context", type=int, default=256, help="tokens already in each sequence")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batches", type=int_list, default=[1, 4, 16],
                        help="decode batch sizes, comma-separated")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--grammar", action="store_true", help="the JSON-schema bitmask's cost")
    parser.add_argument("--mixed", action="store_true", help="two graphs vs one for a mixed step")
    parser.add_argument("--grammar-steps", type=int, default=24)
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="trace the last batch's decode steps with XLA's profiler into DIR "
                             "and print where a step's time goes, op by op (step_profile.py)")
    args = parser.parse_args()

    checkpoint = open_checkpoint(str(cached_demo_checkpoint(args.size)))
    device = open_device(args.device)
    runner = ModelRunner(DecoderConfig(model=str(checkpoint.path), device=args.device,
                                       max_num_seqs=16, max_model_len=1024,
                                       max_num_batched_tokens=256), checkpoint, device)
    image_token_id = geometry_of(checkpoint.config).image_token_id
    rng = np.random.default_rng(0)
    shapes = runner.shapes
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    results = {"machine": machine_line(machine()), "device": device.describe(), "size": args.size,
               "weight_bytes": weight_bytes, "kv_cache_bytes": runner.cache.nbytes, "decode": [],
               "prefill": []}

    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    bs = shapes.block_size
    if args.grammar:
        print(grammar_report(grammar_decode(runner, checkpoint, device, args.grammar_steps, rng),
                             results))
        return
    if args.mixed:
        print(mixed_report(mixed_steps(runner, rng, args.context, args.repeats), results))
        return
    for batch in args.batches:
        seqs, next_block = [], 1
        for i in range(batch):  # each sequence owns its own blocks: no sharing flatters the step
            context = args.context + i + 1
            seq = Sequence(f"d{i}", rng.integers(1000, 20000, size=context).tolist(), greedy, seed=i)
            seq.block_table = list(range(next_block, next_block + -(-context // bs)))
            next_block += len(seq.block_table)
            seqs.append(seq)
        graph = shapes.decode_graph_for(decode_need(seqs, shapes))
        inputs = build_decode(seqs, shapes, graph=graph, vocab_size=runner.vocab_size)
        host_t0 = time.perf_counter()
        build_decode(seqs, shapes, graph=graph, vocab_size=runner.vocab_size)
        build_s = time.perf_counter() - host_t0
        first, wall, execute = timed(lambda: runner.decode(inputs), device, args.repeats)
        results["decode"].append({
            "batch": batch, "attention_len": inputs.graph[1] * bs, "compile_s": first - wall,
            "step_ms": wall * 1e3, "execute_ms": execute * 1e3,
            "host_overhead_ms": (wall - execute + build_s) * 1e3 if device.is_xla else None,
            "tokens_per_s": batch / wall})
        if args.profile and batch == args.batches[-1] and device.is_xla:
            results["profile"] = breakdown(trace_steps(lambda: runner.decode(inputs), 10, args.profile))

    per_image = 196
    for tokens, images in ((128, 0), (256, 1)):
        ids = rng.integers(1000, 20000, size=tokens)
        ids[1:1 + images * per_image] = image_token_id
        rows = rng.standard_normal((images * per_image, runner.hidden_size)).astype(np.float32)
        seq = Sequence("p", ids.tolist(), greedy, seed=0, image_rows=rows if images else None,
                       images=image_spans(ids, image_token_id, [per_image] * images,
                                          ["bench"] * images))
        seq.block_table = list(range(1, 1 + -(-tokens // bs)))
        chunk = Chunk(seq, 0, tokens)
        graph = tuple(pad_to_bucket(n, b) for n, b in zip(
            prefill_need([chunk], shapes), (shapes.chunk_buckets, shapes.block_buckets)))
        inputs = build_prefill([chunk], shapes, graph=graph, hidden_size=runner.hidden_size,
                               vocab_size=runner.vocab_size)
        first, wall, execute = timed(lambda: runner.prefill(inputs), device, max(3, args.repeats // 3))
        results["prefill"].append({"tokens": tokens, "images": images, "compile_s": first - wall,
                                   "step_ms": wall * 1e3, "tokens_per_s": tokens / wall})

    bandwidth = copy_bandwidth_gbps()
    results["copy_bandwidth_gbps"] = bandwidth
    results["decode_floor_ms"] = weight_bytes / (bandwidth * 1e9) * 1e3
    print(report(results))
    if "profile" in results:
        print("\n" + profile_report(results["profile"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


SCHEMA = ('{"type":"object","properties":{"name":{"type":"string"},"count":{"type":"integer"},'
          '"tags":{"type":"array","items":{"type":"string"}}},"required":["name","count","tags"]}')


def grammar_decode(runner, checkpoint, device, steps: int, rng, batch: int = 16) -> dict:
    """Decode tokens/s at `batch` rows, all under SCHEMA or none; host work included."""
    from transformers import AutoTokenizer

    from decoder_service.grammar import Grammars
    from runtime.messages import ResponseFormat

    shapes = runner.shapes
    eos = checkpoint.config.text_config.eos_token_id
    grammars = Grammars(AutoTokenizer.from_pretrained(checkpoint.path), runner.vocab_size, eos)
    fmt = ResponseFormat("json_schema", SCHEMA)
    params = SamplingParams(max_tokens=steps, temperature=0.0)
    out = {}
    for constrained in (False, True, False, True):  # alternated: drift on a shared machine
        seqs, next_block = [], 1
        for i in range(batch):
            context = 128 + i
            seq = Sequence(f"g{i}", rng.integers(1000, 20000, size=context).tolist(), params, seed=i,
                           grammar=grammars.matcher(fmt) if constrained else None)
            seq.block_table = list(range(next_block, next_block + -(-(context + steps) // shapes.block_size)))
            next_block += len(seq.block_table)
            seqs.append(seq)
        graph = shapes.decode_graph_for((batch, -(-(128 + batch + steps) // shapes.block_size)))
        runner.decode(build_decode(seqs, shapes, graph=graph, vocab_size=runner.vocab_size))  # compile
        host_s, t0 = 0.0, time.perf_counter()
        for _ in range(steps):
            h0 = time.perf_counter()
            inputs = build_decode(seqs, shapes, graph=graph, vocab_size=runner.vocab_size)  # fills
            host_s += time.perf_counter() - h0
            rows = unpack(runner.decode(inputs), batch)
            h0 = time.perf_counter()
            for seq, row in zip(seqs, rows):
                seq.output_ids.append(row.token_id)
                if seq.grammar is not None:
                    seq.grammar.accept(row.token_id)
                    if seq.grammar.is_terminated:  # the object is complete: start another
                        seq.grammar = grammars.matcher(fmt)
            host_s += time.perf_counter() - h0
        key = "json_schema" if constrained else "none"
        rate = batch * steps / (time.perf_counter() - t0)
        out.setdefault(key, []).append(rate)
        out.setdefault(f"{key}_host_ms", []).append(host_s / steps * 1e3)
    return {k: (min(v) if k.endswith("_host_ms") else max(v)) for k, v in out.items()}


def grammar_report(rates: dict, r: dict) -> str:
    return (f"decoder, {r['size']} checkpoint, {r['device']}; {r['machine']}\n"
            f"decode at batch 16, every row under a JSON schema: {rates['json_schema']:.1f} tokens/s; "
            f"no grammar: {rates['none']:.1f} tokens/s "
            f"({rates['json_schema'] / rates['none']:.2f}x; best of two runs each); host inputs + "
            f"token accept per step: {rates['json_schema_host_ms']:.2f} ms with the schema, "
            f"{rates['none_host_ms']:.2f} ms without")


def mixed_steps(runner, rng, context: int, repeats: int, batch: int = 16) -> list[dict]:
    """Per chunk size: ms of the decode + prefill graphs and of the mixed graph, same step."""
    shapes, bs = runner.shapes, runner.shapes.block_size
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    seqs, next_block = [], 1
    for i in range(batch):
        seq = Sequence(f"d{i}", rng.integers(1000, 20000, size=context + i).tolist(), greedy, seed=i)
        seq.block_table = list(range(next_block, next_block + -(-(context + i) // bs)))
        next_block += len(seq.block_table)
        seqs.append(seq)
    out = []
    for tokens in (32, 41, 64, 82, 128):  # 41 / 82: one / two pool questions past a cached image
        prompt = Sequence("p", rng.integers(1000, 20000, size=context).tolist(), greedy, seed=0)
        prompt.block_table = list(range(next_block, next_block + -(-context // bs)))
        chunks = [Chunk(prompt, context - tokens, context)]
        decode_graph = shapes.decode_graph_for(decode_need(seqs, shapes))
        prefill_graph, mixed_graph = (
            tuple(pad_to_bucket(n, b) for n, b in zip(need, buckets)) for need, buckets in (
                (prefill_need(chunks, shapes), (shapes.chunk_buckets, shapes.block_buckets)),
                (mixed_need(seqs, chunks, shapes), (shapes.mixed_chunk_buckets, shapes.mixed_block_buckets))))
        decode = build_decode(seqs, shapes, graph=decode_graph, vocab_size=runner.vocab_size)
        prefill = build_prefill(chunks, shapes, graph=prefill_graph, hidden_size=runner.hidden_size,
                                vocab_size=runner.vocab_size)
        mixed = build_mixed(seqs, chunks, shapes, graph=mixed_graph, hidden_size=runner.hidden_size,
                            vocab_size=runner.vocab_size)
        # The same step padded to the power-of-two chunk bucket: what the 1.5x midpoints save.
        coarse_graph = (pad_to_bucket(tokens, shapes.chunk_buckets), mixed_graph[1])
        coarse = (build_mixed(seqs, chunks, shapes, graph=coarse_graph, hidden_size=runner.hidden_size,
                              vocab_size=runner.vocab_size) if coarse_graph != mixed_graph else None)
        runner.decode(decode), runner.prefill(prefill), runner.mixed(mixed)  # the first call compiles
        if coarse:
            runner.mixed(coarse)
        two, one, padded, same = [], [], [], True
        for _ in range(repeats):  # alternated: drift on a shared machine
            t0 = time.perf_counter()
            apart = unpack(runner.decode(decode), batch) + unpack(runner.prefill(prefill), 1)
            two.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            decoded, prefilled = runner.mixed(mixed)
            one.append(time.perf_counter() - t0)
            together = unpack(decoded, batch) + unpack(prefilled, 1)
            same &= [a.token_id for a in apart] == [b.token_id for b in together]
            if coarse:
                t0 = time.perf_counter()
                runner.mixed(coarse)
                padded.append(time.perf_counter() - t0)
        out.append({"chunk_tokens": tokens, "decode_graph": decode_graph, "prefill_graph": prefill_graph,
                    "mixed_graph": mixed_graph, "two_graphs_ms": statistics.median(two) * 1e3,
                    "mixed_graph_ms": statistics.median(one) * 1e3, "same_tokens": same,
                    "coarse_graph": coarse_graph if coarse else None,
                    "coarse_graph_ms": statistics.median(padded) * 1e3 if coarse else None})
    return out


def mixed_report(rows: list[dict], r: dict) -> str:
    lines = [f"decoder, {r['size']} checkpoint, {r['device']}; {r['machine']}",
             "a step decoding 16 sequences and prefilling one chunk (medians, alternated):", "",
             "| chunk tokens | decode + prefill graphs | ms | mixed graph | ms | same tokens "
             "| padded to a power of two | ms |",
             "|---|---|---|---|---|---|---|---|"]
    for x in rows:
        coarse = (f"{x['coarse_graph']} | {x['coarse_graph_ms']:.1f}" if x["coarse_graph"]
                  else "(the same graph) | ")
        lines.append(f"| {x['chunk_tokens']} | {x['decode_graph']} + {x['prefill_graph']} | "
                     f"{x['two_graphs_ms']:.1f} | {x['mixed_graph']} | {x['mixed_graph_ms']:.1f} | "
                     f"{x['same_tokens']} | {coarse} |")
    return "\n".join(lines)


def report(r: dict) -> str:
    lines = [f"decoder, {r['size']} checkpoint, {r['device']}; {r['machine']}",
             f"text weights {r['weight_bytes'] / 1e6:.0f} MB, KV cache {r['kv_cache_bytes'] / 1e6:.0f} MB, "
             f"copy bandwidth {r['copy_bandwidth_gbps']:.1f} GB/s -> weight-read floor "
             f"{r['decode_floor_ms']:.1f} ms/step", "",
             "| decode batch | attention len | step ms | device execute ms | host overhead ms | tokens/s | x floor | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for d in r["decode"]:
        host = "n/a" if d["host_overhead_ms"] is None else f"{d['host_overhead_ms']:.1f}"
        lines.append(f"| {d['batch']} | {d['attention_len']} | {d['step_ms']:.1f} | {d['execute_ms']:.1f} | "
                     f"{host} | {d['tokens_per_s']:.1f} | {d['step_ms'] / r['decode_floor_ms']:.1f} | "
                     f"{d['compile_s']:.1f} |")
    lines += ["", "| prefill tokens | images | step ms | tokens/s | compile s |", "|---|---|---|---|---|"]
    for p in r["prefill"]:
        lines.append(f"| {p['tokens']} | {p['images']} | {p['step_ms']:.0f} | {p['tokens_per_s']:.0f} | "
                     f"{p['compile_s']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
