"""Chat messages to prompt token ids, with the checkpoint's own template and tokenizer.

The processor's chat template renders the conversation with one `<image>` per
image part (`render`); each is then expanded to its image's placeholder count and
the text is tokenized (`tokenize`). No pixels are touched: the encoder does that.

LLaVA-1.5: every image has the count the vision tower yields (`runtime.geometry`,
the rule the encoder and the decoder use). At construction the processor's own
expansion is checked against it: a checkpoint whose processor config disagrees with
its vision tower cannot run in transformers either, and is refused with both numbers.

LLaVA-NeXT (`tokens_per_image=None`): the count depends on the image's size, and
comes from the processor's own `replace_image_token` (the public hook its `__call__`
expands `<image>` with), given the image's size and one tile's pixels: no pixels of the
image are made (a full call on a blank 12 MP canvas took seconds). At construction that
count is checked against full processor calls on a few blank images; remembered per size
(`image_tokens`). The router checks it against the rows the encoder returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from router.schemas import ChatMessage
from runtime.messages import RequestError


@dataclass(frozen=True)
class ImageSlot:
    field: str  # e.g. "messages.0.content.1.image_url", for error messages
    url: str


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    images: list[ImageSlot]


@dataclass(frozen=True)
class RenderedPrompt:
    text: str  # the chat template's output: one image token per image
    images: list[ImageSlot]


def processor_tokens_per_image(processor, size: tuple[int, int] = (61, 47)) -> int | None:
    """Placeholders the processor's own `<image>` expansion writes for one (width, height)
    image; None when it cannot expand (a processor config without `patch_size`, as older
    checkpoints have)."""
    from PIL import Image

    try:
        ids = processor(text=processor.image_token, images=[Image.new("RGB", size)])["input_ids"][0]
    except Exception:  # noqa: BLE001: any failure means the processor does not expand
        return None
    return sum(1 for i in ids if i == processor.image_token_id)


class PromptBuilder:
    """Thread-safe for `render`, `tokenize` and `image_tokens` (read-only state, a locked cache)."""

    def __init__(self, processor, tokens_per_image: int | None) -> None:
        """`tokens_per_image`: the fixed count (LLaVA-1.5); None when it varies per image size."""
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self.tokens_per_image = tokens_per_image
        self._count_for_size = lru_cache(maxsize=4096)(self._processor_count)
        if tokens_per_image is None:
            self._check_counts_match_the_processor()
            return
        expanded = processor_tokens_per_image(processor)
        if expanded is not None and expanded != tokens_per_image:
            raise ValueError(
                f"the checkpoint's processor expands {self.image_token} to {expanded} tokens but its "
                f"vision tower yields {tokens_per_image} per image: processor_config.json "
                "(patch_size, num_additional_image_tokens, vision_feature_select_strategy) "
                "disagrees with config.json")

    def build(self, messages: list[ChatMessage]) -> Prompt:
        """The prompt of a fixed-count checkpoint (LLaVA-1.5)."""
        rendered = self.render(messages)
        return self.tokenize(rendered, [self.tokens_per_image] * len(rendered.images))

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Placeholders for one image of (width, height) pixels."""
        if self.tokens_per_image is not None:
            return self.tokens_per_image
        return self._count_for_size(tuple(size))

    def _processor_count(self, size: tuple[int, int]) -> int:
        width, height = size
        # What the processor's __call__ passes the hook: image sizes (height, width) and pixel
        # values, of which only one tile's shape is read.
        inputs = {"image_sizes": np.array([[height, width]]),
                  "pixel_values": [np.zeros((1, 3, *self._tile_shape), np.float32)]}
        return self.processor.replace_image_token(inputs, 0).count(self.image_token)

    def _check_counts_match_the_processor(self) -> None:
        from PIL import Image

        try:
            probe = self.processor.image_processor(images=[Image.new("RGB", (61, 47))],
                                                   return_tensors="np")["pixel_values"]
        except Exception as error:  # noqa: BLE001: a processor that cannot preprocess at all
            raise ValueError(f"the checkpoint's image processor failed on a probe image: {error}") from error
        self._tile_shape = tuple(int(n) for n in probe.shape[-2:])
        for size in ((61, 47), (300, 90), (90, 300), (1, 1)):
            expanded = processor_tokens_per_image(self.processor, size)
            if expanded is None or expanded != self._processor_count(size):
                raise ValueError(
                    f"the checkpoint's processor expands {self.image_token} for a {size[0]}x"
                    f"{size[1]} image to {expanded} tokens, its replace_image_token to "
                    f"{self._processor_count(size)}: the image token count cannot be known")

    def tokenize(self, rendered: RenderedPrompt, image_tokens: list[int]) -> Prompt:
        """Expands the i-th image token to `image_tokens[i]` placeholders, then tokenizes."""
        pieces = rendered.text.split(self.image_token)
        if len(pieces) - 1 != len(image_tokens):
            raise RequestError(f"messages: the text may not contain the image placeholder "
                               f"{self.image_token} itself")
        text = pieces[0] + "".join(self.image_token * n + piece
                                   for n, piece in zip(image_tokens, pieces[1:]))
        return Prompt(self.tokenizer(text)["input_ids"], rendered.images)

    def render(self, messages: list[ChatMessage]) -> RenderedPrompt:
        conversation, images = [], []
        for m, message in enumerate(messages):
            role = "system" if message.role == "developer" else message.role
            if message.content is None or isinstance(message.content, str):
                conversation.append({"role": role, "content": message.content or ""})
                continue
            parts = []
            for p, part in enumerate(message.content):
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                else:
                    if role != "user":
                        raise RequestError(f"messages.{m}.content.{p}: images are accepted in user "
                                         "messages only")
                    parts.append({"type": "image"})
                    images.append(ImageSlot(f"messages.{m}.content.{p}.image_url", part.image_url.url))
            conversation.append({"role": role, "content": parts})
        return RenderedPrompt(self._render(conversation), images)

    def _render(self, conversation: list[dict]) -> str:
        from jinja2 import TemplateError

        try:
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True,
                                                      tokenize=False)
        except TemplateError as error:  # the template's own raise_exception: a refused conversation
            raise RequestError(f"messages: {error}") from error
