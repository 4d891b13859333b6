"""Run a causal LM layer by layer, holding one decoder layer's weights at a time.

The model's own modules do the work: a skeleton built with `init_empty_weights`, whose
decoder layers get real tensors just before they run and go back to `meta` right after.
The arguments each layer receives (masks, rotary embeddings, positions) are captured by
running the model's own forward with stand-in layers, so no architecture is re-implemented.
"""

from __future__ import annotations

import copy
import enum
import functools
import itertools
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from accelerate.utils import set_module_tensor_to_device
from transformers import PretrainedConfig

from surgeon.data.batches import Batch
from surgeon.allocator import release_free_memory
from surgeon.engine.layout import ModelLayout, build_skeleton
from surgeon.engine.masks import MaskSet
from surgeon.engine.store import SpillStore
from surgeon.io.checkpoint import TensorSource
from surgeon.processes import SOLO, Collective
from surgeon.progress import NullProgress, Progress

class Whole(enum.Enum):
    """A plan that takes every weight from one side."""

    BASE = "base"
    TUNED = "tuned"


BASE, TUNED = Whole.BASE, Whole.TUNED
Plan = Whole | MaskSet  # which weights a pass reads: one side whole, or the working model where(mask, base, tuned)


class _StopForward(Exception):
    pass


class _RecordingLayer(torch.nn.Module):
    """Stands in for a decoder layer: records what the model passes it, returns its input."""

    def __init__(self, index: int, last: int, records: list):
        super().__init__()
        self.index, self.last, self.records = index, last, records

    def forward(self, hidden_states, *args, **kwargs):
        self.records.append((hidden_states, args, kwargs))
        if self.index == self.last:
            raise _StopForward
        return hidden_states


def _over_rows(embedding: torch.nn.Module) -> torch.nn.Module:
    """The model's embedding module, to be run over a few gathered vocabulary rows. Its padding
    index names a row of the whole vocabulary (Qwen's is 151643), which the gathered rows need not
    hold, and torch refuses one past the rows it is given; the index only keeps that row's gradient
    at zero, and no gradient flows here, so a shallow copy runs without it: same outputs."""
    if getattr(embedding, "padding_idx", None) is None:
        return embedding
    view = copy.copy(embedding)
    view.padding_idx = None
    return view


