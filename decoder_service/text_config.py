"""Which text models the decoder computes exactly, read from the config alone (no torch: the
app builder checks a deploy with it before any replica starts).

The decoder is transformers' Llama (`llama.py`); Mistral's and Qwen2's text models are the
same computation (Qwen2 with biases on q/k/v alone) while no sliding window cuts attention
short. A RoPE variant is only a different cos/sin table (`rope.py`) when its frequencies do
not change with the sequence's length: `default`, and transformers' `linear`, `llama3` and
`yarn` scalings; `dynamic` changes them only past `max_position_embeddings`, so it qualifies
while the served length stays within it.
"""

from __future__ import annotations

LLAMA_SHAPED = ("llama", "mistral", "qwen2")  # text model types whose math is Llama's
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_type(cfg) -> str:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return rope.get("rope_type", "default")


def check_rope(cfg, max_len: int | None = None) -> None:
    """Raises a ValueError naming the rope_type when its table would change with the length
    (`max_len`: the positions served; None: not known yet, so `dynamic` passes)."""
    kind = rope_type(cfg)
    if kind in STATIC_ROPE_TYPES:
        return
    limit = getattr(cfg, "max_position_embeddings", None)
    if kind == "dynamic" and (max_len is None or (limit is not None and max_len <= limit)):
        return
    raise ValueError(
        f"unsupported rope_type {kind!r}" + (
            f" past max_position_embeddings ({limit}) with max_model_len {max_len}: its "
            "frequencies change with the sequence's length" if kind == "dynamic" else
            f": supported are {', '.join(STATIC_ROPE_TYPES)}, and dynamic within "
            "max_position_embeddings"))


def projection_biases(cfg) -> tuple[bool, bool]:
    """Whether the attention's (q/k/v, o) projections have biases: Llama's and Mistral's
    `attention_bias` sets both; Qwen2 always has them on q/k/v and never on o."""
    if getattr(cfg, "model_type", "llama") == "qwen2":
        return True, False
    bias = bool(getattr(cfg, "attention_bias", False))
    return bias, bias


def position_limit(cfg) -> tuple[int, str]:
    """The most positions the decoder serves exactly, and the config field that sets them:
    `max_position_embeddings`, or a shorter `sliding_window` (the decoder attends over the
    whole context, so it serves a windowed model only within its window, as vLLM does with
    `--disable-sliding-window`). The default `max_model_len`."""
    limit = int(cfg.max_position_embeddings)
    window = getattr(cfg, "sliding_window", None)
    if window is not None and int(window) < limit:
        return int(window), "sliding_window"
    return limit, "max_position_embeddings"


def check_text_config(cfg, max_len: int | None = None) -> None:
    """Raises a ValueError naming the field when the text model is not one the decoder
    computes exactly: its model_type, activation, RoPE, or `max_len` positions served past
    `position_limit` (a sliding window shorter than that: Mistral v0.1's 4,096)."""
    kind = getattr(cfg, "model_type", "llama")
    if kind not in LLAMA_SHAPED:
        raise ValueError(f"unsupported text_config.model_type {kind!r}: the decoder computes "
                         f"{', '.join(LLAMA_SHAPED)} language models")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported text_config.hidden_act {cfg.hidden_act!r}: Llama uses silu")
    limit, field = position_limit(cfg)
    if max_len is not None and max_len > limit:
        reason = (": the decoder attends over the whole context" if field == "sliding_window"
                  else "")
        raise ValueError(f"decoder.max_model_len: {max_len} exceeds the model's {field} "
                         f"({limit}){reason}")
    check_rope(cfg, max_len)
