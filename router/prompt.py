"""Chat messages to prompt token ids, with the checkpoint's own template and tokenizer.

The processor's chat template renders the conversation with one `<image>` per
image part; each is then expanded to as many placeholder tokens as the vision
tower yields (`runtime.geometry`, the rule the encoder and the decoder use), and
the text is tokenized. No pixels are touched: the encoder does that. At
construction the processor's own expansion is checked against that count: a
checkpoint whose processor config disagrees with its vision tower cannot run in
transformers either, and is refused with both numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def processor_tokens_per_image(processor) -> int | None:
    """Placeholders the processor's own `<image>` expansion writes for one image; None when
    it cannot expand (a processor config without `patch_size`, as older checkpoints have)."""
    from PIL import Image

    try:
        ids = processor(text=processor.image_token, images=[Image.new("RGB", (61, 47))])["input_ids"][0]
    except Exception:  # noqa: BLE001: any failure means the processor does not expand
        return None
    return sum(1 for i in ids if i == processor.image_token_id)


class PromptBuilder:
    def __init__(self, processor, tokens_per_image: int) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self.tokens_per_image = tokens_per_image
        expanded = processor_tokens_per_image(processor)
        if expanded is not None and expanded != tokens_per_image:
            raise ValueError(
                f"the checkpoint's processor expands {self.image_token} to {expanded} tokens but its "
                f"vision tower yields {tokens_per_image} per image: processor_config.json "
                "(patch_size, num_additional_image_tokens, vision_feature_select_strategy) "
                "disagrees with config.json")

    def build(self, messages: list[ChatMessage]) -> Prompt:
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
        text = self._render(conversation)
        text = text.replace(self.image_token, self.image_token * self.tokens_per_image)
        token_ids = self.tokenizer(text)["input_ids"]
        return Prompt(token_ids, images)

    def _render(self, conversation: list[dict]) -> str:
        from jinja2 import TemplateError

        try:
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True,
                                                      tokenize=False)
        except TemplateError as error:  # the template's own raise_exception: a refused conversation
            raise RequestError(f"messages: {error}") from error
