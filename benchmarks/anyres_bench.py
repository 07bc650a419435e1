"""LLaVA-NeXT (anyres) encoder benchmark: tiles/s per bucket, padding waste, packing cost.

    .venv/bin/python benchmarks/anyres_bench.py --size small

- Geometry of a realistic mix of aspect ratios at llava-v1.6's own sizes (336 px tiles,
  24x24 patches, the five llava-hf pinpoints; pure math, no weights): tiles and tokens per
  image, and the padding the encoder runs when tiles are items (bucket math, one request at
  a time) against padding every image to the largest tile count (image-count buckets).
- Device: tiles/s per item-batch bucket for the demo checkpoint's tower (a tile is an item,
  so this is the runner's items/s), and a concurrent service workload of random-shape images
  (tiles of different requests fill shared steps): padding as run, images/s, compilations.
- Host packing (unpad + newline gather) per image at llava-v1.6-7b's sizes (hidden 4096).
Prints markdown and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
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

from benchmarks.encoder_bench import measure_buckets, png, run_workload  # noqa: E402

# (width, height, share): phone photos, screenshots, a document page, square crops, panoramas.
ASPECT_MIX = [(4032, 3024, 0.25), (3024, 4032, 0.20), (1920, 1080, 0.15), (1080, 1920, 0.10),
              (1024, 1024, 0.10), (1240, 1754, 0.08), (2560, 1600, 0.07), (3000, 1000, 0.05)]


def llava_v16_layout():
    from transformers import CLIPVisionConfig, LlavaNextConfig

    from encoder_service.anyres import AnyresLayout

    vision = CLIPVisionConfig(image_size=336, patch_size=14)  # llava-v1.6's tower geometry
    return AnyresLayout.of(LlavaNextConfig(vision_config=vision))


def mix_geometry(buckets, requests: int, seed: int = 0) -> dict:
    from runtime.buckets import padding_waste

    layout = llava_v16_layout()
    shapes = [{"size": f"{w}x{h}", "share": share, "tiles": layout.num_tiles((h, w)),
               "tokens": layout.num_tokens((h, w))} for w, h, share in ASPECT_MIX]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(shapes), size=requests, p=[s["share"] for s in shapes])
    tiles = np.array([shapes[i]["tiles"] for i in picks])
    most = max(s["tiles"] for s in shapes)
    per_request = sum(padding_waste(int(n), buckets) for n in tiles)
    return {"shapes": shapes, "requests": requests, "tiles": int(tiles.sum()),
            "mean_tokens": float(np.mean([shapes[i]["tokens"] for i in picks])),
            "max_tokens": max(s["tokens"] for s in shapes),
            "waste_tiles_as_items": per_request / (per_request + tiles.sum()),
            "waste_padded_to_most_tiles": float((most - tiles).sum() / (most * len(tiles)))}


def pack_cost(repeats: int = 20) -> dict:
    from encoder_service.anyres import pack

    layout = llava_v16_layout()
    hidden, (h, w) = 4096, (3024, 4032)
    rng = np.random.default_rng(0)
    tiles = [rng.standard_normal((layout.tokens_per_tile, hidden), dtype=np.float32)
             for _ in range(layout.num_tiles((h, w)))]
    newline = rng.standard_normal(hidden, dtype=np.float32)
    seconds, copy_seconds = [], []
    for _ in range(repeats):
        began = time.perf_counter()
        out = pack(layout, tiles, newline, (h, w))
        seconds.append(time.perf_counter() - began)
        began = time.perf_counter()
        out.copy()  # the floor: one copy of the output into a fresh array
        copy_seconds.append(time.perf_counter() - began)
    return {"image": f"{w}x{h}", "tiles": len(tiles), "tokens": len(out), "hidden": hidden,
            "ms": 1000 * statistics.median(seconds), "copy_ms": 1000 * statistics.median(copy_seconds),
            "mb": out.nbytes / 2**20}


def random_images(count: int, seed: int = 1) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        w, h, _ = ASPECT_MIX[rng.choice(len(ASPECT_MIX), p=[s for *_, s in ASPECT_MIX])]
        scale = rng.uniform(0.1, 0.25)  # smaller files, same aspect ratios
        size = (max(1, int(w * scale)), max(1, int(h * scale)))
        images.append(png(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))))
    return images


def markdown(result: dict) -> str:
    g, w, p = result["geometry"], result["workload"], result["pack"]
    lines = [f"Checkpoint `next-{result['size']}` ({result['tokens_per_tile']} tokens x "
             f"{result['hidden_size']} per tile), device {result['device']}, {result['machine']}, "
             f"{result['date']}.", "",
             "| bucket (tiles) | step (s) | tiles/s |", "| ---: | ---: | ---: |"]
    for bucket, run in result["buckets"].items():
        lines.append(f"| {bucket} | {run['step_s']:.3f} | {run['items_per_s']:.2f} |")
    lines += ["", "llava-v1.6 geometry (336 px tiles, 576 tokens each, five pinpoints) for the mix:", "",
              "| image (w x h) | share | tiles | tokens |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {s['size']} | {100 * s['share']:.0f} % | {s['tiles']} | {s['tokens']} |"
              for s in g["shapes"]]
    lines += ["", "| measure | value |", "| --- | ---: |",
              f"| padding, tiles as items, one request at a time ({g['requests']} images, "
              f"buckets {result['buckets_list']}) | {100 * g['waste_tiles_as_items']:.1f} % of rows |",
              f"| padding, every image padded to the most tiles (image-count buckets) | "
              f"{100 * g['waste_padded_to_most_tiles']:.1f} % of rows |",
              f"| mean tokens per image in the mix (largest {g['max_tokens']}) | {g['mean_tokens']:.0f} |",
              f"| service: {w['requests']} images of the mix, {result['concurrency']} concurrent, "
              f"{w['tiles']} tiles: padding as run | {100 * w['padding_fraction']:.1f} % of rows |",
              f"| service throughput on that workload (decode + preprocess + device + pack) | "
              f"{w['images_per_s']:.2f} images/s, {w['tiles_per_s']:.2f} tiles/s |",
              f"| compilations after warm-up | {w['compilations_after_warmup']} |",
              f"| host pack (unpad + newline gather), {p['image']}, {p['tiles']} tiles, hidden "
              f"{p['hidden']} | {p['ms']:.1f} ms for {p['tokens']} rows ({p['mb']:.0f} MiB; one plain copy of "
              f"them: {p['copy_ms']:.1f} ms) |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "small"), default="small")
    parser.add_argument("--max-batch-items", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per bucket")
    parser.add_argument("--images", type=int, default=16, help="images in the service workload")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench-results/anyres.json"))
    args = parser.parse_args(argv)

    from benchmarks.common import machine, machine_line
    from deploy.demo_checkpoint import cached_demo_checkpoint
    from encoder_service.config import EncoderConfig
    from encoder_service.service import EncoderService
    from runtime.checkpoint import open_checkpoint
    from runtime.object_store import LocalObjectStore

    checkpoint = open_checkpoint(str(cached_demo_checkpoint(args.size, family="next")))
    config = EncoderConfig(model=str(checkpoint.path), max_batch_items=args.max_batch_items,
                           full_warmup=True)
    geometry = mix_geometry(config.buckets, requests=1000)
    packing = pack_cost()
    service = EncoderService(config, LocalObjectStore())
    print(f"service ready in {service.startup_seconds:.1f} s", flush=True)
    buckets = measure_buckets(checkpoint, config.buckets, args.repeats)
    workload = asyncio.run(run_workload(service, [[b] for b in random_images(args.images)],
                                        args.concurrency))
    workload["tiles"] = workload["rows_run"] - workload["padding_rows"]  # its "items" are images
    workload["images_per_s"] = workload["items"] / workload["seconds"]
    workload["tiles_per_s"] = workload["tiles"] / workload["seconds"]
    service.close()
    result = {
        "size": args.size, "date": date.today().isoformat(),
        "device": "xla (PJRT " + os.environ.get("PJRT_DEVICE", "?") + ")",
        "machine": machine_line(machine()) + ", shared with other work (noisy)",
        "concurrency": args.concurrency, "buckets_list": list(config.buckets),
        "tokens_per_tile": service.tokens_per_image, "hidden_size": service.hidden_size,
        "startup_s": service.startup_seconds, "buckets": buckets, "workload": workload,
        "geometry": geometry, "pack": packing,
    }
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
