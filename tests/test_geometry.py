"""Tokens per image and the rest of a checkpoint's geometry come from the model (issue 12),
for the two checkpoints users brought: a CLIP 224/16 tower with the "full" strategy (197
tokens) and one with the default strategy (196), both stating transformers' default
`image_seq_length` of 576. The encoder, the router's prompts and the app builder agree with
transformers' own processor and model. No Ray here (tests/test_router_deploy.py wires it)."""

import json
import logging

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from deploy.app import build_app, check_deploy
from deploy.cli import main
from decoder_service.config import DecoderConfig
from encoder_service.config import EncoderConfig
from router.images import FetchPolicy
from router.prompt import PromptBuilder
from router.schemas import ChatMessage
from runtime.checkpoint import open_checkpoint
from runtime.geometry import geometry_of, model_geometry, tokens_per_image, warn_if_misstated

# name -> (demo-checkpoint options, tokens per image)
ISSUE_CHECKPOINTS = {
    "clip224-full-576": (["--image-size", "224", "--strategy", "full", "--image-seq-length", "576"], 197),
    "clip224-default-576": (["--image-size", "224", "--image-seq-length", "576"], 196),
}


@pytest.fixture(scope="session")
def issue_checkpoints(tmp_path_factory):
    """The issue's two checkpoints, tiny otherwise, written through the CLI."""
    root = tmp_path_factory.mktemp("issue12")
    for name, (options, _) in ISSUE_CHECKPOINTS.items():
        assert main(["demo-checkpoint", str(root / name), "--size", "tiny", *options]) == 0
    return {name: root / name for name in ISSUE_CHECKPOINTS}


def _expected(name):
    return ISSUE_CHECKPOINTS[name][1]


@pytest.mark.parametrize("name", ISSUE_CHECKPOINTS)
def test_tokens_per_image_comes_from_the_tower_not_image_seq_length(issue_checkpoints, name):
    checkpoint = open_checkpoint(str(issue_checkpoints[name]))
    assert checkpoint.config.image_seq_length == 576
    geometry = model_geometry(checkpoint)
    assert tokens_per_image(checkpoint) == geometry.tokens_per_image == _expected(name)
    assert (geometry.image_size, geometry.patch_size, geometry.text_hidden_size) == (224, 16, 64)
    assert geometry.image_token_id == checkpoint.config.image_token_index


def test_the_tiny_demo_checkpoint_keeps_16_tokens(tiny_checkpoint):
    assert tokens_per_image(open_checkpoint(str(tiny_checkpoint))) == 16


@pytest.mark.parametrize("strategy, expected", [("default", 195), ("full", 196)])
def test_a_siglip_tower_has_no_cls_row(strategy, expected):
    from transformers import LlamaConfig, SiglipVisionConfig

    config = LlavaConfig(vision_config=SiglipVisionConfig(image_size=224, patch_size=16),
                         text_config=LlamaConfig(), vision_feature_select_strategy=strategy)
    assert geometry_of(config).tokens_per_image == expected


def test_unsupported_strategies_and_towers_are_refused(tiny_checkpoint):
    from types import SimpleNamespace

    real = AutoConfig.from_pretrained(tiny_checkpoint)  # transformers itself refuses "cls_patch"
    config = SimpleNamespace(**{**vars(real), "vision_feature_select_strategy": "cls_patch"})
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be one of"):
        geometry_of(config)
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    config.vision_config.model_type = "dinov2"
    with pytest.raises(ValueError, match="'dinov2' is not a supported vision tower"):
        geometry_of(config)


def test_a_misstated_image_seq_length_gets_one_warning_line(issue_checkpoints, tiny_checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="runtime.geometry"):
        config = AutoConfig.from_pretrained(issue_checkpoints["clip224-full-576"])
        assert warn_if_misstated("m", config, geometry_of(config))
        tiny = AutoConfig.from_pretrained(tiny_checkpoint)
        assert not warn_if_misstated("tiny", tiny, geometry_of(tiny))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "image_seq_length 576" in lines[0] and "yields 197" in lines[0]


