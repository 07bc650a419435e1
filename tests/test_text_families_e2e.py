"""A LLaVA whose language model is a Mistral with a sliding window, llama3-scaled RoPE and a
head tied to its embeddings, served end to end over HTTP: token-exact against transformers'
own LLaVA, and served up to its window by default."""

import json
import threading

import httpx
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from deploy.app import build_app
from deploy.startup import health_probe, wait_until_ready
from tests.support import image_data_url

MAX_TOKENS, WINDOW = 8, 512


def _mistral_variant(tiny_checkpoint, target):
    """The tiny demo checkpoint's weights under a Mistral text config (the same tensor names),
    without `lm_head.weight`: transformers ties the head to the embeddings on load."""
    target.mkdir()
    for f in tiny_checkpoint.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (target / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tiny_checkpoint / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("lm_head.weight")},
              target / "model.safetensors")
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    text = config["text_config"]
    text.update(model_type="mistral", sliding_window=WINDOW, tie_word_embeddings=True,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 128})
    config["tie_word_embeddings"] = True
    (target / "config.json").write_text(json.dumps(config))
    return target


def _transformers_answer(path, photo, question):
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    assert type(model.model.language_model).__name__ == "MistralModel"
    assert torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True,
        tokenize=False)
    inputs = processor(text=text, images=[photo], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    prompt_tokens = inputs["input_ids"].shape[1]
    return prompt_tokens, processor.decode(out[0, prompt_tokens:], skip_special_tokens=True)


def test_a_mistral_llava_with_scaled_rope_and_a_tied_head_answers_like_transformers(
        ray_serve, serve_http_port, tiny_checkpoint, tmp_path, photos):
    path = _mistral_variant(tiny_checkpoint, tmp_path / "mistral")
    name = "mistral-tied-llama3"
    app = build_app({"model": str(path), "served_model_name": name, "strict_compile": True,
                     "decoder": {"max_num_seqs": 2}, "encoder": {"max_batch_items": 2}})
    ray_serve.run(app, name=name, route_prefix=f"/{name}")
    url = f"http://127.0.0.1:{serve_http_port}/{name}"
    try:
        outcome = wait_until_ready([health_probe(f"{url}/health")], threading.Event(), timeout_s=300)
        assert outcome.state == "ready", outcome.detail
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert models["data"][0]["max_model_len"] == WINDOW  # not max_position_embeddings (1024)
        question = "What is in this picture?"
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": name, "max_tokens": MAX_TOKENS, "temperature": 0, "messages": [
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(photos[1])}},
                    {"type": "text", "text": question}]}]})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        prompt_tokens, text = _transformers_answer(path, photos[1], question)
        assert body["usage"]["prompt_tokens"] == prompt_tokens
        assert body["choices"][0]["message"]["content"] == text
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["decoder"]["compilations_after_warmup"] == 0
    finally:
        ray_serve.delete(name)
