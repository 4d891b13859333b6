"""Tensors kept in memory up to a byte budget, spilled to disk past it (activations, gradients)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class SpillStore:
    def __init__(self, budget_bytes: int, directory: Path):
        self.budget_bytes = budget_bytes
        self.directory = Path(directory)
        self._memory: dict[str, torch.Tensor] = {}
        self._disk: dict[str, tuple[Path, torch.device, tuple[int, ...], torch.dtype]] = {}
        self.used_bytes = 0
        self.peak_bytes = 0
        self.spilled_bytes = 0

    def _path(self, key: str) -> Path:
        return self.directory / (hashlib.sha1(key.encode()).hexdigest() + ".safetensors")

    def __contains__(self, key: str) -> bool:
        return key in self._memory or key in self._disk

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self.delete(key)
        size = tensor.numel() * tensor.element_size()
        if self.used_bytes + size <= self.budget_bytes:
            self._memory[key] = tensor.detach()
            self.used_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        save_file({"t": tensor.detach().contiguous().cpu()}, str(path))
        self._disk[key] = (path, tensor.device, tuple(tensor.shape), tensor.dtype)
        self.spilled_bytes += size

    def get(self, key: str) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        path, device, _, _ = self._disk[key]
        return load_file(str(path))["t"].to(device)

    def describe(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a stored tensor, without reading a spilled one back."""
        if key in self._memory:
            return tuple(self._memory[key].shape), self._memory[key].dtype
        return self._disk[key][2:]

    def delete(self, key: str) -> None:
        if key in self._memory:
            tensor = self._memory.pop(key)
            self.used_bytes -= tensor.numel() * tensor.element_size()
        elif key in self._disk:
            self._disk.pop(key)[0].unlink(missing_ok=True)

    def pop(self, key: str) -> torch.Tensor:
        tensor = self.get(key)
        self.delete(key)
        return tensor

    def clear(self, prefix: str = "") -> None:
        for key in [k for k in list(self._memory) + list(self._disk) if k.startswith(prefix)]:
            self.delete(key)