class _Reads:
    """`source[name]`: the tensor as stored, read when asked; `gather(name, indices)`: a few of its
    entries (flat indices), without reading the rest."""

    def __init__(self, source: TensorSource):
        self.source = source

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.source.get(name)

    def gather(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        return self.source.gather(name, indices)


class _Current:
    """The weights a pass ran with (the plan's where(mask, base, tuned)): `current[name]` whole,
    `gather(name, indices)` a few entries. From the layer's live parameter where it holds that
    tensor alone in a dtype that keeps the stored values exactly (no file read: a selection gathers
    millions of entries), else read by the plan (`read(name)`, `read(name, indices=...)`)."""

    def __init__(self, parameters: dict[str, torch.Tensor], read: Callable[..., torch.Tensor]):
        self.parameters, self.read = parameters, read

    def __getitem__(self, name: str) -> torch.Tensor:
        param = self.parameters.get(name)
        return param.detach() if param is not None else self.read(name)

    def gather(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        param = self.parameters.get(name)
        if param is not None:
            return param.detach().reshape(-1).index_select(0, indices.to(param.device))
        return self.read(name, indices=indices)


def _holds_exactly(stored: torch.dtype, compute: torch.dtype) -> bool:
    try:
        return stored.is_floating_point and torch.promote_types(stored, compute) == compute
    except RuntimeError:  # float8 types have no promotion
        return compute == torch.float32


@dataclass
class LayerTensors:
    """One layer's base and tuned tensors (stored dtype), for a method's per-layer callback. They
    are read again when asked rather than held for the layer's whole pass: a read from the page
    cache costs less than keeping two more copies of the layer in memory. In a gradient pass,
    `current` reads the weights the pass ran with."""

    index: int
    base: _Reads
    tuned: _Reads
    current: _Current | None = None


@dataclass
class PreparedInputs:
    """Batches with their layer-0 inputs (in the store) and each layer's captured arguments."""

    tag: str
    batches: list[Batch]
    layer_arguments: list[list[tuple[tuple, dict]]]

    def input_key(self, batch: int) -> str:
        return f"{self.tag}/h0/{batch}"


@dataclass
class KeptLayer:
    """One layer's autograd graphs from a gradient pass's forward: per batch the input and the
    output, and the layer's parameters as the graphs hold them."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    parameters: dict[str, torch.nn.Parameter]
    nbytes: int


class Graphs:
    """What a gradient pass's forward keeps for its backward while `room` bytes allow: each layer's
    graphs (the tensors autograd saves, the layer's weights among them), so the backward runs on
    them instead of materializing and recomputing the layer. A layer whose graphs do not fit is
    let go after its forward and recomputed in the backward, as every layer is when room is 0."""

    def __init__(self, room: int, scope: list[list[str]]):
        self.room, self.scope = room, scope
        self.layers: dict[int, KeptLayer] = {}
        self.used = 0
        self._saved: dict[int, int] = {}

    def open(self) -> bool:
        """Whether the next layer's forward records its graphs (not once one did not fit)."""
        return self.room > self.used

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Autograd on, and the bytes of every tensor it saves counted (each storage once).

        The graphs hold this hook, and what it holds must not lead back to them: a cycle through C++
        that no collector breaks, so graphs let go without a backward (a layer that did not fit, a
        pass that failed) would stay resident for the rest of the process (pytorch/pytorch#189025).
        So it returns each tensor detached (an op's saved output keeps no grad_fn) and holds only
        the counts, not this object and the layers it keeps."""
        saved = self._saved = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return tensor.detach()

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield

    def keep(self, index: int, layer: KeptLayer) -> bool:
        layer.nbytes = sum(self._saved.values())
        if self.used + layer.nbytes > self.room:
            self.room = self.used  # layers above are recomputed too: no room is left for them
            return False
        self.layers[index] = layer
        self.used += layer.nbytes
        return True

    def pop(self, index: int) -> KeptLayer | None:
        layer = self.layers.pop(index, None)
        if layer is not None:
            self.used -= layer.nbytes
        return layer


class LayeredModel:
    def __init__(
        self,
        config: PretrainedConfig,
        base: TensorSource,
        tuned: TensorSource,
        store: SpillStore,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        progress: Progress = NullProgress(),
        collective: Collective = SOLO,
    ):
        self.config, self.base, self.tuned = config, base, tuned
        self.store, self.device, self.dtype, self.progress = store, torch.device(device), dtype, progress
        self.collective = collective  # a data-parallel run's processes: each passes its share of the batches
        self.skeleton = build_skeleton(config, dtype)
        self.layout = ModelLayout.from_checkpoint(tuned.names(), {n: tuned.shape(n) for n in tuned.names()}, self.skeleton)
        self.stack = self.layout.stack
        for name, buffer in list(self.skeleton.named_buffers()):
            if buffer.device.type != "meta":
                set_module_tensor_to_device(self.skeleton, name, self.device)
        # the checkpoint's names for the parameters read outside the layers (the engine speaks checkpoint names)
        embedding = next(n for n, p in self.skeleton.named_parameters() if p is self.skeleton.get_input_embeddings().weight)
        self.embedding_name = self.layout.checkpoint_name(embedding)
        self.materialized_layers = 0
        self.max_materialized_layers = 0
        self.kept_graph_layers = 0  # the most layers whose graphs one gradient pass kept, and their bytes
        self.kept_graph_bytes = 0
        self._tags = itertools.count()

    # -- weights ---------------------------------------------------------------------------

    def _set(self, name: str, value: torch.Tensor | None) -> None:
        """Set the parameter a checkpoint tensor loads into (or put it back on meta)."""
        self._set_parameter(self.layout.parameter_of.get(name, name), value)

    def _set_parameter(self, parameter: str, value: torch.Tensor | None) -> None:
        if value is None:
            set_module_tensor_to_device(self.skeleton, parameter, "meta")
        else:
            set_module_tensor_to_device(self.skeleton, parameter, self.device, value=value, dtype=self.dtype)

    def _read(self, name: str, plan: Plan, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name` as the plan has it (where(mask, base, tuned)): whole, or only its flat
        entries `indices`, without reading the rest."""
        if plan == BASE or plan == TUNED or name not in plan:
            source = self.base if plan == BASE else self.tuned
            return source.get(name) if indices is None else source.gather(name, indices)
        if indices is None:
            return plan.apply(name, self.tuned.get(name), lambda at: self.base.gather(name, at))
        return torch.where(plan.at(name, indices), self.base.gather(name, indices), self.tuned.gather(name, indices))

    def fused(self, parameter: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The parameter's value from its checkpoint tensors (fused when transformers fuses them)."""
        fusion = self.layout.fusions.get(parameter)
        return fusion.fuse(tensors, self.skeleton) if fusion else next(iter(tensors.values()))

    @contextmanager
    def layer(self, index: int, plan: Plan, after: int | None = None) -> Iterator[tuple[torch.nn.Module, LayerTensors]]:
        """Decoder layer `index` with real weights for the duration of the block; the tensors of
        layer `after` (the next one the pass needs) are read ahead meanwhile."""
        raw = self.layer_tensors(index)
        parameters = self.layout.layer_parameters(index)
        if after is not None and 0 <= after < self.layout.num_layers:
            following = list(self.layout.layer_tensors[after])
            for source, needed in ((self.base, plan != TUNED), (self.tuned, plan != BASE)):
                if needed:
                    source.prefetch(following)
        self.materialized_layers += 1
        self.max_materialized_layers = max(self.max_materialized_layers, self.materialized_layers)
        try:
            for parameter, names in parameters:
                value = self.fused(parameter, {n: self._read(n, plan) for n in names})
                self._set_parameter(parameter, value)
            yield self.stack.layers[index], raw
        finally:
            for parameter, _ in parameters:
                self._set_parameter(parameter, None)
            self.materialized_layers -= 1
            release_free_memory()

    # -- inputs ----------------------------------------------------------------------------

    def prepare(self, batches: list[Batch], embeddings: str, num_layers: int) -> PreparedInputs:
        """Embed each batch with `embeddings` (BASE or TUNED) and capture each layer's arguments.
        In a data-parallel run this process keeps its share of the batches; the passes sum or
        gather over the processes what they compute from them."""
        batches = self.collective.share(batches)
        source = self.base if embeddings == BASE else self.tuned
        prepared = PreparedInputs(f"inputs{next(self._tags)}", batches, [])
        owner, attribute = self.stack.owner, self.stack.attribute
        real_layers = self.stack.layers
        # only the vocabulary rows these batches use are read; the model's own embedding module
        # runs on them (with its scaling, as Gemma's), through ids renumbered into those rows
        used = torch.unique(torch.cat([batch.input_ids.flatten() for batch in batches])) if batches else torch.zeros(0, dtype=torch.long)
        rows = {"weight": source.rows(self.embedding_name, used).to(self.device, self.dtype)}
        embedding = _over_rows(self.skeleton.get_input_embeddings())
        try:
            for index, batch in enumerate(batches):
                records: list = []
                setattr(owner, attribute, torch.nn.ModuleList(
                    [_RecordingLayer(i, num_layers - 1, records) for i in range(len(real_layers))]
                ))
                try:
                    with torch.no_grad():
                        embeds = torch.func.functional_call(embedding, rows, (torch.searchsorted(used, batch.input_ids).to(self.device),))
                        owner(
                            inputs_embeds=embeds,
                            attention_mask=batch.attention_mask.to(self.device),
                            position_ids=batch.position_ids.to(self.device),
                            use_cache=False,
                        )
                except _StopForward:
                    pass
                self.store.put(prepared.input_key(index), records[0][0])
                prepared.layer_arguments.append([(args, kwargs) for _, args, kwargs in records])
        finally:
            setattr(owner, attribute, real_layers)
        return prepared

    def release(self, prepared: PreparedInputs) -> None:
        self.store.clear(prepared.tag + "/")

    # -- passes ----------------------------------------------------------------------------

    @staticmethod
    def run_layer(module: torch.nn.Module, hidden: torch.Tensor, arguments: tuple[tuple, dict]) -> torch.Tensor:
        args, kwargs = arguments
        out = module(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @staticmethod
    def boundary_key(prepared: PreparedInputs, layer: int, batch: int) -> str:
        return prepared.input_key(batch) if layer == 0 else f"{prepared.tag}/x{layer}/{batch}"

    def forward(self, prepared: PreparedInputs, plan: Plan, num_layers: int, keep: bool, description: str,
                 observe: Callable[[int, torch.nn.Module, Batch], AbstractContextManager] | None = None,
                 graphs: Graphs | None = None, after_layer: Callable[[int], None] | None = None) -> None:
        """Fill the store with each batch's output of layer num_layers-1 (and, if keep, every boundary).
        `observe(layer, module, batch)` is entered around each batch's run of a layer (hooks), and
        `after_layer(layer)` called once every batch has run it; `graphs` keeps the layers'
        autograd graphs for a backward while it has room."""
        # what the last pass freed is given back first: left in the heap, it stays resident through
        # whatever runs between passes (a checkpoint's scoring, its generation model)
        release_free_memory(force=True)
        with self.progress.task(description, total=num_layers) as task:
            for i in range(num_layers):
                with self.layer(i, plan, after=i + 1 if i + 1 < num_layers else None) as (module, _):
                    kept = KeptLayer([], [], self.trainable(i, graphs.scope[i]), 0) if graphs is not None and graphs.open() else None
                    with graphs.recording() if kept else torch.no_grad():
                        self._forward_layer(i, module, prepared, keep, observe, kept)
                if kept and graphs.keep(i, kept):
                    self.materialized_layers += 1  # its weights stay, held by the graphs, until its backward
                    self.max_materialized_layers = max(self.max_materialized_layers, self.materialized_layers)
                del kept
                if after_layer is not None:
                    after_layer(i)
                task.advance()

    def _forward_layer(self, i: int, module: torch.nn.Module, prepared: PreparedInputs, keep: bool,
                       observe: Callable[[int, torch.nn.Module, Batch], AbstractContextManager] | None, kept: KeptLayer | None) -> None:
        """Every batch through layer i, its output stored (its input let go unless `keep`); with
        `kept`, each batch's input and output kept for the backward."""
        for b in range(len(prepared.batches)):
            hidden = self.store.get(self.boundary_key(prepared, i, b))
            if kept:
                hidden = hidden.detach().requires_grad_(i > 0)
            with observe(i, module, prepared.batches[b]) if observe else nullcontext():
                out = self.run_layer(module, hidden, prepared.layer_arguments[b][i])
            if kept:
                kept.inputs.append(hidden)
                kept.outputs.append(out)
            self.store.put(self.boundary_key(prepared, i + 1, b), out)
            if not keep and i > 0:
                self.store.delete(self.boundary_key(prepared, i, b))

    def trainable(self, index: int, in_scope: list[str]) -> dict[str, torch.nn.Parameter]:
        """Layer `index`'s parameters (materialized), those with an in-scope checkpoint tensor set
        to require a gradient and the rest not."""
        wanted = set(in_scope)
        parameters = {}
        for parameter, names in self.layout.layer_parameters(index):
            param = self.skeleton.get_parameter(parameter)
            param.requires_grad_(any(n in wanted for n in names))
            parameters[parameter] = param
        return parameters

    def layer_tensors(self, index: int) -> LayerTensors:
        """Layer `index`'s base and tuned tensors, read when asked (a kept layer's callback needs no more)."""
        return LayerTensors(index, _Reads(self.base), _Reads(self.tuned))

    def current_weights(self, index: int, parameters: dict[str, torch.nn.Parameter], plan: Plan) -> _Current:
        """The weights layer `index` ran with under `plan`: from its live parameters where they hold
        the stored values exactly, read again otherwise."""
        return _Current(self._alone(index, parameters), functools.partial(self._read, plan=plan))

    def _alone(self, index: int, parameters: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
        """Layer `index`'s parameters that hold one checkpoint tensor as stored (no fusion, a dtype
        that keeps its values), by that tensor's name."""
        return {names[0]: parameters[parameter] for parameter, names in self.layout.layer_parameters(index)
                if len(names) == 1 and parameter not in self.layout.fusions
                and all(_holds_exactly(source.dtype(names[0]), parameters[parameter].dtype) for source in (self.base, self.tuned))}

    def last_token_states(self, prepared: PreparedInputs, plan: Plan, num_layers: int, description: str = "probing") -> torch.Tensor:
        """h(x) for every prompt: the residual stream leaving layer num_layers-1 at the last token."""
        self.forward(prepared, plan, num_layers, keep=False, description=description)
        states = [self.store.pop(self.boundary_key(prepared, num_layers, b))[:, -1, :].float().cpu() for b in range(len(prepared.batches))]
        return torch.cat(self.collective.gather(states)).to(self.device)

    def linear_inputs(self, prepared: PreparedInputs, plan: Plan, statistic: Callable[[torch.Tensor], torch.Tensor],
                      on_layer: Callable[[int, dict[str, torch.Tensor]], None], description: str) -> None:
        """For each decoder layer in turn, each of its linear weights (by checkpoint name) with the
        sum over the prompts' real tokens (padding left out) of `statistic(inputs)`, the inputs being
        the weight's (tokens, features) in fp32, summed over the processes of a run: handed to
        `on_layer(layer, sums)` once every batch has run the layer, then let go (one layer's sums in
        memory at a time)."""
        linears = self.layout.linear_weights
        sums: dict[str, torch.Tensor] = {}

        @contextmanager
        def observe(index: int, module: torch.nn.Module, batch: Batch):
            real = batch.attention_mask.bool().to(self.device)
            handles = []
            for name, weight, _ in linears[index]:
                def hook(_, inputs, __, weight=weight):
                    value = statistic(inputs[0][real].float())
                    sums[weight] = value if weight not in sums else sums[weight] + value
                handles.append(module.get_submodule(name).register_forward_hook(hook))
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()

        def after_layer(index: int) -> None:
            # every process sums, even one whose share of the batches is empty (its statistic of no token)
            empty = lambda features: statistic(torch.zeros(0, features, device=self.device))
            layer_sums = {weight: self.collective.sum_(sums.pop(weight) if weight in sums else empty(features)) for _, weight, features in linears[index]}
            on_layer(index, dict(sorted(layer_sums.items())))

        self.forward(prepared, plan, self.layout.num_layers, keep=False, description=description, observe=observe, after_layer=after_layer)
        for b in range(len(prepared.batches)):
            self.store.delete(self.boundary_key(prepared, self.layout.num_layers, b))

    def linear_input_norms(self, prepared: PreparedInputs, plan: Plan, description: str = "input norms") -> dict[str, torch.Tensor]:
        """For each linear weight of the decoder layers (by checkpoint name): the sum over the
        prompts' real tokens of each input feature's square, in fp32: the activation statistic of
        Wanda-style scores."""
        norms: dict[str, torch.Tensor] = {}
        self.linear_inputs(prepared, plan, lambda x: x.pow(2).sum(0), lambda _, sums: norms.update(sums), description)
        return dict(sorted(norms.items()))

    def final_hidden(self, prepared: PreparedInputs, plan: Plan, description: str = "scoring") -> Iterator[tuple[int, torch.Tensor]]:
        """Each batch's residual stream after the last decoder layer (before the final norm)."""
        num_layers = self.layout.num_layers
        self.forward(prepared, plan, num_layers, keep=False, description=description)
        for b in range(len(prepared.batches)):
            yield b, self.store.pop(self.boundary_key(prepared, num_layers, b))

    @contextmanager
    def output_head(self, plan: Plan = TUNED) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """Final norm and output head (tied to the embedding when the checkpoint has none): base's for
        the base model, tuned's otherwise (they are never repaired)."""
        source = self.base if plan == BASE else self.tuned
        norm = self.skeleton.get_submodule(self.stack.norm)
        norm_names = [self.layout.checkpoint_name(f"{self.stack.norm}.{n}") for n, _ in norm.named_parameters()]
        head_name = self.layout.checkpoint_name(next(f"{n}.weight" for n, m in self.skeleton.named_modules() if m is self.skeleton.get_output_embeddings()))
        head_source = head_name if head_name in source.names() else self.embedding_name  # tied heads are not saved
        head = torch.nn.Linear(self.config.hidden_size, source.shape(head_source)[0], bias=False, device=self.device, dtype=self.dtype)
        head.weight.data = source.get(head_source).to(self.device, self.dtype)
        # never repaired: a gradient pass through them (an answer loss) needs only their input's gradient
        head.requires_grad_(False)
        norm.requires_grad_(False)
        softcap = getattr(self.config, "final_logit_softcapping", None)
        for name in norm_names:
            self._set(name, source.get(name))

        def logits(hidden: torch.Tensor) -> torch.Tensor:
            out = head(norm(hidden))
            return torch.tanh(out / softcap) * softcap if softcap else out

        try:
            yield logits
        finally:
            for name in norm_names:
                self._set(name, None)

    def gradient_pass(self, *args, **kwargs) -> float:
        """engine/gradient_pass.GradientPass over this model (its arguments after the engine): the
        loss summed over the batches."""
        from surgeon.engine.gradient_pass import GradientPass

        return GradientPass(self, *args, **kwargs).run()
