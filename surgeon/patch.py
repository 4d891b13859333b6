"""A safety patch: the repair itself, re-appliable to the models it was made from.

A run whose method chose weights (restore, antidote) writes, beside the checkpoint, `masks.safetensors`
(one bit per in-scope weight, 1 = taken from base) and `patch.json`:

    {"format": "surgeon-patch", "version": 1, "kind": "masks", "method": "restore",
     "file": "masks.safetensors", "base": {...}, "tuned": {...},
     "output": {"dtype": null, "max_shard_size": 5000000000}, "surgeon": {...}}

A method that writes values (linear, resta, safe_delta, ...) makes a patch with `output.write:
patch`: kind "tensors", file `patch-tensors.safetensors`, every output tensor whose value differs from
tuned's, as written (as large as what the method changed: a dense method changes most of the model).

`base` and `tuned` are the records' fingerprints (`reference`, `revision` for a Hub model, `local`:
the sha256 of each local folder's weights and config). `surgeon apply` reads the folder, checks that
the models given are those (refusing others unless `--force`, which the card then states) and
writes the same checkpoint bytes the run wrote, streamed like a run: tuned read whole one tensor at a
time, base only at the set entries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from surgeon.errors import InputError
from surgeon.progress import NullProgress, Progress
from surgeon.records import ApplyRecord

FORMAT, VERSION, MANIFEST = "surgeon-patch", 1, "patch.json"
FILES = {"masks": "masks.safetensors", "tensors": "patch-tensors.safetensors"}


def manifest(kind: str, method: str, described: dict, dtype: str | None, max_shard_bytes: int, tool: dict) -> dict:
    """patch.json: what to apply (masks, or tensors by name), to which models, written how."""
    return {"format": FORMAT, "version": VERSION, "kind": kind, "method": method, "file": FILES[kind],
            "base": described["base"], "tuned": described["tuned"], "output": {"dtype": dtype, "max_shard_size": max_shard_bytes},
            "surgeon": tool}


def write_tensor_patch(folder: Path, tuned, get, dtype: str | None, workspace: Path, budget: int) -> int:
    """patch-tensors.safetensors: each output tensor (as the checkpoint would store it) that differs
    from tuned's, held in a spill store until the file's header can be written; how many."""
    import torch

    from surgeon.engine.store import SpillStore
    from surgeon.io.repaired import planned_dtypes
    from surgeon.io.writer import TensorEntry, write_file

    planned, store, entries = planned_dtypes(tuned, dtype), SpillStore(budget, workspace / "patch"), []
    for name in tuned.tensors.names():
        value = get(name).to(planned[name])
        if not torch.equal(value, tuned.tensors.get(name).to(planned[name])):
            store.put(name, value)
            entries.append(TensorEntry(name, tuple(value.shape), value.dtype))
    write_file(folder / FILES["tensors"], entries, store.get, {"format": "pt"})
    store.clear()
    return len(entries)


def patched(file: Path, tuned) -> tuple:
    """A tensor patch over tuned: each output tensor by name (the patch's where it has one), and the
    patch's tensor shapes by name."""
    from safetensors import safe_open

    values = safe_open(str(file), "pt")
    shapes = {n: tuple(values.get_slice(n).get_shape()) for n in values.keys()}
    return (lambda n: values.get_tensor(n) if n in shapes else tuned.tensors.get(n)), shapes


@dataclass(frozen=True)
class Patch:
    folder: Path
    manifest: dict

    @classmethod
    def read(cls, folder: str | Path) -> "Patch":
        folder = Path(folder)
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"no {MANIFEST}: not a surgeon patch (a run of a method that chose weights writes one)", str(folder)) from None
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {MANIFEST}: {exc}", str(path)) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"not a surgeon patch (format is not '{FORMAT}')", str(path))
        if data.get("version") != VERSION:
            raise InputError(f"patch format version {data.get('version')!r}; this surgeon reads version {VERSION}", str(path))
        if FILES.get(data.get("kind")) != data.get("file") or not (folder / str(data.get("file"))).is_file():
            raise InputError("the patch names no masks or tensors file that is there", str(path))
        return cls(folder, data)


