"""A plain in-memory implementation of the method contract (docs/method.md), independent of surgeon's engine.

Whole models in RAM, the model's own forward with output_hidden_states, autograd on
parameters, concatenated gradients for the top-k. Slow and memory-hungry on purpose:
it is what the streaming engine must agree with.
"""

from __future__ import annotations

import math

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.core_model_loading import revert_weight_conversion


def checkpoint_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder (masks.safetensors left out), in memory."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        if file.name != "masks.safetensors":
            tensors.update(load_file(file))
    return tensors


def _batches(tokenizer, prompts, batch_size):
    encoded = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        encoded.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(s)) + s for s in chunk])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in chunk])
        positions = torch.tensor([[0] * (width - len(s)) + list(range(len(s))) for s in chunk])
        batches.append((ids, mask, positions))
    return batches


def linear_input_sums(folder, prompts, statistic, batch_size=4) -> dict[str, torch.Tensor]:
    """For each decoder linear weight of the whole model in `folder` (fp32, in memory): the sum over
    the chat-templated prompts' real tokens of statistic(its inputs), from hooks on its own forward."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    sums, real = {}, {}

    def hook(name):
        def add(_, inputs, __):
            value = statistic(inputs[0][real["mask"]].float())
            sums[name] = sums[name] + value if name in sums else value

        return add

    hooks = [model.get_submodule(n[: -len(".weight")]).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for ids, mask, positions in _batches(tokenizer, prompts, batch_size):
            real["mask"] = mask.bool()
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    for handle in hooks:
        handle.remove()
    return sums


def _answer_batches(tokenizer, prompts, answers, batch_size):
    """Prompt+answer sequences, left-padded, labels -100 but on the answer's tokens (the chat
    template's assistant turn, end-of-turn included)."""
    encoded = []
    for prompt, answer in zip(prompts, answers):
        user = [{"role": "user", "content": prompt}]
        asked = tokenizer(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
        whole = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
        assert ids[: len(asked)] == asked
        encoded.append((ids, [-100] * len(asked) + ids[len(asked):]))
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        pad = lambda row, value: [value] * (width - len(row)) + row
        ids = torch.tensor([pad(i, tokenizer.pad_token_id) for i, _ in chunk])
        mask = torch.tensor([pad([1] * len(i), 0) for i, _ in chunk])
        positions = torch.tensor([pad(list(range(len(i))), 0) for i, _ in chunk])
        batches.append((ids, mask, positions, torch.tensor([pad(labels, -100) for _, labels in chunk])))
    return batches


def _h(model, batch, layer):
    ids, mask, positions = batch
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer][:, -1, :]


def _decoder_prefix(model) -> str:
    """The name of the model's list of num_hidden_layers modules: its decoder layers."""
    count = model.config.get_text_config().num_hidden_layers
    (name,) = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    return name + "."


