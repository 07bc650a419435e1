"""The vision encoder on the XLA device, at its buckets: exact features, no recompilation."""

import logging

import numpy as np
import pytest
from PIL import ImageOps

from encoder_service.runner import EncoderRunner
from encoder_service.vision_model import load_vision_encoder
from runtime.checkpoint import open_checkpoint
from runtime.compile_guard import CompileGuard, RecompilationError, xla_compilation_count
from runtime.device import open_device

BUCKETS = (1, 2, 4, 8)
TOLERANCE = 1e-4  # max abs difference from transformers' eager fp32 features


@pytest.fixture(scope="module")
def warm_runner(tiny_checkpoint):
    device = open_device("xla")
    guard = CompileGuard(device, strict=True, name="encoder-test")
    runner = EncoderRunner(load_vision_encoder(open_checkpoint(str(tiny_checkpoint))), device,
                           BUCKETS, guard)
    with _capture_logs() as records:
        runner.warm_up()
    return runner, records


@pytest.fixture(scope="module")
def photo_variants(photos):
    """16 distinct real photographs: each photo as is, mirrored, flipped and cropped."""
    variants = []
    for photo in photos:
        width, height = photo.size
        variants += [photo, ImageOps.mirror(photo), ImageOps.flip(photo),
                     photo.crop((width // 4, height // 4, width, height))]
    return variants


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, photo_variants):
    """(pixels [N, 3, 64, 64], eager fp32 features [N, 16, 64]) from transformers itself."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_checkpoint).image_processor
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    pixels = processor(images=photo_variants, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = torch.stack(list(model.get_image_features(pixel_values=pixels).pooler_output))
    return pixels.numpy(), features.numpy()


class _capture_logs:
    def __enter__(self):
        self.records = []
        self.handler = logging.Handler()
        self.handler.emit = self.records.append
        logging.getLogger("encoder_service.runner").addHandler(self.handler)
        logging.getLogger("encoder_service.runner").setLevel(logging.INFO)
        return self.records

    def __exit__(self, *exc):
        logging.getLogger("encoder_service.runner").removeHandler(self.handler)


def test_warm_up_compiles_and_logs_every_bucket(warm_runner):
    runner, records = warm_runner
    lines = [r.getMessage() for r in records]
    per_bucket = [line for line in lines if "-- image items:" in line]
    # The largest bucket first (every batch fits it), then the rest, smallest first.
    assert [int(line.split("items: ")[1].split(",")[0]) for line in per_bucket] == [8, 1, 2, 4]
    assert all("compiled in" in line and line.endswith(" s") for line in per_bucket)
    assert any("compiled 4 buckets" in line for line in lines)
    assert set(runner.warmup_seconds) == set(BUCKETS)
    assert all(seconds > 0 for seconds in runner.warmup_seconds.values())
    assert runner.guard.is_warm and runner.guard.warmup_compilations <= len(BUCKETS)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 8, 11, 16])
def test_every_bucket_matches_transformers_with_padding(warm_runner, reference, count):
    runner, _ = warm_runner
    pixels, expected = reference
    before = {b: vars(s).copy() for b, s in runner.bucket_stats.items()}
    out = runner.run(list(pixels[:count]))
    assert len(out) == count
    for row, features in enumerate(out):
        assert features.shape == (16, 64) and features.dtype == np.float32
        assert np.abs(features - expected[row]).max() < TOLERANCE, f"row {row} of {count}"
    padding = sum(s.padding_rows - before[b]["padding_rows"] for b, s in runner.bucket_stats.items())
    assert padding == {3: 1, 5: 3, 11: 1}.get(count, 0)


def test_padding_and_neighbours_never_change_a_row(warm_runner, reference):
    runner, _ = warm_runner
    pixels, _ = reference
    alone = runner.run([pixels[0]])[0]
    for neighbours in ([pixels[5], pixels[9]], [pixels[1]] * 6, [np.full_like(pixels[0], 7.0)]):
        together = runner.run([pixels[0], *neighbours])[0]
        np.testing.assert_allclose(together, alone, atol=1e-5)


def test_200_random_item_counts_add_no_compilation(warm_runner):
    runner, _ = warm_runner
    rng = np.random.default_rng(3)
    before = xla_compilation_count()
    batches_before = sum(s.batches for s in runner.bucket_stats.values())
    items = 0
    for count in rng.integers(1, 3 * BUCKETS[-1] + 1, size=200):
        pixels = list(rng.standard_normal((count, 3, 64, 64), dtype=np.float32))
        assert len(runner.run(pixels)) == count
        items += count
    assert xla_compilation_count() == before
    assert runner.guard.compilations_after_warmup == 0
    batches = sum(s.batches for s in runner.bucket_stats.values()) - batches_before
    assert batches > 200  # counts above the largest bucket ran as several steps
    assert all(s.batches > 0 for s in runner.bucket_stats.values())


def test_graphs_compiled_by_someone_else_in_the_process_are_not_blamed_on_the_encoder(warm_runner):
    import torch

    runner, _ = warm_runner
    before = xla_compilation_count()
    other = torch.arange(13.0, device=runner.device.torch_device) * 3  # e.g. a colocated decoder warming up
    runner.device.sync()
    assert xla_compilation_count() > before
    assert len(runner.run([np.zeros((3, 64, 64), np.float32)])) == 1  # strict guard: no raise
    assert runner.guard.compilations_after_warmup == 0
    del other


def test_a_shape_outside_the_buckets_would_be_caught(warm_runner):
    runner, _ = warm_runner
    runner._step(np.zeros((3, 3, 64, 64), np.float32))  # 3 is not a bucket: a new graph
    with pytest.raises(RecompilationError, match="after warm-up"):
        runner.guard.check("planted bucket 3")


def test_wrong_pixel_shape_is_a_clear_error(warm_runner):
    runner, _ = warm_runner
    with pytest.raises(ValueError, match=r"pixels of shape \(3, 32, 32\)"):
        runner.run([np.zeros((3, 32, 32), np.float32)])


def test_warm_up_compiles_without_running_and_steps_reuse_its_graph(tiny_checkpoint):
    """Warm-up compiles a bucket without running it (a full batch through the tower); the
    first step finds that executable (the strict guard would raise on a compilation)."""
    import time

    import torch_xla.debug.metrics as met

    def executions():
        return (met.metric_data("ExecuteTime") or (0,))[0]

    device = open_device("xla")
    guard = CompileGuard(device, strict=True, name="encoder-test-compile-only")
    model = load_vision_encoder(open_checkpoint(str(tiny_checkpoint)))
    runner = EncoderRunner(model, device, (6,), guard)  # no other test compiles a batch of 6
    before, told = executions(), []
    runner.warm_up(progress=lambda *progress: told.append(progress))
    assert guard.warmup_compilations == 1 and executions() == before
    assert told == [(0, 1, 1), (1, 1, 1)]  # compiled, before serving, planned
    pixels = np.random.default_rng(0).random((2, *runner.pixel_shape), dtype=np.float32)
    out = runner.run(list(pixels))
    assert guard.compilations_after_warmup == 0
    deadline = time.monotonic() + 10  # torch_xla records an execution's metric after its result
    while executions() == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert executions() == before + 1
    assert [o.shape for o in out] == [runner.output_shape] * 2 and np.isfinite(out).all()
