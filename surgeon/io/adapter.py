"""A PEFT LoRA adapter seen as a full checkpoint: base tensors merged one at a time."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from surgeon.errors import IncompatibleModelsError, InputError, first_line
from surgeon.io.checkpoint import DerivedSource, PickleCheckpoint, SafetensorsCheckpoint, TensorSource, FiniteOnce

_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")


def _pattern_value(patterns: dict, module: str, default):
    """rank_pattern / alpha_pattern: peft's own key match (the end of the module name at a dot)."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def _read_config(folder: Path):
    """adapter_config.json through peft, which knows its fields and their defaults."""
    from peft import PeftConfig

    path = folder / "adapter_config.json"
    try:
        return PeftConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 -- peft builds its config classes from the file's values alone: any failure is one of them
        reason = first_line(exc)
        if not isinstance(exc, (OSError, ValueError)):  # peft's own messages say what is wrong; a KeyError's alone would not
            reason = f"{type(exc).__name__}: {reason}"
        raise InputError(f"cannot read adapter config: {reason}", str(path)) from None


def _check_merge_fields(config, where: str) -> None:
    """The fields the merge computes with, checked before it does: a NaN alpha would write NaN weights."""
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(getattr(config, field) or {}, dict):
            raise InputError(f"{field} is {getattr(config, field)!r}; it must map module names to numbers", where)
    numbers = [("r", config.r), ("lora_alpha", config.lora_alpha)]
    numbers += [(f"{field}[{key!r}]", value) for field in ("rank_pattern", "alpha_pattern") for key, value in (getattr(config, field) or {}).items()]
    for field, value in numbers:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InputError(f"{field} is {value!r}; it must be a positive number", where)
    for field in ("fan_in_fan_out", "use_rslora", "use_dora"):
        if not isinstance(getattr(config, field), bool):
            raise InputError(f"{field} is {getattr(config, field)!r}; it must be true or false", where)


class LoraMergedSource(DerivedSource, FiniteOnce):
    """tuned = base + scale * B @ A for every targeted weight, computed the way peft merges; each
    merged tensor checked for NaN/inf on its first read like a stored one (finite factors and a
    finite scale can still overflow the stored dtype)."""

    def __init__(self, base: TensorSource, folder: Path, allow_pickle: bool = False):
        DerivedSource.__init__(self, base)
        FiniteOnce.__init__(self)
        self.base = base
        self.folder = Path(folder)
        config = _read_config(self.folder)
        config_path = self.folder / "adapter_config.json"
        peft_type = str(config.peft_type.value if hasattr(config.peft_type, "value") else config.peft_type).upper()
        if peft_type != "LORA":
            raise InputError(f"only LoRA adapters can be merged, this one is {peft_type}", str(config_path))
        _check_merge_fields(config, str(config_path))
        if config.use_dora:
            raise InputError("DoRA adapters are not supported yet; merge it with peft first", str(config_path))
        weights = self._open_weights(allow_pickle)
        self._deltas: dict[str, tuple[str, str, float]] = {}
        self._replaced: dict[str, str] = {}
        parts: dict[str, dict[str, str]] = {}
        for key in weights.names():
            name = key.removeprefix(_PREFIX)
            match = _LORA.match(name)
            if match:
                parts.setdefault(match["module"], {})[match["part"]] = key
            elif "lora_" in name or "lora_magnitude" in name:
                raise InputError(f"adapter tensor '{key}' is of a kind surgeon cannot merge", str(self.folder))
            else:
                target = re.sub(r"\.modules_to_save\.[^.]+", "", name)
                self._check_target(target, weights.shape(key), key)
                self._replaced[target] = key
        for module, pair in parts.items():
            if set(pair) != {"A", "B"}:
                raise InputError(f"adapter module '{module}' lacks lora_A or lora_B", str(self.folder))
            rank = _pattern_value(config.rank_pattern or {}, module, config.r)
            alpha = _pattern_value(config.alpha_pattern or {}, module, config.lora_alpha)
            scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
            target = f"{module}.weight"
            out_features = weights.shape(pair["B"])[0]
            in_features = weights.shape(pair["A"])[1]
            expected = (in_features, out_features) if config.fan_in_fan_out else (out_features, in_features)
            self._check_target(target, expected, pair["A"])
            self._deltas[target] = (pair["A"], pair["B"], scale)
        self._fan_in_fan_out = bool(config.fan_in_fan_out)
        self._weights = weights
        if not self._deltas and not self._replaced:
            raise InputError("adapter holds no LoRA weights", str(self.folder))

    def _open_weights(self, allow_pickle: bool) -> TensorSource:
        files = sorted(self.folder.glob("adapter_model*.safetensors"))
        if files:
            return SafetensorsCheckpoint(files)
        pickles = sorted(self.folder.glob("adapter_model*.bin"))
        if pickles and allow_pickle:
            return PickleCheckpoint(pickles)
        if pickles:
            raise InputError("adapter weights are a pickle (.bin); set allow_pickle: true on this model to load them", str(self.folder))
        raise InputError("adapter folder has no adapter_model.safetensors", str(self.folder))

    def _check_target(self, target: str, shape, key: str) -> None:
        if target not in self.base.names():
            raise IncompatibleModelsError(f"adapter tensor '{key}' targets '{target}', which base does not have", str(self.folder))
        if tuple(shape) != tuple(self.base.shape(target)):
            raise IncompatibleModelsError(
                f"adapter tensor '{key}' implies shape {list(shape)} but base '{target}' is {list(self.base.shape(target))}",
                str(self.folder),
            )

    @property
    def merged_names(self) -> set[str]:
        return set(self._deltas) | set(self._replaced)

    def prefetch(self, names: list[str]) -> None:
        self.base.prefetch(names)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        return self.get(name)[ids] if name in self.merged_names else self.base.rows(name, ids)

    def gather(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        # a merged entry is the product's rounding, so it is taken from the merged tensor as a whole
        return self.get(name).flatten()[indices] if name in self.merged_names else self.base.gather(name, indices)

    def get(self, name: str) -> torch.Tensor:
        if name in self._replaced:
            return self._weights.get(self._replaced[name]).to(self.base.dtype(name))
        weight = self.base.get(name)
        if name not in self._deltas:
            return weight
        key_a, key_b, scale = self._deltas[name]
        lora_a, lora_b = self._weights.get(key_a), self._weights.get(key_b)
        delta = (lora_b.float() @ lora_a.float()) * scale
        if self._fan_in_fan_out:
            delta = delta.T
        # Like peft's in-place `weight += delta`: the sum is taken in the promoted dtype.
        return self._finite(name, (weight + delta.to(lora_b.dtype)).to(weight.dtype), f"{self.folder} merged into base")
