"""A safety patch: the repair itself, re-appliable to the models it was made from.

A run whose method chose weights (restore, antidote) writes, beside the checkpoint, `masks.safetensors`
(one bit per in-scope weight, 1 = taken from base) and `patch.json`:

    {"format": "surgeon-patch", "version": 1, "kind": "masks", "method": "restore",
     "masks": "masks.safetensors", "base": {...}, "tuned": {...},
     "output": {"dtype": null, "max_shard_size": 5000000000}, "surgeon": {...}}

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

FORMAT, VERSION, MANIFEST = "surgeon-patch", 1, "patch.json"


def manifest(method: str, described: dict, dtype: str | None, max_shard_bytes: int, tool: dict) -> dict:
    """patch.json of a mask repair: what to apply, to which models, written how."""
    return {"format": FORMAT, "version": VERSION, "kind": "masks", "method": method, "masks": "masks.safetensors",
            "base": described["base"], "tuned": described["tuned"], "output": {"dtype": dtype, "max_shard_size": max_shard_bytes},
            "surgeon": tool}


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
        if data.get("kind") != "masks" or not (folder / str(data.get("masks"))).is_file():
            raise InputError("the patch names no masks file that is there", str(path))
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
          progress: Progress = NullProgress()) -> dict:
    """Write the patch applied to base and tuned at `output` (atomically, like a run); the record."""
    from surgeon.engine.masks import MaskSet
    from surgeon.io.atomic import AtomicOutputDir
    from surgeon.io.preflight import check_compatible
    from surgeon.io.references import resolve_model, tokenizer_folder
    from surgeon.io.repaired import write_repaired
    from surgeon.publish.card import render_applied_card
    from surgeon.report import tool_identity, write_report

    patch = Patch.read(patch_folder)
    base_model = resolve_model(base)
    tuned_model = resolve_model(tuned, base=base_model)
    check_compatible(base_model, tuned_model)
    described = {"base": base_model.describe(), "tuned": tuned_model.describe()}
    mismatches = fingerprint_mismatches(patch, described)
    if mismatches and not force:
        raise InputError(f"{'; '.join(mismatches)}; --force applies it anyway (the card says so)", str(patch.folder))
    masks = MaskSet.load(patch.folder / patch.manifest["masks"])
    for name, shape in masks.shapes.items():
        if name not in tuned_model.tensors.names() or tuple(tuned_model.tensors.shape(name)) != tuple(shape):
            raise InputError(f"the patch's mask of {name} has shape {tuple(shape)}; tuned has no tensor of that name and shape", str(patch.folder))
    inputs = [patch.folder, *(f for m in (base_model, tuned_model) for f in (m.folder, *m.content_folders))]
    with AtomicOutputDir(Path(output), overwrite, inputs) as out:
        written = out.temporary
        settings = patch.manifest["output"]
        shards = write_repaired(written, base_model, tuned_model, masks, settings["dtype"], settings["max_shard_size"],
                                tokenizer_folder(tuned_model, base_model), progress)
        (written / patch.manifest["masks"]).write_bytes((patch.folder / patch.manifest["masks"]).read_bytes())
        (written / MANIFEST).write_text(json.dumps(patch.manifest, indent=2) + "\n")
        record = {"tool": tool_identity(), "method": "apply", "patch": {"method": patch.manifest["method"], "made_by": patch.manifest["surgeon"]},
                  "inputs": described, "restored": masks.count(), "forced": bool(mismatches), "mismatches": mismatches,
                  "output": {"shards": shards, "folder": out.destination.name}}
        write_report(written / "surgeon.json", record)
        (written / "README.md").write_text(render_applied_card(record), encoding="utf-8")
        out.commit()
    return record
