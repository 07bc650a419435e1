"""Chat messages to prompt token ids, with the checkpoint's own template and tokenizer.

The processor's chat template renders the conversation with one `<image>` per
image part; each is then expanded to as many placeholder tokens as the vision
tower yields, exactly as the transformers processor does, and the text is
tokenized. No pixels are touched: the encoder does that.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.schemas import ChatMessage


@dataclass(frozen=True)
class ImageSlot:
    field: str  # e.g. "messages.0.content.1.image_url", for error messages
    url: str


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    images: list[ImageSlot]


class PromptBuilder:
    def __init__(self, processor) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        size = processor.image_processor.crop_size
        self.tokens_per_image = int(processor._get_num_multimodal_tokens(
            image_sizes=[[size["height"], size["width"]]])["num_image_tokens"][0])

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
                        raise ValueError(f"messages.{m}.content.{p}: images are accepted in user "
                                         "messages only")
                    parts.append({"type": "image"})
                    images.append(ImageSlot(f"messages.{m}.content.{p}.image_url", part.image_url.url))
            conversation.append({"role": role, "content": parts})
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True,
                                                  tokenize=False)
        text = text.replace(self.image_token, self.image_token * self.tokens_per_image)
        token_ids = self.tokenizer(text)["input_ids"]
        return Prompt(token_ids, images)
