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

    def answer_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def _messages(prompt: str | list[dict], system_prompt: str | None) -> list[dict]:
    """A prompt as a conversation; a conversation (a guard's user and assistant turns) as it is."""
    if isinstance(prompt, list):
        return prompt
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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


def left_padded(sequences: list[list[int]], pad_id: int, labels: list[list[int]] | None = None) -> Batch:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    label_tensor = torch.full((len(sequences), width), IGNORE, dtype=torch.long) if labels is not None else None
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
        mask[row, width - len(sequence):] = 1
        if labels is not None:
            label_tensor[row, width - len(sequence):] = torch.tensor(labels[row], dtype=torch.long)
    return Batch(ids, mask, label_tensor)


def prompt_batches(tokenizer, prompts: list[str] | list[list[dict]], batch_size: int, system_prompt: str | None = None) -> list[Batch]:
    ids = prompt_ids(tokenizer, prompts, system_prompt)
    pad = _pad_id(tokenizer)
    return [left_padded(ids[i : i + batch_size], pad) for i in range(0, len(ids), batch_size)]


def answer_batches(tokenizer, prompts: list[str], answers: list[str], batch_size: int, system_prompt: str | None = None) -> list[Batch]:
    """Prompt+answer sequences whose labels are the answer tokens only (teacher forcing)."""
    pairs = answer_ids(tokenizer, prompts, answers, system_prompt)
    pad = _pad_id(tokenizer)
    batches = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        sequences = [p + a for p, a in chunk]
        labels = [[IGNORE] * len(p) + a for p, a in chunk]
        batches.append(left_padded(sequences, pad, labels))
    return batches
