"""Rows from a local .jsonl/.json/.csv/.parquet file or a file in a Hub dataset repo."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from surgeon.errors import InputError

BUILTIN = "surgeon://"  # a file of surgeon/data/builtin, shipped with the package
_HF_DATASET = re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<revision>[^/]+))?/(?P<file>.+)$")


def _fetch_hub_file(reference: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    match = _HF_DATASET.match(reference)
    if not match:
        raise InputError("a Hub dataset file is written hf://datasets/ORG/NAME[@revision]/FILE", reference)
    if ".." in match["file"].split("/"):
        raise InputError("a Hub dataset file's path may not hold a '..' part", reference)
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


def _builtin_file(reference: str) -> Path:
    folder = Path(__file__).parent / "builtin"
    shipped = sorted(p.name for p in folder.glob("*.jsonl"))
    name = reference.removeprefix(BUILTIN)
    if name not in shipped:
        raise InputError(f"no such file ships with surgeon (it ships: {', '.join(BUILTIN + s for s in shipped)})", reference)
    return folder / name


def load_rows(reference: str) -> list[dict]:
    if reference.startswith(BUILTIN):
        path = _builtin_file(reference)
    else:
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


Prompt = str | list[dict]  # a text, or a conversation: a messages row without its last assistant turn


@dataclass
class HarmfulPrompts:
    """Held-out harmful prompts, with each one's harm category when the set names them."""

    prompts: list[Prompt]
    categories: list[str] | None = None


def prompt_text(prompt: Prompt) -> str:
    """What a person reads as the prompt: the text, or a conversation's last user turn."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _conversation(value: list, field: str, where: str) -> tuple[list[dict], str | None]:
    """A messages value (system/user/assistant turns) as (the turns the model is asked with, the
    last assistant turn's text when the conversation ends with one)."""
    if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        raise InputError(f"'{field}' is not a list of messages, each with a text 'role' and 'content'", where)
    turns = [{"role": m["role"], "content": m["content"]} for m in value]
    answer = turns.pop()["content"] if turns[-1]["role"] == "assistant" else None
    if not turns or turns[-1]["role"] != "user":
        raise InputError(f"the messages in '{field}' do not end with a user turn (before the answer)", where)
    return turns, answer


def _value(row: dict, field: str, number: int, reference: str):
    value = row.get(field)
    if isinstance(value, list):
        return value
    if not isinstance(value, str) or not value.strip():
        known = ", ".join(sorted(row)) or "none"
        raise InputError(f"row {number} has no text or messages field '{field}' (fields: {known})", reference)
    return value


def _rows(rows: list[dict], limit: int | None) -> list[tuple[int, dict]]:
    return list(enumerate(rows[:limit] if limit else rows, 1))


def column(rows: list[dict], field: str, reference: str, limit: int | None = None) -> list[str]:
    """The text field of each row, in file order, first `limit` rows."""
    values = []
    for number, row in _rows(rows, limit):
        value = _value(row, field, number, reference)
        if not isinstance(value, str):
            raise InputError(f"row {number}: '{field}' holds a list, not text", reference)
        values.append(value)
    return values


def prompt_column(rows: list[dict], field: str, reference: str, limit: int | None = None) -> list[Prompt]:
    """Each row's prompt: a text field as it is, a messages field as its turns up to the last user
    turn (the chat template builds the prompt from them)."""
    return [value if isinstance(value := _value(row, field, number, reference), str)
            else _conversation(value, field, f"{reference} row {number}")[0] for number, row in _rows(rows, limit)]


def answer_column(rows: list[dict], field: str, reference: str, limit: int | None = None, prompt_field: str | None = None) -> list[str]:
    """Each row's answer: the text in `field`, or the last assistant turn of a messages field (`field`
    itself, or the prompt's when the rows have no `field`)."""
    answers = []
    for number, row in _rows(rows, limit):
        # a row without `field` answers from its prompt's messages, never from a text prompt
        source = prompt_field if field not in row and isinstance(row.get(prompt_field), list) else field
        value = _value(row, source, number, reference)
        if isinstance(value, list):
            value = _conversation(value, source, f"{reference} row {number}")[1]
            if value is None:
                raise InputError(f"row {number}: the messages in '{source}' end with no assistant turn to take as the answer", reference)
        answers.append(value)
    return answers
