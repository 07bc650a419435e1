"""Image URLs to bytes: `data:` URLs and http(s) fetches with limits.

The router never decodes pixels; it hands the original bytes to the encoder (whose
cache key is a hash of exactly those bytes). Fetching is bounded: a timeout, a byte
cap enforced while streaming, a redirect limit, and, unless a host is allowlisted,
no loopback, private, link-local, reserved or multicast address (checked after DNS
resolution, at every redirect hop). Other schemes (`file:`, `ftp:`, ...) are refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx


class ImageInputError(ValueError):
    """A client's image is unusable; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class FetchPolicy:
    max_image_bytes: int = 20 * 2**20
    timeout_s: float = 10.0
    max_redirects: int = 3
    allowed_hosts: frozenset[str] = frozenset()  # fetched even when they resolve privately


def decode_data_url(url: str, field: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise ImageInputError(field, "malformed data URL")
    media_type = header[5:].split(";")[0]
    if media_type and not media_type.startswith("image/"):
        raise ImageInputError(field, f"data URL has content type {media_type!r}, not an image")
    if ";base64" not in header:
        raise ImageInputError(field, "data URL must be base64-encoded")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ImageInputError(field, f"image is larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(field, "data URL is not valid base64") from None
    if not data:
        raise ImageInputError(field, "image is empty")
    return data


def _address_is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved
                or ip.is_multicast or ip.is_unspecified)


async def _check_host(url: str, field: str, policy: FetchPolicy) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ImageInputError(field, f"URL scheme {parts.scheme!r} is not allowed (use https, http "
                                     "or a data: URL)")
    host = parts.hostname
    if not host:
        raise ImageInputError(field, "URL has no host")
    if host in policy.allowed_hosts:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443,
                                                             type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ImageInputError(field, f"cannot resolve host {host!r}") from None
    if any(not _address_is_public(info[4][0]) for info in infos):
        raise ImageInputError(field, f"host {host!r} resolves to a private or local address")


async def fetch_url(url: str, field: str, policy: FetchPolicy, client: httpx.AsyncClient) -> bytes:
    for _ in range(policy.max_redirects + 1):
        await _check_host(url, field, policy)
        try:
            async with client.stream("GET", url, timeout=policy.timeout_s,
                                     follow_redirects=False) as response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise ImageInputError(field, f"fetching the image returned HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > policy.max_image_bytes:
                    raise ImageInputError(field, f"image is larger than {policy.max_image_bytes} bytes")
                body = bytearray()
                async for piece in response.aiter_bytes():
                    body += piece
                    if len(body) > policy.max_image_bytes:
                        raise ImageInputError(field, f"image is larger than {policy.max_image_bytes} bytes")
        except httpx.TimeoutException:
            raise ImageInputError(field, f"fetching the image timed out after {policy.timeout_s} s") from None
        except httpx.HTTPError as error:
            raise ImageInputError(field, f"fetching the image failed: {type(error).__name__}") from None
        if not body:
            raise ImageInputError(field, "image is empty")
        return bytes(body)
    raise ImageInputError(field, f"more than {policy.max_redirects} redirects")


async def load_image(url: str, field: str, policy: FetchPolicy, client: httpx.AsyncClient) -> bytes:
    if url.startswith("data:"):
        return decode_data_url(url, field, policy.max_image_bytes)
    return await fetch_url(url, field, policy, client)
