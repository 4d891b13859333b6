"""An output folder that appears whole or not at all, and replaces only what surgeon wrote.

Everything is written to `.NAME.surgeon-tmp-PID` beside the destination and renamed into
place at the end. A crash (even SIGKILL) leaves only hidden folders; each run records its
folders under the cache's `runs/`, so the next run, whatever its destination, removes those of
processes that are gone.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from pathlib import Path

from surgeon.errors import OutputError
from surgeon.io.fingerprint import cache_root
from surgeon.io.references import TOKENIZER_FILES

_LOCK_TAG = ".surgeon-lock"
_TMP_TAG = ".surgeon-tmp-"
_WORK_TAG = ".surgeon-work-"
_OLD_TAG = ".surgeon-old-"
_OURS = re.compile(r"^\..+\.surgeon-(tmp|work|old)-\d+$")
# The files a surgeon output folder holds; anything else in it is the user's, and blocks replacing it.
_OUTPUT_FILES = {*TOKENIZER_FILES, "config.json", "generation_config.json", "model.safetensors.index.json", "masks.safetensors",
                 "patch.json", "patch-tensors.safetensors", "surgeon.json", "report.md", "README.md", "recipe.yaml", "tradeoff.png"}
_SHARD = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
_CHECKPOINT_MASKS = re.compile(r"^masks-step-\d+\.safetensors$")
# Failures of the disk or its permissions: the user can act on them, so they are not internal errors.
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_COMMIT_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


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


def output_files(folder: Path) -> list[Path]:
    """The files of an output folder that a surgeon run writes (by name: weights, masks, patch,
    config, tokenizer, records); nothing else in it, hidden files included, is surgeon's."""
    return [p for p in sorted(folder.iterdir())
            if p.is_file() and not p.is_symlink() and (p.name in _OUTPUT_FILES or _SHARD.match(p.name) or _CHECKPOINT_MASKS.match(p.name))]


def checkpoint_masks_name(step: int) -> str:
    """The file an output keeps a scored checkpoint's masks in (`surgeon pick`)."""
    return f"masks-step-{step}.safetensors"


def check_destination(destination: Path, overwrite: bool, inputs: list[Path] = ()) -> None:
    """Refuse, before any work, a destination whose replacement could lose the user's data."""
    for path in inputs:
        path = Path(path).expanduser().resolve()
        if _inside(destination, path) or _inside(path, destination):
            relation = "is" if path == destination else ("lies inside" if _inside(destination, path) else "contains")
            raise OutputError(f"the output folder {relation} an input ({path}); choose another output.path", str(destination))
    places = {Path.cwd().resolve(): "the current folder", Path.home().resolve(): "your home folder", Path(destination.anchor): "a filesystem root"}
    for place, what in places.items():
        if _inside(place, destination):
            raise OutputError(f"the output folder {'is' if place == destination else 'contains'} {what}; choose another output.path", str(destination))
    if not destination.exists():
        return
    if not destination.is_dir():
        raise OutputError("output path exists and is a file", str(destination))
    if os.path.ismount(destination):
        raise OutputError("the output folder is a mount point; choose a folder inside it", str(destination))
    entries = sorted(destination.iterdir())
    if not entries:
        return
    if not (destination / "surgeon.json").is_file():
        raise OutputError("output folder exists and is not a surgeon output (it has no surgeon.json); choose another output.path", str(destination))
    ours = set(output_files(destination))
    foreign = [p.name for p in entries if p not in ours]
    if foreign:
        raise OutputError(f"output folder holds '{foreign[0]}', which surgeon did not write; move it or choose another output.path", str(destination))
    if not overwrite:
        raise OutputError("output folder holds an earlier surgeon output; pass --overwrite to replace it", str(destination))


def _registry() -> Path:
    return cache_root() / "runs"


def lock_path(destination: Path) -> Path:
    """The lock file of an output path: beside it, held by the run writing it for the whole run."""
    return destination.parent / f".{destination.name}{_LOCK_TAG}"


