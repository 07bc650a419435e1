"""Suite-wide setup: the XLA path runs on the CPU through PJRT, and nothing reaches a model hub."""

import os

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from runtime.device import xla_environment  # noqa: E402

os.environ.update(xla_environment(os.environ))

import pytest  # noqa: E402

from deploy.startup import wait_healthy  # noqa: E402
from tests.support import free_port  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The demo checkpoint every test shares, written once through the CLI."""
    from deploy.cli import main

    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["demo-checkpoint", str(directory), "--size", "tiny", "--seed", "0"]) == 0
    return directory


@pytest.fixture(scope="session")
def photos():
    """Real photographs of different sizes and content, as PIL images."""
    from PIL import Image
    from skimage import data

    return [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee()),
            Image.fromarray(data.chelsea()), Image.fromarray(data.rocket())]


@pytest.fixture(scope="session")
def transformers_server(tiny_checkpoint, tmp_path_factory):
    """`transformers serve CHECKPOINT --device cpu`: the reference peer, on a free port."""
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    hf_home = tmp_path_factory.mktemp("hf-home")
    (hf_home / "hub").mkdir()
    log_path = tmp_path_factory.mktemp("logs") / "transformers-serve.log"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    cli = Path(sys.executable).parent / "transformers"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(cli), "serve", str(tiny_checkpoint), "--device", "cpu", "--host", "127.0.0.1",
             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", timeout_s=180, process=process)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)



@pytest.fixture(scope="session")
def serve_http_port():
    return free_port()


@pytest.fixture(scope="session")
def metrics_port():
    """Where the session's Ray node exports Prometheus metrics."""
    return free_port()


@pytest.fixture(scope="session")
def ray_serve(serve_http_port, metrics_port):
    """One local Ray + Serve for the whole session (start-up costs ~15 s). Tests deploy apps
    under their own names and delete them when done."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port,
             runtime_env={"env_vars": {"PJRT_DEVICE": "CPU", "HF_HUB_OFFLINE": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": serve_http_port})
    try:
        yield serve
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def reference_llava(tiny_checkpoint):
    """transformers' own LLaVA on the CPU, eager fp32: the ground truth for tokens and features."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="float32").eval()
    return processor, model


def _decoder(checkpoint, **overrides):
    """A session-long decoder, every graph compiled before it is handed out: one still compiling
    in the background (as a served replica does) would add to the process-wide compile count
    that later modules check (the encoder's tests) whenever it found the host idle."""
    from decoder_service.config import DecoderConfig
    from decoder_service.service import DecoderService
    from runtime.object_store import LocalObjectStore

    return DecoderService(DecoderConfig(model=str(checkpoint), **{
        "max_model_len": 256, "max_num_seqs": 4, "max_images_per_request": 4,
        "max_num_batched_tokens": 64, "strict_compile": True, "full_warmup": True, **overrides}),
        LocalObjectStore())


@pytest.fixture(scope="session")
def crowded_decoder(tiny_checkpoint):
    """A warmed decoder whose KV pool holds 20 blocks of 16 tokens (one 256-token sequence and
    a little more), so concurrent requests wait for blocks or are preempted."""
    from decoder_service.config import KVGeometry

    block_bytes = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=16, dtype_bytes=4).block_bytes(16)
    service = _decoder(tiny_checkpoint, kv_cache_bytes=20 * block_bytes)
    assert service.shapes.num_blocks == 20
    yield service
    service.shutdown()


@pytest.fixture(scope="session")
def decoder_service(tiny_checkpoint):
    """One warmed decoder (strict compile guard) shared by the decoder tests. Its step budget
    (64 tokens) is smaller than most prompts with images (16 tokens each), so prompts are
    chunked, chunk boundaries fall inside image spans, and chunks share steps with decodes."""
    service = _decoder(tiny_checkpoint)
    yield service
    service.shutdown()


# --- issue 17: LLaVA-NeXT (anyres) ----------------------------------------------------------
@pytest.fixture(scope="session")
def next_checkpoint(tmp_path_factory):
    """The tiny LLaVA-NeXT demo checkpoint (64 px tiles, five grid pinpoints), through the CLI."""
    from deploy.cli import main

    directory = tmp_path_factory.mktemp("ckpt") / "next-tiny"
    assert main(["demo-checkpoint", str(directory), "--family", "next", "--size", "tiny"]) == 0
    return directory


@pytest.fixture(scope="session")
def reference_llava_next(next_checkpoint):
    """transformers' own LLaVA-NeXT on the CPU, eager fp32."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    processor = AutoProcessor.from_pretrained(next_checkpoint)
    model = LlavaNextForConditionalGeneration.from_pretrained(
        next_checkpoint, dtype="float32", attn_implementation="eager").eval()
    return processor, model
