"""The processes of a data-parallel run, started by `torchrun` or `accelerate launch`.

accelerate's `PartialState` reads the launcher's environment and starts torch.distributed (gloo
on CPU, NCCL on GPUs). Every process runs the whole method on its share of each pass's prompt
batches; what the passes produce (gradients, hidden states, losses, generated answers) is summed
or gathered, so every process takes the same decisions. One process alone (no launcher) never
touches torch.distributed.
"""

from __future__ import annotations

import os
from typing import TypeVar

T = TypeVar("T")


_state = None  # accelerate's PartialState once `start` joined the group


def world_size() -> int:
    return _state.num_processes if _state is not None else 1


def start(device: str) -> str:
    """Join the launcher's process group (when there is one) and return this process's device:
    `cuda:LOCAL_RANK` for a GPU device, unchanged otherwise."""
    global _state
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    from accelerate import PartialState

    # cpu=True asks for gloo; the device itself stays surgeon's choice (compute.device)
    _state = PartialState(cpu=not device.startswith("cuda"))
    return f"cuda:{_state.local_process_index}" if device.startswith("cuda") else device


def stop() -> None:
    """Leave the process group (a gloo group left to the interpreter's exit aborts the process)."""
    global _state
    if _state is not None:
        _state.destroy_process_group()
        _state = None


def rank() -> int:
    return _state.process_index if _state is not None else 0


def is_main() -> bool:
    return rank() == 0


def launched_as_follower() -> bool:
    """Whether a launcher started this process as other than the first (known before `start`)."""
    return int(os.environ.get("RANK", "0")) > 0


def share(items: list[T]) -> list[T]:
    """This process's contiguous share of `items` (accelerate's split: the first ones get one
    more when uneven), so gathering the shares in rank order gives `items` back in order."""
    if _state is None:
        return items
    with _state.split_between_processes(items) as mine:
        return mine


def gather(items: list[T]) -> list[T]:
    """Every process's list, concatenated in rank order, on every process."""
    if _state is None:
        return items
    from accelerate.utils import gather_object

    return gather_object(list(items))


def sum_(tensor):
    """Sum `tensor` over the processes, in place (every process gets the same values)."""
    if _state is not None:
        import torch.distributed

        if tensor.device.type == "cpu" and torch.distributed.get_backend() == "nccl":  # NCCL reduces GPU tensors only
            tensor.copy_(sum_(tensor.to(_state.device)))
        else:
            torch.distributed.all_reduce(tensor)
    return tensor


def broadcast(value: T) -> T:
    """The main process's value, on every process."""
    if _state is None:
        return value
    import torch.distributed

    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if _state is not None:
        _state.wait_for_everyone()
