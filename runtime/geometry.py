"""A checkpoint's geometry: the sizes every service needs, derived once from the model.

Tokens per image is what the vision tower yields for one image, after the feature
selection strategy, exactly as `LlavaModel.get_image_features` and `LlavaProcessor`
count it:

    patches = (image_size // patch_size) ** 2
    tokens  = patches + (1 if the tower adds a CLS row) - (1 if strategy == "default")

CLIP towers add a CLS row; SigLIP towers do not. The config's `image_seq_length` is a
field transformers neither computes nor checks; it is never read for sizes, and a
value that differs from the derived one gets one warning line.

LLaVA-NeXT (`llava_next`): `tokens_per_image` is what the tower yields for one view
(the base view or one grid tile); an image's own count varies with its shape, and
comes from its processor (router) and its packed tiles (encoder,
`encoder_service.anyres`), which the router checks against each other.

The router (prompt expansion), the encoder (embedding rows) and the decoder
(placeholder runs) all call `model_geometry(checkpoint)` or `tokens_per_image(checkpoint)`;
the app builder checks the deploy against it once (`warn_if_misstated` among others).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from runtime.checkpoint import Checkpoint

log = logging.getLogger(__name__)

SELECT_STRATEGIES = ("default", "full")
# Vision tower model types -> whether the tower prepends a CLS row to its patch rows.
TOWERS_WITH_CLS = {"clip_vision_model": True, "siglip_vision_model": False}


@dataclass(frozen=True)
class ModelGeometry:
    image_size: int  # pixels per side the tower takes
    patch_size: int  # pixels per side of one patch
    select_strategy: str  # "default" drops the CLS row, "full" keeps every row
    tokens_per_image: int  # placeholder tokens (embedding rows) per image; per view for LLaVA-NeXT
    text_hidden_size: int  # embedding columns: the language model's hidden size
    image_token_id: int  # the placeholder token
    vocab_size: int
    max_position_embeddings: int


def geometry_of(config) -> ModelGeometry:
    """The geometry of a `transformers.LlavaConfig`; ValueError names what is unsupported."""
    strategy = config.vision_feature_select_strategy
    if strategy not in SELECT_STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy must be one of {SELECT_STRATEGIES}, "
                         f"got {strategy!r}")
    vision, text = config.vision_config, config.text_config
    tower = getattr(vision, "model_type", None)
    if tower not in TOWERS_WITH_CLS:
        raise ValueError(f"vision_config.model_type {tower!r} is not a supported vision tower "
                         f"({', '.join(TOWERS_WITH_CLS)})")
    image_size, patch_size = int(vision.image_size), int(vision.patch_size)
    if patch_size < 1 or image_size < patch_size:
        raise ValueError(f"vision_config: image_size {image_size} and patch_size {patch_size} "
                         "make no patch")
    tokens = (image_size // patch_size) ** 2 + int(TOWERS_WITH_CLS[tower]) - int(strategy == "default")
    return ModelGeometry(
        image_size=image_size, patch_size=patch_size, select_strategy=strategy,
        tokens_per_image=tokens, text_hidden_size=int(text.hidden_size),
        image_token_id=int(config.image_token_index), vocab_size=int(text.vocab_size),
        max_position_embeddings=int(text.max_position_embeddings))


def model_geometry(checkpoint: Checkpoint) -> ModelGeometry:
    return geometry_of(checkpoint.config)


def tokens_per_image(checkpoint: Checkpoint) -> int:
    """Placeholder tokens per image: what the decoder sizes its image rows with."""
    return geometry_of(checkpoint.config).tokens_per_image


def warn_if_misstated(model_id: str, config, geometry: ModelGeometry) -> bool:
    """Logs one warning line when `config.image_seq_length` is not the derived count (the app
    builder calls this once per deploy). True when it warned."""
    stated = getattr(config, "image_seq_length", None)
    if stated is None or int(stated) == geometry.tokens_per_image:
        return False
    log.warning("%s: config.json says image_seq_length %s, but its vision tower yields %d tokens "
                "per image (%s strategy); serving %d", model_id, stated, geometry.tokens_per_image,
                geometry.select_strategy, geometry.tokens_per_image)
    return True
