"""Chat-templated prompts, left-padded batches in file order, positions that ignore padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.errors import InputError

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None
    weights: torch.Tensor | None = None  # each label token's weight in an answer loss (1 where unset)

    @property
    def position_ids(self) -> torch.Tensor:
        # Padding never shifts positions: each row counts from its first real token.
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def answer_predictions(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden states that predict an answer token (one position before it), and those tokens."""
        targets = self.labels[:, 1:].to(hidden.device)
        wanted = targets != IGNORE
        return hidden[:, :-1][wanted], targets[wanted]

    def answer_weights(self) -> torch.Tensor:
        """The weight of each token `answer_predictions` returns: a loss is the weighted mean of their NLL."""
        wanted = self.labels[:, 1:] != IGNORE
        return torch.ones(int(wanted.sum())) if self.weights is None else self.weights[:, 1:][wanted]


def _messages(prompt: str | list[dict], system_prompt: str | None) -> list[dict]:
    """A prompt as a conversation; a conversation (a guard's user and assistant turns) as it is."""
    if isinstance(prompt, list):
        return prompt
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """A conversation's ids; one longer than the model's context is refused (the model would read it
    for minutes and answer from positions it never learnt)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) > tokenizer.model_max_length:
        opening = " ".join(str(messages[-1]["content"]).split())[:40]
        raise InputError(f"a conversation is {len(ids):,} tokens with its chat template, longer than the model's context of "
                         f"{tokenizer.model_max_length:,} tokens; shorten it or leave it out", f"the one ending '{opening}...'")
    return ids


def prompt_ids(tokenizer, prompts: list[str] | list[list[dict]], system_prompt: str | None = None) -> list[list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the tokenizer has no chat template; surgeon probes the model as a chat model", getattr(tokenizer, "name_or_path", None))
    return [_ids(tokenizer, _messages(p, system_prompt), True) for p in prompts]


def answer_ids(tokenizer, prompts: list[str], answers: list[str], system_prompt: str | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) pairs; the answer includes the template's end-of-turn tokens."""
    pairs = []
    for prompt_tokens, prompt, answer in zip(prompt_ids(tokenizer, prompts, system_prompt), prompts, answers):
        messages = _messages(prompt, system_prompt) + [{"role": "assistant", "content": answer}]
        full = _ids(tokenizer, messages, False)
        if full[: len(prompt_tokens)] == prompt_tokens and len(full) > len(prompt_tokens):
            pairs.append((prompt_tokens, full[len(prompt_tokens):]))
        else:
            tail = tokenizer(answer, add_special_tokens=False)["input_ids"]
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            pairs.append((prompt_tokens, tail + eos))
    return pairs


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate


def left_padded(sequences: list[list[int]], pad_id: int, labels: list[list[int]] | None = None, weights: list[float] | None = None) -> Batch:
    """`weights`: one per sequence, given to each of its label tokens."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    label_tensor = torch.full((len(sequences), width), IGNORE, dtype=torch.long) if labels is not None else None
    weight_tensor = torch.zeros((len(sequences), width)) if weights is not None else None
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
        mask[row, width - len(sequence):] = 1
        if labels is not None:
            label_tensor[row, width - len(sequence):] = torch.tensor(labels[row], dtype=torch.long)
        if weight_tensor is not None:
            weight_tensor[row, width - len(sequence):] = weights[row]
    return Batch(ids, mask, label_tensor, weight_tensor)


def _batched(tokenizer, ids: list[list[int]], batch_size: int) -> list[Batch]:
    pad = _pad_id(tokenizer)
    return [left_padded(ids[i : i + batch_size], pad) for i in range(0, len(ids), batch_size)]


def prompt_batches(tokenizer, prompts: list[str] | list[list[dict]], batch_size: int, system_prompt: str | None = None) -> list[Batch]:
    """Batches of the prompts in file order (a gradient pass's order is the method's)."""
    return _batched(tokenizer, prompt_ids(tokenizer, prompts, system_prompt), batch_size)


def length_sorted_batches(tokenizer, prompts: list[str] | list[list[dict]], batch_size: int,
                          system_prompt: str | None = None) -> tuple[list[Batch], list[int]]:
    """Batches of the prompts shortest templated prompt first (ties in file order), and that order
    as indices into `prompts`: a batch pads its rows to nearly one length instead of to the longest
    of any `batch_size` (for generation, whose answers go back to prompt order)."""
    ids = prompt_ids(tokenizer, prompts, system_prompt)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return _batched(tokenizer, [ids[i] for i in order], batch_size), order


def answer_weights(answers: list[str], answer_tokens: list[int]) -> list[float]:
    """Per answer, the weight of each of its tokens when every distinct answer weighs the same in
    a loss: 1 / the token count of all the answers equal to it. On a classification task whose
    labels are imbalanced, the minority label's answers then count as much as the majority's."""
    totals: dict[str, int] = {}
    for answer, count in zip(answers, answer_tokens):
        totals[answer.strip()] = totals.get(answer.strip(), 0) + count
    return [1.0 / totals[answer.strip()] for answer in answers]


def answer_batches(tokenizer, prompts: list[str], answers: list[str], batch_size: int, system_prompt: str | None = None,
                   balance: str = "tokens") -> list[Batch]:
    """Prompt+answer sequences whose labels are the answer tokens only (teacher forcing). `balance`:
    "tokens" (every answer token weighs the same in a loss) or "answers" (every distinct answer does)."""
    pairs = answer_ids(tokenizer, prompts, answers, system_prompt)
    weights = answer_weights(answers, [len(a) for _, a in pairs]) if balance == "answers" else None
    pad = _pad_id(tokenizer)
    batches = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        sequences = [p + a for p, a in chunk]
        labels = [[IGNORE] * len(p) + a for p, a in chunk]
        batches.append(left_padded(sequences, pad, labels, weights[i : i + batch_size] if weights else None))
    return batches
