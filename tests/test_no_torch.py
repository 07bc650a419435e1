"""The router reads the processor without torch (runtime/no_torch.py): its prompts must be the
ones the processor makes with torch present, for fixed-count and per-size (LLaVA-NeXT) models."""

import json
import subprocess
import sys
from pathlib import Path

SIZES = [(61, 47), (640, 480), (300, 900), (1, 1)]

PROGRAM = """
import json, sys
from runtime.no_torch import without_torch
assert without_torch()
print(json.dumps(__import__("tests.test_no_torch", fromlist=["prompts_of"]).prompts_of(sys.argv[1])))
assert sys.modules["torch"] is None and sys.modules["torch_xla"] is None
"""


def prompts_of(model: str) -> dict:
    """Token ids of a two-image conversation and the placeholders per image size."""
    from transformers import AutoProcessor

    from router.prompt import PromptBuilder
    from router.schemas import ChatMessage
    from runtime.checkpoint import is_anyres, open_config
    from runtime.geometry import geometry_of

    processor = AutoProcessor.from_pretrained(model)
    config = open_config(model)
    prompts = PromptBuilder(processor, None if is_anyres(config) else geometry_of(config).tokens_per_image)
    messages = [ChatMessage.model_validate({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "Compare."}]})]
    rendered = prompts.render(messages)
    counts = [prompts.image_tokens(size) for size in SIZES]
    return {"processor": type(processor.image_processor).__name__, "counts": counts,
            "token_ids": prompts.tokenize(rendered, counts[:2]).token_ids}


def test_prompts_without_torch_equal_those_with_it(tiny_checkpoint, next_checkpoint):
    import torch  # noqa: F401: this process has torch, the child blocks it

    for model in (str(tiny_checkpoint), str(next_checkpoint)):
        child = subprocess.run([sys.executable, "-c", PROGRAM, model], capture_output=True,
                               text=True, timeout=300, cwd=Path(__file__).parents[1])
        assert child.returncode == 0, child.stderr[-2000:]
        assert "PyTorch was not found" not in child.stderr  # expected here, so not said
        without = json.loads(child.stdout.strip().splitlines()[-1])
        assert without == prompts_of(model)
        varies = len(set(without["counts"])) > 1  # LLaVA-NeXT counts per size, LLaVA-1.5 does not
        assert varies == (model == str(next_checkpoint))
