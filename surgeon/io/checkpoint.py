"""Lazy, read-only access to the tensors of a checkpoint, one open handle per shard."""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from surgeon.errors import InputError, NonFiniteError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def check_finite(name: str, tensor: torch.Tensor, where: str) -> torch.Tensor:
    """The tensor itself, or NonFiniteError naming it: a NaN would silently skew every choice after it.
    One min/max reduction (NaN and infinities carry into it): isfinite(...).all() made a mask and
    took 9x as long, 15% of a restore step."""
    if tensor.is_floating_point() and tensor.numel():
        low, high = torch.aminmax(tensor.float() if tensor.element_size() == 1 else tensor)  # float8 has no kernel
        if not (torch.isfinite(low) and torch.isfinite(high)):
            raise NonFiniteError(f"tensor '{name}' holds NaN or infinite values", where)
    return tensor


class FiniteOnce:
    """Checks each tensor the first time it is read: the check rides on the read the run does
    anyway, and costs nothing on the later reads of the same tensor."""

    def __init__(self):
        self._checked: set[str] = set()

    def _finite(self, name: str, tensor: torch.Tensor, where: str) -> torch.Tensor:
        if name not in self._checked:
            check_finite(name, tensor, where)
            self._checked.add(name)
        return tensor

    def _finite_part(self, name: str, part: torch.Tensor, where: str) -> torch.Tensor:
        """Some entries of a tensor: checked unless the whole tensor was (a selection gathers
        millions of entries of tensors it has read whole)."""
        return part if name in self._checked else check_finite(name, part, where)


