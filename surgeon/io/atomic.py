"""An output folder that appears whole or not at all.

Everything is written to `.NAME.surgeon-tmp-PID` beside the destination and renamed into
place at the end. A crash (even SIGKILL) leaves only that hidden folder, which the next run
removes once its process is gone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from surgeon.errors import OutputError

_TMP_TAG = ".surgeon-tmp-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class AtomicOutputDir:
    def __init__(self, destination: Path, overwrite: bool = False, protected: list[Path] = ()):
        self.destination = Path(destination).expanduser().resolve()
        for folder in protected:
            folder = Path(folder).resolve()
            if _inside(folder, self.destination) or _inside(self.destination, folder):
                raise OutputError("the output folder overlaps an input model folder; choose another output.path", str(self.destination))
        if self.destination.exists():
            if not self.destination.is_dir():
                raise OutputError("output path exists and is a file", str(self.destination))
            if any(self.destination.iterdir()) and not overwrite:
                raise OutputError("output folder exists and is not empty; pass --overwrite to replace it", str(self.destination))
        self.parent = self.destination.parent
        self.temporary = self.parent / f".{self.destination.name}{_TMP_TAG}{os.getpid()}"
        self.workspace = self.parent / f".{self.destination.name}.surgeon-work-{os.getpid()}"

    def _remove_stale(self) -> None:
        for prefix in (f".{self.destination.name}{_TMP_TAG}", f".{self.destination.name}.surgeon-work-"):
            for leftover in self.parent.glob(prefix + "*"):
                pid = leftover.name.rsplit("-", 1)[-1]
                if pid.isdigit() and not _alive(int(pid)):
                    shutil.rmtree(leftover, ignore_errors=True)

    def __enter__(self) -> "AtomicOutputDir":
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            shutil.rmtree(self.temporary, ignore_errors=True)
            shutil.rmtree(self.workspace, ignore_errors=True)
            self.temporary.mkdir()
            self.workspace.mkdir()
        except OSError as exc:
            raise OutputError(f"cannot create the output folder: {exc.strerror}", str(self.parent)) from None
        return self

    def commit(self) -> None:
        """Swap the finished folder into place; an old destination is removed only after."""
        old = None
        if self.destination.exists():
            old = self.parent / f".{self.destination.name}.surgeon-old-{os.getpid()}"
            os.rename(self.destination, old)
        os.rename(self.temporary, self.destination)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.workspace, ignore_errors=True)
        if exc_type is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
