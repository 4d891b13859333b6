"""python: task metrics that construct gate cases: scores follow a script, not the answers."""

SCRIPT: list[float] = []


def scripted(prompts, answers, references) -> float:
    """The next scripted score; 1.0 once the script is used up (the final table's re-scores)."""
    return SCRIPT.pop(0) if SCRIPT else 1.0


def lower_is_better(prompts, answers, references) -> float:
    return 0.0


lower_is_better.higher_is_better = False


def wrong_signature(answers) -> float:
    return 0.0


def not_a_number(prompts, answers, references):
    return "high"