def fingerprint_mismatches(patch: Patch, described: dict) -> list[str]:
    """Which of base and tuned differ from the models the patch was made from (by content hash, or
    by Hub revision), in words."""
    problems = []
    for role in ("base", "tuned"):
        want, got = patch.manifest[role], described[role]
        same = (sorted((want.get("local") or {}).values()) == sorted((got.get("local") or {}).values())
                and want.get("revision") == got.get("revision"))
        if not same:
            problems.append(f"{role} is not the model the patch was made from ({want.get('reference')})")
    return problems


def apply(patch_folder: str | Path, base: str, tuned: str, output: str | Path, overwrite: bool = False, force: bool = False,
          progress: Progress = NullProgress()) -> ApplyRecord:
    """Write the patch applied to base and tuned at `output` (atomically, like a run); the record."""
    from surgeon.allocator import streaming
    from surgeon.engine.masks import MaskSet, write_repaired
    from surgeon.io.atomic import AtomicOutputDir
    from surgeon.io.preflight import check_compatible
    from surgeon.io.references import resolve_model, tokenizer_folder
    from surgeon.io.repaired import write_checkpoint
    from surgeon.publish.card import render_applied_card
    from surgeon.report import tool_identity

    patch = Patch.read(patch_folder)
    base_model = resolve_model(base)
    tuned_model = resolve_model(tuned, base=base_model)
    check_compatible(base_model, tuned_model)
    described = {"base": base_model.describe(), "tuned": tuned_model.describe()}
    mismatches = fingerprint_mismatches(patch, described)
    if mismatches and not force:
        raise InputError(f"{'; '.join(mismatches)}; --force applies it anyway (the card says so)", str(patch.folder))
    file = patch.folder / patch.manifest["file"]
    if patch.manifest["kind"] == "masks":
        masks = MaskSet.load(file)
        shapes, restored = masks.shapes, masks.count()
    else:
        get, shapes = patched(file, tuned_model)
        restored = None
    for name, shape in shapes.items():
        if name not in tuned_model.tensors.names() or tuple(tuned_model.tensors.shape(name)) != tuple(shape):
            raise InputError(f"the patch's {name} has shape {tuple(shape)}; tuned has no tensor of that name and shape", str(patch.folder))
    inputs = [patch.folder, *(f for m in (base_model, tuned_model) for f in (m.folder, *m.content_folders))]
    streaming()  # tensor by tensor: each freed as the next is read
    with AtomicOutputDir(Path(output), overwrite, inputs) as out:
        written = out.temporary
        settings = patch.manifest["output"]
        tokenizer = tokenizer_folder(tuned_model, base_model)
        if patch.manifest["kind"] == "masks":
            shards = write_repaired(written, base_model, tuned_model, masks, settings["dtype"], settings["max_shard_size"], tokenizer, progress)
            (written / patch.manifest["file"]).write_bytes(file.read_bytes())  # the output is a patch itself
            (written / MANIFEST).write_text(json.dumps(patch.manifest, indent=2) + "\n")
        else:
            shards = write_checkpoint(written, tuned_model, get, settings["dtype"], settings["max_shard_size"], tokenizer, progress)
        record = ApplyRecord(tool=tool_identity(), patch={"method": patch.manifest["method"], "kind": patch.manifest["kind"],
                                                          "made_by": patch.manifest["surgeon"]},
                             inputs=described, restored=restored, tensors=len(shapes), forced=bool(mismatches), mismatches=mismatches,
                             output={"shards": shards, "folder": out.destination.name})
        record.write(written / "surgeon.json")
        (written / "README.md").write_text(render_applied_card(record), encoding="utf-8")
        out.commit()
    return record