def reference_repair(base_dir, tuned_dir, harmful, task, layer, sparsity, steps, rollback, ratio=0.2, batch_size=4, answers=None,
                     balance="tokens"):
    """Masks after `steps` steps (restore-only with accumulated gradients, or restore+rollback),
    named as the checkpoint names them: transformers' saving rules split fused parameters back.
    With `answers`, rollback's gradient is that of the task answers' loss instead of the task
    direction's: every answer token of the set weighs the same, or with balance "answers" every
    distinct answer does (the mean over distinct answers of their tokens' mean NLL)."""
    tokenizer = AutoTokenizer.from_pretrained(tuned_dir)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    base, tuned, model = load(base_dir), load(tuned_dir), load(tuned_dir)
    base_params, tuned_params = dict(base.named_parameters()), dict(tuned.named_parameters())
    params = dict(model.named_parameters())
    norms = {n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}
    prefix = _decoder_prefix(model)
    index = lambda n: int(n[len(prefix):].split(".")[0])
    # layer by layer, by name within a layer: equal |g| rank in this order (the contract's tie rule)
    scope = sorted((n for n in params if n.startswith(prefix) and index(n) < layer and n.rsplit(".", 1)[0] not in norms),
                   key=lambda n: (index(n), n))
    total = sum(p.numel() for n, p in params.items() if n.startswith(prefix))
    k = math.ceil(sparsity * total)
    H, T = _batches(tokenizer, harmful, batch_size), _batches(tokenizer, task, batch_size)
    with torch.no_grad():
        v_harm = torch.cat([_h(base, b, layer) for b in H]).mean(0)
        v_task = torch.cat([_h(tuned, b, layer) for b in T]).mean(0)
    masks = {n: torch.zeros_like(params[n], dtype=torch.bool) for n in scope}

    def set_theta():
        with torch.no_grad():
            for n in scope:
                params[n].copy_(torch.where(masks[n], base_params[n], tuned_params[n]))

    def gradient(batches, v):
        for b in batches:
            (-torch.nn.functional.cosine_similarity(_h(model, b, layer).mean(0), v, dim=0)).backward()

    answered = _answer_batches(tokenizer, task, answers, batch_size) if answers is not None else None

    def answer_gradient():
        counts = [int((row[1:] != -100).sum()) for *_, labels in answered for row in labels]
        if balance == "answers":  # row weight 1 / (tokens of every row with its answer), over the number of distinct answers
            group = {a: sum(c for b, c in zip(answers, counts) if b == a) for a in answers}
            weights, norm = [1 / group[a] for a in answers], len(group)
        else:
            weights, norm = [1.0] * len(answers), sum(counts)
        row = 0
        for ids, mask, positions, labels in answered:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=-100, reduction="none").sum(1)
            w = torch.tensor(weights[row : row + len(ids)])
            row += len(ids)
            ((nll * w).sum() / norm).backward()

    for _ in range(steps):
        if rollback:
            model.zero_grad(set_to_none=True)
        set_theta()
        gradient(H, v_harm)
        scores, owners, entries = [], [], []  # every candidate's |g|, its tensor's place in scope, its flat index
        for t, n in enumerate(scope):
            g = params[n].grad
            diff = params[n].detach() - base_params[n].detach()
            cand = ((torch.sign(diff) == torch.sign(g)) & (diff != 0)).flatten()
            idx = cand.nonzero().squeeze(1)
            scores.append(g.flatten()[idx].abs())
            owners.append(torch.full_like(idx, t))
            entries.append(idx)
        chosen = torch.sort(torch.cat(scores), descending=True, stable=True).indices[:k]
        owner, entry = torch.cat(owners)[chosen], torch.cat(entries)[chosen]  # in the order chosen
        for t, n in enumerate(scope):
            masks[n].view(-1)[entry[owner == t]] = True
        if rollback:
            set_theta()
            model.zero_grad(set_to_none=True)
            answer_gradient() if answered else gradient(T, v_task)
            d, g = torch.empty(len(entry)), torch.empty(len(entry))
            for t, n in enumerate(scope):
                at = owner == t
                d[at] = params[n].detach().view(-1)[entry[at]] - tuned_params[n].detach().view(-1)[entry[at]]
                g[at] = params[n].grad.view(-1)[entry[at]]
            picks = ((d != 0) & (g != 0) & (torch.sign(d) == torch.sign(g))).nonzero().squeeze(1)
            picks = picks[torch.sort(owner[picks] * (int(entry.max()) + 1 if entry.numel() else 1) + entry[picks], stable=True).indices]  # by tensor, then index
            count = math.ceil(ratio * len(picks))
            undo = picks[torch.sort(g[picks].abs(), descending=True, stable=True).indices[:count]]
            for t, n in enumerate(scope):
                masks[n].view(-1)[entry[undo][owner[undo] == t]] = False
            model.zero_grad(set_to_none=True)
    return revert_weight_conversion(model, masks), k
