"""A run's saved progress: `.NAME.surgeon-state` beside the destination, so that a killed or
failed run of the same recipe on the same inputs resumes instead of starting again.

The folder holds `key.json` (what the state belongs to: recipe hash, input fingerprints, device,
surgeon's version), `progress.json` (the method's own record, written last: the commit point) and
the tensors that record names. A different key never resumes: the folder is replaced, and the run
says which part of the key changed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

from surgeon.errors import first_line
from surgeon.io.writer import TensorEntry, write_file
from surgeon.progress import NullProgress, Progress

STATE_TAG = ".surgeon-state"


def state_folder(destination: Path) -> Path:
    return destination.parent / f".{destination.name}{STATE_TAG}"


def _changed(saved: dict, key: dict) -> str:
    """The first part of the key that differs, in words."""
    for part in sorted(set(saved) | set(key)):
        if saved.get(part) != key.get(part):
            if isinstance(key.get(part), dict) and isinstance(saved.get(part), dict):
                inner = sorted(k for k in set(saved[part]) | set(key[part]) if saved[part].get(k) != key[part].get(k))
                return f"{part} '{inner[0]}' changed" if inner else f"{part} changed"
            return f"{part} changed"
    return "nothing changed"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _damaged(folder: Path, saved: dict) -> str | None:
    """Why a saved state's files cannot be resumed from (a torn or emptied write), or None."""
    for name in (saved.get("tensors"), saved.get("masks") and f"checkpoints/{saved['masks']}"):
        if not name:
            continue
        try:
            with safe_open(str(folder / name), framework="pt", device="cpu") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error types for a bad header or a short file
            return f"{name}: {first_line(exc)}"
    return None


class RunState:
    def __init__(self, folder: Path, key: dict, progress: dict | None, writer: bool = True):
        self.folder, self.key, self.saved, self.writer = folder, key, progress, writer

    @classmethod
    def open(cls, folder: Path, key: dict, fresh: bool = False, progress: Progress = NullProgress(), writer: bool = True) -> "RunState":
        """The state at `folder` when its key matches (saved progress in `.saved`), else a new one.
        Only a writer (the main process of a data-parallel run) changes anything on disk; the
        others read what it opened."""
        if not writer:
            saved = _read(folder / "progress.json") if _read(folder / "key.json") == key else None
            return cls(folder, key, saved, writer=False)
        saved = None
        if folder.is_dir():
            old_key, saved = _read(folder / "key.json"), _read(folder / "progress.json")
            if fresh:
                progress.log("starting over (--fresh): the saved state is discarded")
                saved = None
            elif old_key is None:
                progress.log("starting over: the saved state cannot be read")
                saved = None
            elif old_key != key:
                progress.log(f"starting over: the saved state is for another run ({_changed(old_key, key)})")
                saved = None
            elif saved is not None and (damage := _damaged(folder, saved)):
                progress.log(f"starting over: the saved state is damaged ({damage})")
                saved = None
            if saved is None:  # also when the earlier run stopped before its first checkpoint
                shutil.rmtree(folder)
        if saved is None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "key.json").write_text(json.dumps(key, indent=2, sort_keys=True))
        return cls(folder, key, saved)

    @property
    def checkpoints(self) -> Path:
        path = self.folder / "checkpoints"
        path.mkdir(exist_ok=True)
        return path

    def save(self, record: dict, entries: list[TensorEntry], get_tensor: Callable[[str], torch.Tensor]) -> None:
        """Tensors (fetched one at a time) to a new file, then the record naming it (atomic replace),
        then the old file goes: a kill at any moment leaves a record and the tensors it names."""
        previous = self.saved.get("tensors") if self.saved else None
        name = f"tensors-{record['sequence']}.safetensors"
        if not self.writer:
            self.saved = {**record, "tensors": name}
            return
        write_file(self.folder / name, entries, get_tensor, {"format": "pt"})
        record = {**record, "tensors": name}
        temporary = self.folder / "progress.json.tmp"
        temporary.write_text(json.dumps(record, indent=2))
        os.replace(temporary, self.folder / "progress.json")
        if previous and previous != name:
            (self.folder / previous).unlink(missing_ok=True)
        self.saved = record

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The saved tensors, one at a time (a run's gradients may not fit in memory at once)."""
        with safe_open(str(self.folder / self.saved["tensors"]), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)

    def remove(self) -> None:
        if self.writer:
            shutil.rmtree(self.folder, ignore_errors=True)
