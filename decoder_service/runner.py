"""Model runner: weights, the paged KV cache and the compiled steps on the device.

Compile discipline (after vLLM's TPU model runner):
- inputs are prepared on the host (`decoder_service.inputs`), padded to buckets, and
  moved to the device once per graph call; outputs come back as one packed tensor;
- a graph is embed (+ image merge), layers, sampling. Inside it there is no `.item()`,
  no `.cpu()`, no boolean-mask indexing, no data-dependent shape;
- each graph is traced once, when it is compiled, and then replayed by hash
  (`runtime.graph_replay`): a step runs no model Python. Everything that varies between
  steps is one of the step's input arrays; the KV cache is the state each step updates
  in place (its buffers donated);
- the graphs are the (chunk tokens, context blocks) prefill family, the (batch, blocks)
  decode family and the (chunk tokens, blocks) mixed family of `DecoderShapes` (`graph_plans`).
  `warm_up` compiles one graph, the prefill family's covering one (the largest, which
  every chunk fits by padding up), so the replica can serve: until a decode graph
  exists, decodes run on it as one-token chunks
  (`inputs.decodes_as_chunks`). With `full=True` it compiles every graph before returning.
  `compile_next` compiles one more outside any step (the engine calls it between steps),
  the decode family's covering graph first; each step runs on the cheapest compiled graph
  that fits it (`graph_for`), and on exactly its buckets once all are in;
- after warm-up the compile guard checks every step: a graph made inside one is a bug.
The runner makes no policy decisions: the scheduler chooses what runs.
Not thread-safe: one engine thread calls it.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch

from decoder_service.config import DecoderConfig, DecoderShapes, KVGeometry, derive_shapes
from decoder_service.inputs import DecodeInputs, MixedInputs, PrefillInputs
from decoder_service.kv_cache import PagedKVCache
from decoder_service.llama import ChunkRows, DecodeRows, LlamaTextModel
from decoder_service.rope import rotary_table
from decoder_service.sampler import index_tensors, sample
from decoder_service.text_config import position_limit
from runtime.buckets import pad_to_bucket
from runtime.checkpoint import Checkpoint, text_state_dict
from runtime.compile_guard import CompileGuard
from runtime.device import Device
from runtime.graph_replay import ReplayedGraph
from runtime.graphs import GraphPlan, WarmupProgress, warmup_reporter
from runtime.host_cpu import l2_cache_bytes
from runtime.memory_maps import MapBudget

log = logging.getLogger(__name__)

StepInputs = PrefillInputs | DecodeInputs | MixedInputs


def load_text_model(checkpoint: Checkpoint, dtype: torch.dtype,
                    max_len: int | None = None) -> LlamaTextModel:
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every tensor is loaded strictly next: random init is wasted CPU
        model = LlamaTextModel(checkpoint.config.text_config, max_len)
    tensors = {k.removeprefix("language_model."): v for k, v in text_state_dict(checkpoint).items()}
    model.load_state_dict(tensors, strict=True)
    return model.to(dtype).eval()


def kv_geometry(text_config, dtype: torch.dtype) -> KVGeometry:
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return KVGeometry(num_layers=text_config.num_hidden_layers,
                      num_kv_heads=text_config.num_key_value_heads or heads, head_dim=head_dim,
                      dtype_bytes=torch.empty(0, dtype=dtype).element_size())


def graph_plans(shapes: DecoderShapes) -> dict[str, GraphPlan]:
    """The graph families of `shapes`, by kind; "mixed" only where the family is on."""
    plans = {"prefill": GraphPlan(shapes.prefill_graphs()),
             "decode": GraphPlan(shapes.decode_graphs())}
    mixed = shapes.mixed_graphs()
    if mixed:
        plans["mixed"] = GraphPlan(mixed)
    return plans


def next_to_compile(plans: dict[str, GraphPlan]) -> tuple[str, tuple[int, int]] | None:
    """(family, graph) to compile next, None when all are in: the decode family's covering
    graph first (it takes decodes off the prefill graph), then the decode family smallest
    first (every running sequence uses it), then the prefill family smallest first, then
    the mixed family (optional: a step without one runs two graphs)."""
    if not plans["decode"].compiled:
        return "decode", plans["decode"].covering
    for kind in ("decode", "prefill", "mixed"):
        graph = plans[kind].next_pending() if kind in plans else None
        if graph is not None:
            return kind, graph
    return None


def mixed_graph_for(plans: dict[str, GraphPlan], shapes: DecoderShapes, decodes: int,
                    need: tuple[int, int]) -> tuple[int, int] | None:
    """The compiled mixed graph for a step of `decodes` sequences and chunks needing `need`
    (`inputs.mixed_need`), or None: no mixed family, a decode batch whose bucket is below half
    the mixed graphs' rows, or none compiled that fits.

    A batch of at least half runs padded up to the mixed graph's rows: on two graphs its
    streams' next token would wait for the prefill graph and then the whole next step, and
    there the two cost about the same. A smaller batch keeps its two graphs: padding it costs
    more, for fewer streams. The measurements: docs/decoder.md, "Why half a batch pads up"."""
    plan = plans.get("mixed")
    if plan is None or 2 * pad_to_bucket(decodes, shapes.decode_batch_buckets) < shapes.mixed_batch:
        return None
    return plan.fitting(need)


class ModelRunner:
    def __init__(self, config: DecoderConfig, checkpoint: Checkpoint, device: Device) -> None:
        text = checkpoint.config.text_config
        self.device = device
        self.dtype = getattr(torch, config.dtype)
        limit, limit_name = position_limit(text)
        self.shapes: DecoderShapes = derive_shapes(config, limit, kv_geometry(text, self.dtype),
                                                   limit_name)
        self.vocab_size = int(text.vocab_size)
        self.hidden_size = int(text.hidden_size)
        self.guard = CompileGuard(device, strict=config.strict_compile, name="decoder")
        with self.guard.compiling():  # device set-up syncs: never beside another thread's step
            self.model = load_text_model(checkpoint, self.dtype, self.shapes.max_model_len)
            if device.is_xla and device.computes_on_host:
                self.model.cut_down_projections()
                self.model.stack_head(cache_bytes=l2_cache_bytes() or 0)
            self.model.to(device.torch_device)
            cos, sin = rotary_table(text, self.model.head_dim, self.shapes.max_model_len)
            # In the model's dtype, as transformers' Llama casts them: q and k stay in it.
            self.cos = cos.to(self.dtype).to(device.torch_device)
            self.sin = sin.to(self.dtype).to(device.torch_device)
            # Constant index vectors, made once: torch.arange on the XLA device costs ms per call.
            positions = self.shapes.max_blocks_per_seq * self.shapes.block_size
            self.key_positions = torch.arange(positions).to(device.torch_device)
            self.sampler_indices = index_tensors(self.vocab_size, device.torch_device,
                                                 self.shapes.max_model_len)
            self.cache = PagedKVCache(
                num_layers=len(self.model.layers), num_blocks=self.shapes.num_blocks,
                block_size=self.shapes.block_size, num_kv_heads=self.model.num_kv_heads,
                head_dim=self.model.head_dim, dtype=self.dtype, device=device.torch_device)
            # Materialise weights, tables and cache as device data now: left pending, they would
            # fold into the first warm-up graph, which then differs from the same step later.
            device.sync()
        self.plans = graph_plans(self.shapes)
        self._graphs: dict[tuple[str, tuple[int, int]], ReplayedGraph] = {}  # xla: captured
        self.warmup_seconds = 0.0  # until ready: the covering graph (or all, with full=True)
        self.compile_seconds: dict[tuple[str, tuple[int, int]], float] = {}
        # XLA:CPU maps memory for every kernel it compiles (runtime/memory_maps.py).
        self.map_budget = MapBudget() if device.is_xla and device.computes_on_host else None
        self.compiles_stopped: str | None = None  # why no more graphs compile (out of memory maps)

    def _device_inputs(self, x: StepInputs, prefix: str = "") -> dict[str, torch.Tensor]:
        """A step's host arrays as device tensors, by field name (sampling rows' prefixed;
        a mixed step's halves prefixed `decode.` and `prefill.`)."""
        if isinstance(x, MixedInputs):
            return {**self._device_inputs(x.decode, "decode."),
                    **self._device_inputs(x.prefill, "prefill.")}
        dev = self.device.torch_device
        tensors = {prefix + f.name: torch.from_numpy(getattr(x, f.name)).to(dev)
                   for f in fields(x) if f.name != "sampling"}
        tensors.update({f"{prefix}sampling.{name}": t for name, t in x.sampling.to(dev).items()})
        return tensors

    @staticmethod
    def _sampling_rows(t: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        start = prefix + "sampling."
        return {name.removeprefix(start): v for name, v in t.items() if name.startswith(start)}

    def _chunk_rows(self, t: dict[str, torch.Tensor], p: str = "") -> ChunkRows:
        embeds = self.model.embed_tokens(t[p + "token_ids"])
        embeds = torch.where(t[p + "is_image"][:, None], t[p + "image_rows"].to(embeds.dtype), embeds)
        return ChunkRows(embeds, t[p + "positions"], t[p + "write_blocks"], t[p + "write_offsets"],
                         t[p + "query_seq"], t[p + "context_blocks"], t[p + "key_seq"],
                         t[p + "key_positions"], t[p + "last_index"])

    def _decode_rows(self, t: dict[str, torch.Tensor], p: str = "") -> DecodeRows:
        attended = t[p + "block_tables"].shape[1] * self.shapes.block_size
        return DecodeRows(t[p + "token_ids"], t[p + "positions"], t[p + "write_blocks"],
                          t[p + "write_offsets"], t[p + "block_tables"], t[p + "context_lens"],
                          self.key_positions[:attended])

    @torch.no_grad()
    def _prefill(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model.prefill(self._chunk_rows(t), self.cos, self.sin, self.cache)
        return sample(logits, **self._sampling_rows(t), **self.sampler_indices)

    @torch.no_grad()
    def _decode(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model.decode(self._decode_rows(t), self.cos, self.sin, self.cache)
        return sample(logits, **self._sampling_rows(t), **self.sampler_indices)

    @torch.no_grad()
    def _mixed(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model.mixed(self._decode_rows(t, "decode."), self._chunk_rows(t, "prefill."),
                                  self.cos, self.sin, self.cache)
        decode, prefill = self._sampling_rows(t, "decode."), self._sampling_rows(t, "prefill.")
        rows = {name: torch.cat((decode[name], prefill[name])) for name in decode}
        return sample(logits, **rows, **self.sampler_indices)

    def prefill(self, inputs: PrefillInputs) -> np.ndarray:
        """Runs one prefill graph; returns sampled rows [max_prefill_seqs, ...] (`sampler.sample`)."""
        return self._run("prefill", inputs, "prefill tokens=%d context_blocks=%d" % inputs.graph)

    def decode(self, inputs: DecodeInputs) -> np.ndarray:
        """Runs one decode graph; returns sampled rows [batch bucket, ...]."""
        return self._run("decode", inputs, "decode batch=%d blocks=%d" % inputs.graph)

    def mixed(self, inputs: MixedInputs) -> tuple[np.ndarray, np.ndarray]:
        """Runs one mixed graph; returns the decodes' sampled rows [mixed_batch, ...] and the
        chunks' [max_prefill_seqs, ...]."""
        rows = self._run("mixed", inputs, "mixed tokens=%d blocks=%d" % inputs.graph)
        return rows[:self.shapes.mixed_batch], rows[self.shapes.mixed_batch:]

    def _run(self, kind: str, inputs: StepInputs, what: str) -> np.ndarray:
        with self.guard.step(what):
            return self._execute(kind, inputs).cpu().numpy()

    def _execute(self, kind: str, x: StepInputs) -> torch.Tensor:
        """Runs the step's graph, capturing it first if it never ran (the first call of a
        graph is its compilation: `_compile`, or a step that escaped the buckets, which the
        compile guard reports). Returns the graph's output, on the device."""
        trace = {"prefill": self._prefill, "decode": self._decode, "mixed": self._mixed}[kind]
        tensors = self._device_inputs(x)
        if not self.device.is_xla:  # eager: tracing is running
            out = trace(tensors)
            self.device.sync()
            return out
        graph = self._graphs.get((kind, x.graph))
        if graph is None:
            graph = self._graphs[kind, x.graph] = ReplayedGraph.capture(trace, tensors,
                                                                        self.cache.tensors)
        out, state = graph.run(tensors, self.cache.tensors)
        self.cache.replace(state)
        return out

    def graph_for(self, kind: str, need: tuple[int, int]) -> tuple[int, int]:
        return self.plans[kind].fit(need)

    def mixed_graph_for(self, decodes: int, need: tuple[int, int]) -> tuple[int, int] | None:
        return mixed_graph_for(self.plans, self.shapes, decodes, need)

    @property
    def can_decode(self) -> bool:
        """A decode graph is compiled (else decodes run on the prefill graph)."""
        return bool(self.plans["decode"].compiled)

    @property
    def graphs_compiled(self) -> int:
        return sum(len(p.compiled) for p in self.plans.values())

    @property
    def graphs_planned(self) -> int:
        return sum(len(p.planned) for p in self.plans.values())

    def _compile(self, kind: str, graph: tuple[int, int]) -> None:
        """Runs `graph` once on padding (its writes land in the null block), outside any step."""
        t0 = time.perf_counter()
        if kind == "decode":
            inputs = DecodeInputs.padding(*graph, self.shapes, self.vocab_size)
        else:
            family = PrefillInputs if kind == "prefill" else MixedInputs
            inputs = family.padding(*graph, self.shapes, self.hidden_size, self.vocab_size)
        with self.map_budget.measure() if self.map_budget else nullcontext():
            with self.guard.compiling():
                self._execute(kind, inputs).cpu()  # captured, then run once as a step runs it
            self.plans[kind].mark_compiled(graph)
        self.compile_seconds[kind, graph] = seconds = time.perf_counter() - t0
        log.info("decoder:   -- %s %s: %.2f s (%d of %d graphs)", kind, graph, seconds,
                 self.graphs_compiled, self.graphs_planned)

    def compile_next(self) -> bool:
        """Compiles the graph `next_to_compile` names; False when none is left, or when the
        process lacks the memory maps for more (then it never compiles again: every step fits
        a compiled graph by padding up, the covering prefill graph at worst)."""
        pending = None if self.compiles_stopped else next_to_compile(self.plans)
        if pending is None:
            return False
        if self.map_budget and not self.map_budget.allows_another():
            self.compiles_stopped = f"{self.map_budget.describe()}; raise vm.max_map_count (sysctl)"
            log.warning("decoder: not compiling the other %d graphs: %s to compile them. Steps "
                        "pad up to the %d compiled graphs.", self.graphs_planned - self.graphs_compiled,
                        self.compiles_stopped, self.graphs_compiled)
            return False
        self._compile(*pending)
        return True

    def warm_up(self, full: bool = False, progress: WarmupProgress | None = None) -> None:
        """Compiles the prefill family's covering graph (every step can run on it), then marks
        the guard warm; with `full`, every other graph too before returning. Tells `progress`
        (graphs compiled, graphs to compile before serving, graphs planned) as it goes."""
        started = time.perf_counter()
        self.guard.start_warmup()
        log.info("decoder: graphs planned: %s; compiling %s first",
                 ", ".join(f"{len(plan.planned)} {kind}" for kind, plan in self.plans.items()),
                 "all" if full else "the covering prefill graph")
        report = warmup_reporter(progress, lambda: self.graphs_compiled, self.graphs_planned, full)
        report()
        self._compile("prefill", self.plans["prefill"].covering)
        report()
        self.guard.mark_warm()
        while full and self.compile_next():
            report()
        self.warmup_seconds = time.perf_counter() - started
        log.info("decoder: ready after %.2f s of warm-up (%d of %d graphs compiled)",
                 self.warmup_seconds, self.graphs_compiled, self.graphs_planned)
