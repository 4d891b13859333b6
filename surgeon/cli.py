"""The command line: parse flags, call one function, render its result or its error."""

from __future__ import annotations

import errno
import functools
import signal
import sys
import traceback
import typing
import warnings
from contextlib import contextmanager, nullcontext

import click
from rich.console import Console

from surgeon import __version__
from surgeon.errors import RecipeValidationError, SurgeonError, one_line
from surgeon.recipe.options import EvalOptions, RunOptions

_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []  # the stopping signals this process got


def _consoles() -> tuple[Console, Console]:
    """(stdout, stderr), made when a command runs (the streams may have been replaced). Off a
    terminal, tables print at their full width instead of being cut at 80 columns."""
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 10_000)
    return out, Console(stderr=True, highlight=False, log_path=False)


def _progress(quiet: bool):
    """Bars on a terminal, timestamped lines in a log, nothing with --quiet."""
    from surgeon.console import LogProgress, RichProgress
    from surgeon.progress import NullProgress

    if quiet:
        return nullcontext(NullProgress())
    if sys.stderr.isatty():
        return RichProgress(_consoles()[1])
    return LogProgress()


def _flags(model):
    """click options generated from an options model: each field's flag, type and help."""

    def decorate(command):
        for name, field in reversed(model.model_fields.items()):
            names = ["--" + name.replace("_", "-"), *([field.json_schema_extra["short"]] if field.json_schema_extra else [])]
            kind = next(a for a in typing.get_args(field.annotation) or (field.annotation,) if a is not type(None))
            kind = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Annotated else kind
            if kind is bool:
                command = click.option(*names, name, is_flag=True, help=field.description)(command)
            else:
                choice = click.Choice(typing.get_args(kind)) if typing.get_origin(kind) is typing.Literal else kind
                command = click.option(*names, name, type=choice, help=field.description)(command)
        return command

    return decorate


_settable = click.option(
    "--set", "settings", multiple=True, metavar="KEY.PATH=VALUE",
    help="Set a recipe key (repeatable), e.g. --set restore.steps=3: the value is read as YAML and checked like the recipe; "
         "the output's recipe copy records it.")


def _deprecations(loaded) -> None:
    """A line for each old spelling the recipe was read with (the run goes on)."""
    for note in loaded.deprecations:
        click.echo(f"warning: {note}", err=True)


def _recipe_warnings(loaded) -> None:
    """The old spellings the recipe was read with, then harm not measured where it is not."""
    _deprecations(loaded)
    if loaded.recipe.evaluate.safety is None:
        from surgeon.report import HARM_NOT_MEASURED

        click.echo(f"warning: {HARM_NOT_MEASURED}", err=True)


def _options(model, flags: dict):
    """The flags given, validated by their model; a bad one is an error naming the flag."""
    from pydantic import ValidationError

    from surgeon.errors import RecipeError

    try:
        return model.model_validate({name: value for name, value in flags.items() if value is not None})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise RecipeError(error["msg"].removeprefix("Value error, "), "--" + str(error["loc"][0]).replace("_", "-")) from None


# OS errors about the paths, permissions and disks a user chose: one line and exit 2 wherever they surface
_ENVIRONMENT_ERRNOS = {errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                       errno.EDQUOT, errno.ELOOP, errno.EMFILE}


def _fail(lines: list[tuple[str, str | None]], exit_code: int):
    """The one error format: `error: what (where)`, one line each, then exit."""
    for message, where in lines:
        click.echo("error: " + one_line(message, where), err=True)
    sys.exit(exit_code)


class _Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupt(signum, frame):
    _received.append(signum)
    raise _Interrupted(signum)


@contextmanager
def _terminations_interrupt():
    """SIGTERM and SIGHUP unwind like Ctrl-C, so temporary folders are removed on the way out."""
    _received.clear()
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in _HANDLED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped(signum: int):
    reason = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    click.echo(f"{reason}; nothing was written to the destination", err=True)
    sys.exit(128 + signum)


def _verbosity(function):
    function = click.option("--debug", is_flag=True, help="Show the traceback of any failure.")(function)
    function = click.option("-q", "--quiet", is_flag=True, help="Only the result and errors.")(function)
    return click.option("-v", "--verbose", is_flag=True, help="Also show library warnings.")(function)


