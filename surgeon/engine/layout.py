"""Where the decoder layers are, which tensors are in scope, N and the probe layer E."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from surgeon.errors import IncompatibleModelsError, InputError, RecipeError, first_line

def build_skeleton(config, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model with every parameter on `meta`: structure without memory. Attention is the one
    transformers picks for the family (sdpa where it has it), not eager: eager keeps every
    batch x heads x tokens x tokens probability in a gradient pass's graphs. The buffers a model
    computes when built (Gemma's embedding scale) take `dtype`, the arithmetic's: in config.json's
    stored dtype a bf16 checkpoint computed in fp32 would scale by sqrt(hidden) rounded to bf16,
    where the model loaded in fp32 scales by the fp32 value."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    except Exception as exc:  # noqa: BLE001 -- built from config.json alone: whatever fails is a value in it
        reason = first_line(exc)
        where = str(Path(config._name_or_path) / "config.json") if getattr(config, "_name_or_path", "") else "config.json"
        raise InputError(f"config.json: transformers cannot build the model from it ({type(exc).__name__}: {reason})", where) from None


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "norm" in type(module).__name__.lower()


@dataclass(frozen=True)
class DecoderStack:
    """Where transformers keeps a causal LM's decoder layers and final norm, found on the model
    itself: its base model (`base_model_prefix`), the ModuleList there of num_hidden_layers,
    and the last normalization module of the base model."""

    owner: torch.nn.Module  # the base model
    attribute: str  # the owner's ModuleList of decoder layers
    prefix: str  # checkpoint names of layer i start with f"{prefix}.{i}."
    norm: str  # the final norm's module name

    @classmethod
    def of(cls, skeleton: torch.nn.Module) -> "DecoderStack":
        owner = skeleton.base_model
        owner_name = next(name for name, module in skeleton.named_modules() if module is owner)
        join = lambda name: f"{owner_name}.{name}" if owner_name else name
        count = skeleton.config.get_text_config().num_hidden_layers
        stacks = [name for name, m in owner.named_children() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
        norms = [name for name, m in owner.named_children() if _is_norm(m)]
        if len(stacks) != 1 or not norms:
            raise IncompatibleModelsError(
                f"cannot tell the decoder layers and final norm of {type(skeleton).__name__} apart "
                f"(lists of {count} layers: {stacks or 'none'}; norms: {norms or 'none'}); this architecture is not supported yet"
            )
        return cls(owner, stacks[0], join(stacks[0]), join(norms[-1]))

    @property
    def layers(self) -> torch.nn.ModuleList:
        return getattr(self.owner, self.attribute)


@dataclass(frozen=True)
class Fusion:
    """A parameter transformers builds from several checkpoint tensors when it loads them (the
    experts of mixture-of-experts families, stacked and concatenated into one 3-D parameter).
    It is fused by the converter's own operations and split back by their reverse, as
    transformers does to load and to save, so everything else speaks checkpoint names."""

    parameter: str
    converter: object  # transformers' WeightConverter for this parameter
    groups: tuple[tuple[str, tuple[str, ...]], ...]  # (the converter's source pattern, checkpoint names in loading order)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(name for _, names in self.groups for name in names)

    def _apply(self, converter, collected: dict, model) -> dict:
        for operation in converter.operations:
            collected = operation.convert(collected, source_patterns=converter.source_patterns, target_patterns=converter.target_patterns,
                                          full_layer_name=self.parameter, model=model, config=getattr(model, "config", None))
        return collected

    def fuse(self, tensors: dict[str, torch.Tensor], model=None) -> torch.Tensor:
        """The parameter from its checkpoint tensors (by name)."""
        (fused,) = self._apply(self.converter, {pattern: [tensors[n] for n in names] for pattern, names in self.groups}, model).values()
        return fused

    @cached_property
    def _reverse(self):
        return self.converter.reverse_transform()

    def split(self, tensor: torch.Tensor, model=None) -> dict[str, torch.Tensor]:
        """A tensor shaped like the parameter (its gradient, say) as checkpoint tensors, by name."""
        reverse = self._reverse
        pieces = self._apply(reverse, {reverse.source_patterns[0]: tensor}, model)
        return {name: pieces[target.replace("*", str(i))]
                for (_, names), target in zip(self.groups, reverse.target_patterns) for i, name in enumerate(names)}


def parameter_names(skeleton: torch.nn.Module, names: list[str], shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, str], dict[str, Fusion]]:
    """Checkpoint tensor name -> the model's parameter name, by transformers' own loading rules
    (renamings such as GPT-NeoX's `embed_out` -> `lm_head`), and the parameters transformers
    fuses from several checkpoint tensors. A conversion that is not many-to-one (one checkpoint
    tensor split into several parameters) stops with an error naming the architecture."""
    from transformers.conversion_mapping import WeightConverter, WeightRenaming, get_model_conversion_mapping
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(skeleton)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    meta = skeleton.state_dict()
    mapping: dict[str, str] = {}
    collected: dict[str, dict[str, list[str]]] = {}
    for name in sorted(names, key=dot_natural_key):
        target, pattern = rename_source_key(name, renamings, converters, skeleton.base_model_prefix, meta)
        mapping[name] = target
        if pattern is not None:
            if len(by_pattern[pattern].target_patterns) != 1:
                raise IncompatibleModelsError(
                    f"{type(skeleton).__name__} splits checkpoint tensor '{name}' into several parameters when it loads; "
                    "surgeon cannot repair this architecture yet"
                )
            collected.setdefault(target, {}).setdefault(pattern, []).append(name)
    fusions = {}
    for parameter, groups in collected.items():
        converter = by_pattern[next(iter(groups))]
        ordered = tuple((pattern, tuple(groups.get(pattern, ()))) for pattern in converter.source_patterns)
        fusion = Fusion(parameter, converter, ordered)
        fused = fusion.fuse({n: torch.empty(shapes[n], device="meta") for n in fusion.sources}, skeleton)
        expected = tuple(skeleton.get_parameter(parameter).shape)
        if tuple(fused.shape) != expected:
            raise IncompatibleModelsError(
                f"the checkpoint's {len(fusion.sources)} tensors that form '{parameter}' (e.g. '{fusion.sources[0]}') give shape "
                f"{tuple(fused.shape)}, the model that config.json describes has {expected}"
            )
        fusions[parameter] = fusion
    return {name: mapping[name] for name in names}, fusions


@dataclass(frozen=True)
class ModelLayout:
    """Checkpoint tensor names grouped by decoder layer, and which of them are norms."""

    num_layers: int
    layer_tensors: tuple[tuple[str, ...], ...]
    norm_tensors: frozenset[str]
    decoder_parameters: int
    stack: DecoderStack  # where the decoder layers and final norm are on the skeleton
    parameter_of: dict  # checkpoint name -> parameter name (the same for almost every tensor)
    fusions: dict  # parameter -> Fusion, for parameters built from several checkpoint tensors

    @classmethod
    def from_checkpoint(cls, names: list[str], shapes: dict[str, tuple[int, ...]], skeleton: torch.nn.Module) -> "ModelLayout":
        stack = DecoderStack.of(skeleton)
        num_layers = len(stack.layers)
        pattern = re.compile(rf"^{re.escape(stack.prefix)}\.(\d+)\.(.+)$")
        grouped: list[list[str]] = [[] for _ in range(num_layers)]
        norms = set()
        parameter_of, fusions = parameter_names(skeleton, names, shapes)
        for name in names:
            parameter = parameter_of[name]
            match = pattern.match(parameter)
            if not match:
                continue
            index = int(match[1])
            if index >= num_layers:
                raise IncompatibleModelsError(f"tensor '{name}' is beyond the {num_layers} layers the config declares")
            try:
                skeleton.get_parameter(parameter)
            except AttributeError:
                raise IncompatibleModelsError(f"tensor '{name}' is not a parameter of the model that config.json describes") from None
            grouped[index].append(name)
            if _is_norm(skeleton.get_submodule(parameter.rsplit(".", 1)[0])):
                norms.add(name)
        if num_layers == 0 or not any(grouped):
            raise IncompatibleModelsError(f"no decoder layers named {stack.prefix}.N in the checkpoint")
        for index, tensors in enumerate(grouped):
            expected = {f"{stack.prefix}.{index}.{n}" for n, _ in stack.layers[index].named_parameters()}
            if missing := sorted(expected - {parameter_of[n] for n in tensors}):
                raise IncompatibleModelsError(f"checkpoint lacks {len(missing)} tensor(s) of decoder layer {index}, e.g. '{missing[0]}'")
        total = sum(math.prod(shapes[n]) for layer in grouped for n in layer)
        return cls(num_layers, tuple(tuple(layer) for layer in grouped), frozenset(norms), total, stack, parameter_of, fusions)

    @cached_property
    def linear_weights(self) -> tuple[tuple[tuple[str, str, int], ...], ...]:
        """Per decoder layer, its nn.Linear modules as (module name within the layer, the weight's
        checkpoint name, in_features): what LoRA adapts and Wanda-style scores read."""
        return tuple(tuple((name, self.checkpoint_name(f"{self.stack.prefix}.{index}.{name}.weight"), module.in_features)
                           for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear))
                     for index, layer in enumerate(self.stack.layers))

    def layer_parameters(self, index: int) -> list[tuple[str, tuple[str, ...]]]:
        """Decoder layer `index` as (parameter, its checkpoint tensors): one tensor for most
        parameters, the experts' tensors in the order transformers fuses them otherwise."""
        out: dict[str, tuple[str, ...]] = {}
        for name in self.layer_tensors[index]:
            parameter = self.parameter_of.get(name, name)
            if parameter not in out:
                out[parameter] = self.fusions[parameter].sources if parameter in self.fusions else (name,)
        return list(out.items())

    @property
    def layer_prefix(self) -> str:
        """"model.layers" for most families, "gpt_neox.layers", "transformer.h", ..."""
        return self.stack.prefix

    @cached_property
    def _checkpoint_of(self) -> dict[str, str]:
        # the first checkpoint name of each parameter (a fused one has several; none is asked for)
        names: dict[str, str] = {}
        for name, parameter in self.parameter_of.items():
            names.setdefault(parameter, name)
        return names

    def checkpoint_name(self, parameter: str) -> str:
        """The checkpoint's name for a parameter of the model (itself when nothing renames it)."""
        return self._checkpoint_of.get(parameter, parameter)

    def layer_of(self, name: str) -> tuple[int, str] | None:
        """(decoder layer, the tensor's checkpoint name within the layer) of a checkpoint tensor, or None outside the layers."""
        head, parameter = self.layer_prefix + ".", self.parameter_of.get(name, name)
        if not parameter.startswith(head):
            return None
        index, _, rest = parameter[len(head):].partition(".")
        if not index.isdigit():
            return None
        # the checkpoint's own name past the layer index (it differs from the parameter's for renamed or fused tensors)
        inside = re.search(rf"(?:^|\.){index}\.(.+)$", name)
        return int(index), inside[1] if inside else rest

    def probe_layer(self, setting: int | float | None) -> int:
        """E: how many leading decoder layers are probed and may change."""
        if setting is None:
            return max(1, (4 * self.num_layers) // 6)
        if isinstance(setting, float):
            return max(1, math.floor(setting * self.num_layers))
        if setting > self.num_layers:
            raise RecipeError(f"probe.layer is {setting} but the model has {self.num_layers} decoder layers", "probe.layer")
        return setting

    def scope(self, probe_layer: int) -> list[list[str]]:
        """In-scope tensor names per layer < E: every decoder tensor except normalization weights."""
        return [[n for n in self.layer_tensors[i] if n not in self.norm_tensors] for i in range(probe_layer)]

    def budget(self, sparsity: float) -> int:
        """k = ceil(sparsity * N), N = parameters of all decoder layers."""
        return math.ceil(sparsity * self.decoder_parameters)

    def facts(self, probe_setting: int | float | None, sparsity: float, shape) -> dict:
        """L, E, N, k and the weights in scope (`shape`: a tensor name's shape), as `surgeon
        validate` and `surgeon plan` print them."""
        probe_layer = self.probe_layer(probe_setting)
        return {
            "layers": self.num_layers,
            "probe_layer": probe_layer,
            "decoder_parameters": self.decoder_parameters,
            "budget_per_step": self.budget(sparsity),
            "in_scope_parameters": sum(math.prod(shape(n)) for layer in self.scope(probe_layer) for n in layer),
        }
