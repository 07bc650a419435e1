"""LLaVA-NeXT through the services, without HTTP: the router (its processor counts each image's
tokens from its size), the encoder (tiles as items) and the decoder (images of different token
counts in one step, chunked prompts, prefix caching) give the prompt ids of LlavaNextProcessor
and the greedy tokens of `LlavaNextForConditionalGeneration.generate` (eager fp32). The one
allowed difference, as for LLaVA-1.5: a step where the reference's top two logits are within
1e-4 ends that request's comparison there."""

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image

from decoder_service.config import DecoderConfig
from decoder_service.service import DecoderService
from encoder_service.config import EncoderConfig
from encoder_service.service import EncoderService
from router.schemas import ChatCompletionRequest
from router.service import RouterConfig, RouterService
from runtime.object_store import LocalObjectStore
from tests.support import collect, image_data_url

NEAR_TIE = 1e-4


@pytest.fixture(scope="module")
def services(next_checkpoint):
    store = LocalObjectStore()
    encoder = EncoderService(EncoderConfig(model=str(next_checkpoint), strict_compile=True,
                                           batch_wait_s=0.02), store)
    decoder = DecoderService(DecoderConfig(
        model=str(next_checkpoint), max_model_len=384, max_num_seqs=4, max_images_per_request=4,
        max_num_batched_tokens=64, strict_compile=True), store)
    router = RouterService(RouterConfig(
        model_id=encoder.model_id, served_model_name="next", model_path=str(next_checkpoint),
        preprocess_fingerprint=encoder.fingerprint, max_model_len=384), encoder, decoder)
    yield router, encoder, decoder
    asyncio.run(router.close())
    encoder.close()
    decoder.shutdown()


def _images(photos):
    wide = Image.fromarray(np.tile(np.linspace(0, 255, 240, dtype=np.uint8)[None, :, None], (80, 1, 3)))
    return [photos[0], photos[1], photos[2], wide]  # 512x512, 600x400, 451x300, 240x80


def _reference(reference, text, images, max_tokens):
    processor, model = reference
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}],
                                           add_generation_prompt=True)
    inputs = processor(images=images or None, text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    prompt_ids = inputs["input_ids"][0].tolist()
    gaps = [float(torch.topk(step[0], 2).values.diff().abs()) for step in out.logits]
    return prompt_ids, out.sequences[0, len(prompt_ids):].tolist(), gaps


def _body(text, images, max_tokens):
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in images]
    return ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": parts + [{"type": "text", "text": text}]}],
        "max_tokens": max_tokens, "temperature": 0})


def test_greedy_tokens_match_llava_next_generate(services, reference_llava_next, photos):
    router, encoder, decoder = services
    images = _images(photos)
    specs = [("Tell me a story.", [], 20), ("What is in this picture?", [images[1]], 20),
             ("Compare these three pictures.", [images[0], images[3], images[2]], 16),
             ("And this one?", [images[3]], 16), ("Again: what is in it?", [images[1]], 12)]
    expected = [_reference(reference_llava_next, *spec) for spec in specs]

    async def run_all():
        prepared = [await router._prepare(_body(*spec), f"next-{i}") for i, spec in enumerate(specs)]
        results = await asyncio.gather(*(collect(decoder, p.request) for p in prepared))
        return prepared, results

    prepared, results = asyncio.run(run_all())
    counts = {ref.meta.num_tokens for p in prepared for ref in p.request.images}
    assert len(counts) >= 3  # images of different token counts, sharing steps
    ties = compared = 0
    for p, (tokens, *_), (prompt_ids, want, gaps), spec in zip(prepared, results, expected, specs):
        assert list(p.request.prompt_token_ids) == prompt_ids, spec[0]  # the processor's expansion
        limit = next((s for s, gap in enumerate(gaps) if gap < NEAR_TIE), len(want))
        ties += limit < len(want)
        assert tokens[:limit] == want[:limit], spec[0]
        compared += limit
    print(f"token counts {sorted(counts)}; near-ties: {ties}; {compared} tokens compared")
    assert ties <= 1 and compared >= 50
    stats = decoder.stats()
    assert stats["prefix_cache_hit_tokens"] >= 16  # the repeated image's blocks were reused
    assert decoder.runner.guard.compilations_after_warmup == 0
    assert encoder.stats()["compilations_after_warmup"] == 0


