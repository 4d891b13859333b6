"""Batched greedy decoding through the chat template, on a fully loaded model."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from surgeon.data.batches import length_sorted_batches
from surgeon.processes import SOLO, Collective
from surgeon.progress import NullProgress, Progress, ProgressTask


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object


def load_for_generation(folder: Path, tokenizer_folder: Path, device: str, dtype: torch.dtype, max_memory: int | None, offload: Path) -> LoadedModel:
    """On the device when it fits; past `max_memory`, accelerate's device map offloads to CPU/disk."""
    from surgeon.io import hf_loading

    kwargs: dict = {"dtype": dtype}
    if max_memory is not None or device.startswith("cuda"):
        accelerator = int(device.split(":")[1]) if device.startswith("cuda:") else (0 if device.startswith("cuda") else None)
        budget = max_memory if max_memory is not None else "1000GiB"
        limits = {"cpu": budget} if accelerator is None else {accelerator: budget, "cpu": "1000GiB"}
        kwargs.update(device_map="auto", max_memory=limits, offload_folder=str(offload))
    model = hf_loading.causal_lm(folder, **kwargs).eval()
    if "device_map" not in kwargs:
        model.to(device)
    tokenizer = hf_loading.tokenizer(tokenizer_folder, model.config)
    return LoadedModel(model, tokenizer)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the device map's first module's device (disk- and CPU-offloaded run on
    the CPU); without a map, where the parameters are."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        first = next(iter(device_map.values()))
        if first in ("cpu", "disk"):
            return torch.device("cpu")
        return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
    return next(model.parameters()).device


class _TokenWatch(StoppingCriteria):
    """Never stops decoding: it only reports the token position, so a slow batch shows movement."""

    def __init__(self, task: ProgressTask, prompt_length: int, max_new_tokens: int):
        self.task, self.prompt_length, self.max_new_tokens = task, prompt_length, max_new_tokens

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.task.detail(f"token {input_ids.shape[1] - self.prompt_length}/{self.max_new_tokens} of this batch")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _SettledRows(StoppingCriteria):
    """Ends each row whose answer so far settles its judge's verdict (`Settled`); the batch ends
    when every row has ended, by this or by end of sequence."""

    def __init__(self, tokenizer, prompt_length: int, settled: Callable[[str], bool]):
        self.tokenizer, self.prompt_length, self.settled = tokenizer, prompt_length, settled
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for row in (~self.done).nonzero().flatten().tolist():
            self.done[row] = self.settled(self.tokenizer.decode(input_ids[row, self.prompt_length:], skip_special_tokens=True).strip())
        return self.done.to(input_ids.device)


@dataclass
class GenerationStats:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def generate(
    loaded: LoadedModel,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    system_prompt: str | None = None,
    progress: Progress = NullProgress(),
    stats: GenerationStats | None = None,
    description: str = "generating",
    settled: Callable[[str], bool] | None = None,
    collective: Collective = SOLO,
) -> list[str]:
    """Greedy answers in prompt order; stops at the model's end-of-turn/EOS tokens, and with
    `settled`, each row as soon as its answer so far passes it (what a judge needs is there). In a
    data-parallel run each process answers its share of the batches and all get every answer."""
    from transformers import GenerationConfig

    tokenizer, model = loaded.tokenizer, loaded.model
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    device = input_device(model)
    answers, tokens = [], 0
    batches, order = length_sorted_batches(tokenizer, prompts, batch_size, system_prompt)
    batches = collective.share(batches)
    with progress.task(description, total=sum(len(b) for b in batches)) as task, torch.no_grad():
        for batch in batches:
            started = time.perf_counter()
            watch = StoppingCriteriaList([_TokenWatch(task, batch.input_ids.shape[1], max_new_tokens)]
                                         + ([_SettledRows(tokenizer, batch.input_ids.shape[1], settled)] if settled else []))
            out = model.generate(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                                 generation_config=config, stopping_criteria=watch)
            new = out[:, batch.input_ids.shape[1]:].cpu()
            for row in new:
                stop = (row == pad).nonzero()
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
                tokens += int(stop[0]) + 1 if len(stop) else len(row)
            if stats is not None:
                stats.seconds += time.perf_counter() - started
            task.advance(len(batch))
    if stats is not None:
        stats.tokens += sum(collective.gather([tokens]))
    in_order = [""] * len(prompts)
    for index, answer in zip(order, collective.gather(answers)):
        in_order[index] = answer
    return in_order
