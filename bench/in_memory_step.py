"""One restore-only step done the plain way, for bench/scale.py to compare with: both models whole
in RAM (fp32), the model's own forward through the first E layers, autograd on every parameter,
one torch.topk over the concatenated scores of every in-scope weight, and the repaired model
written with save_pretrained (the job surgeon does, output included).

    python bench/in_memory_step.py BASE TUNED OUT --layer E --sparsity 0.002 --prompts P [P ...]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgeon.data.batches import prompt_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("tuned")
    parser.add_argument("out")
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--sparsity", type=float, required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompts", nargs="+", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    load = lambda folder: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    base, model = load(args.base), load(args.tuned)
    tokenizer = AutoTokenizer.from_pretrained(args.tuned)
    E = args.layer
    total = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers."))
    with safe_open(str(next(Path(args.tuned).glob("*.safetensors"))), framework="pt") as handle:
        tuned_dtype = handle.get_tensor(next(iter(handle.keys()))).dtype
    full_layers = model.model.layers
    for m in (base, model):
        m.model.layers = m.model.layers[:E]  # only the probed layers run
    batches = prompt_batches(tokenizer, args.prompts, args.batch_size)

    def last_hidden(m, batch):
        out = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                output_hidden_states=True, use_cache=False)
        return out.hidden_states[E][:, -1, :]

    with torch.no_grad():
        v_harm = torch.cat([last_hidden(base, b) for b in batches]).mean(0)
    step_started = time.perf_counter()  # the step as surgeon's report times it: gradients and the selection
    for batch in batches:
        (-torch.nn.functional.cosine_similarity(last_hidden(model, batch).mean(0), v_harm, dim=0)).backward()
    norms = {n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}
    base_params = dict(base.named_parameters())
    scores, params = [], []
    for name, param in model.named_parameters():
        if not name.startswith("model.layers.") or name.rsplit(".", 1)[0] in norms:
            continue
        diff = param.detach() - base_params[name].detach()
        candidate = (torch.sign(diff) == torch.sign(param.grad)) & (diff != 0)
        scores.append(torch.where(candidate, param.grad.abs(), torch.full_like(param.grad, -1.0)).flatten())
        params.append((name, param))
    chosen = torch.topk(torch.cat(scores), math.ceil(args.sparsity * total)).indices
    step = time.perf_counter() - step_started
    with torch.no_grad():  # restore the chosen entries, then write the whole model in tuned's dtype
        offsets = torch.tensor([0] + [p.numel() for _, p in params]).cumsum(0)
        for (name, param), start, end in zip(params, offsets[:-1], offsets[1:]):
            mine = chosen[(chosen >= start) & (chosen < end)] - start
            param.view(-1)[mine] = base_params[name].detach().view(-1)[mine]
    model.model.layers = full_layers
    model.to(tuned_dtype).save_pretrained(args.out)
    print(f"in-memory step: {chosen.numel():,} weights restored and written in {time.perf_counter() - started:.1f} s; step {step:.3f} s")


if __name__ == "__main__":
    main()
