"""The processes of a data-parallel run, started by `torchrun` or `accelerate launch`, as one
collective object that the run passes to whatever splits or combines work (the engine, the
evaluator, generation, a method that writes).

accelerate's `PartialState` reads the launcher's environment and starts torch.distributed (gloo
on CPU, NCCL on GPUs). Every process runs the whole method on its share of each pass's prompt
batches; what the passes produce (gradients, hidden states, losses, generated answers) is summed
or gathered, so every process takes the same decisions. One process alone (no launcher) has
`SOLO`, which never touches torch.distributed.
"""

from __future__ import annotations

import os
from typing import Protocol, TypeVar

T = TypeVar("T")


class Collective(Protocol):
    world_size: int
    rank: int

    @property
    def is_main(self) -> bool:
        """The process that writes (outputs, saved state, caches) and reports."""
        ...

    def share(self, items: list[T]) -> list[T]: ...

    def gather(self, items: list[T]) -> list[T]: ...

    def sum_(self, tensor): ...

    def broadcast(self, value: T) -> T: ...

    def barrier(self) -> None: ...

    def stop(self) -> None: ...


class Solo:
    """One process: its share is everything, and every collective operation is the identity."""

    world_size, rank, is_main = 1, 0, True

    def share(self, items: list[T]) -> list[T]:
        return items

    def gather(self, items: list[T]) -> list[T]:
        return list(items)

    def sum_(self, tensor):
        return tensor

    def broadcast(self, value: T) -> T:
        return value

    def barrier(self) -> None:
        pass

    def stop(self) -> None:
        pass


SOLO = Solo()


class Group:
    """The processes a launcher started, through accelerate's PartialState."""

    def __init__(self, state):
        self._state = state
        self.world_size, self.rank = state.num_processes, state.process_index

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This process's contiguous share of `items` (accelerate's split: the first ones get one
        more when uneven), so gathering the shares in rank order gives `items` back in order."""
        with self._state.split_between_processes(items) as mine:
            return mine

    def gather(self, items: list[T]) -> list[T]:
        """Every process's list, concatenated in rank order, on every process."""
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def sum_(self, tensor):
        """Sum `tensor` over the processes, in place (every process gets the same values)."""
        import torch.distributed

        if tensor.device.type == "cpu" and torch.distributed.get_backend() == "nccl":  # NCCL reduces GPU tensors only
            tensor.copy_(self.sum_(tensor.to(self._state.device)))
        else:
            torch.distributed.all_reduce(tensor)
        return tensor

    def broadcast(self, value: T) -> T:
        """The main process's value, on every process."""
        import torch.distributed

        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self._state.wait_for_everyone()

    def stop(self) -> None:
        """Leave the process group (a gloo group left to the interpreter's exit aborts the process)."""
        self._state.destroy_process_group()


def start(device: str) -> tuple[str, Collective]:
    """Join the launcher's process group (when there is one): this process's device
    (`cuda:LOCAL_RANK` for a GPU device, unchanged otherwise) and the collective."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device, SOLO
    from accelerate import PartialState

    # cpu=True asks for gloo; the device itself stays surgeon's choice (compute.device)
    state = PartialState(cpu=not device.startswith("cuda"))
    return (f"cuda:{state.local_process_index}" if device.startswith("cuda") else device), Group(state)


def launched_as_follower() -> bool:
    """Whether a launcher started this process as other than the first (known before `start`)."""
    return int(os.environ.get("RANK", "0")) > 0
