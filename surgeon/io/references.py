"""Resolve the model references of a recipe: local folders, Hub ids@revision, LoRA adapters."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from surgeon.errors import InputError
from surgeon.io.adapter import LoraMergedSource
from surgeon.io.checkpoint import PickleCheckpoint, SafetensorsCheckpoint, TensorSource
from surgeon.io.fingerprint import folder_fingerprint
from surgeon.recipe.hub_ids import split_hub_reference

# README.md: the model's card, whose licence and text the repaired model's card carries on
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*", "README.md"]
TOKENIZER_FILES = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
]


@dataclass
class ResolvedModel:
    """A model ready to stream: where its files are, its tensors, and where it came from."""

    reference: str
    folder: Path
    tensors: TensorSource
    config: dict
    config_folder: Path
    revision: str | None = None
    adapter_of: str | None = None
    content_folders: tuple[Path, ...] = ()  # every folder whose files make up the weights

    def __post_init__(self):
        if not self.content_folders:
            self.content_folders = (self.folder,)

    @property
    def tokenizer_folder(self) -> Path | None:
        """The folder holding this model's tokenizer: its own, else (an adapter's) base's, else None."""
        for folder in (self.folder, self.config_folder):
            if any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
                return folder
        return None

    def describe(self) -> dict:
        """How the published records name this model: a Hub input by id@commit, a local one by
        `./folder-name`, with a sha256 of each local folder's weights and config in `local`; never
        by a path on this machine."""
        folders = [Path(part).expanduser() for part in _parts(self.reference)]
        local = {local_name(f): "sha256:" + folder_fingerprint(f) for f in folders if f.exists()}
        return {
            "reference": portable_reference(self.reference, self.revision),
            "revision": self.revision,
            "adapter_of": portable_reference(self.adapter_of) if self.adapter_of else None,
            "local": local or None,
        }


def _parts(reference: str) -> list[str]:
    """`model+adapter[+adapter...]` as its parts; a folder whose name holds a '+' is one part."""
    return reference.split("+") if "+" in reference and not Path(reference).expanduser().exists() else [reference]


def local_name(path: Path | str) -> str:
    """How the published records name a local file or folder: `./name`, nothing of where it lies."""
    return f"./{Path(path).expanduser().resolve().name}"


def portable_reference(reference: str, revision: str | None = None) -> str:
    """A recipe reference that names nothing private: local folders as `./name`, a Hub id pinned
    to the commit it resolved to."""
    parts = _parts(reference)
    if len(parts) == 1 and revision and not Path(reference).expanduser().exists():
        return f"{reference.split('@')[0]}@{revision}"
    return "+".join(local_name(part) if Path(part).expanduser().exists() else part for part in parts)


def _download(reference: str, allow_pickle: bool) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, revision = split_hub_reference(reference)
    patterns = _HUB_FILES + (["*.bin"] if allow_pickle else [])
    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except RevisionNotFoundError:
        raise InputError(f"revision '{revision}' not found on the Hub", reference) from None
    except RepositoryNotFoundError:
        raise InputError("model not found on the Hub (or it is private and HF_TOKEN is not set)", reference) from None
    except LocalEntryNotFoundError:
        raise InputError("the Hub cannot be reached and the model is not in the local cache", reference) from None
    except HfHubHTTPError as exc:
        raise InputError(f"Hub download failed: {exc}".splitlines()[0], reference) from None
    # snapshot folders are named by the commit they hold
    return folder, folder.name


def _read_config(folder: Path, reference: str) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise InputError("model folder has no config.json", reference) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"config.json is not valid JSON: {exc}", reference) from None


_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size", "head_dim")
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def check_config(config: dict, tensors: TensorSource, where: str) -> None:
    """config.json's sizes against the checkpoint, before anything is built from them: a wrong one
    would hang building a billion layers or allocate a vocabulary of 10^12 rows. Each is a positive
    whole number; the layer count is the checkpoint's; the vocabulary is an embedding's row count."""
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for key in _SIZES:
        value = text_config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise InputError(f"config.json: {key} is {value!r}; it must be a positive whole number", where)
    names = tensors.names()
    layers = {int(m.group(1)) for name in names if (m := _LAYER_INDEX.search(name))}
    declared = text_config.get("num_hidden_layers")
    if layers and declared is not None and declared != max(layers) + 1:
        raise InputError(f"config.json says {declared} decoder layers; the checkpoint holds {max(layers) + 1}", where)
    vocabulary = text_config.get("vocab_size")
    if vocabulary is not None and not any(len(tensors.shape(n)) == 2 and tensors.shape(n)[0] == vocabulary for n in names):
        raise InputError(f"config.json: vocab_size {vocabulary} is the row count of no embedding in the checkpoint", where)


