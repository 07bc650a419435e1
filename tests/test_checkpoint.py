"""Each service can load its own half of a checkpoint, and only that half."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from runtime.checkpoint import canonical_name, open_checkpoint, text_state_dict, vision_state_dict


def _strip(tensors, prefix):
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def test_halves_partition_the_checkpoint(tiny_checkpoint):
    checkpoint = open_checkpoint(str(tiny_checkpoint))
    vision, text = vision_state_dict(checkpoint), text_state_dict(checkpoint)
    full = load_file(tiny_checkpoint / "model.safetensors")
    assert not set(vision) & set(text)
    loaded = {"model." + k if not k.startswith("lm_head") else k for k in {**vision, **text}}
    assert loaded == {canonical_name(k) for k in full}
    assert "lm_head.weight" in text and not any(k.startswith("language_model") for k in vision)


def test_vision_half_rebuilds_the_image_features(tiny_checkpoint, photos):
    checkpoint = open_checkpoint(str(tiny_checkpoint))
    tensors = vision_state_dict(checkpoint)
    tower = AutoModel.from_config(checkpoint.config.vision_config)
    tower.load_state_dict(_strip(tensors, "vision_tower."), strict=True)
    projector = LlavaMultiModalProjector(checkpoint.config)
    projector.load_state_dict(_strip(tensors, "multi_modal_projector."), strict=True)

    reference = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.stack(reference.get_image_features(pixel_values=pixels).pooler_output)
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(projector(hidden), expected)


def _copy_with_names(source, target, rename):
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            (target / f.name).write_bytes(f.read_bytes())
    tensors = load_file(source / "model.safetensors")
    save_file({rename(k): v.contiguous() for k, v in tensors.items()}, target / "model.safetensors")
    return target


@pytest.mark.parametrize("layout", ["current", "llava-hf v4 with vision_model"])
def test_every_known_layout_loads_the_same_halves(tiny_checkpoint, tmp_path, layout):
    if layout == "current":
        rename = canonical_name
    else:
        def rename(name):
            return canonical_name(name).replace("model.vision_tower.", "vision_tower.vision_model.")
    copy = open_checkpoint(str(_copy_with_names(tiny_checkpoint, tmp_path, rename)))
    original = open_checkpoint(str(tiny_checkpoint))
    for half in (vision_state_dict, text_state_dict):
        a, b = half(copy), half(original)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_head_tied_to_the_embeddings_loads_as_transformers_ties_it(tiny_checkpoint, tmp_path):
    """tie_word_embeddings: no lm_head.weight is stored; the decoder's head is the embedding."""
    from decoder_service.runner import load_text_model

    _copy_with_names(tiny_checkpoint, tmp_path, canonical_name)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["tie_word_embeddings"] = config["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))

    text = text_state_dict(open_checkpoint(str(tmp_path)))
    assert text["lm_head.weight"] is text["language_model.embed_tokens.weight"]
    model = load_text_model(open_checkpoint(str(tmp_path)), torch.float32)
    reference = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    torch.testing.assert_close(model.lm_head(torch.eye(model.lm_head.weight.shape[0])[:3]),
                               reference.lm_head.weight.T[:3])
    torch.testing.assert_close(reference.lm_head.weight,
                               reference.get_input_embeddings().weight)  # transformers tied them

    untied = tmp_path / "untied"
    untied.mkdir()
    for f in tmp_path.iterdir():
        if f.is_file():
            (untied / f.name).write_bytes(f.read_bytes())
    config["text_config"]["tie_word_embeddings"] = config["tie_word_embeddings"] = False
    (untied / "config.json").write_text(json.dumps(config))
    assert "lm_head.weight" not in text_state_dict(open_checkpoint(str(untied)))  # not guessed


def test_canonical_names():
    assert canonical_name("language_model.lm_head.weight") == "lm_head.weight"
    assert canonical_name("language_model.model.norm.weight") == "model.language_model.norm.weight"
    assert canonical_name("vision_tower.vision_model.post_layernorm.bias") == (
        "model.vision_tower.post_layernorm.bias")
    assert canonical_name("model.multi_modal_projector.linear_1.bias") == (
        "model.multi_modal_projector.linear_1.bias")


def test_not_a_llava_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a LLaVA-family checkpoint"):
        open_checkpoint(str(tmp_path))


def test_llava_next_halves_load_in_both_layouts(next_checkpoint, tmp_path):
    """model_type llava_next: the encoder's half holds image_newline too, under either layout."""
    renames = (("model.vision_tower.", "vision_tower.vision_model."),
               ("model.multi_modal_projector.", "multi_modal_projector."),
               ("model.image_newline", "image_newline"),
               ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))

    def legacy(name):
        name = canonical_name(name)
        return next((old + name[len(new):] for new, old in renames if name.startswith(new)), name)

    copy = open_checkpoint(str(_copy_with_names(next_checkpoint, tmp_path, legacy)))
    original = open_checkpoint(str(next_checkpoint))
    assert copy.is_anyres and original.is_anyres
    assert "image_newline" in load_file(tmp_path / "model.safetensors")  # the old name was written
    vision, text = vision_state_dict(original), text_state_dict(original)
    assert "image_newline" in vision and not any("newline" in k for k in text)
    for half in (vision_state_dict, text_state_dict):
        a, b = half(copy), half(original)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
