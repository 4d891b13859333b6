"""Where the decoder layers are, which tensors are in scope, N and the probe layer E."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from surgeon.errors import IncompatibleModelsError, RecipeError

LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def build_skeleton(config) -> torch.nn.Module:
    """The model with every parameter on `meta`: structure without memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "norm" in type(module).__name__.lower()


@dataclass(frozen=True)
class ModelLayout:
    """Checkpoint tensor names grouped by decoder layer, and which of them are norms."""

    num_layers: int
    layer_tensors: tuple[tuple[str, ...], ...]
    norm_tensors: frozenset[str]
    decoder_parameters: int

    @classmethod
    def from_checkpoint(cls, names: list[str], shapes: dict[str, tuple[int, ...]], skeleton: torch.nn.Module) -> "ModelLayout":
        num_layers = len(skeleton.model.layers)
        grouped: list[list[str]] = [[] for _ in range(num_layers)]
        norms = set()
        for name in names:
            match = LAYER_NAME.match(name)
            if not match:
                continue
            index = int(match[1])
            if index >= num_layers:
                raise IncompatibleModelsError(f"tensor '{name}' is beyond the {num_layers} layers the config declares")
            try:
                skeleton.get_parameter(name)
            except AttributeError:
                raise IncompatibleModelsError(f"tensor '{name}' is not a parameter of the model that config.json describes") from None
            grouped[index].append(name)
            if _is_norm(skeleton.get_submodule(name.rsplit(".", 1)[0])):
                norms.add(name)
        if num_layers == 0 or not any(grouped):
            raise IncompatibleModelsError("no decoder layers named model.layers.N in the checkpoint")
        for index, tensors in enumerate(grouped):
            expected = {f"model.layers.{index}.{n}" for n, _ in skeleton.model.layers[index].named_parameters()}
            if missing := sorted(expected - set(tensors)):
                raise IncompatibleModelsError(f"checkpoint lacks {len(missing)} tensor(s) of decoder layer {index}, e.g. '{missing[0]}'")
        total = sum(math.prod(shapes[n]) for layer in grouped for n in layer)
        return cls(num_layers, tuple(tuple(layer) for layer in grouped), frozenset(norms), total)

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