def _checkpoint(folder: Path, reference: str, allow_pickle: bool) -> TensorSource:
    if sorted(folder.glob("*.safetensors")):
        return SafetensorsCheckpoint.from_folder(folder)
    pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    if pickles and allow_pickle:
        return PickleCheckpoint(pickles)
    if pickles:
        raise InputError("checkpoint is a pickle (.bin/.pt), which can run code; set allow_pickle: true on this model to load it with weights_only", reference)
    raise InputError("model folder has no .safetensors files", reference)


def _names(reference: str) -> set[str]:
    """What a model reference may be recorded as elsewhere: its Hub id, path, and last path part."""
    bare = reference.split("@")[0].rstrip("/")
    return {bare.casefold(), Path(bare).name.casefold(), str(Path(bare).expanduser().resolve()).casefold()}


def _check_adapter_base(folder: Path, reference: str, base: ResolvedModel) -> None:
    """An adapter trained on another model merges into base as long as shapes match, and repairs the
    wrong model: the base its adapter_config.json records must be base (by Hub id, path or folder
    name; a chain of adapters is compared at the model it starts from)."""
    try:
        recorded = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, AttributeError):
        return  # peft's own reading reports a broken adapter_config.json
    if not isinstance(recorded, str) or not recorded.strip():
        return
    first = _parts(base.reference)[0]
    known = _names(first)
    if isinstance(base.config.get("_name_or_path"), str) and base.config["_name_or_path"]:
        known |= _names(base.config["_name_or_path"])
    if not _names(recorded) & known:
        raise InputError(f"this adapter was trained on '{recorded}', not on base '{first}'; set any_base: true on it in the "
                         "recipe to apply it anyway (the card says so)", reference)


def resolve_model(reference: str, allow_pickle: bool = False, base: ResolvedModel | None = None, any_base: bool = False) -> ResolvedModel:
    """A local folder wins over a Hub id of the same spelling. Adapters need `base`, and must have
    been trained on it unless `any_base`. `model+adapter[+adapter...]` is the model with each LoRA
    adapter merged on in turn."""
    if len(_parts(reference)) > 1:
        first, *adapters = _parts(reference)
        model = resolve_model(first, allow_pickle, base)
        for adapter in adapters:
            merged = resolve_model(adapter, allow_pickle, base=model, any_base=any_base)
            if merged.adapter_of is None:
                raise InputError(f"'{adapter}' follows a '+' but is not an adapter folder (no adapter_config.json)", reference)
            model = ResolvedModel(reference, merged.folder, merged.tensors, model.config, model.config_folder,
                                  merged.revision, adapter_of=model.adapter_of or first, content_folders=merged.content_folders)
        return model
    folder = Path(reference).expanduser()
    revision = None
    if not folder.exists():
        if split_hub_reference(reference) is None:
            raise InputError("no such folder, and not a Hub id of the form org/name[@revision]", reference)
        folder, revision = _download(reference, allow_pickle)
    if not folder.is_dir():
        raise InputError("a model reference must be a folder (or a Hub id), not a file", reference)
    if (folder / "adapter_config.json").exists():
        if base is None:
            raise InputError("this is an adapter; it can only be the tuned model, applied to base", reference)
        if not any_base:
            _check_adapter_base(folder, reference, base)
        return ResolvedModel(
            reference=reference, folder=folder, tensors=LoraMergedSource(base.tensors, folder, allow_pickle),
            config=base.config, config_folder=base.config_folder, revision=revision, adapter_of=base.reference,
            content_folders=base.content_folders + (folder,),
        )
    tensors = _checkpoint(folder, reference, allow_pickle)
    config = _read_config(folder, reference)
    check_config(config, tensors, str(folder / "config.json"))
    return ResolvedModel(reference=reference, folder=folder, tensors=tensors, config=config, config_folder=folder, revision=revision)


def tokenizer_folder(tuned: ResolvedModel, base: ResolvedModel) -> Path:
    """tuned's tokenizer (the chat template it was trained with), else base's."""
    folder = tuned.tokenizer_folder or base.tokenizer_folder
    if folder is None:
        raise InputError("neither tuned nor base has tokenizer files (tokenizer.json or tokenizer_config.json)", tuned.reference)
    return folder
