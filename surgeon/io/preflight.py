"""Compare base and tuned from configs and safetensors headers alone, before any heavy work."""

from __future__ import annotations

from surgeon.errors import IncompatibleModelsError
from surgeon.io.references import ResolvedModel

_CONFIG_KEYS = ("model_type", "architectures", "num_hidden_layers", "hidden_size", "vocab_size", "intermediate_size", "num_attention_heads")


def _short(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def mismatches(base: ResolvedModel, tuned: ResolvedModel) -> list[str]:
    problems = []
    for key in _CONFIG_KEYS:
        if base.config.get(key) != tuned.config.get(key):
            problems.append(f"config {key}: base {base.config.get(key)!r} vs tuned {tuned.config.get(key)!r}")
    base_names, tuned_names = set(base.tensors.names()), set(tuned.tensors.names())
    if missing := sorted(base_names - tuned_names):
        problems.append(f"{len(missing)} tensor(s) only in base, e.g. {missing[0]}")
    if extra := sorted(tuned_names - base_names):
        problems.append(f"{len(extra)} tensor(s) only in tuned, e.g. {extra[0]}")
    for name in sorted(base_names & tuned_names):
        if base.tensors.shape(name) != tuned.tensors.shape(name):
            problems.append(f"shape of {name}: base {list(base.tensors.shape(name))} vs tuned {list(tuned.tensors.shape(name))}")
        elif base.tensors.dtype(name) != tuned.tensors.dtype(name):
            problems.append(f"dtype of {name}: base {_short(base.tensors.dtype(name))} vs tuned {_short(tuned.tensors.dtype(name))}")
    return problems


def check_compatible(base: ResolvedModel, tuned: ResolvedModel) -> None:
    problems = mismatches(base, tuned)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise IncompatibleModelsError(f"base and tuned differ: {'; '.join(problems[:3])}{more}", f"{base.reference} vs {tuned.reference}")
