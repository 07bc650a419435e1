"""LLaVA-NeXT (anyres): an image is a base view plus a grid of tiles; a tile is an encoder item.

The checkpoint's own image processor cuts the image (`TilePreprocessor`): it picks the
canvas from `image_grid_pinpoints` that best fits the image, resizes and pads the image
onto it, and cuts it into tiles of the tower's size, row-major, after one downscaled base
view. Every tile then runs through the vision tower as an ordinary item of the item-batch
buckets (tiles of concurrent requests share steps), giving [tokens_per_tile, hidden] each.

Packing follows `LlavaNextModel.pack_image_features` ("spatial_unpad"): the grid tiles'
patch rows are laid out as one feature map, the rows or columns that only cover the
padding are cut ("unpad", from the image's aspect ratio), an `image_newline` row ends each
row of the map, and the base view's rows come first. That is a pure gather, so the host
builds it once per image size as an index array (`AnyresLayout.pack_index`) into the
image's tile features with the newline row appended, and `pack` copies it as the index's
contiguous runs (`pack_runs`: ~2 runs per map row) straight from each tile into the output,
so the real rows are copied once (no concatenation of the tiles first). It runs on the host
because the tiles come back from the device per step anyway (an image's tiles may span steps
shared with other requests): no extra graph, no extra transfer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from encoder_service.preprocess import Preprocessor


@dataclass(frozen=True)
class Tiles:
    """One image, preprocessed: what the encoder runs, and what the packing needs."""

    pixels: np.ndarray  # [num_tiles, 3, S, S] float32: the base view, then the grid row-major
    image_size: tuple[int, int]  # (height, width) of the original image, in pixels


@dataclass(frozen=True)
class AnyresLayout:
    tile_size: int  # pixels per side of a tile: the tower's input
    patches_per_side: int  # patch rows (and columns) per tile
    grid_pinpoints: tuple[tuple[int, int], ...]  # the (height, width) canvases tiles are cut from

    @classmethod
    def of(cls, config) -> AnyresLayout:
        """The layout of a `transformers.LlavaNextConfig`; ValueError names what is unsupported."""
        if config.vision_feature_select_strategy != "default":
            raise ValueError("vision_feature_select_strategy: LLaVA-NeXT packs tiles of patch rows "
                             f"only ('default'), got {config.vision_feature_select_strategy!r}")
        vision = config.vision_config
        pinpoints = tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints)
        tile = int(vision.image_size)
        if not pinpoints or any(h % tile or w % tile or h < tile or w < tile for h, w in pinpoints):
            raise ValueError(f"image_grid_pinpoints {[list(p) for p in pinpoints]} must be multiples "
                             f"of the tower's {tile} px")
        return cls(tile_size=tile, patches_per_side=tile // int(vision.patch_size),
                   grid_pinpoints=pinpoints)

    @property
    def tokens_per_tile(self) -> int:
        return self.patches_per_side ** 2

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of tiles for an image of (height, width), as the processor picks it."""
        from transformers.image_processing_utils import select_best_resolution

        height, width = select_best_resolution(tuple(image_size), [list(p) for p in self.grid_pinpoints])
        return height // self.tile_size, width // self.tile_size

    def num_tiles(self, image_size: tuple[int, int]) -> int:
        rows, cols = self.grid(image_size)
        return 1 + rows * cols

    def num_tokens(self, image_size: tuple[int, int]) -> int:
        return len(self.pack_index(tuple(image_size)))

    @lru_cache(maxsize=1024)  # one entry per image size seen; the layout is frozen and hashable
    def pack_index(self, image_size: tuple[int, int]) -> np.ndarray:
        """Rows of `[tile features flattened; newline]` in packed order: int64 [num_tokens].

        Tile t's patch (y, x) is row t * T + y * side + x (T = side * side); the newline is row
        num_tiles * T. Cut rows and columns are those `unpad_image` cuts, with its rounding."""
        side, per_tile = self.patches_per_side, self.tokens_per_tile
        rows, cols = self.grid(image_size)
        newline = (1 + rows * cols) * per_tile
        map_h, map_w = rows * side, cols * side  # the grid's feature map, in patches
        y, x = np.arange(map_h)[:, None], np.arange(map_w)[None, :]
        tile = 1 + (y // side) * cols + (x // side)  # the base view is tile 0
        feature_map = tile * per_tile + (y % side) * side + (x % side)  # [map_h, map_w]
        height, width = image_size
        if width / height > map_w / map_h:  # wider than the canvas: rows of padding top and bottom
            kept = int(round(height * (map_w / width), 7))
            pad = (map_h - kept) // 2
            feature_map = feature_map[pad:map_h - pad]
        else:
            kept = int(round(width * (map_h / height), 7))
            pad = (map_w - kept) // 2
            feature_map = feature_map[:, pad:map_w - pad]
        with_newlines = np.concatenate(
            [feature_map, np.full((feature_map.shape[0], 1), newline)], axis=1)
        index = np.concatenate([np.arange(per_tile), with_newlines.reshape(-1)]).astype(np.int64)
        index.flags.writeable = False  # shared through the cache
        return index


@lru_cache(maxsize=1024)
def pack_runs(layout: AnyresLayout, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`pack_index` as copies: runs [R, 4] of (tile, first row in it, first output row, rows),
    and the output rows [N] that take the newline."""
    index = layout.pack_index(image_size)
    per_tile = layout.tokens_per_tile
    is_newline = index == layout.num_tiles(image_size) * per_tile  # the row after every tile's
    # A run begins where the source is not the next row, or a tile begins (the base view's
    # last row and the first grid tile's first row are adjacent in the source, not in a tile).
    starts = np.flatnonzero((np.diff(index, prepend=-2) != 1) | (index % per_tile == 0))
    lengths = np.diff(np.append(starts, len(index)))
    tiles, offsets = np.divmod(index[starts], per_tile)
    runs = np.stack([tiles, offsets, starts, lengths], axis=1)
    return runs[~is_newline[starts]], np.flatnonzero(is_newline)


def pack(layout: AnyresLayout, tile_features: list[np.ndarray], newline: np.ndarray,
         image_size: tuple[int, int]) -> np.ndarray:
    """tile_features: num_tiles x [T, D]; newline: [D] -> the image's embedding [num_tokens, D]
    (equal to `[tiles flattened; newline][pack_index]`)."""
    runs, newline_rows = pack_runs(layout, tuple(image_size))
    out = np.empty((layout.num_tokens(tuple(image_size)), tile_features[0].shape[1]),
                   tile_features[0].dtype)
    for tile, first, at, count in runs.tolist():
        out[at:at + count] = tile_features[tile][first:first + count]
    out[newline_rows] = newline
    return out


class TilePreprocessor(Preprocessor):
    """Image bytes -> `Tiles`, with the checkpoint's LLaVA-NeXT image processor."""

    def item_shape(self, pixels: Tiles) -> tuple[int, ...]:
        return tuple(pixels.pixels.shape[1:])

    def pixels_of(self, image) -> Tiles:
        # pixel_values: [1, num_tiles, 3, S, S] (one image: no padding to other images' counts)
        out = self.image_processor(images=[image], return_tensors="np")
        height, width = (int(v) for v in out["image_sizes"][0])
        return Tiles(pixels=np.ascontiguousarray(out["pixel_values"][0], dtype=np.float32),
                     image_size=(height, width))
