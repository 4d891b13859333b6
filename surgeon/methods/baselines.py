"""Baselines users compare against, streamed like the main method: each gives every output tensor
by name, computed when the writer asks for it.

- reset_layers: decoder layers < E copied whole from base (norms included).
- resta: tuned + scale * (base - unaligned) (Bhardwaj et al. 2024), where `unaligned` is base
  fine-tuned on harmful data; tensors where base and unaligned agree stay tuned's, bit-exact.
"""

from __future__ import annotations

import torch

from surgeon.methods.interface import Repair


class ResetLayersRun:
    def __init__(self, context):
        self.context = context
        self.base, self.tuned = context.pair.base.tensors, context.pair.tuned.tensors
        self.probe_layer = context.probe_layer
        self.replaced = {name for layer in context.pair.layout.layer_tensors[: self.probe_layer] for name in layer}

    def get(self, name: str) -> torch.Tensor:
        return self.base.get(name) if name in self.replaced else self.tuned.get(name)

    def run(self) -> Repair:
        changed = self.context.share_of_decoder(self.replaced)
        layers = self.context.pair.layout.num_layers
        return Repair(f"decoder layers below {self.probe_layer} of {layers} copied whole from base ({changed['parameters']:,} parameters)",
                      {"probe_layer": self.probe_layer}, changed, tensors=self.get)


class RestaRun:
    def __init__(self, context):
        self.context = context
        self.base, self.tuned = context.pair.base.tensors, context.pair.tuned.tensors
        self.unaligned = context.inputs.unaligned.tensors
        self.scale = context.recipe.resta.scale
        self.changed: set[str] = set()

    def get(self, name: str) -> torch.Tensor:
        tuned, base, unaligned = self.tuned.get(name), self.base.get(name), self.unaligned.get(name)
        if torch.equal(base, unaligned):
            return tuned
        self.changed.add(name)
        return (tuned.float() + self.scale * (base.float() - unaligned.float())).to(tuned.dtype)

    def _change(self) -> str:
        changed = self.context.share_of_decoder(self.changed)
        return f"RESTA: tuned + {self.scale} x (base - unaligned) on {changed['tensors']} tensors ({changed['parameters']:,} parameters)"

    def run(self) -> Repair:
        # what changed is known once every tensor has streamed through get()
        return Repair(self._change, {"scale": self.scale}, lambda: self.context.share_of_decoder(self.changed), tensors=self.get)
