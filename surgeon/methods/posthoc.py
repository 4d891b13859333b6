"""Other post-hoc repairs of a fine-tune's safety, streamed tensor by tensor like restore, so they
can be compared on the same checkpoints with the same judge. Each works on the fine-tuning update
`tuned - base` of a full checkpoint (a LoRA adapter is merged first), computed in fp32 and cast
back to the stored dtype; a tensor the method leaves alone is copied bit-exact.

- linear (Farn et al. 2025): tuned + alpha x (base - tuned), the pre/post fine-tuning merge.
- resta (Bhardwaj et al. 2024): tuned + scale x (base - unaligned), unaligned being base fine-tuned
  on harmful data; tensors where base and unaligned agree stay tuned's.
- antidote (Huang et al., ICML 2025): one-shot Wanda-style pruning of the update on harmful
  data: in each row of every decoder linear weight, the entries with the highest
  |update| x input norm go back to base. A mask repair: the output is where(mask, base, tuned).
- safe_lora (Hsu et al., NeurIPS 2024): C = V V^T / ||V||_F from V = base - unaligned (the
  aligned model minus the model before alignment); the update matrices whose projection C x update
  is least similar to themselves become base + C x update.
- dg_hard (Abro and Tahir, 2026): each 2-D update keeps only its singular values above the
  Donoho-Gavish hard threshold omega(beta) x median / mu_beta.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from surgeon.engine.layered import TUNED
from surgeon.engine.masks import MaskSet
from surgeon.methods.interface import Repair
from surgeon.methods.records import DgHardRecord, SafeLoraRecord
from surgeon.methods.settings import Antidote, DgHard, Linear, SafeLora


def _update(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    return tuned.float() - base.float()


class _TensorRepair:
    """A repair that gives every output tensor by name and learns what it changed as they stream."""

    label = ""

    def __init__(self, context):
        self.context = context
        self.base, self.tuned = context.pair.base.tensors, context.pair.tuned.tensors
        self.base_names = set(self.base.names())
        self.changed: set[str] = set()

    def repaired(self, name: str, base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor | None:
        """The repaired tensor, or None to keep tuned's."""
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        tuned = self.tuned.get(name)
        if name not in self.base_names:
            return tuned
        value = self.repaired(name, self.base.get(name), tuned)
        if value is None:
            return tuned
        self.changed.add(name)
        return value.to(tuned.dtype)

    def settings(self) -> dict:
        raise NotImplementedError

    def run(self) -> Repair:
        def change() -> str:
            changed = self.context.share_of_decoder(self.changed)
            return f"{self.label} on {changed['tensors']} tensors ({changed['parameters']:,} parameters)"

        return Repair(change, self.settings(), lambda: self.context.share_of_decoder(self.changed), tensors=self.get)


class LinearRun(_TensorRepair):
    def __init__(self, context):
        super().__init__(context)
        self.alpha = (context.recipe.linear or Linear()).alpha
        self.label = f"tuned + {self.alpha} x (base - tuned)"

    def repaired(self, name, base, tuned):
        if torch.equal(base, tuned):
            return None
        return tuned.float() + self.alpha * (base.float() - tuned.float())

    def settings(self) -> dict:
        return {"alpha": self.alpha}


class RestaRun(_TensorRepair):
    """tuned + scale x (base - unaligned), where base and unaligned differ (Bhardwaj et al. 2024)."""

    def __init__(self, context):
        super().__init__(context)
        self.unaligned = context.inputs.unaligned.tensors
        self.scale = context.recipe.resta.scale
        self.label = f"RESTA: tuned + {self.scale} x (base - unaligned)"

    def repaired(self, name, base, tuned):
        unaligned = self.unaligned.get(name)
        if torch.equal(base, unaligned):
            return None
        return tuned.float() + self.scale * (base.float() - unaligned.float())

    def settings(self) -> dict:
        return {"scale": self.scale}


# -- DG-Hard ----------------------------------------------------------------------------------

DG_MIN_NUMEL = 1024  # smaller matrices (and 1-D tensors) pass through: the noise model needs a matrix


def dg_omega(beta: float) -> float:
    """Gavish and Donoho's hard-threshold coefficient for aspect ratio beta (4/sqrt(3) at 1)."""
    return math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta * beta + 14 * beta + 1)))


@lru_cache(maxsize=256)
def marchenko_pastur_median(beta: float, points: int = 200_000) -> float:
    """mu_beta, the median singular value of a unit-noise matrix of aspect beta: the median of the
    Marchenko-Pastur law, integrated on a fine grid of singular values s (in s the law's density,
    sqrt((l+ - s^2)(s^2 - l-)) / (pi beta s), stays finite at 0 when beta = 1)."""
    low, high = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    grid = torch.linspace(math.sqrt(low), math.sqrt(high), points + 1, dtype=torch.float64)
    squares = grid * grid
    density = torch.sqrt(torch.clamp((high - squares) * (squares - low), min=0)) / (math.pi * beta * grid.clamp(min=1e-300))
    if low == 0:
        density[0] = math.sqrt(high) / (math.pi * beta)  # the limit at s = 0
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum((density[1:] + density[:-1]) / 2, 0)])
    cdf = cdf / cdf[-1]
    right = int(torch.searchsorted(cdf, torch.tensor(0.5, dtype=torch.float64)))
    left = max(right - 1, 0)
    share = (0.5 - cdf[left]) / max(float(cdf[right] - cdf[left]), 1e-300)
    return float(grid[left] + share * (grid[right] - grid[left]))


