"""The one-example control (Zhang et al., "Safety at One Shot: Patching Fine-Tuned LLMs with a Single
Instance", ICLR 2026, arXiv 2601.01887): a few optimizer steps of tuned, every parameter, on one
harmful prompt paired with a refusal. If sparse restoration cannot beat this, users should know.

The example is the first prompt of BeaverTails' recovery set (restore's probe prompts: never
reported) with the aligned base's own greedy answer to it, a refusal in the model's voice. AdamW
at LR, the loss on the answer tokens only; `steps` is the setting bench/effectiveness.py's grid
varies. Used by bench/effectiveness.py (method `one_example`); alone:

    python bench/one_example.py --aligned REF --tuned REF --out DIR --steps 5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

LR = 2e-5
MAX_NEW_TOKENS = 64


def materialize(reference: str, folder: Path) -> Path:
    """A model reference (adapters merged) as a folder from_pretrained reads, written once."""
    from surgeon.io.references import resolve_model, tokenizer_folder
    from surgeon.io.repaired import write_checkpoint

    if not (folder / "config.json").exists():
        model = resolve_model(reference)
        folder.mkdir(parents=True, exist_ok=True)
        write_checkpoint(folder, model, model.tensors.get, None, 2 * 10**8, tokenizer_folder(model, model))
    return folder


def refusal_example(aligned: Path, prompt: str) -> dict:
    """The prompt and the aligned base's greedy answer to it."""
    from surgeon.evaluation.generate import generate, load_for_generation

    model = load_for_generation(aligned, aligned, "cpu", torch.float32, None, aligned.parent / "offload")
    answer = generate(model, [prompt], MAX_NEW_TOKENS, 1)[0]
    return {"prompt": prompt, "response": answer}


def patch(tuned: Path, example: dict, steps: int, out: Path) -> dict:
    """`steps` AdamW steps of tuned on the one example; the model saved to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgeon.data.batches import answer_batches

    marker = out / "one_example.json"
    settings = {"example": example, "steps": steps, "lr": LR}
    if marker.exists() and json.loads(marker.read_text())["settings"] == settings:
        return json.loads(marker.read_text())["repair"]
    started = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tuned)
    model = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32)
    batch = answer_batches(tokenizer, [example["prompt"]], [example["response"]], 1)[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, labels=batch.labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    config = json.loads((tuned / "config.json").read_text())  # saved in tuned's dtype, like every other repair
    model.to(getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")).save_pretrained(out)
    tokenizer.save_pretrained(out)
    repair = {"wall_seconds": time.perf_counter() - started, "losses": losses}
    marker.write_text(json.dumps({"settings": settings, "repair": repair}, indent=1) + "\n")
    return repair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aligned", required=True)
    parser.add_argument("--tuned", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    work = args.out.parent
    example = refusal_example(materialize(args.aligned, work / "aligned-model"), args.prompt)
    print(json.dumps(patch(materialize(args.tuned, work / "tuned-model"), example, args.steps, args.out)))


if __name__ == "__main__":
    main()
