"""Call a running splitserve app from Python through Ray Serve, no HTTP involved.

    make serve                                   # in one terminal (or splitserve serve)
    .venv/bin/python examples/handle_api.py      # in another

Inside another Serve deployment, skip `ray.init` and use `serve.get_app_handle` the same way.
"""

import asyncio
import base64
import io

import ray
from PIL import Image
from ray import serve
from skimage import data


def image_url() -> str:
    buffer = io.BytesIO()
    Image.fromarray(data.coffee()).save(buffer, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


async def main() -> None:
    handle = serve.get_app_handle("splitserve")
    request = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url()}},
        {"type": "text", "text": "What is in this picture?"}]}],
        "max_tokens": 16, "temperature": 0}

    reply = await handle.chat.remote(request)  # a dict shaped like OpenAI's response
    print("whole:   ", reply["choices"][0]["message"]["content"], reply["usage"])

    print("streamed:", end=" ", flush=True)
    async for chunk in handle.options(stream=True).chat.remote({**request, "stream": True}):
        for choice in chunk["choices"]:
            print(choice["delta"].get("content", ""), end="", flush=True)
    print()


if __name__ == "__main__":
    ray.init(address="auto", log_to_driver=False)
    asyncio.run(main())
