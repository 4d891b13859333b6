"""restore's own estimate for `surgeon plan`: activations, kept graphs, accumulated gradients and one
layer's working set within compute.max_memory, the spill and the saved state on disk, from the
checkpoint's headers and the prompts' token counts; one decoder layer timed for a step."""

from __future__ import annotations

import math
import time

from surgeon.allocator import slack_for
from surgeon.engine.topk import PILE
from surgeon.context import DTYPE_BYTES
from surgeon.plan import Estimate

GRAPH_TENSORS = 24  # what autograd saves of a Llama-shaped layer, a token: its norms, projections, attention and MLP inputs


def _prompt_tokens(pair, prompts: list[str], system_prompt: str | None, answers: list[str] | None = None) -> list[tuple[int, int]]:
    """Each prompt's (tokens, answer tokens), chat-templated as the batches will hold them; the
    answer's 0 without `answers`."""
    from surgeon.data.batches import answer_ids, prompt_ids

    if answers is None:
        return [(len(ids), 0) for ids in prompt_ids(pair.tokenizer, prompts, system_prompt)]
    return [(len(asked), len(answer)) for asked, answer in answer_ids(pair.tokenizer, prompts, answers, system_prompt)]


def _total_and_longest(lengths: list[tuple[int, int]]) -> tuple[int, int]:
    whole = [asked + answer for asked, answer in lengths]
    return sum(whole), max(whole, default=0)


def estimate(recipe, inputs, pair) -> Estimate:
    """Layers, E, k, N; the memory and disk of restore's passes and state; its time, by calibration."""
    import torch

    from surgeon.data.batches import prompt_batches
    from surgeon.engine.layered import TUNED
    from surgeon.engine.masks import MaskSet
    from surgeon.engine.objectives import TowardDirection

    settings, layout, tensors = pair.settings, pair.layout, inputs.tuned.tensors
    facts = layout.facts(recipe.probe.layer, recipe.restore.sparsity, tensors.shape)
    probe_layer, in_scope = facts["probe_layer"], facts["in_scope_parameters"]
    scope = layout.scope(probe_layer)
    compute = DTYPE_BYTES[recipe.compute.dtype]
    hidden = pair.config.get_text_config().hidden_size

    harmful_tokens, longest = _total_and_longest(_prompt_tokens(pair, inputs.harmful, recipe.probe.system_prompt))
    # each gradient pass: (its layers, its padded tokens: left padding to the longest prompt, at most);
    # restore's on the harmful prompts to E, rollback's on the task prompts to E or, on their
    # answers' loss, with the answers through every layer
    answer_loss = recipe.restore.rollback.objective == "answer_loss"
    task_lengths = _prompt_tokens(pair, inputs.task, recipe.probe.system_prompt, inputs.task_answers if answer_loss else None)
    task_tokens, task_longest = _total_and_longest(task_lengths)
    passes = [(probe_layer, len(inputs.harmful) * longest)]
    if recipe.restore.rollback.mode != "never":
        passes.append((layout.num_layers if answer_loss else probe_layer, len(inputs.task) * task_longest))
    # a gradient pass keeps every boundary of its prompt set, plus each set's layer-0 inputs
    activations = max((layers + 1) * padded for layers, padded in passes) * hidden * compute
    budget = settings.budget
    activations += (harmful_tokens + task_tokens) * hidden * compute
    # restore-only steps accumulate fp32 gradients, kept for the next step (none after the last)
    gradients = in_scope * 4 if recipe.restore.rollback.mode != "always" and recipe.restore.steps > 1 else 0
    layer_params = max(sum(math.prod(tensors.shape(n)) for n in layer) for layer in layout.layer_tensors)
    # the autograd graphs a gradient pass keeps where the activations' half has room: per layer its
    # weights in the compute dtype and what autograd saves, about GRAPH_TENSORS hidden-sized tensors a token
    room = max(0, settings.activations_bytes - activations - slack_for(budget))
    graph_layer = lambda padded: layer_params * compute + padded * hidden * compute * GRAPH_TENSORS
    graphs = max(min(layers, room // graph_layer(padded)) * graph_layer(padded) for layers, padded in passes)
    spill = max(0, activations - settings.activations_bytes) + max(0, gradients - settings.stores_bytes)
    largest = max(math.prod(tensors.shape(n)) for layer in layout.layer_tensors for n in layer)
    stored = max(tensors.dtype(n).itemsize for n in tensors.names())
    # the layer in the compute dtype and its fp32 gradient; one tensor at a time: base and tuned as
    # stored, the merged value and the selection's fp32 scores; the top-k's candidates (up to PILE * k
    # of them: value and entry id, and at the end their concatenation with tensor ids); the heap's trim slack
    working_layer = (layer_params * (compute + 4) + largest * (2 * stored + compute + 4)
                     + math.ceil(PILE * facts["budget_per_step"]) * ((4 + 8) + (4 + 8 + 8)) + slack_for(budget))
    if answer_loss:  # the top of the answers' pass: the output head, and a batch's fp32 logits at its answer tokens,
        # their log-softmax and its gradient
        vocab, size = pair.config.get_text_config().vocab_size, recipe.probe.batch_size
        answered = max(sum(answer for _, answer in task_lengths[i : i + size]) for i in range(0, len(task_lengths), size))
        working_layer = max(working_layer, vocab * hidden * compute + 3 * answered * vocab * 4 + slack_for(budget))
    checkpoints = recipe.restore.steps // recipe.restore.save_every + 1
    state = gradients + checkpoints * math.ceil(in_scope / 8)  # the saved gradients, and each checkpoint's bit masks
    lines = [f"decoder layers L {facts['layers']}, probe layer E {probe_layer}, N {facts['decoder_parameters']:,}, "
             f"k {facts['budget_per_step']:,} per step, {in_scope:,} weights in scope"]

    def timed() -> tuple[float, list[str]]:
        """One decoder layer's gradient work on the harmful prompts, timed; a step from it."""
        batches = prompt_batches(pair.tokenizer, inputs.harmful, recipe.probe.batch_size, recipe.probe.system_prompt)
        prepared = pair.engine.prepare(batches, TUNED, 1)
        target = torch.randn(hidden)
        seconds = []
        for _ in range(2):  # the second, once allocations and kernels are warm
            started = time.perf_counter()
            pair.engine.gradient_pass(prepared, MaskSet({}), TowardDirection(target), 1, [scope[0]], lambda raw, grads: None,
                                      description="calibrating layer 0")
            seconds.append(time.perf_counter() - started)
        # the layer was timed on the harmful prompts; rollback's pass scales by its layers and tokens
        rollback = passes[1][0] * task_tokens / max(harmful_tokens, 1) if recipe.restore.rollback.mode == "always" else 0
        step = seconds[-1] * (probe_layer + rollback)
        return step, [f"time: one layer's gradient work {seconds[-1]:.2f} s, so about {step:.0f} s per restore step "
                      "(scoring checkpoints comes on top)"]

    return Estimate(memory={"activations": min(activations, settings.activations_bytes), "graphs": graphs, "gradients": min(gradients, settings.stores_bytes),
                            "one_layer": working_layer},
                    disk={"spill": spill, "run_state": state}, facts=facts, lines=lines, time=timed,
                    pass_only=("graphs", "one_layer"), judges_checkpoints=True)
