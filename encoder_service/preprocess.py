"""Image bytes -> pixel arrays, with the checkpoint's own transformers image processor.

Decoding is guarded: the encoded size and the pixel count (read from the header,
before any pixel is decoded) are checked against limits, so a small file that
claims a huge canvas (a decompression bomb) is refused without allocating it.
Every failure is an `ImageRejected` saying what is wrong; the caller names the item.
"""

from __future__ import annotations

import io

import numpy as np


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
        probe = self.pixels_of(_probe_image())
        if probe.shape != self.pixel_shape:
            raise ValueError(f"the checkpoint's image processor makes pixels of shape {probe.shape}, "
                             f"the vision tower needs {self.pixel_shape}")

    def __call__(self, data: bytes) -> np.ndarray:
        """Pixels [3, S, S] float32 for the image file `data`."""
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
            image = Image.open(io.BytesIO(data))  # reads the header only
            width, height = image.size
            if width * height > self.max_image_pixels:
                raise ImageRejected(
                    f"{width}x{height} = {width * height} pixels is over the limit of "
                    f"{self.max_image_pixels} (max_image_pixels)")
            image.load()  # decodes now, so a truncated file fails here, naming the item
            # The processor's own RGB conversion composites transparency onto white; use it.
            return image if self.converts_rgb else image.convert("RGB")
        except ImageRejected:
            raise
        except Image.UnidentifiedImageError as error:
            raise ImageRejected("not an image in a format PIL can read") from error
        except Image.DecompressionBombError as error:  # PIL's own limit, above ours by default
            raise ImageRejected(f"refused as a decompression bomb ({error})") from error
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... per format
            raise ImageRejected(f"not a decodable image ({type(error).__name__}: "
                                f"{error})") from error

    def pixels_of(self, image) -> np.ndarray:
        # pixel_values: [1, 3, S, S]
        pixels = self.image_processor(images=[image], return_tensors="np")["pixel_values"]
        return np.ascontiguousarray(pixels[0], dtype=np.float32)


def load_image_processor(path):
    """The checkpoint's own image processor, as its preprocessor config names it."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path)


def _probe_image():
    from PIL import Image

    return Image.new("RGB", (97, 61), (120, 30, 200))