def _held(lock: Path) -> bool:
    """Whether a live process, in any PID namespace or container sharing the disk, holds the lock
    (the kernel drops a dead process's lock)."""
    import fcntl

    try:
        with open(lock, "rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def _listing(folder: Path) -> list | None:
    """What a folder holds, to notice a change: each entry's name, size and modification time."""
    if not folder.exists():
        return None
    try:
        return sorted((p.name, p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.iterdir()) if folder.is_dir() else [("", 0, folder.lstat().st_mtime_ns)]
    except OSError:
        return [("unreadable", 0, 0)]


def remove_stale(mine: Path | None = None) -> None:
    """Remove the hidden folders of surgeon processes that are gone. An old output that a killed
    commit had moved aside goes back in place when nothing replaced it. `mine`: the lock this
    process holds (a record of that lock is of a run that died holding it)."""
    registry = _registry()
    if not registry.is_dir():
        return
    for record in registry.glob("*.json"):
        try:
            entry = json.loads(record.read_text())
            pid, paths = int(entry["pid"]), [Path(p) for p in entry["paths"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        lock = Path(entry["lock"]) if "lock" in entry else None
        if (_alive(pid) and pid != os.getpid()) or (lock is not None and lock != mine and _held(lock)):
            continue  # the pid alone is not proof of death: a run in another PID namespace holds its lock
        for path in paths:
            if not _OURS.match(path.name) or not path.exists():
                continue
            if _OLD_TAG in path.name:
                original = path.parent / path.name[1:].rsplit(_OLD_TAG, 1)[0]
                if not original.exists():
                    os.rename(path, original)
                    continue
            shutil.rmtree(path, ignore_errors=True)
        record.unlink(missing_ok=True)


class AtomicOutputDir:
    """A destination written all at once. `lock` (the process that commits: every one but the
    followers of a data-parallel run) holds the destination's lock for the whole run: a second run to
    the same output is refused at once, naming the first; and what the destination holds is noted, so
    that anything put there meanwhile is kept at the commit, the result going beside it."""

    def __init__(self, destination: Path, overwrite: bool = False, inputs: list[Path] = (), lock: bool = True):
        self.destination = Path(destination).expanduser().resolve()
        check_destination(self.destination, overwrite, inputs)
        self.parent = self.destination.parent
        self._lock, self._lock_file, self._before = lock, None, None
        pid = os.getpid()
        self.temporary = self.parent / f".{self.destination.name}{_TMP_TAG}{pid}"
        self.workspace = self.parent / f".{self.destination.name}{_WORK_TAG}{pid}"
        self._old = self.parent / f".{self.destination.name}{_OLD_TAG}{pid}"
        self._record = _registry() / f"{pid}.json"

    def _acquire(self) -> None:
        import fcntl
        import socket

        path = lock_path(self.destination)
        while True:
            handle = open(path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise OutputError(f"another surgeon run ({holder}) is writing this output; wait for it to end or choose another output.path",
                                  str(self.destination)) from None
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()  # the run that held it removed the file as we opened it: lock the one at the path now
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._lock_file = handle

    def _release(self) -> None:
        """The lock file goes with the lock (removed while still held, so that a run which opened it
        meanwhile sees it gone and locks the next one); SIGKILL leaves it, and the kernel the lock."""
        if self._lock_file is None:
            return
        lock_path(self.destination).unlink(missing_ok=True)
        self._lock_file.close()
        self._lock_file = None

    def __enter__(self) -> "AtomicOutputDir":
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            if self._lock:
                self._acquire()
            self._before = _listing(self.destination)
            remove_stale(lock_path(self.destination) if self._lock else None)
            self._record.parent.mkdir(parents=True, exist_ok=True)
            self._record.write_text(json.dumps({"pid": os.getpid(), "lock": str(lock_path(self.destination)),
                                                "paths": [str(p) for p in (self.temporary, self.workspace, self._old)]}))
            self.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.temporary, ignore_errors=True)
            shutil.rmtree(self.workspace, ignore_errors=True)
            self.temporary.mkdir()
            self.workspace.mkdir()
        except OSError as exc:
            self._cleanup()
            raise OutputError(f"cannot create the output folder: {exc.strerror}", str(exc.filename or self.parent)) from None
        return self

    def commit(self) -> None:
        """Swap the finished folder into place; an old destination is removed only after. Ctrl-C,
        SIGTERM and SIGHUP wait until the swap is done, so it is never left half made."""
        if _listing(self.destination) != self._before:
            # something was put at the destination during the run: it stays; the result goes beside it
            aside = self.parent / f"{self.destination.name}.surgeon-{os.getpid()}"
            os.rename(self.temporary, aside)
            raise OutputError(f"the destination changed during the run and was left as it is; the result is in {aside}", str(self.destination))
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _COMMIT_SIGNALS)
        try:
            if self.destination.exists():
                os.rename(self.destination, self._old)
            os.rename(self.temporary, self.destination)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        shutil.rmtree(self._old, ignore_errors=True)

    def _cleanup(self) -> None:
        shutil.rmtree(self.workspace, ignore_errors=True)
        shutil.rmtree(self.temporary, ignore_errors=True)
        self._record.unlink(missing_ok=True)
        self._release()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._cleanup()
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
            where = exc.filename if isinstance(exc.filename, str) else str(self.destination)
            raise OutputError(f"cannot write the output: {exc.strerror or os.strerror(exc.errno)}; nothing was written to the destination",
                              where) from None
