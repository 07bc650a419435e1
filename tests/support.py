"""Helpers shared by tests: ports, images as data URLs, embedding refs, a Serve app deployed
for a module. (Waiting for a server: `deploy.startup.wait_healthy`, the one readiness poller.)"""

from contextlib import contextmanager


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def deployed_app(serve, port: int, name: str, args: dict, route_prefix: str = "/",
                 timeout_s: float = 300):
    """`build_app(args)` run as Serve app `name`: yields its base URL once `/health` answers
    200, and deletes the app after."""
    from deploy.app import build_app
    from deploy.startup import wait_healthy

    serve.run(build_app(args), name=name, route_prefix=route_prefix)
    url = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    wait_healthy(f"{url}/health", timeout_s=timeout_s)
    try:
        yield url
    finally:
        serve.delete(name)


def openai_client(base_url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def app_stats(name: str) -> dict:
    """The app's `stats()` (router, encoder and decoder counters), through its handle."""
    from ray import serve

    return serve.get_app_handle(name).stats.remote().result()


def image_data_url(image, fmt: str = "PNG") -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


async def collect(service, request):
    """Runs one request to the end: (token ids, text, finish reason, chunks)."""
    chunks = [chunk async for chunk in service.generate(request)]
    tokens = [t for c in chunks for t in c.token_ids]
    return tokens, "".join(c.text for c in chunks), chunks[-1].finish_reason, chunks


def embedding_refs(store, model_id, features):
    """EmbeddingRefs over eager image features ([tokens, hidden] each), put in `store`. The
    image hash is a digest of the features, so the same picture gets the same key (as the
    encoder's key over the image bytes does) and the decoder's prefix cache can reuse it."""
    import hashlib

    import numpy as np

    from runtime.messages import EmbeddingMeta, EmbeddingRef

    refs = []
    for f in features:
        array = np.ascontiguousarray(np.asarray(f, dtype=np.float32))
        key = hashlib.blake2b(array.tobytes(), digest_size=32).hexdigest()
        meta = EmbeddingMeta(key, array.shape[0], array.shape[1], "float32", model_id)
        refs.append(EmbeddingRef(meta, store.put(array)))
    return tuple(refs)


def transformers_answer(path, photo, question: str, max_tokens: int) -> tuple[int, str]:
    """transformers' own LLaVA on the checkpoint at `path` (eager fp32 on the CPU, greedy):
    (prompt tokens, answer text) for `question` about `photo`."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True,
        tokenize=False)
    inputs = processor(text=text, images=[photo], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    prompt_tokens = inputs["input_ids"].shape[1]
    return prompt_tokens, processor.decode(out[0, prompt_tokens:], skip_special_tokens=True)


def assert_answers_like_transformers(url: str, name: str, path, photo, max_tokens: int = 8,
                                     question: str = "What is in this picture?") -> None:
    """Asks the app at `url` (served model `name`) about `photo` over HTTP, greedily: its prompt
    tokens and answer equal transformers' on the checkpoint at `path`, and neither half
    compiled a graph after warm-up."""
    import httpx

    reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": name, "max_tokens": max_tokens, "temperature": 0, "messages": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(photo)}},
                {"type": "text", "text": question}]}]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    prompt_tokens, text = transformers_answer(path, photo, question, max_tokens)
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["choices"][0]["message"]["content"] == text
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["encoder"]["compilations_after_warmup"] == 0
    assert health["decoder"]["compilations_after_warmup"] == 0
