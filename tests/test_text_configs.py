"""Which text models the decoder computes: its rotary tables equal transformers' Llama RoPE for
every variant it serves, Mistral and Qwen2 models compute as transformers' do, and what it would compute differently
(a length-dependent RoPE, a sliding window inside the served length, another architecture)
is refused by name."""

import pytest
import torch
from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from decoder_service.llama import LlamaTextModel
from decoder_service.rope import rotary_table
from decoder_service.config import DecoderConfig, KVGeometry, derive_shapes
from decoder_service.text_config import check_rope, position_limit

HEAD_DIM, MAX_POSITIONS = 32, 1024

VARIANTS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "default, theta 500000": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 256},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
}


def _config(rope: dict) -> LlamaConfig:
    return LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, head_dim=HEAD_DIM,
                       max_position_embeddings=MAX_POSITIONS, rope_parameters=rope)


@pytest.mark.parametrize("name", VARIANTS)
def test_tables_equal_transformers_rope(name):
    config = _config(VARIANTS[name])
    cos, sin = rotary_table(config, HEAD_DIM, MAX_POSITIONS)
    positions = torch.arange(MAX_POSITIONS)[None, :]
    expected_cos, expected_sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32),
                                                              positions)
    torch.testing.assert_close(cos, expected_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, expected_sin[0], rtol=0, atol=1e-6)
    if name not in ("default", "dynamic"):  # dynamic equals default within max_position_embeddings
        default_cos, _ = rotary_table(_config(VARIANTS["default"]), HEAD_DIM, MAX_POSITIONS)
        assert not torch.allclose(cos, default_cos)  # the scaling is applied


def test_a_length_dependent_rope_is_refused_by_name():
    dynamic = _config(VARIANTS["dynamic"])
    check_rope(dynamic, MAX_POSITIONS)  # within max_position_embeddings: one table
    with pytest.raises(ValueError, match="rope_type 'dynamic' past max_position_embeddings"):
        rotary_table(dynamic, HEAD_DIM, 2 * MAX_POSITIONS)
    longrope = _config({"rope_type": "longrope", "rope_theta": 10000.0,
                        "short_factor": [1.0] * (HEAD_DIM // 2), "long_factor": [2.0] * (HEAD_DIM // 2),
                        "original_max_position_embeddings": 256})
    with pytest.raises(ValueError, match="unsupported rope_type 'longrope'"):
        check_rope(longrope)


def _small(config_class, **extra):
    return config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100, **extra)


def test_mistral_shaped_text_models_load_and_are_served_within_their_sliding_window():
    model = LlamaTextModel(_small(MistralConfig, sliding_window=None), max_len=8192)
    assert model.num_kv_heads == 2 and model.head_dim == 16
    assert position_limit(_small(MistralConfig, sliding_window=None)) == (131072, "max_position_embeddings")
    windowed = _small(MistralConfig, sliding_window=4096)
    assert position_limit(windowed) == (4096, "sliding_window")  # the default max_model_len
    LlamaTextModel(windowed, max_len=4096)  # the window is never reached
    with pytest.raises(ValueError, match=r"decoder.max_model_len: 8192 exceeds the model's sliding_window \(4096\)"):
        LlamaTextModel(windowed, max_len=8192)
    limit, field = position_limit(windowed)
    kv = KVGeometry(num_layers=1, num_kv_heads=2, head_dim=16, dtype_bytes=4)
    assert derive_shapes(DecoderConfig(model="m"), limit, kv, field).max_model_len == 4096
    with pytest.raises(ValueError, match=r"max_model_len \(8192\) exceeds the model's sliding_window"):
        derive_shapes(DecoderConfig(model="m", max_model_len=8192), limit, kv, field)


def test_another_architecture_is_refused_by_name():
    with pytest.raises(ValueError, match="unsupported text_config.model_type 'gemma'"):
        LlamaTextModel(_small(GemmaConfig))


