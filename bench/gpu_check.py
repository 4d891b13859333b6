"""One prepared GPU check: a 7B-shaped random pair, one restore step, and what the GPU did.

Builds a Llama-2-7B-shaped pair (32 layers, hidden 4096, MLP 11008, bf16) tensor by tensor on
disk (tuned = base + noise on the decoder layers; nothing holds a whole model), runs `surgeon run`
for one restore-only step on 16 prompts with fp32 arithmetic, and prints peak GPU memory, the
prompt tokens the gradient pass processed per second, and that pass's arithmetic as a share of
the GPU's measured fp32 matmul throughput. `--shape tiny` runs the same on CPU in seconds, which
is how the script is tested before a GPU is lent. With `--processes N` (default: one per visible
GPU) the same step runs again data-parallel under torchrun, and its time is compared.

    python bench/gpu_check.py [--shape 7b|tiny] [--device cuda] [--work /tmp/surgeon-gpu] [--processes N]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timed_run import surgeon_run  # noqa: E402

from surgeon.io.writer import TensorEntry, write_sharded  # noqa: E402
from surgeon.tiny import HARMFUL, TASK, build_tokenizer  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, vocab_size=32000),
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "0.37b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}


def write_pair(root: Path, shape: str, dtype: torch.dtype) -> tuple[Path, Path]:
    """Random base and tuned (base + 1% noise on decoder weights), streamed tensor by tensor.
    The folders are named by shape and dtype and reused when they exist."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_tokenizer()
    config = LlamaConfig(**SHAPES[shape], pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    entries = [TensorEntry(name, tuple(p.shape), dtype) for name, p in skeleton.named_parameters()]
    tag = f"{shape}-{str(dtype).removeprefix('torch.')}"
    folders = root / f"{tag}-base", root / f"{tag}-tuned"
    for noise, folder in zip((0.0, 0.01), folders):
        if (folder / "config.json").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)

        def tensor(name: str, noise=noise) -> torch.Tensor:
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            shape_ = next(e.shape for e in entries if e.name == name)
            if name.endswith("norm.weight"):
                value = torch.ones(shape_)
            else:
                value = torch.randn(shape_, generator=generator) * 0.02
            if noise and name.startswith("model.layers."):
                value += torch.randn(shape_, generator=generator) * noise * 0.02
            return value.to(dtype)

        write_sharded(folder, entries, tensor, 2 * 10**9)
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folders


def gradient_pass_work(report: dict, prompts: list[str], recompute: bool = True) -> tuple[int, float]:
    """(prompt tokens, arithmetic) of one restore step's gradient pass over the first E layers:
    the forward (2P a token) and the backward (4P), P the parameters of a layer, plus a recomputed
    forward (2P) for each layer whose autograd graphs the pass could not keep (none with
    recompute=False: an implementation that keeps every graph, as the in-memory one)."""
    tokenizer = build_tokenizer()
    tokens = 0
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    layer_params = report["decoder_parameters_N"] / report["settings"]["layers_L"]
    layers = report["settings"]["probe_layer"]
    recomputed = layers - report["memory"].get("graphs_kept", {}).get("layers", 0) if recompute else 0
    return tokens, 2 * layer_params * tokens * (3 * layers + recomputed)


def matmul_flops(device: str, dtype: torch.dtype, size: int) -> float:
    """Measured matmul throughput (FLOP/s) of this device in the compute dtype: the ceiling."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    repeats, started = 10, time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/surgeon-gpu"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--processes", type=int, default=max(1, torch.cuda.device_count()), help="also run data-parallel on N processes")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base, tuned = write_pair(args.work, args.shape, torch.bfloat16)
    print(f"pair written in {time.perf_counter() - started:.0f} s", flush=True)
    prompts = (HARMFUL * math.ceil(args.prompts / len(HARMFUL)))[: args.prompts]
    recipe = {
        "base": str(base), "tuned": str(tuned),
        "data": {"harmful": {"prompts": prompts}, "task": {"prompts": TASK}},
        "probe": {"batch_size": 8}, "restore": {"sparsity": 0.002, "steps": 1, "warmup": 0, "save_every": 1, "rollback": {"mode": "never"}},
        "evaluate": {"models": []},
        "compute": {"device": args.device, "dtype": "float32"}, "output": {"path": str(args.work / "out"), "max_shard_size": "2GB"},
    }
    path = args.work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = surgeon_run(path)
    report = json.loads((args.work / "out" / "surgeon.json").read_text())
    step = report["record"]["steps"][0]["seconds"]
    E = report["settings"]["probe_layer"]
    tokens, flops = gradient_pass_work(report, prompts)
    ceiling = matmul_flops(args.device, torch.float32, 8192 if args.device.startswith("cuda") else 512)
    peak = report["peak_memory"].get("cuda_bytes")
    print(f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}, shape {args.shape}, E {E}, "
          f"{tokens} prompt tokens, k {report['settings']['budget']:,}")
    print(f"surgeon run: {run.wall_seconds:.0f} s wall, peak RSS {run.peak_rss_gib:.2f} GiB"
          + (f", peak GPU memory {peak / 2**30:.2f} GiB" if peak else ""))
    print(f"restore step: {step:.1f} s, {tokens * E / step:.0f} token-layers/s, {flops / step / 1e12:.2f} TFLOP/s "
          f"= {flops / step / ceiling:.1%} of this device's measured fp32 matmul ({ceiling / 1e12:.1f} TFLOP/s)")
    if args.processes > 1:
        parallel = surgeon_run(path, processes=args.processes)
        shared = json.loads((args.work / "out" / "surgeon.json").read_text())
        seconds = shared["record"]["steps"][0]["seconds"]
        print(f"{shared['settings']['world_size']} processes: surgeon run {parallel.wall_seconds:.0f} s wall, restore step {seconds:.1f} s "
              f"({step / seconds:.2f}x one process), the same {shared['restored']['total']:,} weights: "
              f"{shared['restored']['total'] == report['restored']['total']}")


if __name__ == "__main__":
    main()
