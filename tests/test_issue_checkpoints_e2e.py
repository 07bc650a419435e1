"""The issue-12 checkpoints served end to end over HTTP, token-exact against transformers' own
LLaVA: a CLIP 224/16 tower with the "full" strategy (197 tokens per image) and one with the
default strategy (196), both stating `image_seq_length` 576. A deploy that cannot turn
healthy fails the test at once with the app's own reason (no 300 s wait)."""

import threading

import httpx
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from deploy.app import build_app
from deploy.startup import health_probe, wait_until_ready
from tests.support import image_data_url
from tests.test_geometry import ISSUE_CHECKPOINTS, issue_checkpoints  # noqa: F401: the fixture

MAX_TOKENS = 8


def _transformers_answer(path, photo, question):
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True,
        tokenize=False)
    inputs = processor(text=text, images=[photo], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    prompt_tokens = inputs["input_ids"].shape[1]
    return prompt_tokens, processor.decode(out[0, prompt_tokens:], skip_special_tokens=True)


@pytest.mark.parametrize("name", ISSUE_CHECKPOINTS)
def test_issue_checkpoint_answers_like_transformers(ray_serve, serve_http_port, issue_checkpoints,
                                                   photos, name):
    path = issue_checkpoints[name]
    app = build_app({"model": str(path), "served_model_name": name, "strict_compile": True,
                     "decoder": {"max_model_len": 512, "max_num_seqs": 2},
                     "encoder": {"max_batch_items": 2}})
    ray_serve.run(app, name=name, route_prefix=f"/{name}")
    url = f"http://127.0.0.1:{serve_http_port}/{name}"
    try:
        outcome = wait_until_ready([health_probe(f"{url}/health")], threading.Event(), timeout_s=300)
        assert outcome.state == "ready", outcome.detail
        question = "What is in this picture?"
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": name, "max_tokens": MAX_TOKENS, "temperature": 0, "messages": [
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(photos[2])}},
                    {"type": "text", "text": question}]}]})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        prompt_tokens, text = _transformers_answer(path, photos[2], question)
        assert body["usage"]["prompt_tokens"] == prompt_tokens
        assert body["choices"][0]["message"]["content"] == text
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["encoder"]["compilations_after_warmup"] == 0
        assert health["decoder"]["compilations_after_warmup"] == 0
    finally:
        ray_serve.delete(name)
