"""Write a checkpoint in tuned's names, layout and files, each tensor's value from a function
(a method's tensors, or `engine.masks.write_repaired`'s where(mask, base, tuned))."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from surgeon.io.references import TOKENIZER_FILES, ResolvedModel
from surgeon.io.writer import TensorEntry, write_sharded
from surgeon.progress import NullProgress, Progress

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def planned_dtypes(tuned: ResolvedModel, dtype: str | None) -> dict[str, torch.dtype]:
    """Each tensor's dtype in the output: output.dtype for floating tensors where set, else tuned's."""
    out_dtype, source = DTYPES[dtype] if dtype else None, tuned.tensors
    return {n: out_dtype if out_dtype and source.dtype(n).is_floating_point else source.dtype(n) for n in source.names()}


def write_checkpoint(
    folder: Path,
    tuned: ResolvedModel,
    get: Callable[[str], torch.Tensor],
    dtype: str | None,
    max_shard_bytes: int,
    tokenizer_folder: Path,
    progress: Progress = NullProgress(),
) -> list[str]:
    """tuned's tensor names and layout, each value from `get`, plus tuned's config and tokenizer."""
    planned = planned_dtypes(tuned, dtype)
    entries = [TensorEntry(n, tuned.tensors.shape(n), planned[n]) for n in tuned.tensors.names()]
    shards = write_sharded(folder, entries, lambda n: get(n).to(planned[n]), max_shard_bytes, progress)
    _copy_model_files(folder, tuned, tokenizer_folder, dtype)
    return shards


def _copy_model_files(folder: Path, tuned: ResolvedModel, tokenizer_folder: Path, dtype: str | None) -> None:
    """config and generation config from tuned (base's for an adapter), and the tokenizer used."""
    config = dict(tuned.config)
    if dtype:
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = tuned.config_folder / "generation_config.json"
    if generation.exists():
        shutil.copyfile(generation, folder / "generation_config.json")
    for name in TOKENIZER_FILES:
        source = tokenizer_folder / name
        if source.exists():
            shutil.copyfile(source, folder / name)
