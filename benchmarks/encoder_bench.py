"""Encoder benchmark: warm-up, items/s per bucket, padding waste, cache hit vs miss latency.

    .venv/bin/python benchmarks/encoder_bench.py --size small

Writes the demo checkpoint once to a cache directory, builds an `EncoderService` on the
xla device (PJRT CPU unless a TPU is visible) with a `LocalObjectStore`, and measures:
- warm-up: compile + first run seconds per bucket, and start-up in total (the service's own);
- device throughput: items/s per bucket for full, preprocessed batches (the runner alone);
- padding waste: padded rows / rows run, for random item counts (1..3x the largest bucket),
  both as the bucket math gives it one request at a time and as the service actually ran
  a concurrent workload through its cross-request batcher;
- latency of one image through `encode`: a miss (decode, preprocess, batch, device, store)
  and then a hit (hash + cache lookup);
- the largest difference from transformers' eager fp32 `get_image_features` on real photos.
Prints a markdown table and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("PJRT_DEVICE", "CPU")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def checkpoint_dir(size: str, cache_dir: Path) -> Path:
    from deploy.demo_checkpoint import write_demo_checkpoint

    directory = cache_dir / f"llava-demo-{size}-seed0"
    marker = directory / "splitserve_demo.json"
    if not (marker.exists() and json.loads(marker.read_text()) == {"size": size, "seed": 0}):
        print(f"writing the {size} demo checkpoint to {directory}", flush=True)
        write_demo_checkpoint(directory, size=size, seed=0)
    return directory


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo_images(count: int) -> list:
    """Real photographs (skimage), varied by crop and mirror so each one is a new image."""
    from PIL import Image, ImageOps
    from skimage import data

    bases = [Image.fromarray(f()) for f in (data.astronaut, data.coffee, data.chelsea, data.rocket)]
    images = []
    for i in range(count):
        base = bases[i % len(bases)]
        step = i // len(bases)
        w, h = base.size
        image = base.crop((step % 7, step % 5, w - step % 11, h - step % 3))
        images.append(ImageOps.mirror(image) if step % 2 else image)
    return images


def measure_buckets(checkpoint, buckets, repeats: int) -> dict[int, dict]:
    """Device throughput per bucket: a runner of its own (same graphs, so nothing compiles)."""
    from encoder_service.runner import EncoderRunner
    from encoder_service.vision_model import load_vision_encoder
    from runtime.compile_guard import CompileGuard
    from runtime.device import open_device

    device = open_device("xla")
    runner = EncoderRunner(load_vision_encoder(checkpoint), device, buckets,
                           CompileGuard(device, strict=True, name="bench"))
    runner.warm_up()
    rng = np.random.default_rng(0)
    results = {}
    for bucket in buckets:
        pixels = list(rng.standard_normal((bucket, *runner.pixel_shape), dtype=np.float32))
        seconds = []
        for _ in range(repeats):
            began = time.perf_counter()
            runner.run(pixels)
            seconds.append(time.perf_counter() - began)
        step_s = statistics.median(seconds)
        results[bucket] = {"step_s": step_s, "items_per_s": bucket / step_s}
    assert runner.guard.compilations_after_warmup == 0
    return results


async def measure_latency(service, images: list[bytes]) -> dict:
    miss, hit = [], []
    for data in images:
        began = time.perf_counter()
        await service.encode([data])
        miss.append(time.perf_counter() - began)
        began = time.perf_counter()
        await service.encode([data])
        hit.append(time.perf_counter() - began)
    return {"miss_ms": 1000 * statistics.median(miss), "hit_ms": 1000 * statistics.median(hit),
            "samples": len(images)}


async def run_workload(service, requests: list[list[bytes]], concurrency: int) -> dict:
    before = service.stats()
    began = time.perf_counter()
    for wave in range(0, len(requests), concurrency):
        await asyncio.gather(*[service.encode(r) for r in requests[wave:wave + concurrency]])
    seconds = time.perf_counter() - began
    after = service.stats()
    rows = padding = 0
    for bucket, stats in after["buckets"].items():
        batches = stats["batches"] - before["buckets"][bucket]["batches"]
        rows += bucket * batches
        padding += stats["padding_rows"] - before["buckets"][bucket]["padding_rows"]
    items = sum(len(r) for r in requests)
    return {"requests": len(requests), "items": items, "seconds": seconds,
            "items_per_s": items / seconds, "rows_run": rows, "padding_rows": padding,
            "padding_fraction": padding / rows if rows else 0.0,
            "compilations_after_warmup": after["compilations_after_warmup"]}


def bucket_math_waste(counts, buckets) -> dict:
    from runtime.buckets import padding_waste

    padding = sum(padding_waste(int(n), buckets) for n in counts)
    return {"requests": len(counts), "items": int(sum(counts)), "padding_rows": padding,
            "padding_fraction": padding / (padding + int(sum(counts)))}


def reference_difference(checkpoint, service, store, photos) -> dict:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(checkpoint.path).image_processor
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint.path, dtype=torch.float32).eval()
    pixels = processor(images=photos, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels).pooler_output
    expected = np.stack([f.numpy() for f in features])
    refs = asyncio.run(service.encode([png(p) for p in photos]))
    got = np.stack(store.get([r.object_ref for r in refs]))
    return {"max_abs_diff": float(np.abs(got - expected).max()),
            "max_abs_value": float(np.abs(expected).max()), "images": len(photos)}


def markdown(result: dict) -> str:
    lines = [f"Checkpoint `{result['size']}` ({result['tokens_per_image']} tokens x "
             f"{result['hidden_size']} per image), device {result['device']}, {result['machine']}, "
             f"{result['date']}.", "",
             "| bucket (items) | warm-up (s) | step (s) | items/s |", "| ---: | ---: | ---: | ---: |"]
    for bucket, run in result["buckets"].items():
        lines.append(f"| {bucket} | {result['warmup_seconds'][bucket]:.2f} | {run['step_s']:.3f} | "
                     f"{run['items_per_s']:.2f} |")
    w, m, lat, ref = (result["workload"], result["bucket_math_waste"], result["latency"],
                      result["reference"])
    lines += ["", "| measure | value |", "| --- | ---: |",
              f"| start-up in total (load + compile all buckets) | {result['startup_s']:.1f} s |",
              f"| warm-up, all buckets | {sum(result['warmup_seconds'].values()):.1f} s |",
              f"| padding waste, bucket math, {m['requests']} random counts "
              f"1..{3 * result['max_batch_items']} | {100 * m['padding_fraction']:.1f} % of rows |",
              f"| padding waste, service, {w['requests']} requests ({w['items']} images), "
              f"{result['concurrency']} concurrent | {100 * w['padding_fraction']:.1f} % of rows |",
              f"| service throughput on that workload (decode + preprocess + device) | "
              f"{w['items_per_s']:.2f} items/s |",
              f"| compilations after warm-up | {w['compilations_after_warmup']} |",
              f"| latency, one image, cache miss (median of {lat['samples']}) | {lat['miss_ms']:.1f} ms |",
              f"| latency, one image, cache hit (median of {lat['samples']}) | {lat['hit_ms']:.2f} ms |",
              f"| max abs difference from eager fp32 get_image_features ({ref['images']} photos) | "
              f"{ref['max_abs_diff']:.1e} (largest value {ref['max_abs_value']:.1f}) |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "small"), default="small")
    parser.add_argument("--max-batch-items", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per bucket")
    parser.add_argument("--requests", type=int, default=40, help="requests in the service workload")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-samples", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "splitserve")
    parser.add_argument("--out", type=Path, default=Path("bench-results/encoder.json"))
    args = parser.parse_args(argv)

    from benchmarks.common import machine, machine_line
    from encoder_service.config import EncoderConfig
    from encoder_service.service import EncoderService
    from runtime.checkpoint import open_checkpoint
    from runtime.object_store import LocalObjectStore

    checkpoint = open_checkpoint(str(checkpoint_dir(args.size, args.cache_dir)))
    config = EncoderConfig(model=str(checkpoint.path), max_batch_items=args.max_batch_items,
                           full_warmup=True)  # every bucket's warm-up time, and no compile mid-run
    store = LocalObjectStore()
    service = EncoderService(config, store)
    stats = service.stats()
    print(f"service ready in {service.startup_seconds:.1f} s", flush=True)

    buckets = measure_buckets(checkpoint, config.buckets, args.repeats)
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 3 * config.max_batch_items + 1, size=args.requests)
    images = iter(png(p) for p in photo_images(int(counts.sum()) + args.latency_samples))
    requests = [[next(images) for _ in range(n)] for n in counts]
    workload = asyncio.run(run_workload(service, requests, args.concurrency))
    latency = asyncio.run(measure_latency(service, [next(images) for _ in range(args.latency_samples)]))
    reference = reference_difference(checkpoint, service, store, photo_images(4))
    service.close()

    result = {
        "size": args.size, "date": date.today().isoformat(), "device": "xla (PJRT " +
        os.environ.get("PJRT_DEVICE", "?") + ")",
        "machine": machine_line(machine()) + ", shared with other work (noisy)",
        "max_batch_items": config.max_batch_items, "concurrency": args.concurrency,
        "tokens_per_image": service.tokens_per_image, "hidden_size": service.hidden_size,
        "startup_s": service.startup_seconds, "warmup_seconds": stats["warmup_seconds"],
        "buckets": buckets, "workload": workload,
        "bucket_math_waste": bucket_math_waste(counts, config.buckets),
        "latency": latency, "reference": reference,
    }
    table = markdown(result)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