def dg_hard(update: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, int, int]:
    """(the update with only its singular values above the threshold, rank kept, rank)."""
    m, n = update.shape
    beta = min(m, n) / max(m, n)
    u, s, vt = torch.linalg.svd(update, full_matrices=False)
    threshold = scale * dg_omega(beta) * float(torch.median(s)) / marchenko_pastur_median(beta)
    kept = torch.where(s > threshold, s, torch.zeros_like(s))
    return (u * kept.unsqueeze(0)) @ vt, int((kept > 0).sum()), s.numel()


class DgHardRun(_TensorRepair):
    def __init__(self, context):
        super().__init__(context)
        self.scale = (context.recipe.dg_hard or DgHard()).scale
        self.label = f"update matrices cut to their singular values above {self.scale} x the Donoho-Gavish threshold"
        self.ranks: dict[str, list[int]] = {}

    def repaired(self, name, base, tuned):
        update = _update(base, tuned)
        if update.ndim != 2 or update.numel() < DG_MIN_NUMEL or float(update.abs().max()) <= 1e-8:
            return None
        filtered, kept, rank = dg_hard(update, self.scale)
        self.ranks[name] = [kept, rank]
        return base.float() + filtered

    def settings(self) -> dict:
        return {"scale": self.scale}

    def run(self) -> Repair:
        repair = super().run()
        repair.record = lambda: DgHardRecord(ranks_kept=self.ranks)  # filled while the tensors stream, recorded after
        return repair


# -- Safe LoRA -------------------------------------------------------------------------------------

def decoder_linear_weights(context) -> list[str]:
    """Checkpoint names of the decoder layers' linear weights (what LoRA adapts)."""
    return [weight for layer in context.pair.layout.linear_weights for _, weight, _ in layer]


def safe_lora_projection(aligned: torch.Tensor, unaligned: torch.Tensor) -> torch.Tensor | None:
    """C = V V^T / ||V||_F with V = aligned - unaligned, as Safe LoRA builds it; None when V is 0."""
    v = aligned.float() - unaligned.float()
    norm = torch.linalg.norm(v)
    return None if norm == 0 else (v @ v.T) / norm


class SafeLoraRun(_TensorRepair):
    def __init__(self, context):
        super().__init__(context)
        self.unaligned = context.inputs.unaligned.tensors
        self.options = context.recipe.safe_lora or SafeLora()
        self.cosines: dict[str, float] = {}
        self.projected: set[str] = set()

    def run(self) -> Repair:
        progress = self.context.progress
        names = decoder_linear_weights(self.context)
        with progress.task("safe_lora: cosines", total=len(names)) as task:
            for name in names:
                base = self.base.get(name)
                update = _update(base, self.tuned.get(name))
                projection = safe_lora_projection(base, self.unaligned.get(name)) if bool(update.any()) else None
                if projection is not None:
                    projected = projection @ update
                    self.cosines[name] = float(torch.nn.functional.cosine_similarity(projected.reshape(1, -1), update.reshape(1, -1)))
                task.advance()
        options = self.options
        if self.cosines:
            threshold = options.threshold if options.select == "threshold" else sorted(self.cosines.values())[: options.number][-1]
            self.projected = {name for name, cosine in self.cosines.items() if cosine <= threshold}
        self.label = f"{len(self.projected)} of {len(self.cosines)} update matrices projected onto the alignment matrix of base - unaligned"
        repair = super().run()
        repair.record = SafeLoraRecord(cosines=self.cosines, projected=sorted(self.projected))
        return repair

    def repaired(self, name, base, tuned):
        if name not in self.projected:
            return None
        return base.float() + safe_lora_projection(base, self.unaligned.get(name)) @ _update(base, tuned)

    def settings(self) -> dict:
        return self.options.model_dump()


# -- Antidote ------------------------------------------------------------------------------------------

def antidote_mask(update: torch.Tensor, input_squares: torch.Tensor, ratio: float) -> torch.Tensor:
    """In each row, the entries Antidote prunes: score |update| x sqrt(sum of the input feature's
    squares), sorted ascending (stable); all but the first int(columns x (1 - ratio)) go, except
    entries the fine-tune left at base."""
    score = update.abs() * torch.sqrt(input_squares).reshape(1, -1)
    order = torch.sort(score, dim=-1, stable=True).indices
    keep = int(score.shape[1] * (1 - ratio))
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, order[:, keep:], True)
    return mask & (update != 0)


class AntidoteRun:
    def __init__(self, context):
        self.context = context
        self.ratio = (context.recipe.antidote or Antidote()).ratio
        engine = context.pair.engine
        self.prepared = engine.prepare(context.prompt_batches(context.inputs.harmful), TUNED, context.pair.layout.num_layers)

    def run(self) -> Repair:
        pair, progress = self.context.pair, self.context.progress
        engine, base, tuned = pair.engine, pair.base.tensors, pair.tuned.tensors
        squares = engine.linear_input_norms(self.prepared, TUNED, "antidote: input norms on harmful prompts (tuned)")
        engine.release(self.prepared)
        names = list(squares)
        masks = MaskSet({name: tuned.shape(name) for name in names})
        with progress.task("antidote: pruning", total=len(names)) as task:
            for name in names:
                mask = antidote_mask(_update(base.get(name), tuned.get(name)), squares[name].cpu(), self.ratio)
                masks.set(name, mask.flatten().nonzero().squeeze(1))
                task.advance()
        count, total = masks.count(), pair.layout.decoder_parameters
        return Repair(
            change=(f"{count:,} weights ({count / total:.4%} of the decoder parameters) pruned back to base, "
                    f"the top {self.ratio:.0%} of each row of the update by |update| x input norm on {len(self.context.inputs.harmful)} harmful prompts"),
            settings={"ratio": self.ratio, "harmful_prompts": len(self.context.inputs.harmful)},
            changed={"tensors": sum(1 for n in names if masks.count(n)), "parameters": count, "share_of_N": count / total},
            masks=masks, masks_metadata={"method": "antidote"},
        )