@pytest.mark.parametrize("name", ISSUE_CHECKPOINTS)
def test_router_prompts_equal_the_processors_own(issue_checkpoints, photos, name):
    processor = AutoProcessor.from_pretrained(issue_checkpoints[name])
    prompts = PromptBuilder(processor, tokens_per_image(open_checkpoint(str(issue_checkpoints[name]))))
    messages = [ChatMessage.model_validate({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "Compare."}]})]
    ours = prompts.build(messages)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                      {"type": "image"}, {"type": "text", "text": "Compare."}]}],
        add_generation_prompt=True, tokenize=False)
    theirs = processor(text=text, images=photos[:2])["input_ids"][0]
    assert ours.token_ids == list(theirs)
    assert ours.token_ids.count(processor.image_token_id) == 2 * _expected(name)


@pytest.mark.parametrize("name", ISSUE_CHECKPOINTS)
def test_encoder_embeddings_equal_transformers_features(issue_checkpoints, photos, name):
    import io

    from encoder_service.service import EncoderService
    from runtime.object_store import LocalObjectStore

    path = issue_checkpoints[name]
    store = LocalObjectStore()
    service = EncoderService(EncoderConfig(model=str(path), device="cpu", max_batch_items=2,
                                           strict_compile=True), store)
    try:
        blobs = []
        for photo in photos[:2]:
            buffer = io.BytesIO()
            photo.save(buffer, format="PNG")
            blobs.append(buffer.getvalue())
        import asyncio

        refs = asyncio.run(service.encode(blobs, "geometry"))
        assert service.tokens_per_image == _expected(name)
        arrays = store.get([ref.object_ref for ref in refs])
    finally:
        service.close()
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    pixels = processor.image_processor(images=photos[:2], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixels).pooler_output
    for ref, array, features in zip(refs, arrays, expected):
        assert ref.meta.num_tokens == _expected(name) and array.shape == (_expected(name), 64)
        assert np.abs(array - features.numpy()).max() < 1e-4


# --- build-time checks ---------------------------------------------------------------------------

def _disagreeing_processor(source, tmp_path):
    """A copy of `source` whose processor config forgets the CLS row its "full" tower keeps."""
    import shutil

    target = tmp_path / "disagrees"
    shutil.copytree(source, target)
    config_file = target / "processor_config.json"
    settings = json.loads(config_file.read_text())
    settings["num_additional_image_tokens"] = 0
    config_file.write_text(json.dumps(settings))
    return target


def test_a_processor_that_disagrees_with_its_tower_is_refused_at_build(issue_checkpoints, tmp_path):
    path = _disagreeing_processor(issue_checkpoints["clip224-full-576"], tmp_path)
    with pytest.raises(ValueError, match=r"expands <image> to 196 tokens but its vision tower "
                                         r"yields 197"):
        build_app({"model": str(path), "decoder": {"max_model_len": 512}})


def _check(path, **decoder):
    model = str(path)
    return check_deploy(model, EncoderConfig(model=model), DecoderConfig(model=model, **decoder),
                        FetchPolicy())


def test_the_builder_checks_the_deploy_against_the_geometry(issue_checkpoints, caplog):
    path = issue_checkpoints["clip224-full-576"]
    with caplog.at_level(logging.WARNING, logger="runtime.geometry"):
        assert _check(path, max_model_len=512).tokens_per_image == 197
    assert sum("image_seq_length 576" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match=r"decoder.max_model_len: 160 tokens cannot hold one image "
                                         r"\(197 tokens\)"):
        _check(path, max_model_len=160)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        _check(path, max_model_len=4096)
    model = str(path)
    with pytest.raises(ValueError, match="max_image_bytes: the router fetches up to 100 bytes"):
        check_deploy(model, EncoderConfig(model=model), DecoderConfig(model=model, max_model_len=512),
                     FetchPolicy(max_image_bytes=100))


@pytest.mark.parametrize("section", ["fetch", "encoder"])
def test_max_image_bytes_is_set_once_for_router_and_encoder(tiny_checkpoint, section):
    with pytest.raises(ValueError, match=f"{section}.max_image_bytes: set `max_image_bytes` once"):
        build_app({"model": str(tiny_checkpoint), section: {"max_image_bytes": 10}})
    build_app({"model": str(tiny_checkpoint), "max_image_bytes": 10})


def test_a_language_model_the_decoder_does_not_compute_is_refused_at_build(tiny_checkpoint, tmp_path):
    for f in tiny_checkpoint.iterdir():
        if f.is_file():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0,
                                                "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _check(tmp_path, max_model_len=128)  # within max_position_embeddings: one rotary table
    config["text_config"]["model_type"] = "gemma"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported text_config.model_type 'gemma'"):
        build_app({"model": str(tmp_path), "decoder": {"max_model_len": 64}})
