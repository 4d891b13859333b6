"""On-disk cache of generations, keyed by (model content, prompts, generation settings)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("SURGEON_CACHE"):
        return Path(os.environ["SURGEON_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "surgeon"


def _digest(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
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
        memo = memo_dir / _digest(str(file), str(stat.st_size), str(stat.st_mtime_ns))
        if memo.exists():
            parts.append(memo.read_text())
            continue
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
        memo_dir.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest.hexdigest())
        parts.append(digest.hexdigest())
    return _digest(*(f"{f.name}:{p}" for f, p in zip(files, parts)))


def combine(*parts: str) -> str:
    return _digest(*parts)


class GenerationCache:
    def __init__(self, root: Path | None = None):
        self.directory = (root or cache_root()) / "generations"

    def key(self, model: str, prompts: list[str], settings: dict) -> str:
        return _digest(model, json.dumps(prompts), json.dumps(settings, sort_keys=True))

    def get(self, key: str) -> list[str] | None:
        path = self.directory / f"{key}.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())["answers"]
        except (json.JSONDecodeError, KeyError):
            return None

    def put(self, key: str, answers: list[str], meta: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.directory / f".{key}.{os.getpid()}.tmp"
        temporary.write_text(json.dumps({"answers": answers, **meta}))
        os.replace(temporary, self.directory / f"{key}.json")
