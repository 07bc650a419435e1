"""The demo checkpoints load offline as ordinary llava-hf checkpoints."""

import hashlib
import os
import subprocess
import sys

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from deploy.demo_checkpoint import SIZES, build_config, build_tokenizer, write_demo_checkpoint


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_loads_offline_in_a_fresh_process(tiny_checkpoint):
    code = ("import sys; from transformers import AutoProcessor, LlavaForConditionalGeneration;"
            "AutoProcessor.from_pretrained(sys.argv[1]);"
            "LlavaForConditionalGeneration.from_pretrained(sys.argv[1]); print('ok')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tiny_checkpoint.parent / "empty-hf-home")}
    result = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_image_placeholders_match_the_vision_tower(tiny_checkpoint, photos):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=photos[:2], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    placeholders = int((inputs["input_ids"] == model.config.image_token_index).sum())
    assert [f.shape[0] for f in features] == [placeholders // 2] * 2
    assert placeholders // 2 == (64 // 16) ** 2  # CLS dropped by the "default" strategy
    # Nothing truncates before the model's own context does.
    assert processor.tokenizer.model_max_length >= model.config.text_config.max_position_embeddings


def test_chat_template_keeps_images_in_place(tiny_checkpoint):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "First"}, {"type": "image"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And?"},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "Be brief. USER: First<image>\n ASSISTANT: A cat.[SEP]USER: And? ASSISTANT:"


def test_tokenizer_adds_bos_only_and_keeps_image_token_whole():
    tokenizer = build_tokenizer(max_length=1024)
    ids = tokenizer("hello <image> world")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<image>") in ids


def test_same_seed_same_bytes_other_seed_other_weights(tiny_checkpoint, tmp_path):
    again = write_demo_checkpoint(tmp_path / "again", size="tiny", seed=0)
    other = write_demo_checkpoint(tmp_path / "other", size="tiny", seed=1)
    assert _digest(again) == _digest(tiny_checkpoint)
    assert _digest(other) != _digest(tiny_checkpoint)


def test_sizes_have_the_promised_parameter_counts():
    tokenizer = build_tokenizer(max_length=2048)
    counts = {}
    for size in SIZES:
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(build_config(size, tokenizer))
        vision = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
        text = sum(p.numel() for n, p in model.named_parameters()
                   if "language_model" in n or n.startswith("lm_head"))
        counts[size] = (vision, text)
    assert sum(counts["tiny"]) < 5_000_000
    assert 80_000_000 < counts["small"][0] < 95_000_000  # ViT-B/16
    assert 100_000_000 < counts["small"][1] < 200_000_000


def test_next_family_expands_each_image_to_its_own_feature_count(next_checkpoint):
    """`--family next`: AutoProcessor is LlavaNext's and writes, per image, exactly as many
    placeholders as LlavaNext's packed features have rows, which differ with the image shape."""
    from PIL import Image
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    processor = AutoProcessor.from_pretrained(next_checkpoint)
    assert isinstance(processor, LlavaNextProcessor)
    assert len(processor.image_processor.image_grid_pinpoints) >= 3
    model = LlavaNextForConditionalGeneration.from_pretrained(next_checkpoint).eval()
    images = [Image.new("RGB", size, (30, 90, 160)) for size in [(64, 64), (130, 60), (40, 150)]]
    counts = []
    for image in images:
        inputs = processor(text="<image>", images=[image], return_tensors="pt")
        with torch.no_grad():
            (features,) = model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).pooler_output
        counts.append(int((inputs["input_ids"] == model.config.image_token_index).sum()))
        assert features.shape[0] == counts[-1]
    assert len(set(counts)) == 3
