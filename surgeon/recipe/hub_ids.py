"""Hub repo ids as the Hub itself checks them (huggingface_hub's validate_repo_id); no torch."""

from __future__ import annotations

from huggingface_hub.utils import HFValidationError, validate_repo_id


def split_hub_reference(text: str) -> tuple[str, str | None] | None:
    """`org/name[@revision]` as (repo id, revision), or None when it is not one. A bare `name`
    is refused: surgeon names models and pushes by organization."""
    repo, at, revision = text.partition("@")
    if "/" not in repo or (at and not revision.strip()) or any(c.isspace() for c in revision):
        return None
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    return repo, revision or None
