"""The layer-reset baseline users compare against, streamed like the main method: decoder layers
< E copied whole from base (norms included), every output tensor given by name when the writer
asks for it. RESTA and the other published repairs are in methods/posthoc.py.
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
