"""Everything surgeon loads through transformers' from_pretrained, loaded one safe way: no code from
a model folder ever runs (trust_remote_code=False: a config whose auto_map names custom classes is
read with transformers' own, or refused), and a folder holding safetensors is never read from a
pickle beside them (use_safetensors), whatever file from_pretrained would prefer."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub.errors import StrictDataclassError

from surgeon.errors import InputError, first_line


_UNREADABLE = (ValueError, OSError, KeyError, TypeError, StrictDataclassError)


def _loaded(load, folder: Path, what: str, unreadable: tuple[type[Exception], ...] = _UNREADABLE):
    try:
        return load()
    except unreadable as exc:
        # transformers says "trust_remote_code" when a folder needs its own code; anything else is a
        # folder it cannot read (its config classes validate their fields with huggingface_hub's strict
        # dataclasses): one line either way, naming the folder
        reason = first_line(exc)
        if "trust_remote_code" in str(exc):
            reason = "it needs custom code from the model folder (auto_map), which surgeon never runs"
        raise InputError(f"cannot load the {what}: {reason}", str(folder)) from None


def config(folder: Path):
    from transformers import AutoConfig

    # reading config.json builds nothing but the config: any failure is a value in the file
    return _loaded(lambda: AutoConfig.from_pretrained(folder, trust_remote_code=False), folder, "config", (Exception,))


def tokenizer(folder: Path, config=None):
    """With the model's `config`, the tokenizer's model_max_length is at most the model's context
    (max_position_embeddings), so that a prompt too long for the model is refused when it is tokenized."""
    from transformers import AutoTokenizer

    loaded = _loaded(lambda: AutoTokenizer.from_pretrained(folder, trust_remote_code=False), folder, "tokenizer")
    context = getattr(config.get_text_config(), "max_position_embeddings", None) if config is not None else None
    if isinstance(context, int) and context > 0:
        loaded.model_max_length = min(loaded.model_max_length, context)
    return loaded


def _has_safetensors(folder: Path) -> bool:
    return any(Path(folder).glob("*.safetensors"))


def causal_lm(folder: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return _loaded(lambda: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, use_safetensors=_has_safetensors(folder), **kwargs),
                   folder, "model")


def sequence_classifier(folder: Path):
    from transformers import AutoModelForSequenceClassification

    return _loaded(lambda: AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=False,
                                                                              use_safetensors=_has_safetensors(folder)), folder, "classifier")
