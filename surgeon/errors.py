"""Every error surgeon raises on purpose; the CLI renders each as one line."""


def one_line(message: str, where: str | None = None) -> str:
    """`what (where)` on one line: messages may quote library errors that span lines."""
    text = f"{message} ({where})" if where else message
    return " ".join(part.strip() for part in text.splitlines())


def first_line(exc: BaseException) -> str:
    """A library exception's message as one line can quote it: its first line, else its type's name."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class SurgeonError(Exception):
    """Base class. `exit_code` 2 means bad input the user can fix."""

    exit_code = 2

    def __init__(self, message: str, where: str | None = None):
        self.message = message
        self.where = where
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return one_line(self.message, self.where)


class RecipeError(SurgeonError):
    """The recipe is malformed: unknown key, wrong type, contradictory settings."""


class RecipeValidationError(RecipeError):
    """Several bad fields at once; each is kept so the CLI can print one line per field."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        first_message, first_where = problems[0]
        super().__init__(first_message, first_where)


class InputError(SurgeonError):
    """A referenced model, adapter or dataset cannot be read as asked."""


class NonFiniteError(SurgeonError):
    """A weight, gradient, direction or score is NaN or infinite: no repair can be trusted past it."""


class IncompatibleModelsError(SurgeonError):
    """base and tuned (or an adapter) do not describe the same architecture."""


class OutputError(SurgeonError):
    """The destination cannot be written as asked (exists, not empty, not writable)."""


class TaskFloorError(SurgeonError):
    """No checkpoint kept the task score at or above the floor."""


class PushError(SurgeonError):
    """The push failed or was refused; the local output is intact."""