def test_the_encoder_and_the_processor_must_agree_on_the_count(services, photos):
    """An embedding whose rows differ from the processor's count is a server fault, not a 400."""
    from runtime.messages import EmbeddingMismatchError

    router, _, _ = services
    image = _images(photos)[3]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    counted = router.prompts.image_tokens((image.width, image.height))
    with pytest.raises(EmbeddingMismatchError, match="processor expands the image to"):
        asyncio.run(router._embed([buffer.getvalue()], ["messages.0.content.0.image_url"],
                                  "mismatch", [counted + 1]))


def test_greedy_answers_over_http_equal_llava_next(ray_serve, serve_http_port, next_checkpoint,
                                                  reference_llava_next, photos):
    """The whole app on Ray Serve: text-only, 1-image and 3-image prompts of different shapes,
    sent at once, answer with transformers' greedy text and prompt token count."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from deploy.app import build_app
    from deploy.startup import health_probe, wait_until_ready

    name = "llava-next-tiny"
    app = build_app({"model": str(next_checkpoint), "served_model_name": name, "strict_compile": True,
                     "decoder": {"max_model_len": 384, "max_num_seqs": 4},
                     "encoder": {"max_batch_items": 4}})
    ray_serve.run(app, name=name, route_prefix=f"/{name}")
    url = f"http://127.0.0.1:{serve_http_port}/{name}"
    processor = reference_llava_next[0]
    images = _images(photos)
    specs = [("Tell me a story.", [], 16), ("What is in this picture?", [images[2]], 16),
             ("Compare these three pictures.", [images[3], images[1], images[0]], 12)]
    try:
        outcome = wait_until_ready([health_probe(f"{url}/health")], threading.Event(), timeout_s=300)
        assert outcome.state == "ready", outcome.detail

        def ask(spec):
            reply = httpx.post(f"{url}/v1/chat/completions", timeout=300,
                               json={"model": name, **_body(*spec).model_dump(exclude_none=True)})
            assert reply.status_code == 200, reply.text
            return reply.json()

        with ThreadPoolExecutor(len(specs)) as pool:
            replies = list(pool.map(ask, specs))
        for reply, spec in zip(replies, specs):
            prompt_ids, want, gaps = _reference(reference_llava_next, *spec)
            limit = next((s for s, gap in enumerate(gaps) if gap < NEAR_TIE), len(want))
            text = reply["choices"][0]["message"]["content"]
            assert reply["usage"]["prompt_tokens"] == len(prompt_ids), spec[0]
            expected = processor.decode(want[:limit], skip_special_tokens=True)
            assert text == expected if limit == len(want) else text.startswith(expected), spec[0]
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["encoder"]["compilations_after_warmup"] == 0
        assert health["decoder"]["compilations_after_warmup"] == 0
    finally:
        ray_serve.delete(name)


def test_bad_input_is_a_400_naming_the_field(services):
    """An image whose size cannot be read, or text that spells the image token itself, is the
    client's fault (RequestError, HTTP 400) and names the field; the router keeps serving."""
    from runtime.messages import RequestError

    router, _, _ = services
    bad = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "what?"}]}], "max_tokens": 2})
    with pytest.raises(RequestError, match=r"^messages\.0\.content\.0\.image_url: not an image"):
        asyncio.run(router._prepare(bad, "bad-image"))
    spelled = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "say <image> twice"}], "max_tokens": 2})
    with pytest.raises(RequestError, match="^messages: the text may not contain"):
        asyncio.run(router._prepare(spelled, "spelled"))
    ok = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert asyncio.run(router._prepare(ok, "fine")).request.prompt_token_ids


def test_the_builder_refuses_a_llava_next_checkpoint_it_cannot_pack(tmp_path):
    """A LLaVA-NeXT checkpoint with the "full" strategy (CLS rows cannot be laid out as patch
    rows) is refused before any replica starts, naming the field."""
    from deploy.app import check_deploy
    from deploy.demo_checkpoint import write_demo_checkpoint
    from router.images import FetchPolicy

    model = str(write_demo_checkpoint(tmp_path / "next-full", family="next", strategy="full"))
    with pytest.raises(ValueError, match="^vision_feature_select_strategy: LLaVA-NeXT packs"):
        check_deploy(model, EncoderConfig(model=model), DecoderConfig(model=model, max_model_len=256),
                     FetchPolicy())
