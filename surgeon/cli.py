"""The command line: parse flags, call one function, render its result or its error."""

from __future__ import annotations

import functools
import sys
import traceback

import click
from rich.console import Console

from surgeon import __version__
from surgeon.errors import RecipeValidationError, SurgeonError

_err = Console(stderr=True, highlight=False, log_path=False)
_out = Console(highlight=False)


def _verbosity(function):
    function = click.option("--debug", is_flag=True, help="Show the traceback of any failure.")(function)
    function = click.option("-q", "--quiet", is_flag=True, help="Only the result and errors.")(function)
    return click.option("-v", "--verbose", is_flag=True, help="Also show library warnings.")(function)


def _reported(function):
    """SurgeonError: one line per problem, exit 2. Anything else: one line, exit 1."""

    @functools.wraps(function)
    def wrapper(*args, debug: bool = False, verbose: bool = False, quiet: bool = False, **kwargs):
        if not verbose:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
        try:
            return function(*args, verbose=verbose, quiet=quiet, **kwargs)
        except RecipeValidationError as exc:
            for message, where in exc.problems:
                click.echo(f"error: {message} ({where})", err=True)
            sys.exit(exc.exit_code)
        except SurgeonError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {exc.one_line()}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written to the destination", err=True)
            sys.exit(130)
        except Exception as exc:  # the last line of defence: one line unless --debug
            if debug:
                traceback.print_exc()
            first = (str(exc).splitlines() or [""])[0]
            click.echo(f"internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="surgeon")
def main():
    """Repair the safety alignment a fine-tuned model lost, from a YAML recipe."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Output folder (overrides output.path).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--device", help="auto, cpu, cuda, cuda:N (overrides compute.device).")
@click.option("--force-push", is_flag=True, help="Push (output.push) even if the evaluation does not show a repair.")
@_verbosity
@_reported
def run(recipe, output, overwrite, device, force_push, verbose, quiet):
    """Repair the tuned model of RECIPE and write the repaired checkpoint."""
    from surgeon.console import RichProgress, models_table, summary_lines, summary_table
    from surgeon.pipeline import RunOverrides
    from surgeon.pipeline import run as run_recipe
    from surgeon.recipe import load_recipe

    loaded = load_recipe(recipe)
    with RichProgress(_err, show_bars=not quiet, show_log=not quiet) as progress:
        report = run_recipe(loaded, RunOverrides(output, overwrite, device, force_push), progress)
    if not quiet and "steps" in report:
        _out.print(summary_table(report))
    if (table := models_table(report)) is not None:
        _out.print(table)
    for line in summary_lines(report):
        click.echo(line)
    if report.get("pushed"):
        click.echo(f"pushed: {report['pushed']}")


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

    from surgeon.console import RichProgress
    from surgeon.errors import RecipeError
    from surgeon.publish.push import push
    from surgeon.recipe.schema import Push

    try:
        settings = Push(repo_id=repo_id, private=private, branch=branch, create_pr=create_pr, commit_message=message, prune=prune)
    except ValidationError as exc:
        raise RecipeError(exc.errors()[0]["msg"].removeprefix("Value error, "), "--repo-id") from None
    with RichProgress(_err, show_bars=not quiet, show_log=not quiet) as progress:
        url = push(Path(folder), settings, force, progress)
    click.echo(f"pushed: {url}")


@main.command(name="eval")
@click.argument("models", nargs=-1, required=True)
@click.option("--recipe", type=click.Path(dir_okay=False), help="Take the evaluate section (and base/tuned) from this recipe.")
@click.option("--safety", type=click.Path(dir_okay=False), help="Harmful prompts (.jsonl/.json/.csv/.parquet, field 'prompt').")
@click.option("--task", type=click.Path(dir_okay=False), help="Task rows with 'prompt' and 'response'.")
@click.option("--metric", help="exact_match, contains, f1:<label>, rouge_l, loss, kl or python:module:function.")
@click.option("--judge", type=click.Choice(["refusal", "guard", "classifier"]), help="How answers to harmful prompts are judged.")
@click.option("--judge-model", help="The guard or classifier model for --judge guard/classifier.")
@click.option("--limit", type=click.IntRange(min=1), help="First N rows of each set.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Prompts per generation batch.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Longest answer generated.")
@click.option("--device", help="auto, cpu, cuda, cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@_verbosity
@_reported
def evaluate(models, recipe, safety, task, metric, judge, judge_model, limit, batch_size, max_new_tokens, device, as_json, verbose, quiet):
    """Harmful rate and task score of MODELS side by side ('base'/'tuned' name a recipe's models)."""
    import json

    from surgeon.console import RichProgress, models_table
    from surgeon.pipeline import EvalRequest, evaluate_models
    from surgeon.recipe import load_recipe

    request = EvalRequest(list(models), load_recipe(recipe) if recipe else None, safety, task, metric, judge, judge_model,
                          limit, batch_size, max_new_tokens, device)
    with RichProgress(_err, show_bars=not quiet and not as_json, show_log=False) as progress:
        results = evaluate_models(request, progress)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    _out.print(models_table({"evaluation": results}))
    generation = results["generation"]
    if generation["tokens"]:
        click.echo(f"generated {generation['tokens']:,} tokens in {generation['seconds']:.1f}s ({generation['tokens_per_second']:.1f} tokens/s)")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@_verbosity
@_reported
def validate(recipe, verbose, quiet):
    """Check RECIPE: schema, model and data references, base/tuned compatibility. No heavy work."""
    from surgeon.pipeline import validate as validate_recipe
    from surgeon.recipe import load_recipe

    facts = validate_recipe(load_recipe(recipe))
    if not quiet:
        for key, value in facts.items():
            click.echo(f"{key.replace('_', ' ')}: {value:,}")
    click.echo(f"{recipe}: ok")


if __name__ == "__main__":
    main()
