"""On-disk cache of generations, keyed by (model content, prompts, generation settings)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from surgeon.io.fingerprint import cache_root, digest_strings


class GenerationCache:
    def __init__(self, root: Path | None = None):
        self.directory = (root or cache_root()) / "generations"

    def key(self, model: str, prompts: list[str], settings: dict) -> str:
        return digest_strings(model, json.dumps(prompts), json.dumps(settings, sort_keys=True))

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
