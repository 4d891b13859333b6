"""Content fingerprints: of model folders (weights and config, memoized so each file is hashed
once) and of data files. They key the evaluation cache and name local inputs in the records."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from surgeon.errors import InputError


def cache_root() -> Path:
    root = Path(os.environ["SURGEON_CACHE"]) if os.environ.get("SURGEON_CACHE") else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "surgeon"
    if root.exists() and not root.is_dir():
        raise InputError("surgeon's cache must be a folder; this is a file (set SURGEON_CACHE to a folder)", str(root))
    return root


def digest_strings(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def folder_fingerprint(folder: Path, root: Path | None = None) -> str:
    """sha256 over the weight files' bytes; remembered per (path, size, mtime) so it is paid once."""
    folder = Path(folder).resolve()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.name != "masks.safetensors")
    files += [p for p in (folder / "config.json", folder / "adapter_config.json") if p.exists()]
    memo_dir = (root or cache_root()) / "fingerprints"
    parts = []
    for file in files:
        stat = file.stat()
        memo = memo_dir / digest_strings(str(file), str(stat.st_size), str(stat.st_mtime_ns))
        if memo.exists():
            parts.append(memo.read_text())
            continue
        value = file_sha256(file)
        memo_dir.mkdir(parents=True, exist_ok=True)
        memo.write_text(value)
        parts.append(value)
    return digest_strings(*(f"{f.name}:{p}" for f, p in zip(files, parts)))


def combine(*parts: str) -> str:
    return digest_strings(*parts)
