"""Image URLs to bytes: `data:` URLs and http(s) fetches with limits.

The router never decodes pixels; it hands the original bytes to the encoder (whose
cache key is a hash of exactly those bytes). For a checkpoint whose image token count
depends on the image's size (LLaVA-NeXT) it reads the size from the file's header
(`image_size`), with the same PIL plugins the encoder accepts. Fetching is bounded: one deadline for
the whole fetch (DNS, connect, every redirect hop and the body), a byte cap enforced
while streaming, and a redirect limit. Unless a host is allowlisted, a URL whose host
resolves to anything but a global unicast address (loopback, private, shared,
link-local such as the cloud metadata address 169.254.169.254, reserved, multicast)
is refused, at every redirect hop, and the connection goes to the very address that
was checked, so a second DNS answer cannot swap in a private one (DNS rebinding).
Other schemes (`file:`, `ftp:`, ...) are refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from runtime.limits import ACCEPTED_IMAGE_FORMATS, MAX_IMAGE_BYTES
from runtime.messages import RequestError


class ImageInputError(RequestError):
    """A client's image is unusable; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class FetchPolicy:
    max_image_bytes: int = MAX_IMAGE_BYTES  # the app builder passes the encoder's value too
    timeout_s: float = 10.0  # the whole fetch, redirects included
    max_redirects: int = 3
    # Trusted hosts, fetched even when they resolve privately: "host" (any port) or "host:port".
    allowed_hosts: frozenset[str] = frozenset()

    def allows(self, host: str, port: int) -> bool:
        return host in self.allowed_hosts or f"{host}:{port}" in self.allowed_hosts


@dataclass(frozen=True)
class _Target:
    url: str  # what to connect to: the checked address, or the URL itself for an allowlisted host
    headers: dict[str, str]
    extensions: dict[str, str]


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


def address_is_public(address: str) -> bool:
    """True for a global unicast address, looking through IPv6 forms that embed an IPv4 one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not address_is_public(str(embedded)):
            return False
    return ip.is_global and not ip.is_multicast


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


async def _resolve(url: str, field: str, policy: FetchPolicy) -> _Target:
    """Checks the scheme and the host's addresses; returns where to connect."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ImageInputError(field, f"URL scheme {parts.scheme!r} is not allowed (use https, http "
                                     "or a data: URL)")
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ImageInputError(field, "URL has an invalid port") from None
    if not host:
        raise ImageInputError(field, "URL has no host")
    if policy.allows(host, port):
        return _Target(url, {}, {})
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ImageInputError(field, f"cannot resolve host {host!r}") from None
    addresses = [info[4][0] for info in infos]
    if not addresses or any(not address_is_public(a) for a in addresses):
        raise ImageInputError(field, f"host {host!r} resolves to a private, loopback, link-local "
                                     "or otherwise non-public address")
    ip = ipaddress.ip_address(addresses[0].split("%", 1)[0])
    netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    return _Target(pinned, {"Host": host_header},
                   {"sni_hostname": host} if parts.scheme == "https" else {})


async def _fetch(url: str, field: str, policy: FetchPolicy, client: httpx.AsyncClient) -> bytes:
    for _ in range(policy.max_redirects + 1):
        target = await _resolve(url, field, policy)
        # identity: the byte cap then bounds what is read, with no inflating of compressed bodies
        request = client.build_request("GET", target.url, timeout=policy.timeout_s,
                                       headers={**target.headers, "Accept-Encoding": "identity"},
                                       extensions=target.extensions)
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            if response.is_redirect:
                url = urljoin(url, response.headers.get("location", ""))
                continue
            if response.status_code != 200:
                raise ImageInputError(field, f"fetching the image returned HTTP {response.status_code}")
            if response.headers.get("content-encoding", "identity").lower() != "identity":
                raise ImageInputError(field, "the image was sent with a content encoding; "
                                             "serve it uncompressed")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > policy.max_image_bytes:
                raise ImageInputError(field, f"image is larger than {policy.max_image_bytes} bytes")
            body = bytearray()
            async for piece in response.aiter_raw():
                body += piece
                if len(body) > policy.max_image_bytes:
                    raise ImageInputError(field, f"image is larger than {policy.max_image_bytes} bytes")
        finally:
            await response.aclose()
        if not body:
            raise ImageInputError(field, "image is empty")
        return bytes(body)
    raise ImageInputError(field, f"more than {policy.max_redirects} redirects")


async def fetch_url(url: str, field: str, policy: FetchPolicy, client: httpx.AsyncClient) -> bytes:
    try:
        return await asyncio.wait_for(_fetch(url, field, policy, client), policy.timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise ImageInputError(field, f"fetching the image took longer than {policy.timeout_s} s") from None
    except httpx.HTTPError as error:
        raise ImageInputError(field, f"fetching the image failed: {type(error).__name__}") from None


async def load_image(url: str, field: str, policy: FetchPolicy, client: httpx.AsyncClient) -> bytes:
    if url.startswith("data:"):  # base64 of up to max_image_bytes: off the event loop
        return await asyncio.to_thread(decode_data_url, url, field, policy.max_image_bytes)
    return await fetch_url(url, field, policy, client)


def image_size(data: bytes, field: str) -> tuple[int, int]:
    """(width, height) from the image file's header; no pixel is decoded."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_IMAGE_FORMATS) as image:
            return image.size
    except Exception as error:  # noqa: BLE001: PIL raises many kinds; the encoder says more
        raise ImageInputError(field, "not an image in a format PIL can read among those accepted "
                              f"(PNG, JPEG, WebP, single-frame GIF): {type(error).__name__}") from None
