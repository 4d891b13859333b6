"""The model card (README.md) of a repaired model: the evidence first, tuned's own card after."""

from __future__ import annotations

import re
from pathlib import Path

from surgeon.methods.registry import methods
from surgeon.records import ApplyRecord, RunRecord
from surgeon.report import HARM_NOT_MEASURED_NOTE, category_lines, model_rows, safety_rows_text, tradeoff_lines
_HF_DATASET = re.compile(r"hf://datasets/([^/@]+/[^/@]+)")


def _hub_id(described: dict) -> str | None:
    """The Hub id of an input that came from the Hub (its revision is then known)."""
    return described["reference"].split("@")[0] if described.get("revision") else None


def _split_card(text: str) -> tuple[dict, str]:
    from huggingface_hub import ModelCard

    card = ModelCard(text, ignore_metadata_errors=True)
    return card.data.to_dict(), card.text


def render_card(report: RunRecord, recipe_text: str, tuned_card: str | None = None, plot: str | None = None) -> str:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    tuned_meta, tuned_body = _split_card(tuned_card) if tuned_card else ({}, "")
    inputs, evaluation = report.inputs, report.evaluation
    bases = [b for b in (_hub_id(inputs["tuned"]), _hub_id(inputs["base"])) if b]
    datasets = sorted(set(_HF_DATASET.findall(recipe_text)))
    results = []
    repaired = evaluation.models.get("repaired") if evaluation else None
    if repaired:
        name = "repaired"
        if repaired.harmful_rate is not None:
            results.append(EvalResult(task_type="text-generation", dataset_type="harmful-prompts", dataset_name=safety_rows_text(evaluation),
                                      metric_type="harmful_rate", metric_name=f"harmful rate ({evaluation.judge} judge)",
                                      metric_value=round(repaired.harmful_rate, 4)))
        if repaired.task_score is not None:
            results.append(EvalResult(task_type="text-generation", dataset_type="task", dataset_name="task evaluation set",
                                      metric_type=evaluation.metric, metric_name=f"task {evaluation.metric}",
                                      metric_value=round(repaired.task_score, 4)))
    data = ModelCardData(
        base_model=bases or None,
        base_model_relation="merge" if bases else None,
        library_name="transformers",
        license=tuned_meta.get("license"),
        tags=["surgeon", "safety", "alignment"],
        datasets=datasets or None,
        model_name=name if results else None,
        eval_results=results or None,
    )
    tuned_ref, base_ref = inputs["tuned"]["reference"], inputs["base"]["reference"]
    spec = methods().get(report.method)
    citation = spec.citation if spec else None
    intro = (
        f"This model is `{tuned_ref}` with the safety alignment that fine-tuning removed repaired against the aligned model "
        f"`{base_ref}` by surgeon {report.tool['version']}, method **{report.method}**"
        f"{f' ({citation})' if citation else ''}: {report.change}."
    )
    lines = ["# Safety-repaired model", "", intro, ""] if report.harm_measured else \
        ["# Repaired model: harm not measured", "", HARM_NOT_MEASURED_NOTE, "", intro, ""]
    if report.output.shards == []:  # output.write: patch
        lines += ["**This repository holds a safety patch, not a model**: `masks.safetensors` (the weights taken from base) or "
                  "`patch-tensors.safetensors` (the tensors the method changed), and `patch.json` (the models it was made from). "
                  "Write the repaired model with "
                  f"`surgeon apply . --base {base_ref} --tuned {tuned_ref} -o repaired`; the figures below are that model's.", ""]
    other_base = [role for role, described in inputs.items() if described.get("any_base")]
    if other_base:
        lines += [f"**`{'`, `'.join(other_base)}` is a LoRA adapter that its adapter_config.json says was trained on another base model "
                  f"than `{base_ref}`; it was applied anyway (`any_base: true`).**", ""]
    rows = model_rows(evaluation)
    if rows:
        direction = "higher is better" if evaluation.higher_is_better else "lower is better"
        lines += [
            "## Before and after",
            "",
            f"Harmful rate: share of {safety_rows_text(evaluation)} answered with compliance, {evaluation.judge or '–'} judge; "
            "degenerate: the share answered with nothing usable (empty, no letters, a bare label, a loop), counted apart. "
            f"Over-refusal: share of {evaluation.benign_prompts} harmless prompts refused; KL from tuned: the mean "
            "KL divergence (nats) of the next-token distribution after each of them from tuned's, a capability check. "
            f"Task: {evaluation.metric or '–'} ({direction}) on {evaluation.task_rows} rows"
            + (" (a function of the recipe's author, run with evaluate.task.allow_code)." if (evaluation.metric or "").startswith("python:") else "."),
            "",
            "| model | harmful rate | degenerate | judge | over-refusal | KL from tuned | task score | metric |",
            "|---|---|---|---|---|---|---|---|",
            *[f"| {r[0]} | {r[1]} | {r[2]} | {evaluation.judge or '–'} | {r[3]} | {r[4]} | {r[5]} | {evaluation.metric or '–'} |" for r in rows],
            "",
        ]
        if category_lines(evaluation):
            lines += ["Harmful rate per harm category:", "", *category_lines(evaluation), ""]
    if report.tradeoff and report.tradeoff.checkpoints:
        lines += ["## Trade-off", "", *tradeoff_lines(report), ""]
        if plot:
            lines += [f"![harmful rate against task score at each checkpoint]({plot})", ""]
    lines += report.record.card_sections(report) if report.record else []
    lines += ["## Inputs", "", "| role | reference | revision or content |", "|---|---|---|"]
    supply: dict[tuple[str, str], list[str]] = {}
    for role, described in inputs.items():
        lines.append(f"| {role} | `{described['reference']}` | {described.get('revision') or ('local' if described.get('local') else '–')} |")
        for name, digest in (described.get("local") or {}).items():
            supply.setdefault((name, digest), []).append(role)
    lines += ["", "## Reproduce", "", f"Recipe sha256 `{report.recipe_sha256[:16]}`.", ""]
    if supply:
        lines += ["The local inputs are not published with this model; put these beside `recipe.yaml`:", ""]
        lines += [f"- `{name}` ({', '.join(roles)}): {digest}" for (name, digest), roles in supply.items()]
        lines.append("")
    lines += ["```bash", *_install_lines(report.tool), "surgeon run recipe.yaml", "```", "", "```yaml",
              portable_recipe(recipe_text, inputs, report.output.folder).rstrip(), "```", ""] + ([f"Method: {citation}.", ""] if citation else [])
    if tuned_body.strip():
        lines += ["---", "", f"*The card of the tuned model `{tuned_ref}` follows.*", "", tuned_body.strip(), ""]
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}", body="\n".join(lines))
    return str(card)


