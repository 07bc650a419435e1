"""LLaVA-family checkpoints, opened by halves.

A checkpoint is a directory or a hub id in Hugging Face format: LLaVA-1.5
(`model_type: llava`) or LLaVA-NeXT (`llava_next`, anyres tiles; its encoder half also
holds the `image_newline` row). The encoder needs only the vision tower and projector
(and `image_newline`); the decoder only the language model and its
head. `vision_state_dict` and `text_state_dict` read just those tensors out of the
safetensors files (lazily, file by file), so each service holds its own weights.

Tensor names are normalised to the current transformers layout
(`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.image_newline`,
`model.language_model.*`, `lm_head.*`); the older llava-hf hub layout
(`vision_tower.vision_model.*`, `language_model.model.*`, `image_newline`, ...) is renamed on
the way in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Older llava-hf layout -> current layout. Applied in order, first match wins.
_LEGACY_RENAMES = (
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^vision_tower\.vision_model\."), "model.vision_tower."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
    (re.compile(r"^image_newline$"), "model.image_newline"),
)

# config.json model types served: LLaVA-1.5 and LLaVA-NeXT (anyres).
LLAVA_MODEL_TYPES = ("llava", "llava_next")

VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline")
TEXT_PREFIXES = ("model.language_model.", "lm_head.")
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


def canonical_name(name: str) -> str:
    for pattern, replacement in _LEGACY_RENAMES:
        if pattern.match(name):
            return pattern.sub(replacement, name, count=1)
    return name


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    model_id: str  # what the user named: a hub id or the directory as given
    config: object  # transformers.LlavaConfig or LlavaNextConfig

    @property
    def is_anyres(self) -> bool:
        return is_anyres(self.config)

    def weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [self.path / name for name in names]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in checkpoint {self.path}")
        return files

    def tensors(self, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Tensors whose canonical name starts with one of `prefixes`, prefix 'model.' dropped."""
        from safetensors import safe_open

        selected: dict[str, torch.Tensor] = {}
        for file in self.weight_files():
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    canonical = canonical_name(name)
                    if canonical.startswith(prefixes):
                        selected[canonical.removeprefix("model.")] = f.get_tensor(name)
        if not selected:
            raise ValueError(f"checkpoint {self.path} has no tensors under {', '.join(prefixes)}")
        return selected


def is_anyres(config) -> bool:
    """LLaVA-NeXT: an image is a base view plus grid tiles, and its token count varies."""
    return config.model_type == "llava_next"


def open_checkpoint(model: str) -> Checkpoint:
    """Opens a local directory, or a hub id through the Hugging Face cache.

    With HF_HUB_OFFLINE=1 a hub id resolves only if it is already cached.
    """
    path = Path(model).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model, allow_patterns=_HUB_FILES))
    return Checkpoint(path=path, model_id=model, config=open_config(str(path), model))


def open_config(model: str, model_id: str | None = None):
    """The checkpoint's `LlavaConfig` or `LlavaNextConfig` alone (a hub id fetches config.json,
    not the weights)."""
    from transformers import AutoConfig

    path = Path(model).expanduser()
    config = AutoConfig.from_pretrained(path if path.is_dir() else model)
    if getattr(config, "model_type", None) not in LLAVA_MODEL_TYPES:
        raise ValueError(
            f"{model_id or model}: model_type {getattr(config, 'model_type', None)!r} is not a "
            f"LLaVA-family checkpoint (expected one of {', '.join(LLAVA_MODEL_TYPES)})")
    return config


def vision_state_dict(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """`vision_tower.*`, `multi_modal_projector.*` (and LLaVA-NeXT's `image_newline`) tensors:
    the encoder's half."""
    return checkpoint.tensors(VISION_PREFIXES)


def text_state_dict(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """`language_model.*` and `lm_head.*` tensors: the decoder's half. A checkpoint whose head
    is tied to the input embeddings (`tie_word_embeddings`) stores no `lm_head.weight`:
    the embedding matrix stands in for it, as transformers ties them on load."""
    tensors = checkpoint.tensors(TEXT_PREFIXES)
    embedding = tensors.get("language_model.embed_tokens.weight")
    if "lm_head.weight" not in tensors and embedding is not None and ties_word_embeddings(checkpoint.config):
        tensors["lm_head.weight"] = embedding
    return tensors


def ties_word_embeddings(config) -> bool:
    """The LLaVA config or its text config ties the head to the input embeddings."""
    return bool(getattr(config, "tie_word_embeddings", False)
                or getattr(getattr(config, "text_config", None), "tie_word_embeddings", False))
