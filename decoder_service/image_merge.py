"""Scatter image features into image placeholder positions, with fixed shapes.

The host knows where every placeholder is, so it builds, per prefill step, one
index per packed token: which row of the padded image-row block fills it (0 when
the token is text) and whether it is an image token at all. The device then does
a gather and a `where`: no boolean-mask indexing, no `masked_scatter`, no shape
that depends on how many placeholders there are. Rows are consumed in order of
appearance, which is exactly what transformers' `masked_scatter` does, across
several images per prompt and several prompts per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def placeholder_count(token_ids: Sequence[int] | np.ndarray, image_token_id: int) -> int:
    return int(np.count_nonzero(np.asarray(token_ids) == image_token_id))


def build_image_index(token_ids: np.ndarray, image_token_id: int, row_offsets: Sequence[int],
                      placeholder_counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Host side. token_ids: [T] packed tokens of the step (padding included).

    `row_offsets[j]` is where prompt j's image rows start in the step's row block and
    `placeholder_counts[j]` how many placeholders prompt j has; the prompts' placeholders
    appear in `token_ids` in prompt order. Returns (row_index [T] int32, is_image [T] bool).
    """
    is_image = token_ids == image_token_id
    if int(is_image.sum()) != sum(placeholder_counts):
        raise ValueError(f"{int(is_image.sum())} image placeholders in the step, "
                         f"but the prompts declare {sum(placeholder_counts)}")
    rows = np.concatenate([np.arange(count, dtype=np.int32) + offset
                           for offset, count in zip(row_offsets, placeholder_counts)]
                          or [np.zeros(0, dtype=np.int32)])
    row_index = np.zeros(token_ids.shape, dtype=np.int32)
    row_index[is_image] = rows
    return row_index, is_image


def merge_image_rows(text_embeds: torch.Tensor, image_rows: torch.Tensor, row_index: torch.Tensor,
                     is_image: torch.Tensor) -> torch.Tensor:
    """Device side. text_embeds: [T, D]; image_rows: [R, D]; row_index, is_image: [T]."""
    gathered = image_rows.index_select(0, row_index)  # [T, D]
    return torch.where(is_image[:, None], gathered.to(text_embeds.dtype), text_embeds)
