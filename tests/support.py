"""Helpers shared by tests: ports, images as data URLs, embedding refs. (Waiting for a server:
`deploy.startup.wait_healthy`, the one readiness poller.)"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
