"""A tiny progress protocol, so the engine reports work without knowing about terminals."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol


class ProgressTask(Protocol):
    def advance(self, amount: float = 1) -> None: ...

    def detail(self, text: str) -> None:
        """Where a long item stands (`token 40/128`), for displays that show it."""


class Progress(Protocol):
    def task(self, description: str, total: float | None) -> "contextmanager[ProgressTask]": ...

    def log(self, message: str) -> None: ...


class _NullTask:
    def advance(self, amount: float = 1) -> None:
        pass

    def detail(self, text: str) -> None:
        pass


class NullProgress:
    """The default: reports nothing."""

    @contextmanager
    def task(self, description: str, total: float | None) -> Iterator[_NullTask]:
        yield _NullTask()

    def log(self, message: str) -> None:
        pass