@pytest.mark.parametrize("config_class, extra", [
    (LlamaConfig, {}),
    (LlamaConfig, {"rope_parameters": VARIANTS["llama3"], "attention_bias": True}),
    (MistralConfig, {"sliding_window": None}),
    (Qwen2Config, {"tie_word_embeddings": True}),
], ids=["llama", "llama3 rope, biases", "mistral", "qwen2"])
def test_next_token_logits_equal_transformers_causal_lm(config_class, extra):
    """The whole text model, eager on the CPU: one prompt's last-token logits equal
    transformers' `*ForCausalLM` with the same weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _small(config_class, max_position_embeddings=MAX_POSITIONS, **extra)
    reference = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name.endswith("bias"):  # initialised to zero: make a missing one show
                parameter.normal_()
    model = LlamaTextModel(config, max_len=MAX_POSITIONS)
    state = {k.removeprefix("model."): v for k, v in reference.state_dict().items()}
    model.load_state_dict(state, strict=True)
    tokens = torch.randint(0, config.vocab_size, (37,))
    ours = _last_token_logits(model, config, tokens)
    with torch.no_grad():
        expected = reference(tokens[None]).logits[0, -1]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def _last_token_logits(model: LlamaTextModel, config, tokens: torch.Tensor) -> torch.Tensor:
    """One prompt prefilled in one chunk on a fresh paged cache, eager on the CPU."""
    from decoder_service.kv_cache import PagedKVCache
    from decoder_service.llama import ChunkRows

    t, bs = len(tokens), 16
    blocks = -(-t // bs)
    cache = PagedKVCache(num_layers=config.num_hidden_layers, num_blocks=blocks + 1, block_size=bs,
                         num_kv_heads=config.num_key_value_heads, head_dim=model.head_dim,
                         dtype=torch.float32, device=torch.device("cpu"))
    positions = torch.arange(t)
    rows = ChunkRows(model.embed_tokens(tokens), positions, 1 + positions // bs, positions % bs,
                     torch.zeros(t, dtype=torch.long), torch.arange(1, blocks + 1),
                     torch.zeros(blocks * bs, dtype=torch.long), torch.arange(blocks * bs),
                     torch.tensor([t - 1]))
    cos, sin = rotary_table(config, model.head_dim, MAX_POSITIONS)
    with torch.no_grad():
        return model.prefill(rows, cos, sin, cache)[0]


def _random_small_model():
    """A one-layer Llama with weights drawn at a scale that spreads its logits, and a prompt."""
    torch.manual_seed(0)
    config = _small(LlamaConfig, max_position_embeddings=MAX_POSITIONS)
    model = LlamaTextModel(config, max_len=MAX_POSITIONS)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    return config, model, torch.randint(0, config.vocab_size, (37,))


def test_head_stacked_in_column_blocks_computes_the_same_logits():
    """The XLA:CPU layout of the head (`stack_head`): its weight as `[blocks, in, width]`, the
    last block zero-padded, one batched dot. Same logits, over any leading dims; a head whose
    block would not fit the cache budget, or in bfloat16, stays whole."""
    config, model, tokens = _random_small_model()
    whole = _last_token_logits(model, config, tokens)
    hidden = torch.randn(2, 3, config.hidden_size)
    whole_rows = model.lm_head(hidden)
    block_bytes = config.hidden_size * 32 * 4
    model.stack_head(width=32, cache_bytes=block_bytes - 1)  # a block would not fit: left whole
    assert model.lm_head.stacked is None
    in_bfloat16 = LlamaTextModel(config, max_len=MAX_POSITIONS).to(torch.bfloat16)
    in_bfloat16.stack_head(width=32, cache_bytes=block_bytes)  # float32 only: left whole
    assert in_bfloat16.lm_head.stacked is None

    model.stack_head(width=32, cache_bytes=block_bytes)

    head = model.lm_head
    assert head.stacked.shape == (4, config.hidden_size, 32) and not hasattr(head, "weight")
    assert torch.count_nonzero(head.stacked[-1, :, 100 - 96:]) == 0  # the padding columns
    stacked = _last_token_logits(model, config, tokens)
    assert stacked.shape == whole.shape == (config.vocab_size,)
    torch.testing.assert_close(stacked, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head(hidden), whole_rows, rtol=1e-5, atol=1e-5)


def test_down_projections_cut_into_column_blocks_compute_the_same_logits():
    """The XLA:CPU layout (`cut_down_projections`): each down projection's weight as column
    blocks, one dot each, the last block narrower. Same logits, and the blocks replace the
    weight rather than sitting beside it."""
    config, model, tokens = _random_small_model()
    whole = _last_token_logits(model, config, tokens)
    before = sum(p.numel() for p in model.parameters())
    model.cut_down_projections(width=24, max_blocks=2)  # three would be needed: left whole
    assert model.layers[0].mlp.down_proj.blocks is None

    model.cut_down_projections(width=24, max_blocks=3)

    down = model.layers[0].mlp.down_proj
    assert [b.shape[1] for b in down.blocks] == [24, 24, 16] and not hasattr(down, "weight")
    assert sum(p.numel() for p in model.parameters()) == before
    cut = _last_token_logits(model, config, tokens)
    torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-5)
    assert cut.argmax() == whole.argmax()
