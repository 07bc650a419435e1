"""The encoder's model: a LLaVA checkpoint's vision tower and projector, nothing else.

`VisionEncoder(pixels) -> embeddings` is what `LlavaModel.get_image_features` computes
(same feature layer(s), same CLS handling, same projector), as one module whose only
input is a fixed-shape pixel batch, so it compiles to one XLA graph per batch bucket.
For LLaVA-NeXT a batch row is one tile (`encoder_service.anyres` packs an image's tiles
with the checkpoint's `image_newline`, which this module loads and keeps on the host).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from runtime.checkpoint import Checkpoint, vision_state_dict
from runtime.geometry import geometry_of


def feature_layer_indices(feature_layer: int | list[int], num_layers: int) -> tuple[int, ...]:
    """Absolute indices into the tower's hidden states (0 = embeddings, i = after layer i).

    >>> feature_layer_indices(-2, 24)
    (23,)
    >>> feature_layer_indices([-2, -5, 3], 24)
    (23, 20, 3)
    """
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    if not layers:
        raise ValueError("vision_feature_layer must name at least one layer")
    indices = []
    for layer in layers:
        index = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= index <= num_layers:
            raise ValueError(f"vision_feature_layer {layer} is outside a tower of {num_layers} layers")
        indices.append(index)
    return tuple(indices)


class VisionEncoder(nn.Module):
    """Tower + projector. pixels: [B, 3, S, S] -> embeddings: [B, tokens_per_image, hidden_size]."""

    def __init__(self, config) -> None:  # config: transformers.LlavaConfig
        super().__init__()
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        geometry = geometry_of(config)  # validates the strategy and the tower type
        vision = config.vision_config
        self.image_size = geometry.image_size
        self.drop_first_row = geometry.select_strategy == "default"
        self.layer_indices = feature_layer_indices(config.vision_feature_layer, vision.num_hidden_layers)
        # SDPA traces into one XLA graph per bucket here (torch_xla decomposes it; counted with
        # the compile guard, no graph break), matches eager attention within 1e-5 and ran the
        # ViT-B/16 tower ~1.8x faster than "eager" on XLA:CPU (2.2 s vs 4.1 s at 8 items).
        self.tower = AutoModel.from_config(vision, attn_implementation="sdpa")
        self.projector = LlavaMultiModalProjector(config)
        self.tokens_per_image = geometry.tokens_per_image  # per view: per tile for LLaVA-NeXT
        self.hidden_size = geometry.text_hidden_size
        self.image_newline: np.ndarray | None = None  # [hidden_size], LLaVA-NeXT's row separator

    def load_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Loads the vision half strictly, then drops tower layers past the last one read."""
        tensors = vision_state_dict(checkpoint)
        newline = tensors.pop("image_newline", None)
        if checkpoint.is_anyres and newline is None:
            raise ValueError(f"checkpoint {checkpoint.path} is LLaVA-NeXT but has no image_newline")
        if newline is not None:
            self.image_newline = newline.to(torch.float32).numpy()
        halves = {"tower": "vision_tower.", "projector": "multi_modal_projector."}
        for attr, prefix in halves.items():
            part = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            getattr(self, attr).load_state_dict(part, strict=True)
        # LLaVA-1.5 reads layer -2: the last layer's output is never used, so do not run it.
        layers = getattr(getattr(self.tower, "encoder", None), "layers", None)
        if isinstance(layers, nn.ModuleList):
            del layers[max(self.layer_indices):]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: [B, 3, S, S]; hidden_states[i]: [B, rows, D_vision], rows = patches (+ 1 CLS)
        hidden_states = self.tower(pixels, output_hidden_states=True).hidden_states
        features = torch.cat([hidden_states[i] for i in self.layer_indices], dim=-1)
        if self.drop_first_row:  # "default": CLIP's CLS row (transformers drops row 0 for any tower)
            features = features[:, 1:]
        return self.projector(features)  # [B, tokens_per_image, hidden_size]


def load_vision_encoder(checkpoint: Checkpoint) -> VisionEncoder:
    """The checkpoint's vision half in float32, in eval mode, on the host."""
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every tensor is loaded strictly next: random init is wasted CPU
        model = VisionEncoder(checkpoint.config)
    model.load_checkpoint(checkpoint)
    return model.to(torch.float32).eval()