class TensorSource(Protocol):
    """What the engine needs from a model's weights: names, headers, and one tensor at a time."""

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored, a copy of the caller's own (it may write to it; the file never changes)."""
        ...

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (unique, ascending) of a 2-D tensor: the embedding rows a prompt set uses,
        without the whole matrix (a 128k-token vocabulary in fp32 is 2-4 GB)."""
        ...

    def gather(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        """Entries `indices` of the flattened tensor (as stored): the few a selection looks at,
        without copying the whole tensor out of the file."""
        ...

    def prefetch(self, names: list[str]) -> None:
        """Ask the operating system to start reading these tensors into its page cache (read-ahead:
        the next layer's bytes arrive while this one computes); a hint, never required."""
        ...


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Ascending ids as [start, stop) runs of consecutive values."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(start, stop) for start, stop in runs]


class DerivedSource:
    """Base of sources that compute their tensors from others: names, shapes and dtypes are `like`'s."""

    def __init__(self, like: TensorSource):
        self.like = like

    def names(self) -> list[str]:
        return self.like.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.like.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.like.dtype(name)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        return self.get(name)[ids]

    def gather(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        return self.get(name).flatten()[indices]

    def prefetch(self, names: list[str]) -> None:
        self.like.prefetch(names)


def _data_extents(file: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's bytes in a safetensors file, from its header (an 8-byte length, then JSON with
    data_offsets relative to the end of the header): safe_open does not expose them."""
    try:
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
    except (OSError, ValueError):
        return {}  # safe_open reports a broken header with its own message
    return {name: (8 + length + entry["data_offsets"][0], entry["data_offsets"][1] - entry["data_offsets"][0])
            for name, entry in header.items() if name != "__metadata__"}


class SafetensorsCheckpoint(FiniteOnce):
    """All `*.safetensors` files of a folder (the index is not needed: headers say everything).

    Headers are read once. A tensor is read into memory of its own; a gather maps only the
    tensor's bytes, for as long as it takes: a mapping kept open keeps every page read through it
    resident, so a long run would show the whole model in its RSS.
    """

    def __init__(self, files: list[Path]):
        super().__init__()
        if not files:
            raise InputError("no .safetensors files found")
        self._where: dict[str, Path] = {}
        self._headers: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._extents: dict[Path, dict[str, tuple[int, int]]] = {}  # per file, read at its first read-ahead
        for file in sorted(files):
            try:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    for name in handle.keys():
                        if name in self._where:
                            raise InputError(f"tensor '{name}' appears in two shards", str(file))
                        view = handle.get_slice(name)
                        dtype = SAFETENSORS_DTYPES.get(view.get_dtype())
                        if dtype is None:
                            raise InputError(f"tensor '{name}' has unsupported dtype {view.get_dtype()}", str(file))
                        self._where[name] = file
                        self._headers[name] = (tuple(view.get_shape()), dtype)
            except (SafetensorError, OSError) as exc:
                raise InputError(f"cannot read safetensors file: {exc}", str(file)) from None

    @classmethod
    def from_folder(cls, folder: Path) -> "SafetensorsCheckpoint":
        """The index's shards if there is an index, else model.safetensors, else every *.safetensors
        (so a surgeon output folder, with its masks.safetensors beside the model, reads as a model)."""
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise InputError(f"unreadable shard index: {exc}", str(index)) from None
            if not isinstance(weight_map, dict) or not all(isinstance(name, str) and name for name in weight_map.values()):
                raise InputError("the shard index's weight_map must map tensor names to shard file names", str(index))
            shards = sorted(set(weight_map.values()))
            files = [folder / name for name in shards]
            # a shard outside the folder would be read but not fingerprinted (the records hash the folder's
            # files); links in it stay allowed (a Hub snapshot's files link to its blob store)
            inside = os.path.normpath(folder)
            if outside := [name for name, f in zip(shards, files) if os.path.dirname(os.path.normpath(f)) != inside]:
                raise InputError(f"the index names a shard outside the model folder ({outside[0]}); surgeon reads only the folder's own files", str(index))
            if missing := [f.name for f in files if not f.exists()]:
                raise InputError(f"the index names {len(missing)} missing shard(s), e.g. {missing[0]}", str(index))
        elif (folder / "model.safetensors").exists():
            files = [folder / "model.safetensors"]
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise InputError("no .safetensors files in model folder", str(folder))
        return cls(files)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._headers[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._headers[name][1]

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def get(self, name: str) -> torch.Tensor:
        """The tensor's bytes read into memory of its own from the extent the header gives, without
        parsing the shard's header again for each tensor (a 0.37B step's reads took as long that way
        as their first NaN check). Read, not mapped: a tensor over a mapping of the file dies by
        SIGBUS, which no handler can turn into an error, when another process truncates the file
        while the tensor is in use."""
        stored = self._read(name)
        if stored is not None:
            return self._finite(name, stored.view(self.shape(name)), str(self._where[name]))
        try:
            with safe_open(str(self._where[name]), framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise InputError(f"cannot read tensor '{name}': {exc}", str(self._where[name])) from None
        return self._finite(name, tensor, str(self._where[name]))

    def prefetch(self, names: list[str]) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if self.extent(name) is not None:
                by_file.setdefault(self._where[name], []).append(name)
        for file, in_file in by_file.items():
            try:
                descriptor = os.open(file, os.O_RDONLY)
            except OSError:
                continue  # a hint: the read itself reports a missing file
            try:
                for name in in_file:
                    os.posix_fadvise(descriptor, *self.extent(name), os.POSIX_FADV_WILLNEED)
            finally:
                os.close(descriptor)

    def extent(self, name: str) -> tuple[int, int] | None:
        """(first byte, length) of a tensor's data in its file; each file's header is parsed at its first use."""
        file = self._where.get(name)
        if file is None:
            return None
        if file not in self._extents:
            self._extents[file] = _data_extents(file)
        return self._extents[file].get(name)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        try:
            with safe_open(str(self._where[name]), framework="pt", device="cpu") as handle:
                view = handle.get_slice(name)
                rows = torch.cat([view[start:stop] for start, stop in _runs(ids.tolist())] or [view[0:0]])
        except (SafetensorError, OSError) as exc:
            raise InputError(f"cannot read tensor '{name}': {exc}", str(self._where[name])) from None
        return self._finite_part(name, rows, str(self._where[name]))

    def gather(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        """Read through a mapping of the tensor's bytes: only the pages holding the entries are
        touched, and the mapping is closed again at once (see the class note on mappings)."""
        if not indices.numel():
            return torch.empty(0, dtype=self.dtype(name))
        stored = self._mapped(name)
        if stored is None:
            return self.get(name).flatten()[indices]
        entries = stored.index_select(0, indices.to(torch.long))
        del stored  # the mapping closes with the last tensor over it
        return self._finite_part(name, entries, str(self._where[name]))

    def _read(self, name: str) -> torch.Tensor | None:
        """The tensor's bytes, flat, in memory of its own (None when the header gives no extent); a
        file shorter than its header says (truncated since it was opened) is one line."""
        extent = self.extent(name)
        if extent is None:
            return None
        start, length = extent
        flat = torch.empty(length // self.dtype(name).itemsize, dtype=self.dtype(name))
        buffer, done = memoryview(flat.view(torch.uint8).numpy()), 0
        try:
            with open(self._where[name], "rb", buffering=0) as handle:
                while done < length and (count := os.preadv(handle.fileno(), [buffer[done:]], start + done)):
                    done += count
        except OSError as exc:
            raise InputError(f"cannot read tensor '{name}': {exc.strerror}", str(self._where[name])) from None
        if done < length:
            raise InputError(f"the file ends before tensor '{name}' does: it was truncated or changed since surgeon opened it", str(self._where[name]))
        return flat

    def _mapped(self, name: str) -> torch.Tensor | None:
        """The tensor's bytes, flat, through a copy-on-write mapping of that part of its file (a
        write changes the caller's pages, never the file), which closes when the last tensor over it
        is freed (None when the header gives no extent)."""
        extent = self.extent(name)
        if extent is None:
            return None
        start, length = extent
        dtype = self.dtype(name)
        if not length:
            return torch.empty(0, dtype=dtype)
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self._where[name], "rb") as handle:  # the mapping keeps its own handle
                mapped = mmap.mmap(handle.fileno(), start + length - aligned, offset=aligned, access=mmap.ACCESS_COPY)
            # safetensors stores little-endian, as every platform torch runs on
            return torch.frombuffer(mapped, dtype=dtype, count=length // dtype.itemsize, offset=start - aligned)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read tensor '{name}': {exc}", str(self._where[name])) from None


class PickleCheckpoint(FiniteOnce):
    """`.bin`/`.pt` checkpoints, only when the recipe says allow_pickle; loaded weights_only."""

    def __init__(self, files: list[Path]):
        super().__init__()
        self._files = ", ".join(str(f) for f in files)
        self._tensors: dict[str, torch.Tensor] = {}
        for file in sorted(files):
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for a bad pickle
                raise InputError(f"cannot load pickle checkpoint: {exc}", str(file)) from None
            self._tensors.update(state)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._finite(name, self._tensors[name].clone(), self._files)

    def prefetch(self, names: list[str]) -> None:
        """No read-ahead: torch.load maps the file, and its layout is the pickle's."""

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        return self._finite_part(name, self._tensors[name][ids], self._files)  # indexing copies, from the mapped file

    def gather(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        return self._finite_part(name, self._tensors[name].flatten()[indices], self._files)
