"""The methods a recipe's `method:` may name.

A method is one module and one `register(MethodSpec(...))`: its settings (a pydantic model, which
becomes the recipe section named after the method), what it needs from the recipe, and the
factory that builds it from the run context. Packages outside surgeon register theirs through
the `surgeon.methods` entry-point group (each entry point is a MethodSpec). Nothing here imports
torch: the factory is a "module:attribute" string, imported only when a run builds the method.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

from surgeon.methods import settings
from surgeon.methods.records import DgHardRecord, SafeLoraRecord
from surgeon.methods.restore.record import RestoreRecord
from surgeon.methods.safe_delta.settings import SafeDelta

ENTRY_POINTS = "surgeon.methods"
NEEDS = frozenset({"data", "unaligned"})  # data: harmful and task prompts; unaligned: a model without base's alignment


@dataclass(frozen=True)
class MethodSpec:
    name: str
    factory: str | Callable[[Any], Any]  # RunContext -> Method; "module:attribute" keeps torch out of parsing
    summary: str
    needs: frozenset[str] = frozenset()
    settings: type | None = None  # a pydantic model: the recipe section `<name>:` (built-in sections live in the schema)
    check: Callable[[Any], None] | None = None  # cross-field rules on the whole recipe; raises ValueError
    citation: str | None = None
    record: type | None = None  # its part of surgeon.json: a records.MethodRecord subclass, which renders its own sections
    plan: str | Callable[[Any, Any, Any], Any] | None = None  # (recipe, inputs, model pair) -> plan.Estimate: `surgeon plan`

    def __post_init__(self):
        if unknown := set(self.needs) - NEEDS:
            raise ValueError(f"method '{self.name}' needs unknown inputs {sorted(unknown)}; known: {sorted(NEEDS)}")

    def build(self, context):
        return _resolved(self.factory)(context)

    def estimate(self, recipe, inputs, pair):
        """Its own needs for `surgeon plan` (a plan.Estimate)."""
        return _resolved(self.plan)(recipe, inputs, pair)


def _resolved(function: str | Callable) -> Callable:
    if isinstance(function, str):
        module, _, attribute = function.partition(":")
        return getattr(importlib.import_module(module), attribute)
    return function


_METHODS: dict[str, MethodSpec] = {}
_loaded_entry_points = False


def register(spec: MethodSpec, replace: bool = False) -> MethodSpec:
    if spec.name in _METHODS and not replace:
        raise ValueError(f"a method named '{spec.name}' is already registered")
    _METHODS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _METHODS.pop(name, None)


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for entry in entry_points(group=ENTRY_POINTS):
        spec = entry.load()
        if spec.name not in _METHODS:
            register(spec)


def methods() -> dict[str, MethodSpec]:
    _load_entry_points()
    return dict(_METHODS)


def method_spec(name: str) -> MethodSpec:
    """The registered method, or a ValueError that names the closest one."""
    known = methods()
    if name in known:
        return known[name]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"registered: {', '.join(sorted(known))}"
    raise ValueError(f"unknown method '{name}'; {hint}")


def _restore_rules(recipe) -> None:
    if recipe.restore.stop_at is not None and (recipe.evaluate.safety is None or recipe.evaluate.task is None):
        raise ValueError("restore.stop_at needs evaluate.safety and evaluate.task: each checkpoint's harm and task score")
    if recipe.restore.rollback.mode == "auto" and recipe.evaluate.task is None:
        raise ValueError("restore.rollback.mode 'auto' needs a task score: add evaluate.task, or set restore.rollback.mode to 'never' or 'always'")


PAPER = ("Yang, Tao, Chen, Xu: *Alleviating the Fear of Losing Alignment in LLM Fine-tuning*, "
         "IEEE S&P 2025 ([arXiv 2504.09757](https://arxiv.org/abs/2504.09757))")

register(MethodSpec(
    "restore", "surgeon.methods.restore.run:RestoreRun",
    "a gradient-chosen few of tuned's weights restored from base, part of them rolled back where the task suffers",
    needs=frozenset({"data"}), check=_restore_rules, citation=PAPER, record=RestoreRecord, plan="surgeon.methods.restore.plan:estimate",
))
register(MethodSpec(
    "resta", "surgeon.methods.posthoc:RestaRun", "tuned + scale x (base - unaligned)", needs=frozenset({"unaligned"}),
    citation=("Bhardwaj, Anh, Poria: *Language Models are Homer Simpson! Safety Re-Alignment of Fine-tuned Language Models "
              "through Task Arithmetic*, ACL 2024 ([arXiv 2402.11746](https://arxiv.org/abs/2402.11746))"),
))
register(MethodSpec("reset_layers", "surgeon.methods.baselines:ResetLayersRun", "decoder layers below the probe layer copied whole from base"))
register(MethodSpec(
    "linear", "surgeon.methods.posthoc:LinearRun", "tuned + alpha x (base - tuned): the pre/post fine-tuning merge", settings=settings.Linear,
    citation=("Farn, Su, Kumar, Sahay, Chen, Lee: *Safeguard Fine-Tuned LLMs Through Pre- and Post-Tuning Model Merging*, "
              "Findings of EMNLP 2025 ([arXiv 2412.19512](https://arxiv.org/abs/2412.19512))"),
))
register(MethodSpec(
    "antidote", "surgeon.methods.posthoc:AntidoteRun",
    "the update's entries with the highest |update| x input norm on harmful prompts pruned back to base, per row",
    needs=frozenset({"data"}), settings=settings.Antidote,
    citation=("Huang, Bhattacharya, Joshi, Kimball, Liu: *Antidote: Post-fine-tuning Safety Alignment for Large Language Models "
              "against Harmful Fine-tuning*, ICML 2025 ([arXiv 2408.09600](https://arxiv.org/abs/2408.09600))"),
))
register(MethodSpec(
    "safe_lora", "surgeon.methods.posthoc:SafeLoraRun",
    "update matrices least like their projection onto the alignment matrix of base - unaligned replaced by that projection",
    needs=frozenset({"unaligned"}), settings=settings.SafeLora, record=SafeLoraRecord,
    citation=("Hsu, Tsai, Lin, Chen, Yu, Huang: *Safe LoRA: the Silver Lining of Reducing Safety Risks when Finetuning Large "
              "Language Models*, NeurIPS 2024 ([arXiv 2405.16833](https://arxiv.org/abs/2405.16833))"),
))
register(MethodSpec(
    "dg_hard", "surgeon.methods.posthoc:DgHardRun", "each update matrix cut to its singular values above the Donoho-Gavish threshold",
    settings=settings.DgHard, record=DgHardRecord,
    citation=("Abro, Tahir: *Spectral Unforgetting: Post-Hoc Recovery of Damaged Capabilities Without Retraining*, 2026 "
              "([arXiv 2605.20296](https://arxiv.org/abs/2605.20296))"),
))
register(MethodSpec(
    "safe_delta", "surgeon.methods.safe_delta.run:SafeDeltaRun",
    "per linear weight, tuned's deltas within a safety budget on harmful prompts' inputs kept, the rest base's with compensation",
    needs=frozenset({"data"}), settings=SafeDelta,
    citation=("Lu, Liu, Wu, Chen, Zhang, Ong, Wang, Tang: *Safe Delta: Consistently Preserving Safety when Fine-Tuning LLMs on "
              "Diverse Datasets*, ICML 2025 ([arXiv 2505.12038](https://arxiv.org/abs/2505.12038))"),
))
