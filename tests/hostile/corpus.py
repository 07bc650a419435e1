"""The hostile-request corpus: malformed or hostile chat requests and the 4xx each must get.

Each `Case` builds its request at run time from a `Context` (the local image host and
the limits the test app was deployed with) and names what the answer must be: the
status, the OpenAI error `type`, the `param` (the field), and a pattern the message
must match. Inputs are made here, in memory: truncated JPEG, PNG bomb, SVG, animated
GIF, and so on. URL cases only ever point at 127.0.0.1 / localhost / ::1.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

BAD = "invalid_request_error"
IMAGE_FIELD = "messages.0.content.0.image_url"


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int
    max_image_bytes: int  # the app's per-image cap (router fetch / data URL, and the encoder)
    max_model_len: int
    max_images: int


@dataclass(frozen=True)
class Context:
    host: object  # tests.hostile.servers.ImageHost, allowlisted as 127.0.0.1:<port>
    limits: Limits


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Context], dict]  # -> keyword arguments of httpx's post()
    status: int
    kind: str = BAD
    param: str | None = None  # the field the error must name; None: not checked
    message: str = ""  # regex the error message must match


# --- inputs -----------------------------------------------------------------------------------

def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@lru_cache(maxsize=None)
def good_png() -> bytes:
    return _save(Image.linear_gradient("L").convert("RGB").resize((96, 96)), "PNG")


@lru_cache(maxsize=None)
def png_bomb() -> bytes:
    """20000x20000 = 400 M pixels in about 50 kB: one colour, 1 bit per pixel, deflated."""
    return _save(Image.new("1", (20000, 20000)), "PNG", optimize=True)


def _frames() -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), colour) for colour in ("red", "green", "blue")]


def animated_gif() -> bytes:
    first, *rest = _frames()
    return _save(first, "GIF", save_all=True, append_images=rest, duration=100, loop=0)


def animated_png() -> bytes:
    first, *rest = _frames()
    return _save(first, "PNG", save_all=True, append_images=rest)


SVG = (b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
       b'width="20000" height="20000"><rect width="100%" height="100%" fill="red"/></svg>')


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


# --- request shapes ---------------------------------------------------------------------------

def chat(**fields) -> dict:
    return {"json": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}}


def with_image(url: str, role: str = "user") -> dict:
    return {"json": {"messages": [{"role": role, "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]}],
        "max_tokens": 2}}


def raw(body: bytes, content_type: str | None = "application/json") -> dict:
    headers = {"content-type": content_type} if content_type else {}
    return {"content": body, "headers": headers}


def _chunked(body: bytes):
    for start in range(0, len(body), 1 << 16):
        yield body[start:start + (1 << 16)]


def _oversized_body(ctx: Context) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "a" * ctx.limits.max_request_bytes}]}).encode()


def _host(ctx: Context, path: str, host: str = "127.0.0.1") -> str:
    return ctx.host.url(path, host)


# --- the corpus -------------------------------------------------------------------------------

CASES: list[Case] = [
    # the body itself
    Case("non_json_body", lambda c: raw(b'{"messages": [ this is not json'), 400, message="not valid JSON"),
    Case("json_wrong_content_type", lambda c: raw(json.dumps(chat()["json"]).encode(), "text/plain"),
         415, message="Content-Type: application/json"),
    Case("json_no_content_type", lambda c: raw(json.dumps(chat()["json"]).encode(), None), 415,
         message="must be JSON"),
    Case("json_array_body", lambda c: raw(b"[1, 2, 3]"), 400, message="^body: .*dictionary"),
    Case("deeply_nested_json", lambda c: raw(b"[" * 200_000 + b"]" * 200_000), 400, message="body"),
    Case("empty_body", lambda c: raw(b""), 400, message="body"),
    Case("body_over_limit_declared", lambda c: raw(_oversized_body(c)), 413,
         message="larger than .* bytes \\(max_request_bytes\\)"),
    Case("body_over_limit_chunked", lambda c: raw(_chunked(_oversized_body(c))), 413,
         message="max_request_bytes"),
    # the schema
    Case("missing_messages", lambda c: {"json": {"max_tokens": 2}}, 400, param="messages",
         message="Field required"),
    Case("empty_messages", lambda c: chat(messages=[]), 400, param="messages"),
    Case("unknown_role", lambda c: chat(messages=[{"role": "root", "content": "hi"}]), 400,
         param="messages.0.role"),
    Case("unknown_part_type", lambda c: chat(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA"}}]}]), 400, param="messages.0.content.0",
         message="does not match any of the expected tags"),
    Case("image_part_without_url", lambda c: chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {}}]}]), 400, param=IMAGE_FIELD + ".url"),
    Case("unknown_model", lambda c: chat(model="gpt-4o"), 404, "model_not_found", "model",
         "not served here"),
    # sampling parameters
    Case("negative_temperature", lambda c: chat(temperature=-0.5), 400, param="temperature"),
    Case("absurd_temperature", lambda c: chat(temperature=1e300), 400, param="temperature"),
    Case("nan_temperature", lambda c: raw(b'{"messages": [{"role": "user", "content": "hi"}], '
                                          b'"temperature": NaN}'), 400, param="temperature"),
    Case("top_p_zero", lambda c: chat(top_p=0), 400, param="top_p"),
    Case("top_p_above_one", lambda c: chat(top_p=1.5), 400, param="top_p"),
    Case("negative_top_k", lambda c: chat(top_k=-7), 400, param="top_k"),
    Case("zero_max_tokens", lambda c: chat(max_tokens=0), 400, param="max_tokens"),
    Case("negative_max_tokens", lambda c: chat(max_tokens=-5), 400, param="max_tokens"),
    Case("absurd_max_tokens", lambda c: chat(max_tokens=10**15), 400, param="max_tokens",
         message="do not fit"),
    Case("infinite_max_tokens", lambda c: raw(b'{"messages": [{"role": "user", "content": "hi"}], '
                                              b'"max_tokens": Infinity}'), 400, param="max_tokens"),
    Case("negative_seed", lambda c: chat(seed=-1), 400, param="seed"),
    Case("too_many_top_logprobs", lambda c: chat(logprobs=True, top_logprobs=50), 400,
         param="top_logprobs"),
    Case("top_logprobs_without_logprobs", lambda c: chat(top_logprobs=2), 400, param="top_logprobs",
         message="logprobs"),
    Case("too_many_choices", lambda c: chat(n=9), 400, param="n"),  # max_choices is 8
    Case("tools_are_not_supported", lambda c: chat(tools=[{"type": "function", "function": {
        "name": "f"}}]), 400, param="tools"),
    Case("unknown_field", lambda c: chat(max_token=5), 400, param="max_token"),
    Case("uncompilable_schema", lambda c: chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}), 400, param="response_format.json_schema.schema"),
    Case("too_many_stop_strings", lambda c: chat(stop=[f"s{i}" for i in range(20)]), 400, param="stop"),
    # text that is valid JSON but not valid Unicode
    Case("lone_surrogate_in_text", lambda c: raw(b'{"messages": [{"role": "user", "content": '
                                                 b'"\\ud800 hi"}], "max_tokens": 2}'), 400,
         param="messages.0.content", message="lone surrogate U\\+D800"),
    Case("lone_surrogate_in_text_part", lambda c: raw(
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi \\udfff"}]}]}'),
         400, param="messages.0.content.0.text", message="lone surrogate"),
    # prompt size
    Case("huge_prompt", lambda c: chat(messages=[{"role": "user", "content": "word " * 200_000}]),
         400, param="messages", message="characters of text cannot fit"),
    Case("prompt_over_context", lambda c: chat(messages=[{"role": "user", "content": "cat " * 400}]),
         400, param="messages", message="the prompt has \\d+ tokens"),
    # images in the request
    Case("hundred_images", lambda c: chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(good_png())}}] * 100}]), 400,
         param="messages", message="at most \\d+ images per request, got 100"),
    Case("image_in_assistant_message", lambda c: with_image(data_url(good_png()), role="assistant"),
         400, param="messages.0.content.0", message="user messages only"),
    Case("bad_base64", lambda c: with_image("data:image/png;base64,iVBOR***not base64***"), 400,
         param=IMAGE_FIELD, message="not valid base64"),
    Case("data_url_not_an_image_type", lambda c: with_image(data_url(b"#!/bin/sh\n", "text/x-sh")),
         400, param=IMAGE_FIELD, message="not an image"),
    Case("data_url_not_base64", lambda c: with_image("data:image/png,rawbytes"), 400,
         param=IMAGE_FIELD, message="base64"),
    Case("zero_size_image", lambda c: with_image("data:image/png;base64,"), 400, param=IMAGE_FIELD,
         message="empty"),
    Case("image_over_byte_cap", lambda c: with_image(data_url(b"\x89PNG" + b"\0" * c.limits.max_image_bytes)),
         400, param=IMAGE_FIELD, message="larger than"),
    Case("truncated_jpeg", lambda c: with_image(data_url(
        _save(Image.linear_gradient("L").convert("RGB"), "JPEG")[:900], "image/jpeg")),
         400, param=IMAGE_FIELD, message="not a decodable image"),
    Case("random_bytes_as_png", lambda c: with_image(data_url(bytes(range(256)) * 8)), 400,
         param=IMAGE_FIELD, message="not an image in a format"),
    Case("png_bomb_20000x20000", lambda c: with_image(data_url(png_bomb())), 400, param=IMAGE_FIELD,
         message="decompression bomb|max_image_pixels"),
    Case("svg", lambda c: with_image(data_url(SVG, "image/svg+xml")), 400, param=IMAGE_FIELD,
         message="SVG is a vector format"),
    Case("animated_gif", lambda c: with_image(data_url(animated_gif(), "image/gif")), 400,
         param=IMAGE_FIELD, message="animated GIF"),
    Case("animated_png", lambda c: with_image(data_url(animated_png())), 400, param=IMAGE_FIELD,
         message="animated PNG"),
    Case("bmp_not_accepted", lambda c: with_image(data_url(_save(_frames()[0], "BMP"), "image/bmp")),
         400, param=IMAGE_FIELD, message="accepted \\(PNG, JPEG, WebP"),
    Case("extreme_aspect_ratio", lambda c: with_image(data_url(_save(Image.new("RGB", (6000, 4)), "PNG"))),
         400, param=IMAGE_FIELD, message="aspect ratio"),
    # image URLs
    Case("file_url", lambda c: with_image("file:///etc/passwd"), 400, param=IMAGE_FIELD,
         message="scheme 'file'"),
    Case("ftp_url", lambda c: with_image("ftp://127.0.0.1/image.png"), 400, param=IMAGE_FIELD,
         message="scheme 'ftp'"),
    Case("loopback_port_not_allowlisted", lambda c: with_image(f"http://127.0.0.1:{c.host.port + 1}/x.png"
                                                               if c.host.port < 65535 else
                                                               "http://127.0.0.1:1/x.png"),
         400, param=IMAGE_FIELD, message="private, loopback"),
    Case("localhost_url", lambda c: with_image(_host(c, "/ok.png", "localhost")), 400,
         param=IMAGE_FIELD, message="loopback"),
    Case("ipv6_loopback_url", lambda c: with_image(f"http://[::1]:{c.host.port}/ok.png"), 400,
         param=IMAGE_FIELD, message="loopback"),
    Case("decimal_loopback_url", lambda c: with_image(f"http://2130706433:{c.host.port}/ok.png"), 400,
         param=IMAGE_FIELD, message="loopback"),
    Case("unspecified_address_url", lambda c: with_image(f"http://0.0.0.0:{c.host.port}/ok.png"), 400,
         param=IMAGE_FIELD, message="non-public"),
    Case("redirect_to_loopback", lambda c: with_image(
        _host(c, "/redirect?to=" + _host(c, "/ok.png", "localhost"))), 400, param=IMAGE_FIELD,
         message="'localhost' resolves to a private, loopback"),
    Case("redirect_to_file", lambda c: with_image(_host(c, "/redirect?to=file:///etc/passwd")), 400,
         param=IMAGE_FIELD, message="scheme 'file'"),
    Case("redirect_loop", lambda c: with_image(_host(c, "/loop")), 400, param=IMAGE_FIELD,
         message="more than \\d+ redirects"),
    Case("slow_url", lambda c: with_image(_host(c, "/slow.png")), 400, param=IMAGE_FIELD,
         message="took longer than"),
    Case("hanging_url", lambda c: with_image(_host(c, "/hang.png")), 400, param=IMAGE_FIELD,
         message="took longer than"),
    Case("endless_download", lambda c: with_image(_host(c, "/huge.png")), 400, param=IMAGE_FIELD,
         message="larger than"),
    Case("declared_huge_download", lambda c: with_image(_host(c, "/declared-huge.png")), 400,
         param=IMAGE_FIELD, message="larger than"),
    Case("url_is_a_web_page", lambda c: with_image(_host(c, "/page.html")), 400, param=IMAGE_FIELD,
         message="not an image in a format"),
    Case("compressed_download", lambda c: with_image(_host(c, "/gzip.png")), 400, param=IMAGE_FIELD,
         message="content encoding"),
    Case("url_not_found", lambda c: with_image(_host(c, "/missing.png")), 400, param=IMAGE_FIELD,
         message="HTTP 404"),
]
