"""Baselines users compare against, streamed like the main method: each is a TensorSource.

- reset_layers: decoder layers < E copied whole from base (norms included).
- resta: tuned + scale * (base - unaligned) (Bhardwaj et al. 2024), where `unaligned` is base
  fine-tuned on harmful data; tensors where base and unaligned agree stay tuned's, bit-exact.
"""

from __future__ import annotations

import torch

from surgeon.engine.layout import ModelLayout
from surgeon.io.checkpoint import DerivedSource, TensorSource


class ResetLayers(DerivedSource):
    def __init__(self, base: TensorSource, tuned: TensorSource, layout: ModelLayout, probe_layer: int):
        super().__init__(tuned)
        self.base, self.tuned = base, tuned
        self.replaced = {name for layer in layout.layer_tensors[:probe_layer] for name in layer}

    def get(self, name: str) -> torch.Tensor:
        return self.base.get(name) if name in self.replaced else self.tuned.get(name)


class Resta(DerivedSource):
    def __init__(self, base: TensorSource, tuned: TensorSource, unaligned: TensorSource, scale: float):
        super().__init__(tuned)
        self.base, self.tuned, self.unaligned, self.scale = base, tuned, unaligned, scale
        self.changed: set[str] = set()

    def get(self, name: str) -> torch.Tensor:
        tuned, base, unaligned = self.tuned.get(name), self.base.get(name), self.unaligned.get(name)
        if torch.equal(base, unaligned):
            return tuned
        self.changed.add(name)
        return (tuned.float() + self.scale * (base.float() - unaligned.float())).to(tuned.dtype)
