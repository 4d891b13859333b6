"""One gradient pass through the layered model: the forward keeping each boundary (and the layers'
autograd graphs while the activations' budget has room), the objective's loss per batch, then the
backward layer by layer, handing each layer's in-scope gradients to the method's callback."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable

import torch

from surgeon.allocator import release_free_memory, slack
from surgeon.io.checkpoint import check_finite

if TYPE_CHECKING:
    from surgeon.engine.layered import Graphs, KeptLayer, LayeredModel, LayerTensors, Plan, PreparedInputs
    from surgeon.engine.objectives import Objective


class GradientPass:
    """The gradient of the sum over batches of the objective's loss (from the hidden states after
    layer num_layers-1) with respect to the in-scope tensors. `on_layer` gets the grads of each
    layer with tensors in scope (summed over the processes of a data-parallel run, so every process
    selects the same). `initial_grads` seeds each parameter's .grad before the batches add to it,
    the same order of additions as calling backward batch after batch on a whole model."""

    def __init__(
        self,
        engine: LayeredModel,
        prepared: PreparedInputs,
        plan: Plan,
        objective: Objective,
        num_layers: int,
        scope: list[list[str]],
        on_layer: Callable[[LayerTensors, dict[str, torch.Tensor]], None],
        initial_grads: Callable[[str], torch.Tensor | None] = lambda name: None,
        description: str = "gradients",
    ):
        self.engine, self.prepared, self.plan, self.objective = engine, prepared, plan, objective
        self.num_layers, self.scope, self.on_layer, self.initial_grads, self.description = num_layers, scope, on_layer, initial_grads, description

    def run(self) -> float:
        """The pass; returns the loss summed over the batches (and the processes)."""
        engine = self.engine
        graphs = self._forward()
        total = self._losses()
        with engine.progress.task(f"{self.description}: backward", total=self.num_layers) as task:
            for i in reversed(range(self.num_layers)):
                self._backward_layer(i, graphs.pop(i))
                task.advance()
        return total

    def _forward(self) -> Graphs:
        """Every boundary stored; the layers' graphs kept while they fit in what the activations'
        budget leaves after this pass's boundaries (a layer's output and its gradient per batch,
        each the size of the layer-0 input) and the heap's slack before a trim."""
        from surgeon.engine.layered import Graphs

        engine, prepared = self.engine, self.prepared
        store = engine.store
        inputs = [store.describe(prepared.input_key(b)) for b in range(len(prepared.batches))]
        boundaries = (self.num_layers + 2) * sum(math.prod(shape) * dtype.itemsize for shape, dtype in inputs)
        graphs = Graphs(store.budget_bytes - store.used_bytes - boundaries - slack(), self.scope)
        engine.forward(prepared, self.plan, self.num_layers, keep=True, description=f"{self.description}: forward", graphs=graphs)
        engine.kept_graph_layers = max(engine.kept_graph_layers, len(graphs.layers))
        engine.kept_graph_bytes = max(engine.kept_graph_bytes, graphs.used)
        return graphs

    def _losses(self) -> float:
        """Each batch's loss from the last boundary, its gradient with respect to that boundary stored."""
        engine, prepared = self.engine, self.prepared
        total = 0.0
        with self.objective.losses(engine, prepared, self.plan) as loss_of:
            for b in range(len(prepared.batches)):
                hidden = engine.store.pop(engine.boundary_key(prepared, self.num_layers, b)).detach().requires_grad_(True)
                loss = loss_of(b, hidden)
                loss.backward()
                engine.store.put(f"{prepared.tag}/grad/{b}", hidden.grad)
                total += loss.item()
        return engine.collective.sum_(torch.tensor(total, dtype=torch.float64)).item()

    def _backward_layer(self, i: int, kept: KeptLayer | None) -> None:
        """Layer i's backward for every batch, on its kept graphs or recomputed from its stored
        input; its in-scope gradients handed to `on_layer`."""
        engine = self.engine
        # a kept layer needs no weights of its own: only the reads its callback may ask for
        stored = nullcontext((None, engine.layer_tensors(i))) if kept else None
        with stored or engine.layer(i, self.plan, after=i - 1 if i > 0 else None) as (module, raw):
            parameters = kept.parameters if kept else engine.trainable(i, self.scope[i])
            params = self._seeded(i, parameters)
            self._backpropagate(i, module, kept)
            grads = self._gradients(params)
            if params:
                raw.current = engine.current_weights(i, parameters, self.plan)
                self.on_layer(raw, grads)
        if kept:
            del kept, parameters, params
            engine.materialized_layers -= 1
            release_free_memory()

    def _seeded(self, i: int, parameters: dict[str, torch.nn.Parameter]) -> dict[str, tuple[torch.nn.Parameter, list[str]]]:
        """Layer i's parameters with in-scope checkpoint tensors, by parameter (with those names),
        each .grad seeded with the initial gradient (the accumulated one enters once, on the main
        process, before the sum over processes) or cleared."""
        engine, in_scope = self.engine, set(self.scope[i])
        params = {}
        for parameter, names in engine.layout.layer_parameters(i):
            param = parameters[parameter]
            wanted = [n for n in names if n in in_scope]
            if not wanted:
                continue
            params[parameter] = (param, wanted)
            seeds = {n: self.initial_grads(n) if n in in_scope and engine.collective.is_main else None for n in names}
            if any(seed is not None for seed in seeds.values()):
                dtype = next(seed.dtype for seed in seeds.values() if seed is not None)
                seeds = {n: torch.zeros(engine.tuned.shape(n), dtype=dtype) if seed is None else seed for n, seed in seeds.items()}
                param.grad = engine.fused(parameter, seeds).to(engine.device, engine.dtype).clone()
            else:
                param.grad = None
        return params

    def _backpropagate(self, i: int, module: torch.nn.Module | None, kept: KeptLayer | None) -> None:
        """Each batch's gradient through layer i: its parameters' grads accumulate, and the gradient
        with respect to its input replaces the stored one (layer 0's input needs none)."""
        engine, prepared = self.engine, self.prepared
        for b in range(len(prepared.batches)):
            if kept:
                hidden, out = kept.inputs[b], kept.outputs[b]
            else:
                hidden = engine.store.get(engine.boundary_key(prepared, i, b)).detach().requires_grad_(i > 0)
                out = engine.run_layer(module, hidden, prepared.layer_arguments[b][i])
            out.backward(engine.store.pop(f"{prepared.tag}/grad/{b}"))
            if i > 0:
                engine.store.put(f"{prepared.tag}/grad/{b}", hidden.grad)
                engine.store.delete(engine.boundary_key(prepared, i, b))

    def _gradients(self, params: dict[str, tuple[torch.nn.Parameter, list[str]]]) -> dict[str, torch.Tensor]:
        """Each in-scope checkpoint tensor's gradient: summed over the processes, split back out of
        a fused parameter, checked finite; the parameters' grads let go."""
        engine = self.engine
        grads = {}
        for parameter, (param, wanted) in params.items():
            grad = engine.collective.sum_(param.grad if param.grad is not None else torch.zeros_like(param))
            fusion = engine.layout.fusions.get(parameter)
            pieces = fusion.split(grad, engine.skeleton) if fusion else {wanted[0]: grad}
            grads.update({n: check_finite(f"gradient of {n}", pieces[n], self.description) for n in wanted})
            param.grad = None
        return grads
