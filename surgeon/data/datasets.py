"""Rows from a local .jsonl/.json/.csv/.parquet file or a file in a Hub dataset repo."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from surgeon.errors import InputError

_HF_DATASET = re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<revision>[^/]+))?/(?P<file>.+)$")


def _fetch_hub_file(reference: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    match = _HF_DATASET.match(reference)
    if not match:
        raise InputError("a Hub dataset file is written hf://datasets/ORG/NAME[@revision]/FILE", reference)
    try:
        return Path(hf_hub_download(match["repo"], match["file"], repo_type="dataset", revision=match["revision"]))
    except LocalEntryNotFoundError:
        raise InputError("the Hub cannot be reached and the file is not in the local cache", reference) from None
    except HfHubHTTPError as exc:
        raise InputError(f"Hub download failed: {exc}".splitlines()[0], reference) from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"invalid JSON: {exc.msg}", f"{path}:{number}") from None
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON: {exc.msg}", f"{path}:{exc.lineno}") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list):
        raise InputError("a .json dataset must be a list of objects", str(path))
    return data


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise InputError("reading .parquet needs pyarrow: pip install 'alignment-surgeon[parquet]'", str(path)) from None
    return parquet.read_table(path).to_pylist()


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def load_rows(reference: str) -> list[dict]:
    path = _fetch_hub_file(reference) if reference.startswith("hf://") else Path(reference).expanduser()
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise InputError(f"unsupported dataset format '{path.suffix}': use .jsonl, .json, .csv or .parquet", reference)
    if not path.is_file():
        raise InputError("dataset file not found", reference)
    try:
        rows = reader(path)
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})", reference) from None
    except (csv.Error, ValueError, OSError, RecursionError) as exc:  # also pyarrow's errors, which derive from these
        raise InputError(f"cannot read the dataset: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", reference) from None
    if not rows:
        raise InputError("dataset is empty", reference)
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise InputError("each row must be an object with named fields", f"{reference} row {number}")
    return rows


@dataclass
class HarmfulPrompts:
    """Held-out harmful prompts, with each one's harm category when the set names them."""

    prompts: list[str]
    categories: list[str] | None = None


def column(rows: list[dict], field: str, reference: str, limit: int | None = None) -> list[str]:
    """The field of each row as text, in file order, first `limit` rows."""
    values = []
    for number, row in enumerate(rows[:limit] if limit else rows, 1):
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
            known = ", ".join(sorted(row)) or "none"
            raise InputError(f"row {number} has no text field '{field}' (fields: {known})", reference)
        values.append(value)
    return values
