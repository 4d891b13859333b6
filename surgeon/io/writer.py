"""Write sharded safetensors one tensor at a time, with Hugging Face shard names and index.

The shard plan comes from shapes and dtypes alone, so each header is written first and
tensor bytes are streamed after it: memory holds one tensor, never a whole shard.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from surgeon.io.checkpoint import SAFETENSORS_DTYPES
from surgeon.allocator import release_free_memory
from surgeon.progress import NullProgress, Progress

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(entries: list[TensorEntry], max_shard_bytes: int) -> dict[str, list[TensorEntry]]:
    """Shard names (Hugging Face's) and their entries, by huggingface_hub's own rule (greedy in order; a tensor
    larger than the budget gets a shard of its own), from shapes and dtypes alone."""
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory({e.name: e for e in entries}, get_storage_size=lambda e: e.nbytes,
                                                 filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_bytes)
    by_name = {e.name: e for e in entries}
    return {file: [by_name[name] for name in names] for file, names in split.filename_to_tensors.items()}


def _header(entries: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": _DTYPE_NAMES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(tensor: torch.Tensor):
    """The tensor's bytes as a buffer over its own memory (no copy into a bytes object)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def write_file(path: Path, entries: list[TensorEntry], get_tensor: Callable[[str], torch.Tensor], metadata: dict[str, str]) -> None:
    """One safetensors file whose header keeps the given order, so equal content is equal bytes
    (safetensors' own writer orders the metadata by a hash map, differently each run). Tensors
    are fetched one at a time, so a file larger than memory (a run's saved gradients) can be written."""
    with open(path, "wb") as out:
        out.write(_header(entries, metadata))
        for entry in entries:
            out.write(_tensor_bytes(get_tensor(entry.name)))
            release_free_memory()


def write_sharded(
    folder: Path,
    entries: list[TensorEntry],
    get_tensor: Callable[[str], torch.Tensor],
    max_shard_bytes: int,
    progress: Progress = NullProgress(),
) -> list[str]:
    """Write every entry (fetched by `get_tensor`, in order) and the index; return shard names."""
    shards = plan_shards(entries, max_shard_bytes)
    names = list(shards)
    weight_map = {}
    with progress.task("writing shards", total=len(entries)) as task:
        for shard_name, shard in shards.items():
            with open(folder / shard_name, "wb") as out:
                out.write(_header(shard, {"format": "pt"}))
                for entry in shard:
                    tensor = get_tensor(entry.name)
                    if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                        raise ValueError(f"{entry.name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {entry.shape} {entry.dtype}")
                    out.write(_tensor_bytes(tensor))
                    del tensor  # before the next read: a tensor read through a mapping holds its pages
                    release_free_memory()
                    weight_map[entry.name] = shard_name
                    task.advance()
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names
