"""LLaVAs on other language models, served end to end over HTTP and token-exact against
transformers' own LLaVA: a Mistral with a sliding window (served up to its window by
default), llama3-scaled RoPE and a head tied to its embeddings; and a SigLIP tower with a
Qwen2 (biases on q/k/v, tied head), as llava-hf's llava-interleave-qwen checkpoints are."""

import json

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tests.support import assert_answers_like_transformers, deployed_app

WINDOW = 512


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


def _siglip_qwen2(tiny_checkpoint, target):
    """A tiny SigLIP + Qwen2 LLaVA ("full" features: SigLIP has no CLS row), with the demo's
    tokenizer and chat template and a SigLIP image processor."""
    from transformers import (LlavaConfig, LlavaProcessor, Qwen2Config, SiglipImageProcessorPil,
                              SiglipVisionConfig)

    from deploy.demo_checkpoint import SIZES, TEXT_INIT_RANGE

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    tokenizer, demo = processor.tokenizer, json.loads((tiny_checkpoint / "config.json").read_text())
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, image_size=64, patch_size=16)
    text = Qwen2Config(**SIZES["tiny"].text, vocab_size=demo["text_config"]["vocab_size"],
                       initializer_range=TEXT_INIT_RANGE, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=demo["image_token_index"], image_seq_length=16,
                         vision_feature_select_strategy="full", vision_feature_layer=-1,
                         projector_hidden_act="gelu", tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # biases start at zero: give q/k/v's some weight
        for name, parameter in model.named_parameters():
            if "language_model" in name and name.endswith("_proj.bias"):
                parameter.normal_(0.0, TEXT_INIT_RANGE)
    model.generation_config = LlavaForConditionalGeneration.from_pretrained(
        tiny_checkpoint).generation_config
    model.save_pretrained(target)
    LlavaProcessor(image_processor=SiglipImageProcessorPil(size={"height": 64, "width": 64}),
                   tokenizer=tokenizer, patch_size=16, vision_feature_select_strategy="full",
                   num_additional_image_tokens=0, chat_template=processor.chat_template,
                   image_token=processor.image_token).save_pretrained(target)
    return target


@pytest.mark.parametrize("name, build, language_model, max_model_len", [
    ("mistral-tied-llama3", _mistral_variant, "MistralModel", WINDOW),  # not max_position_embeddings
    ("siglip-qwen2", _siglip_qwen2, "Qwen2Model", 1024),
])
def test_a_llava_on_another_language_model_answers_like_transformers(
        ray_serve, serve_http_port, tiny_checkpoint, tmp_path, photos, name, build, language_model,
        max_model_len):
    path = build(tiny_checkpoint, tmp_path / name)
    model = LlavaForConditionalGeneration.from_pretrained(path)
    assert type(model.model.language_model).__name__ == language_model
    assert torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)  # tied
    args = {"model": str(path), "served_model_name": name, "strict_compile": True,
            "decoder": {"max_num_seqs": 2}, "encoder": {"max_batch_items": 2}}
    with deployed_app(ray_serve, serve_http_port, name, args, route_prefix=f"/{name}") as url:
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert models["data"][0]["max_model_len"] == max_model_len
        assert_answers_like_transformers(url, name, path, photos[1])
