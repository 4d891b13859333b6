"""Where the decoder layers are, which tensors are in scope, N and the probe layer E."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from surgeon.errors import IncompatibleModelsError, RecipeError

def build_skeleton(config) -> torch.nn.Module:
    """The model with every parameter on `meta`: structure without memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


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


def parameter_names(skeleton: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """Checkpoint tensor name -> the model's parameter name, by transformers' own loading rules
    (renamings such as GPT-NeoX's `embed_out` -> `lm_head`). Tensors that transformers converts
    (fuses or splits) when loading stop with an error naming the architecture."""
    from transformers.conversion_mapping import WeightConverter, WeightRenaming, get_model_conversion_mapping
    from transformers.core_model_loading import rename_source_key

    transforms = get_model_conversion_mapping(skeleton)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = skeleton.state_dict()
    mapping = {}
    for name in names:
        target, converter = rename_source_key(name, renamings, converters, skeleton.base_model_prefix, meta)
        if converter is not None:
            raise IncompatibleModelsError(
                f"{type(skeleton).__name__} converts checkpoint tensor '{name}' when it loads (fused or split weights, as in "
                "mixture-of-experts families); surgeon cannot repair this architecture yet"
            )
        mapping[name] = target
    return mapping


@dataclass(frozen=True)
class ModelLayout:
    """Checkpoint tensor names grouped by decoder layer, and which of them are norms."""

    num_layers: int
    layer_tensors: tuple[tuple[str, ...], ...]
    norm_tensors: frozenset[str]
    decoder_parameters: int
    layer_prefix: str  # "model.layers" for most families, "gpt_neox.layers", "transformer.h", ...
    parameter_of: dict  # checkpoint name -> parameter name (the same for almost every tensor)

    @classmethod
    def from_checkpoint(cls, names: list[str], shapes: dict[str, tuple[int, ...]], skeleton: torch.nn.Module) -> "ModelLayout":
        stack = DecoderStack.of(skeleton)
        num_layers = len(stack.layers)
        pattern = re.compile(rf"^{re.escape(stack.prefix)}\.(\d+)\.(.+)$")
        grouped: list[list[str]] = [[] for _ in range(num_layers)]
        norms = set()
        parameter_of = parameter_names(skeleton, names)
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
        return cls(num_layers, tuple(tuple(layer) for layer in grouped), frozenset(norms), total, stack.prefix, parameter_of)

    def checkpoint_name(self, parameter: str) -> str:
        """The checkpoint's name for a parameter of the model (itself when nothing renames it)."""
        return next((name for name, p in self.parameter_of.items() if p == parameter), parameter)

    def layer_of(self, name: str) -> tuple[int, str] | None:
        """(decoder layer, the parameter's name within the layer) of a checkpoint tensor, or None outside the layers."""
        head, parameter = self.layer_prefix + ".", self.parameter_of.get(name, name)
        if not parameter.startswith(head):
            return None
        index, _, rest = parameter[len(head):].partition(".")
        return (int(index), rest) if index.isdigit() else None

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
