"""Push a finished output folder to the Hub as one commit, behind the gate of its own evidence.

The token comes from HF_TOKEN or the huggingface_hub login only, and is scrubbed from
anything surgeon prints.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from surgeon import __version__
from surgeon.errors import InputError, PushError, first_line
from surgeon.progress import NullProgress, Progress
from surgeon.recipe.schema import Push
from surgeon.records import ApplyRecord, RunRecord, read_record

RETRIES = 4
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def _scrub(text: str) -> str:
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text


def resume_command(folder: Path, settings: Push, force: bool) -> str:
    words = ["surgeon", "push", str(folder), "--repo-id", settings.repo_id, "--private" if settings.private else "--public"]
    if settings.branch != "main":
        words += ["--branch", settings.branch]
    if settings.commit_message:
        words += ["--message", settings.commit_message]
    words += ["--create-pr"] * settings.create_pr + ["--prune"] * settings.prune + ["--force"] * force
    return shlex.join(words)


def gate(report: RunRecord | ApplyRecord) -> list[str]:
    """Reasons not to publish, from the run's own numbers: harm did not fall, or task past the floor."""
    if isinstance(report, ApplyRecord):
        return ["this checkpoint was written by `surgeon apply` and not evaluated (evaluate it, or push the patch's own run)"]
    reasons = []
    models = report.evaluation.models if report.evaluation else {}
    tuned, repaired = models.get("tuned"), models.get("repaired")
    if tuned is None or repaired is None or tuned.harmful_rate is None or repaired.harmful_rate is None:
        reasons.append("the run measured no harmful rate for tuned and repaired (add evaluate.safety)")
    elif repaired.harmful_rate >= tuned.harmful_rate:
        reasons.append(f"the harmful rate did not fall (tuned {tuned.harmful_rate:.1%}, repaired {repaired.harmful_rate:.1%})")
    tradeoff = report.tradeoff
    if tradeoff and tradeoff.floor is not None and tradeoff.chosen_step is None:
        reasons.append(f"no checkpoint kept the task score within the floor {tradeoff.floor:.4f}")
    return reasons


def _transient(error: BaseException | None) -> bool:
    """A server-side or network failure, anywhere in the chain (the client wraps upload errors)."""
    from huggingface_hub.errors import HfHubHTTPError

    while error is not None:
        if isinstance(error, HfHubHTTPError):
            response = getattr(error, "response", None)
            if response is None or getattr(response, "status_code", None) in TRANSIENT_STATUS:
                return True
        elif isinstance(error, (ConnectionError, TimeoutError)) or type(error).__module__.startswith(("httpx", "httpcore")):
            return True
        error = error.__cause__ or error.__context__
    return False


def push(folder: Path, settings: Push, force: bool = False, progress: Progress = NullProgress(), backoff: float = 2.0) -> str:
    """Create the repo (private by default) and branch if missing, then commit every file at once."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    try:
        report = read_record(folder)
    except InputError as exc:
        raise PushError(exc.message, exc.where) from None
    if not force and (reasons := gate(report)):
        raise PushError(f"push refused: {'; '.join(reasons)}. Pass --force to publish anyway", str(folder))
    recipe = f" (recipe sha256 {report.recipe_sha256[:12]})" if isinstance(report, RunRecord) else ""
    message = settings.commit_message or f"surgeon {__version__}: safety-repaired model{recipe}"
    api = HfApi()
    attempt = 0
    with _published(folder, report) as staged:
        files = sum(1 for _ in staged.iterdir())
        while True:
            attempt += 1
            try:
                api.create_repo(settings.repo_id, private=settings.private, exist_ok=True)
                if settings.branch != "main":
                    api.create_branch(settings.repo_id, branch=settings.branch, exist_ok=True)
                progress.log(f"pushing {files} files to {settings.repo_id}@{settings.branch} (attempt {attempt})")
                # one commit; with prune, its delete operations remove what the folder lacks (never .gitattributes)
                info = api.upload_folder(repo_id=settings.repo_id, folder_path=staged, commit_message=message, revision=settings.branch,
                                         create_pr=settings.create_pr, delete_patterns="*" if settings.prune else None)
                return info.pr_url or info.commit_url
            except Exception as error:  # classified below: transient ones are retried, the rest end the push
                if attempt < RETRIES and _transient(error):
                    time.sleep(backoff * 2 ** (attempt - 1))
                    continue
                reason = _scrub(first_line(error))
                raise PushError(
                    f"push failed after {attempt} attempt(s): {reason}. The local output is intact; resume with: {resume_command(folder, settings, force)}",
                    settings.repo_id,
                ) from None


@contextmanager
def _published(folder: Path, report: RunRecord | ApplyRecord):
    """What is pushed: only the files surgeon wrote (never hidden files or anything a user put
    beside them), hard-linked into a staging folder beside the output (no copy of the weights), with
    recipe.yaml as the card rewrites it: inputs by their published names, no path of this machine."""
    from surgeon.io.atomic import output_files
    from surgeon.publish.card import portable_recipe

    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.surgeon-push-", dir=folder.parent) as staging:
        staged = Path(staging)
        for path in output_files(folder):
            if path.name == "recipe.yaml":
                text = portable_recipe(path.read_text(), report.inputs, report.output.folder)
                (staged / path.name).write_text(text)
                continue
            try:
                os.link(path, staged / path.name)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(path, staged / path.name)
        yield staged