def _reported(function):
    """SurgeonError: one line per problem, exit 2. Interrupted: exit 128 + signal. Anything else: one line, exit 1."""

    @functools.wraps(function)
    def wrapper(*args, debug: bool = False, verbose: bool = False, quiet: bool = False, **kwargs):
        if not verbose:
            import logging

            import huggingface_hub.utils
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
            # the Hub client logs each retry of an unreachable server; the error that follows says it in one line
            logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
            huggingface_hub.utils.disable_progress_bars()
        try:
            with _terminations_interrupt(), warnings.catch_warnings():
                if not verbose:  # Python warnings from the libraries (peft's unknown config keys...) as well as their logs
                    warnings.simplefilter("ignore")
                return function(*args, verbose=verbose, quiet=quiet, **kwargs)
        except RecipeValidationError as exc:
            _fail(exc.problems, exc.exit_code)
        except SurgeonError as exc:
            if _received:
                _stopped(_received[0])
            if debug:
                traceback.print_exc()
            _fail([(exc.message, exc.where)], exc.exit_code)
        except KeyboardInterrupt as exc:
            _stopped(exc.signum if isinstance(exc, _Interrupted) else signal.SIGINT)
        except Exception as exc:  # the last line of defence: one line unless --debug
            if _received:  # the interrupt landed inside a library, whose cleanup raised this instead
                _stopped(_received[0])
            if debug:
                traceback.print_exc()
            if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:  # a path or disk the user gave, not a bug
                _fail([(exc.strerror, exc.filename)], 2)
            first = (str(exc).splitlines() or [""])[0]
            click.echo(f"internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)

    return wrapper


class _SurgeonGroup(click.Group):
    """click's own usage errors (unknown option, missing argument) in surgeon's one-line format."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            param = getattr(exc, "param", None)
            where = param.get_error_hint(exc.ctx).replace("'", "") if param is not None and exc.ctx is not None else None
            detailed = isinstance(exc, click.BadParameter) and not isinstance(exc, click.MissingParameter)
            message = (exc.message if detailed else exc.format_message()).rstrip(".")
            _fail([(message, where or (exc.ctx.command_path if exc.ctx else "surgeon"))], exc.exit_code)
        except click.Abort:
            _stopped(signal.SIGINT)
        except click.ClickException as exc:
            _fail([(exc.format_message(), None)], exc.exit_code)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=_SurgeonGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="surgeon")
def main():
    """Repair the safety alignment a fine-tuned model lost, from a YAML recipe."""


@main.command()
@click.argument("recipe")
@_settable
@_flags(RunOptions)
@_verbosity
@_reported
def run(recipe, settings, verbose, quiet, **flags):
    """Repair the tuned model of RECIPE and write the repaired checkpoint."""
    from surgeon.api import Recipe, repair
    from surgeon.console import categories_table, models_table, summary_lines
    from surgeon.processes import launched_as_follower

    options = _options(RunOptions, flags)
    loaded = Recipe.load(recipe, settings=settings)
    follower = launched_as_follower()  # under torchrun / accelerate launch the main process alone reports
    if not follower:
        _deprecations(loaded.loaded)
    with _progress(quiet or follower) as progress:
        result = repair(loaded, **options.model_dump(), progress=progress)
    if follower:
        return
    report = result.record
    out, _ = _consoles()
    for table in [*(report.record.console_tables(report) if report.record and not quiet else []),
                  models_table(report.evaluation), categories_table(report.evaluation)]:
        if table is not None:
            out.print(table)
    for line in summary_lines(report, result.output):
        click.echo(line)
    if report.pushed:
        click.echo(f"pushed: {report.pushed}")


@main.command(name="push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--repo-id", required=True, help="org/name on the Hub (created if missing).")
@click.option("--private/--public", default=True, show_default=True, help="Visibility of a repo that has to be created.")
@click.option("--branch", default="main", show_default=True, help="Branch to commit to (created if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--message", help="Commit message (default names surgeon and the recipe).")
@click.option("--prune", is_flag=True, help="Delete files of the repo that the folder does not have.")
@click.option("--force", is_flag=True, help="Push even if the run's evaluation does not show a repair.")
@_verbosity
@_reported
def push_command(folder, repo_id, private, branch, create_pr, message, prune, force, verbose, quiet):
    """Push a finished output FOLDER to the Hub as one commit."""
    from pathlib import Path

    from pydantic import ValidationError

    from surgeon.errors import RecipeError
    from surgeon.publish.push import push
    from surgeon.recipe.schema import Push

    try:
        settings = Push(repo_id=repo_id, private=private, branch=branch, create_pr=create_pr, commit_message=message, prune=prune)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise RecipeError(error["msg"].removeprefix("Value error, "), "--" + str(error["loc"][0]).replace("_", "-") if error["loc"] else "surgeon push") from None
    with _progress(quiet) as progress:
        url = push(Path(folder), settings, force, progress)
    click.echo(f"pushed: {url}")


@main.command(name="pick")
@click.argument("recipe")
@click.option("--step", type=int, required=True, help="The checkpoint of the output's trade-off table to write instead.")
@click.option("--output", "-o", help="The output folder, if not the recipe's output.path.")
@_verbosity
@_reported
def pick_command(recipe, step, output, verbose, quiet):
    """Rewrite RECIPE's finished output at another checkpoint, without a gradient pass (restore)."""
    from surgeon.pick import pick
    from surgeon.recipe import load_recipe

    with _progress(quiet) as progress:
        report = pick(load_recipe(recipe), step, output, progress)
    repaired = report.evaluation.models.get("repaired") if report.evaluation else None
    harm = f", harmful rate {repaired.harmful_rate:.1%}" if repaired and repaired.harmful_rate is not None else ""
    click.echo(f"wrote step {step}: {report.changed.parameters:,} weights from base{harm}")


@main.command(name="apply")
@click.argument("patch", type=click.Path(exists=True, file_okay=False))
@click.option("--base", required=True, help="The aligned model the patch was made from: folder or Hub id[@revision].")
@click.option("--tuned", required=True, help="The fine-tune it repairs: folder, Hub id, LoRA adapter or model+adapter.")
@click.option("--output", "-o", required=True, help="Output folder: missing, empty, or an earlier surgeon output (with --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier surgeon output at the destination.")
@click.option("--force", is_flag=True, help="Apply to models other than those the patch was made from (the card says so).")
@_verbosity
@_reported
def apply_command(patch, base, tuned, output, overwrite, force, verbose, quiet):
    """Apply a safety PATCH (a run's output folder, or its masks.safetensors and patch.json) to base and tuned."""
    from surgeon.patch import apply

    with _progress(quiet) as progress:
        record = apply(patch, base, tuned, output, overwrite, force, progress)
    forced = f" (forced: {'; '.join(record.mismatches)})" if record.forced else ""
    changed = f"{record.restored:,} weights taken from base" if record.restored is not None else f"{record.tensors} tensors replaced"
    click.echo(f"wrote {output}: {changed}{forced}")


@main.command(name="eval")
@click.argument("models", nargs=-1, required=True)
@_flags(EvalOptions)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@_verbosity
@_reported
def evaluate(models, as_json, verbose, quiet, **flags):
    """Harmful rate and task score of MODELS side by side ('base'/'tuned' name a recipe's models)."""
    import json

    from surgeon.api import evaluate as evaluate_models
    from surgeon.console import categories_table, models_table

    options = _options(EvalOptions, flags)
    with _progress(quiet or as_json) as progress:
        results = evaluate_models(list(models), options.recipe, progress, **options.model_dump(exclude={"recipe"}))
    if as_json:
        click.echo(json.dumps(results.model_dump(mode="json"), indent=2))
        return
    for table in (models_table(results), categories_table(results)):
        if table is not None:
            _consoles()[0].print(table)
    shown = {name: scores.examples for name, scores in results.models.items() if scores.examples}
    if shown:
        from surgeon.report import answer_lines

        click.echo("\n".join(answer_lines(shown)))
    generation = results.generation
    if generation.tokens:
        click.echo(f"generated {generation.tokens:,} tokens in {generation.seconds:.1f}s ({generation.tokens_per_second:.1f} tokens/s)")


@main.command()
@click.argument("recipe")
@_settable
@click.option("--schema-only", is_flag=True, help="Check the schema (and what the recipe extends) only: no model or data is read.")
@click.option("--print", "show", is_flag=True, help="Print the recipe with every setting resolved, defaults included.")
@_verbosity
@_reported
def validate(recipe, settings, schema_only, show, verbose, quiet):
    """Check RECIPE: schema, model and data references, base/tuned compatibility. No heavy work."""
    from surgeon.pipeline import validate as validate_recipe
    from surgeon.recipe import load_recipe

    loaded = load_recipe(recipe, settings)
    if show:
        click.echo(loaded.resolved_text(), nl=False)
    if not schema_only:
        facts = validate_recipe(loaded)
        if not quiet:
            for key, value in facts.items():
                click.echo(f"{key.replace('_', ' ')}: {value:,}")
    _recipe_warnings(loaded)
    click.echo(f"{recipe}: ok" + (" (schema only)" if schema_only else ""))


@main.command()
@click.argument("recipe")
@_settable
@click.option("--output", "-o", help="The destination to check the disk of (overrides output.path).")
@click.option("--no-calibrate", is_flag=True, help="Skip timing one decoder layer.")
@_verbosity
@_reported
def plan(recipe, settings, output, no_calibrate, verbose, quiet):
    """What a run of RECIPE needs: peak memory, disk, and what its method estimates (restore: L, E, k, N, a step's time)."""
    from surgeon.pipeline import destination
    from surgeon.plan import plan as plan_run
    from surgeon.recipe import load_recipe

    loaded = load_recipe(recipe, settings)
    _recipe_warnings(loaded)
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    with _progress(quiet) as progress:
        facts = plan_run(loaded, destination(loaded, RunOptions(output=output)), progress, calibrate=not no_calibrate)
    parts = lambda named: ", ".join(f"{name.replace('_', ' ')} {gib(size)}" for name, size in named.items())
    for line in facts.lines[:1]:  # the method's own facts first (restore: L, E, N, k)
        click.echo(line)
    apart = f"; {' and '.join(n.replace('_', ' ') for n in facts.pass_only)} never beside the generation model" \
        if facts.pass_only and facts.memory.get("generation_model") else ""
    click.echo(f"memory: peak about {gib(facts.peak_memory_bytes)} ({parts(facts.memory)}{apart}); compute.max_memory {gib(facts.memory_budget_bytes)}")
    click.echo(f"disk: {gib(facts.disk_bytes)} ({parts(facts.disk)}); {gib(facts.free_disk_bytes)} free")
    for line in facts.lines[1:]:
        click.echo(line)


@main.command()
def schema():
    """Print the recipe's JSON Schema (editors complete and check recipes with it)."""
    import json

    from surgeon.recipe.schema import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


if __name__ == "__main__":
    main()
