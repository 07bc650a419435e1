"""Image bytes -> pixel arrays, with the checkpoint's own transformers image processor.

Decoding is guarded: the encoded size and the pixel count (read from the header,
before any pixel is decoded) are checked against limits, so a small file that
claims a huge canvas (a decompression bomb) is refused without allocating it.
Only raster formats a client can be expected to send are opened (PNG, JPEG, WebP,
single-frame GIF, as OpenAI accepts), so no other PIL plugin ever parses client
bytes; an extreme aspect ratio is refused too, since resizing its shortest edge
to the tower's size would blow the long edge up. Every failure is an
`ImageRejected` saying what is wrong; the caller names the item.
"""

from __future__ import annotations

import io

import numpy as np

from runtime.limits import ACCEPTED_IMAGE_FORMATS

ACCEPTED_FORMATS = ACCEPTED_IMAGE_FORMATS
MULTI_FRAME_FORMATS = ("PNG", "WEBP", "GIF")  # APNG, animated WebP and GIF: refused when animated
MAX_ASPECT_RATIO = 200  # long edge / short edge, the bound Qwen2-VL's processor sets too


class ImageRejected(ValueError):
    """One image cannot be encoded: undecodable, too large, or the wrong kind of file."""


class Preprocessor:
    """Thread-safe: the processor is configured once and only read afterwards."""

    def __init__(self, image_processor, image_size: int, *, max_image_bytes: int,
                 max_image_pixels: int) -> None:
        self.image_processor = image_processor
        self.pixel_shape = (3, image_size, image_size)
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.converts_rgb = bool(getattr(image_processor, "do_convert_rgb", False))
        probe = self.item_shape(self.pixels_of(_probe_image()))
        if probe != self.pixel_shape:
            raise ValueError(f"the checkpoint's image processor makes pixels of shape {probe}, "
                             f"the vision tower needs {self.pixel_shape}")

    def __call__(self, data: bytes):
        """Pixels [3, S, S] float32 for the image file `data` (`pixels_of`'s type)."""
        image = self.decode(data)
        try:
            return self.pixels_of(image)
        except Exception as error:  # e.g. a 1-pixel-high image the resize cannot handle
            raise ImageRejected(f"could not be preprocessed ({type(error).__name__}: {error})") from error

    def check_bytes(self, data) -> None:
        """Refuses what is not bytes or is over `max_image_bytes`, before anything reads it."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageRejected(f"expected image bytes, got {type(data).__name__}")
        if len(data) > self.max_image_bytes:
            raise ImageRejected(f"{len(data)} bytes is over the limit of "
                                f"{self.max_image_bytes} bytes (max_image_bytes)")

    def decode(self, data: bytes):
        from PIL import Image

        self.check_bytes(data)
        try:
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)  # reads the header only
            width, height = image.size
            if width * height > self.max_image_pixels:
                raise ImageRejected(
                    f"{width}x{height} = {width * height} pixels is over the limit of "
                    f"{self.max_image_pixels} (max_image_pixels)")
            if max(width, height) > MAX_ASPECT_RATIO * max(min(width, height), 1):
                raise ImageRejected(f"{width}x{height} has an aspect ratio over "
                                    f"{MAX_ASPECT_RATIO}:1")
            if image.format in MULTI_FRAME_FORMATS and getattr(image, "is_animated", False):
                raise ImageRejected(f"animated {image.format} images are not accepted; send a "
                                    "single frame")
            image.load()  # decodes now, so a truncated file fails here, naming the item
            # The processor's own RGB conversion composites transparency onto white; use it.
            return image if self.converts_rgb else image.convert("RGB")
        except ImageRejected:
            raise
        except Image.UnidentifiedImageError as error:
            if _looks_like_svg(data):
                raise ImageRejected("SVG is a vector format, not a raster image; send PNG, JPEG, "
                                    "WebP or GIF") from error
            raise ImageRejected("not an image in a format PIL can read among those accepted "
                                "(PNG, JPEG, WebP, single-frame GIF)") from error
        except Image.DecompressionBombError as error:  # PIL's own limit, above ours by default
            raise ImageRejected(f"refused as a decompression bomb ({error}); the limit is "
                                f"{self.max_image_pixels} pixels (max_image_pixels)") from error
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... per format
            raise ImageRejected(f"not a decodable image ({type(error).__name__}: "
                                f"{error})") from error

    def item_shape(self, pixels) -> tuple[int, ...]:
        """The shape of one encoder item in what `pixels_of` returns."""
        return tuple(pixels.shape)

    def pixels_of(self, image) -> np.ndarray:
        # pixel_values: [1, 3, S, S]
        pixels = self.image_processor(images=[image], return_tensors="np")["pixel_values"]
        return np.ascontiguousarray(pixels[0], dtype=np.float32)


def load_image_processor(path):
    """The checkpoint's own image processor, as its preprocessor config names it."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path)


def _looks_like_svg(data: bytes) -> bool:
    head = bytes(data[:1024]).lstrip(b"\xef\xbb\xbf \t\r\n").lower()  # BOM, whitespace
    return head.startswith((b"<?xml", b"<svg", b"<!doctype svg")) and b"<svg" in bytes(data[:65536]).lower()


def _probe_image():
    from PIL import Image

    return Image.new("RGB", (97, 61), (120, 30, 200))
