"""A fake model runner with hand-computable outputs (after JetStream's fake engine).

It keeps a KV pool of its own on the host, written and read exactly as the real
graphs do (block ids, offsets, block tables, context blocks, key masks), but what it
stores per position is the token's "value" (its id, or for an image position the
first column of its embedding row). The next token of a sequence is a checksum of
every value it can see, so any mistake in paging, prefix reuse, chunking, image row
placement or recomputation after preemption changes the output. `expected_tokens`
computes the same thing straight from the sequence. Every graph shape it is asked
to run must be one warm-up would compile, or it raises like the strict guard.
"""

from __future__ import annotations

import numpy as np

from decoder_service.config import DecoderConfig, DecoderShapes, KVGeometry, derive_shapes
from decoder_service.inputs import NO_SEQ_QUERY, DecodeInputs, MixedInputs, PrefillInputs
from decoder_service.runner import graph_plans, mixed_graph_for, next_to_compile
from runtime.compile_guard import RecompilationError
from runtime.messages import MAX_TOP_LOGPROBS

TOKEN_BASE, TOKEN_RANGE = 1000, 997  # outputs stay clear of special and image token ids
TINY_KV = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=16, dtype_bytes=4)
# LLaVA-1.5-7B: 32 layers, 32 KV heads of 128, bfloat16.
LLAVA_7B_KV = KVGeometry(num_layers=32, num_kv_heads=32, head_dim=128, dtype_bytes=2)


def decoder_shapes(kv: KVGeometry = TINY_KV, max_position_embeddings: int = 1024,
                   **overrides) -> DecoderShapes:
    """The shapes of a decoder config (the tiny test decoder's, less `overrides`) for a model
    of geometry `kv`, without loading one."""
    config = DecoderConfig(model="unused", **{"max_model_len": 256, "max_num_seqs": 4,
                                              "max_num_batched_tokens": 64, **overrides})
    return derive_shapes(config, max_position_embeddings, kv)


def checksum(values: np.ndarray) -> int:
    weights = np.arange(1, len(values) + 1, dtype=np.int64)
    return TOKEN_BASE + int((values.astype(np.int64) * weights).sum() % TOKEN_RANGE)


def expected_tokens(prompt_values: list[int], count: int) -> list[int]:
    """What the fake generates after a prompt whose positions hold `prompt_values`."""
    values, out = list(prompt_values), []
    for _ in range(count):
        out.append(checksum(np.asarray(values)))
        values.append(out[-1])
    return out


class _Guard:
    compilations_after_warmup = 0


class FakeRunner:
    def __init__(self, shapes: DecoderShapes, *, vocab_size: int = 30528, hidden_size: int = 4,
                 all_warm: bool = True) -> None:
        """`all_warm`: every graph is compiled; else only the covering prefill graph, as a
        replica serves first, and `compile_next` adds the others as the real runner does."""
        self.shapes = shapes
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.guard = _Guard()
        self.pool = np.full((shapes.num_blocks, shapes.block_size), -1, np.int64)
        self.graphs: list[tuple[str, tuple[int, int]]] = []
        self.plans = graph_plans(shapes)
        self.plans["prefill"].mark_compiled(self.plans["prefill"].covering)
        while all_warm and self.compile_next():  # all warm: steps run on exactly their buckets
            pass
        self.compile_seconds = {("prefill", self.plans["prefill"].covering): 0.0}
        self.fail_next: str | None = None  # "decode", "prefill" or "mixed": that call raises once
        self.graphs_planned = sum(len(p.planned) for p in self.plans.values())
        self.compiles_stopped: str | None = None  # the real runner's: it never runs out of maps

    @property
    def graphs_compiled(self) -> int:
        return sum(len(p.compiled) for p in self.plans.values())

    @property
    def can_decode(self) -> bool:
        return bool(self.plans["decode"].compiled)

    def graph_for(self, kind: str, need: tuple[int, int]) -> tuple[int, int]:
        return self.plans[kind].fit(need)

    def mixed_graph_for(self, decodes: int, need: tuple[int, int]) -> tuple[int, int] | None:
        return mixed_graph_for(self.plans, self.shapes, decodes, need)

    def compile_next(self) -> bool:
        pending = next_to_compile(self.plans)  # in the real runner's order
        if pending is not None:
            kind, graph = pending
            self.plans[kind].mark_compiled(graph)
        return pending is not None

    def _check(self, kind: str, graph: tuple[int, int]) -> None:
        self.graphs.append((kind, graph))
        if graph not in self.plans[kind].compiled:
            raise RecompilationError(f"fake runner: {kind} graph {graph} is not warmed up")
        if self.fail_next == kind:
            self.fail_next = None
            raise RuntimeError(f"injected {kind} failure")

    @staticmethod
    def _rows(tokens: list[int]) -> np.ndarray:
        out = np.zeros((len(tokens), 2 + 2 * MAX_TOP_LOGPROBS), np.float32)
        out[:, 0] = tokens
        out[:, 2] = tokens
        return out

    def decode(self, x: DecodeInputs) -> np.ndarray:
        self._check("decode", x.graph)
        return self._decode(x)

    def prefill(self, x: PrefillInputs) -> np.ndarray:
        self._check("prefill", x.graph)
        return self._prefill(x)

    def mixed(self, x: MixedInputs) -> tuple[np.ndarray, np.ndarray]:
        """Both halves over one blocks bucket, as the real mixed graph runs them."""
        self._check("mixed", x.graph)
        assert x.decode.block_tables.shape == (self.shapes.mixed_batch, x.graph[1])
        return self._decode(x.decode), self._prefill(x.prefill)

    def _decode(self, x: DecodeInputs) -> np.ndarray:
        bs = self.shapes.block_size
        self.pool[x.write_blocks, x.write_offsets] = x.token_ids
        tokens = []
        for i in range(len(x.token_ids)):
            visible = self.pool[x.block_tables[i]].reshape(-1)[:x.context_lens[i]]
            tokens.append(checksum(visible) if x.context_lens[i] else 0)
        assert x.block_tables.shape[1] * bs >= x.context_lens.max()
        return self._rows(tokens)

    def _prefill(self, x: PrefillInputs) -> np.ndarray:
        values = np.where(x.is_image, x.image_rows[:, 0].astype(np.int64), x.token_ids)
        self.pool[x.write_blocks, x.write_offsets] = values
        keys = self.pool[x.context_blocks].reshape(-1)
        tokens = []
        for last in x.last_index:
            seq, position = x.query_seq[last], x.positions[last]
            if seq == NO_SEQ_QUERY:
                tokens.append(0)
                continue
            mine = (x.key_seq == seq) & (x.key_positions <= position)
            order = np.argsort(x.key_positions[mine], kind="stable")
            tokens.append(checksum(keys[mine][order]))
        return self._rows(tokens)