def _install_lines(tool: dict) -> list[str]:
    """Install exactly the surgeon that made this output: the release, or the git commit it ran from."""
    if tool.get("commit"):
        changes = ", with uncommitted changes" if tool.get("modified") else ""
        return [f"# {tool['distribution']} {tool['version']} at git commit {tool['commit']}{changes}, not a published release:",
                f"git checkout {tool['commit']} && pip install ."]
    return [f"pip install {tool['distribution']}=={tool['version']}"]


def portable_recipe(recipe_text: str, inputs: dict, output_folder: str) -> str:
    """The recipe with every input named as the records name it (`./name` for a local input, id@commit
    for the Hub) and the output as `./folder`: nothing of the machine it ran on."""
    import yaml

    recipe = yaml.safe_load(recipe_text)
    for field, described in inputs.items():
        *parents, key = field.split(".")
        owner = recipe
        for parent in parents:
            owner = owner.get(parent) if isinstance(owner, dict) else None
        if not isinstance(owner, dict) or owner.get(key) is None:
            continue
        if isinstance(owner[key], dict):
            owner[key]["path"] = described["reference"]
        else:
            owner[key] = described["reference"]
    output = recipe.get("output") if isinstance(recipe.get("output"), dict) else {}
    recipe["output"] = {**output, "path": f"./{output_folder}"}
    return yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)


def tuned_card(folder: Path) -> str | None:
    path = Path(folder) / "README.md"
    return path.read_text(encoding="utf-8") if path.exists() else None


def render_applied_card(record: ApplyRecord) -> str:
    """The card of a checkpoint `surgeon apply` wrote: which patch, onto which models, and whether
    it was forced onto models it was not made from. Nothing is evaluated here: the patch's own run
    measured its effect on the models it names."""
    from huggingface_hub import ModelCard, ModelCardData

    inputs = record.inputs
    bases = [b for b in (_hub_id(inputs["tuned"]), _hub_id(inputs["base"])) if b]
    data = ModelCardData(base_model=bases or None, base_model_relation="merge" if bases else None, library_name="transformers",
                         tags=["surgeon", "safety", "alignment"])
    made_by = record.patch["made_by"]
    changed = f"{record.restored:,} weights taken from `base`" if record.restored is not None else f"{record.tensors} tensors replaced"
    lines = [
        f"# {inputs['tuned']['reference']}, with a surgeon safety patch applied",
        "",
        f"`tuned` with {changed}, as the `{record.patch['method']}` patch made by surgeon "
        f"{made_by.get('version')}{' at ' + made_by['commit'] if made_by.get('commit') else ''} chose them; every other weight is tuned's, bit-exact. "
        "This checkpoint was not evaluated: the patch's own run measured the repair on the models the patch names.",
        "",
    ]
    if record.forced:
        lines += [f"**Applied with `--force` to models the patch was not made from: {'; '.join(record.mismatches)}. "
                  "Its measured effect does not carry over; evaluate this checkpoint before you use it.**", ""]
    lines += ["| input | reference | content sha256 |", "|---|---|---|",
              *[f"| {role} | `{d['reference']}` | {', '.join(f'`{v}`' for v in (d.get('local') or {}).values()) or d.get('revision') or '–'} |"
                for role, d in inputs.items()], "",
              f"Made with `surgeon apply` ({_install_lines(record.tool)[-1]}).", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))
