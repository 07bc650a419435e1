"""Replayed graphs: trace a step once, then run its compiled executable by hash.

torch_xla's lazy mode re-runs the Python that builds a graph on every call (every op of
every layer records an IR node, then the graph is hashed to find its executable). For
the decoder's step that is 12-15 ms of host time on each call, ~15 % of a batch-16 decode
step on the `small` checkpoint (docs/benchmarks.md). vLLM's TPU runner avoids it with
`torch.compile(backend="openxla")`, whose bridge runs cached executables by hash; measured
here, that saves the same host time but costs ~3.5 s more per graph to compile (Dynamo
and AOT tracing each bucket), which start-up pays for every bucket.

`ReplayedGraph` does what the bridge does at run time, without Dynamo: `capture` traces
`fn` once lazily on real device tensors, compiles the graph, and records its parameters:
which are the call's inputs (by tensor id) and which are constants (weights, tables: kept
by reference). `run` hands the executable the new inputs in that order; no Python of `fn`
runs. What this demands of `fn`:
- every value that changes between calls is one of its `inputs` (a dict of tensors); a
  Python number or a tensor made inside `fn` from host data is frozen at capture;
- no torch RNG (its seed would be frozen too; the sampler derives noise from seeds it is
  given): `capture` refuses a graph that reads torch_xla's seed;
- `state` (the KV cache) is updated in place by `fn`; `run` returns its new tensors, which
  replace the old ones, whose buffers were donated to the step.

Donation: the state tensors are marked as buffer donors, and XLA pairs each output with
the first unused donor of its shape, in order (seen in the compiled HLO's
`input_output_alias`). The outputs are therefore ordered as the donors appear among the
graph's parameters, so each updated layer reuses its own buffer; in any other order XLA
copies the cache on every call (measured: +60 ms a decode step on `small`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class ReplayedGraph:
    def __init__(self, graph_hash: str, names: tuple[str, ...], slots: list[int | None],
                 constants: list, order: list[int]) -> None:
        self._hash = graph_hash
        self._names = names  # the inputs' keys, in order
        self._slots = slots  # per graph parameter: index into inputs + state, or None
        self._constants = constants  # per graph parameter: the tensor itself, when a constant
        self._order = order  # output k + 1 is the new value of state[order[k]]

    @classmethod
    def capture(cls, fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                inputs: dict[str, torch.Tensor], state: list[torch.Tensor]) -> ReplayedGraph:
        """Traces `fn(inputs)` (one tensor out; `state` updated in place) and compiles it.
        Nothing runs: `state` keeps its values. Call with no other device work in flight."""
        import torch_xla
        from torch_xla.utils.buffer_donor_context import alias_with_buffer_donor_config

        xlac = torch_xla._XLAC
        torch_xla.sync()  # nothing else pending: the graph is fn's alone
        for t in state:
            xlac._set_buffer_donation(t, True)
        ids = {xlac._xla_get_tensor_id(t): i for i, t in enumerate([*inputs.values(), *state])}
        state_ids = [xlac._xla_get_tensor_id(t) for t in state]
        ids_of_state = set(state_ids)
        before = [torch.clone(t) for t in state]  # share the buffers: the tracing is undone below
        try:
            out = fn(inputs)
            # Donors in the order the output's graph reaches them (layer by layer).
            reached, _ = xlac._get_tensors_xla_device_data_node([out])
            position = {tensor_id: k for k, tensor_id in enumerate(reached)}
            missing = [i for i, tensor_id in enumerate(state_ids) if tensor_id not in position]
            if missing:
                raise ValueError(f"state tensors {missing} are not inputs of the traced graph")
            order = sorted(range(len(state)), key=lambda i: position[state_ids[i]])
            roots = [out, *(state[i] for i in order)]
            param_ids, param_values = xlac._get_tensors_xla_device_data_node(roots)
            if xlac._get_seed_info_id() in param_ids:
                raise ValueError("the traced graph draws from torch's RNG: its seed would be frozen")
            donors = [tensor_id for tensor_id in param_ids if tensor_id in ids_of_state]
            if donors != [state_ids[i] for i in order]:
                raise RuntimeError("graph parameters reorder the state: XLA would copy it every call")
            slots = [ids.get(tensor_id) for tensor_id in param_ids]
            constants = [value if slot is None else None for slot, value in zip(slots, param_values)]
            with alias_with_buffer_donor_config():  # the hash includes the donors: both inside
                graph_hash = xlac._get_graph_hash(roots)
                xlac._xla_warm_up_cache(roots, [])
        finally:  # nothing traced may run: the state gets its buffers back, the IR is dropped
            for t, saved in zip(state, before):
                t.copy_(saved)
            xlac._clear_pending_irs(str(torch_xla.device()))
        return cls(graph_hash, tuple(inputs), slots, constants, order)

    def run(self, inputs: dict[str, torch.Tensor],
            state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs the graph on `inputs` (the capture's keys and shapes) and `state`.
        Returns (output, new state): the old state's buffers are donated, drop them."""
        import torch_xla

        xlac = torch_xla._XLAC
        if tuple(inputs) != self._names:
            raise ValueError(f"inputs {tuple(inputs)} differ from the captured {self._names}")
        for t in state:
            xlac._set_buffer_donation(t, True)
        given = [*inputs.values(), *state]
        params = [given[slot] if slot is not None else constant
                  for slot, constant in zip(self._slots, self._constants)]
        results = xlac._run_cached_graph(self._hash, params)
        new_state = list(state)
        for k, i in enumerate(self._order):
            new_state[i] = results[1 + k]
        return results[0], new_state
