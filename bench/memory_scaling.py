"""Peak RSS of `surgeon run` as the model grows in depth: the layered engine's memory bound.

Random Llama-shaped models of one layer width (hidden 512, MLP 1536: ~3.4 M parameters a layer)
and 8 to 72 layers, repaired for one restore-only step on the tiny example's prompts. With the
default budget, accumulated gradients (one float per in-scope weight) stay in RAM; with
compute.max_memory set low they spill to disk, and peak RSS should not follow model size.

    python bench/memory_scaling.py [--layers 8 24 72] [--work /tmp/surgeon-scaling]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from surgeon.tiny import HARMFUL, TASK, build_tokenizer
from timed_run import surgeon_run


def make_models(root: Path, layers: int) -> tuple[Path, Path]:
    base, tuned = root / f"L{layers}-base", root / f"L{layers}-tuned"
    if (tuned / "config.json").exists():
        return base, tuned
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(layers)
    model = AutoModelForCausalLM.from_config(config)
    for folder in (base, tuned):
        model.save_pretrained(folder, max_shard_size="200MB")
        tokenizer.save_pretrained(folder)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.startswith("model.layers."):
                    param.add_(torch.randn_like(param) * 0.01)
    return base, tuned


def peak_rss(recipe: Path) -> tuple[float, dict]:
    run = surgeon_run(recipe)
    report = json.loads((recipe.parent / f"{recipe.stem}-out" / "surgeon.json").read_text())
    return run.peak_rss_gib, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 24, 72])
    parser.add_argument("--work", type=Path, default=Path("/tmp/surgeon-scaling"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print("| layers | params per model | checkpoint (fp32) | peak RSS, default budget | peak RSS, max_memory 64MiB | spilled | layers held at once |")
    print("|---|---|---|---|---|---|---|")
    for layers in args.layers:
        base, tuned = make_models(args.work, layers)
        size = sum(p.stat().st_size for p in tuned.glob("*.safetensors"))
        figures = []
        for budget in (None, "64MiB"):
            recipe = args.work / f"L{layers}-{budget or 'default'}.yaml"
            recipe.write_text(json.dumps({
                "base": str(base), "tuned": str(tuned),
                "data": {"harmful": {"prompts": HARMFUL}, "task": {"prompts": TASK}},
                "restore": {"steps": 1, "warmup": 0, "rollback": {"mode": "never"}},
                "compute": {"device": "cpu", "max_memory": budget},
                "output": {"path": str(recipe.parent / f"{recipe.stem}-out"), "max_shard_size": "200MB"},
            }))
            figures.append(peak_rss(recipe))
        (default_rss, _), (small_rss, report) = figures
        print(f"| {layers} | {size / 4 / 1e6:.0f} M | {size / 1e6:.0f} MB | {default_rss:.2f} GiB | {small_rss:.2f} GiB | "
              f"{report['memory']['spilled_bytes'] / 1e6:.0f} MB | {report['memory']['max_decoder_layers_materialized']} |")


if __name__ == "__main__":
    main()
