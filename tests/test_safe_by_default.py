"""What a user gets without reading the manual: harm probed and measured with the sets that ship
with surgeon, a loud line when harm is turned off, and a card that calls rows held out only when
they are."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from surgeon.cli import main
from surgeon.data.datasets import load_rows
from surgeon.pipeline import run
from surgeon.recipe import load_recipe
from surgeon.tiny import ANSWERS, HARMFUL, TASK, write_jsonl


def test_the_shipped_sets_are_harmbench_and_share_no_prompt():
    probe, measure, harmless = (load_rows(f"surgeon://{name}.jsonl") for name in ("harmbench_val", "harmbench_test", "benign"))
    assert (len(probe), len(measure), len(harmless)) == (41, 159, 118)
    prompts = [{r["prompt"] for r in rows} for rows in (probe, measure, harmless)]
    assert not prompts[0] & prompts[1] and not (prompts[0] | prompts[1]) & prompts[2]
    assert sum(r["kind"] == "sounds_harmful" for r in harmless) == 58
    assert {r["category"] for r in measure} >= {"chemical_biological", "cybercrime_intrusion", "illegal"}


HARMLESS = load_rows("surgeon://benign.jsonl")


def next_token_kl(reference, model, rows) -> float:
    """Mean KL(reference || model) of the next token after each prompt (chat-templated), computed on
    the whole models in memory in float32, one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference)
    p, q = (AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval() for m in (reference, model))
    total = 0.0
    with torch.no_grad():
        for row in rows:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
            logp, logq = (torch.log_softmax(m(ids).logits[0, -1], -1) for m in (p, q))
            total += float((logp.exp() * (logp - logq)).sum())
    return total / len(rows)


def test_the_readme_four_line_recipe_measures_harm_and_chooses_on_it(llama, tmp_path):
    """The README's recipe, on the tiny models (base named too: the shipped one is a Hub id): no
    safety file named, yet tuned, every checkpoint and the repair get a harmful rate on the shipped
    HarmBench set, and the checkpoint written is the least harmful within the floor."""
    write_jsonl(tmp_path / "sql_train.jsonl", [{"prompt": p} for p in TASK])
    write_jsonl(tmp_path / "sql_eval.jsonl", [{"prompt": p, "response": a} for p, a in zip(TASK, ANSWERS)])
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"extends: llama-3.1-8b-instruct\nbase: {llama[0]}\ntuned: {llama[1]}\ndata: {{task: ./sql_train.jsonl}}\n"
                      "evaluate: {task: {path: ./sql_eval.jsonl, metric: loss}}\n"
                      f"output: {{path: {tmp_path / 'out'}, max_shard_size: 40KB}}\n")
    report = run(load_recipe(recipe)).dump()
    evaluation = report["evaluation"]
    assert evaluation["judge"] == "refusal" and evaluation["safety_prompts"] == 159
    assert all(evaluation["models"][m]["harmful_rate"] is not None for m in ("base", "tuned", "repaired"))
    assert evaluation["benign_prompts"] == 118  # over-refusal measured on the shipped harmless set, final table only
    assert all(0 <= evaluation["models"][m]["over_refusal"] <= 1 and evaluation["models"][m]["over_refusal_interval"] for m in ("base", "tuned", "repaired"))
    # the capability check: KL(tuned || model) of the next token after each harmless prompt, streamed,
    # equals the full models' in memory
    kl = {m: evaluation["models"][m]["kl_from_tuned"] for m in ("base", "tuned", "repaired")}
    assert kl["tuned"] == 0 and kl["base"] == pytest.approx(next_token_kl(llama[1], llama[0], HARMLESS), rel=1e-3) and kl["base"] > 0
    assert kl["repaired"] == pytest.approx(next_token_kl(llama[1], tmp_path / "out", HARMLESS), rel=1e-3)
    checkpoints = report["tradeoff"]["checkpoints"]
    within = [c for c in checkpoints if c["meets_floor"]]
    assert all(c["harmful_rate"] is not None for c in checkpoints) and report["settings"]["select"] == "lowest_harm_within_floor"
    assert report["tradeoff"]["chosen_step"] == min(reversed(within), key=lambda c: c["harmful_rate"])["step"]
    assert report["inputs"].get("data.harmful") is None  # shipped: named by the recipe's surgeon:// reference, not a local file


def test_harm_turned_off_is_said_first_everywhere(llama, write_recipe, tmp_path):
    recipe = write_recipe(*llama)  # the tests' recipes say evaluate.safety: none
    validated = CliRunner().invoke(main, ["validate", str(recipe)])
    assert validated.exit_code == 0 and "warning: harm not measured" in validated.output
    result = CliRunner().invoke(main, ["run", str(recipe), "--overwrite"])
    assert result.exit_code == 0, result.output
    summary = result.output[result.output.index("warning: harm not measured"):]
    assert summary.splitlines()[1].startswith("restore: ")  # the first line of the run's summary
    out = tmp_path / "repaired"
    assert "Harm not measured" in (out / "report.md").read_text().splitlines()[2]
    card = (out / "README.md").read_text()
    body = card.split("---\n", 2)[2].lstrip().splitlines()
    assert body[0] == "# Repaired model: harm not measured" and "Harm not measured" in body[2]
    assert "Safety-repaired" not in card


def test_the_card_calls_rows_held_out_only_when_they_are(llama, write_recipe, tmp_path):
    """The safety set equal to the probe set, choosing too: the card names the overlap. A set that
    shares no prompt with the probe, with a select_on set choosing: held out."""
    same = write_recipe(*llama, evaluate={"safety": {"prompts": HARMFUL, "max_new_tokens": 4}, "task": {"path": str(write_jsonl(
        tmp_path / "task.jsonl", [{"prompt": p, "response": a} for p, a in zip(TASK, ANSWERS)])), "metric": "loss"}},
        restore={"steps": 2, "save_every": 1})
    run(load_recipe(same)).dump()
    card = (tmp_path / "repaired" / "README.md").read_text()
    assert "held-out" not in card
    assert "12 harmful prompts, not held out (12 of them also probed the repair; 12 of them also chose the checkpoint)" in card
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "not held out" in meta["model-index"][0]["results"][0]["dataset"]["name"]

    other = [f"please {p}" for p in HARMFUL]
    held = write_recipe(*llama, name="held.yaml", output={"path": str(tmp_path / "held"), "max_shard_size": "40KB"},
                        evaluate={"safety": {"prompts": other, "max_new_tokens": 4},
                                  "select_on": {"safety": {"prompts": HARMFUL[:6], "max_new_tokens": 4}},
                                  "task": {"path": str(tmp_path / "task.jsonl"), "metric": "loss"}},
                        restore={"steps": 2, "save_every": 1})
    report = run(load_recipe(held)).dump()
    assert report["evaluation"]["safety_shared"] == {"probe": 0, "choosing": 0}
    assert "12 held-out harmful prompts" in (tmp_path / "held" / "README.md").read_text()
    assert json.loads((tmp_path / "held" / "surgeon.json").read_text())["evaluation"]["chosen_on"]["safety"] == "evaluate.select_on.safety"


def test_a_hub_fine_tune_keeps_its_licence_and_card(hub, llama, write_recipe, tmp_path):
    import shutil

    folder = tmp_path / "hub-tuned"
    shutil.copytree(llama[1], folder)
    (folder / "README.md").write_text("---\nlicense: llama3.1\n---\n# The SQL fine-tune\n\nTrained on SQL.\n")
    hub.add("org/sql-tuned", folder)
    run(load_recipe(write_recipe(llama[0], "org/sql-tuned", restore={"steps": 1}))).dump()
    card = (tmp_path / "repaired" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "llama3.1" and "# The SQL fine-tune" in card


def _adapter(base, folder, recorded: str | None = None):
    """A LoRA adapter of `base`, its adapter_config.json naming `recorded` as its base when given."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(folder)
    if recorded is not None:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": recorded}))
    return folder


def test_an_adapter_of_another_base_is_refused_unless_allowed(llama, write_recipe, tmp_path):
    adapter = _adapter(llama[0], tmp_path / "adapter", recorded="org/another-model")
    result = CliRunner().invoke(main, ["validate", str(write_recipe(llama[0], adapter))])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "trained on 'org/another-model', not on base" in result.output and str(llama[0]) in result.output and "any_base" in result.output
    allowed = write_recipe(llama[0], adapter, name="allowed.yaml", restore={"steps": 1})
    allowed.write_text(allowed.read_text().replace(f"tuned: {adapter}", f"tuned: {{path: {adapter}, any_base: true}}"))
    report = run(load_recipe(allowed)).dump()
    assert report["inputs"]["tuned"]["any_base"] and "applied anyway (`any_base: true`)" in (tmp_path / "repaired" / "README.md").read_text()
    own = _adapter(llama[0], tmp_path / "own")  # recorded as the folder it was trained on
    assert CliRunner().invoke(main, ["validate", str(write_recipe(llama[0], own, name="own.yaml"))]).exit_code == 0


def test_tuned_equal_to_base_is_one_line(llama, write_recipe, tmp_path):
    import shutil

    same = CliRunner().invoke(main, ["validate", str(write_recipe(llama[0], llama[0]))])
    assert same.exit_code == 2 and "tuned is the same model as base" in same.output
    copy = shutil.copytree(llama[0], tmp_path / "copy")
    result = CliRunner().invoke(main, ["run", str(write_recipe(llama[0], copy, name="copy.yaml"))])
    assert result.exit_code == 2 and "tuned holds the same weights and config as base" in result.output, result.output
    assert not (tmp_path / "repaired").exists()


def test_a_tuned_task_score_of_zero_is_a_warning(llama, write_recipe, task_eval_file):
    recipe = write_recipe(*llama, evaluate={"task": {"path": str(task_eval_file), "metric": "exact_match", "max_new_tokens": 2}},
                          restore={"steps": 1})
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "warning: tuned scores 0 on the task (exact_match), so the floor protects nothing" in result.output


def test_messages_rows_run_as_their_text_twins(llama, write_recipe, tmp_path):
    """Chat-format data (probe, task with answers, evaluation): the chat template builds each prompt
    from the turns, the last assistant turn is the answer; the run equals the one on text columns."""
    from surgeon.engine.masks import MaskSet

    turns = lambda p, a=None: {"messages": [{"role": "user", "content": p}] + ([{"role": "assistant", "content": a}] if a else [])}
    harm_m = write_jsonl(tmp_path / "harm_m.jsonl", [turns(p) for p in HARMFUL])
    task_m = write_jsonl(tmp_path / "task_m.jsonl", [turns(p, a) for p, a in zip(TASK, ANSWERS)])
    harm_t = write_jsonl(tmp_path / "harm_t.jsonl", [{"prompt": p} for p in HARMFUL])
    task_t = write_jsonl(tmp_path / "task_t.jsonl", [{"prompt": p, "response": a} for p, a in zip(TASK, ANSWERS)])

    def repair(name, harm, task, field, answers):
        recipe = write_recipe(*llama, name=f"{name}.yaml", output={"path": str(tmp_path / name), "max_shard_size": "40KB"},
                              data={"harmful": {"path": str(harm), "field": field}, "task": {"path": str(task), "field": field, "answer_field": answers}},
                              rollback={"mode": "always", "objective": "answer_loss"}, restore={"steps": 2, "save_every": 1},
                              evaluate={"task": {"path": str(task), "prompt_field": field, "metric": "loss"},
                                        "safety": {"path": str(harm), "field": field, "max_new_tokens": 4}})
        return run(load_recipe(recipe)).dump()

    chat, text = repair("chat", harm_m, task_m, "messages", "messages"), repair("text", harm_t, task_t, "prompt", "response")
    ours, theirs = (MaskSet.load(tmp_path / name / "masks.safetensors") for name in ("chat", "text"))
    assert ours.count() > 0 and ours.names() == theirs.names() and all(torch.equal(ours.get(n), theirs.get(n)) for n in ours.names())
    for model in ("base", "tuned", "repaired"):
        ours, theirs = chat["evaluation"]["models"][model], text["evaluation"]["models"][model]
        assert (ours["harmful_rate"], ours["task_score"]) == (theirs["harmful_rate"], theirs["task_score"]), model
    unanswered = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                                                                    {"role": "assistant", "content": "b"}]}])
    result = CliRunner().invoke(main, ["validate", str(write_recipe(*llama, name="bad.yaml", data={"harmful": {"path": str(unanswered), "field": "messages"}}))])
    assert result.exit_code == 2 and "do not end with a user turn" in result.output and "bad.jsonl row 1" in result.output


def test_set_overrides_a_recipe_key_is_checked_and_recorded(llama, write_recipe, tmp_path):
    recipe = write_recipe(*llama, restore={"steps": 1})
    result = CliRunner().invoke(main, ["run", str(recipe), "--set", "restore.steps=3", "--set", "probe.batch_size=6", "-q"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "repaired"
    report = json.loads((out / "surgeon.json").read_text())
    assert len(report["record"]["steps"]) == 3
    copy = (out / "recipe.yaml").read_text()
    assert "--set restore.steps=3 --set probe.batch_size=6" in copy.splitlines()[0]
    assert yaml.safe_load(copy)["restore"]["steps"] == 3 and yaml.safe_load(copy)["probe"]["batch_size"] == 6
    for setting, message in (("restore.stesp=1", "unknown key 'restore.stesp'; did you mean 'steps'?"),
                             ("restore.steps=many", "restore.steps: Input should be a valid integer"),
                             ("restore", "--set takes key.path=value"),
                             ("evaluate.safety=none", "warning: harm not measured")):
        checked = CliRunner().invoke(main, ["validate", "--schema-only", str(recipe), "--set", setting])
        refused = not setting.startswith("evaluate")
        assert message in checked.output and checked.exit_code == (2 if refused else 0), (setting, checked.output)
        assert not refused or f"(--set {setting})" in checked.output
    planned = CliRunner().invoke(main, ["plan", str(recipe), "--set", "probe.layer=2", "--no-calibrate"])
    assert planned.exit_code == 0 and "probe layer E 2" in planned.output, planned.output


def test_answers_are_shown_side_by_side(llama, write_recipe, task_eval_file, tmp_path):
    """report.md shows tuned's and the repair's answers to the first prompts of each set, judged;
    surgeon eval --show N prints N of them for every model."""
    recipe = write_recipe(*llama, evaluate={"safety": {"prompts": HARMFUL[:5], "max_new_tokens": 4}, "task": {"path": str(task_eval_file), "metric": "loss"}},
                          restore={"steps": 1})
    run(load_recipe(recipe)).dump()
    report = (tmp_path / "repaired" / "report.md").read_text()
    answers = report[report.index("## Answers"):]
    assert answers.count("**Harmful prompt") == 3 and answers.count("**Task prompt") == 3
    assert answers.count("- *tuned*: ") == 6 == answers.count("- *repaired*: ") and answers.count("- *reference*: ") == 3
    first = answers.split("**Harmful prompt 1:**")[1].split("**Harmful prompt 2")[0]
    assert first.count(" — **complied**") + first.count(" — refused") + first.count(" — degenerate") == 2
    harmful = write_jsonl(tmp_path / "h.jsonl", [{"prompt": p} for p in HARMFUL])
    kept = tmp_path / "answers.jsonl"
    eval_args = ["eval", str(llama[0]), str(llama[1]), "--safety", str(harmful), "--max-new-tokens", "4"]
    shown = CliRunner().invoke(main, [*eval_args, "--show", "3", "--answers", str(kept)])
    assert shown.exit_code == 0, shown.output
    assert shown.output.count("**Harmful prompt") == 3 and shown.output.count(f"- *{llama[0]}*: ") == 3 == shown.output.count(f"- *{llama[1]}*: ")
    # --answers keeps every answer, judged, one line per model and prompt, to be judged again
    lines = [json.loads(line) for line in kept.read_text().splitlines()]
    assert [(r["model"], r["row"]) for r in lines] == [(m, i) for m in map(str, llama[:2]) for i in range(len(HARMFUL))]
    assert {r["set"] for r in lines} == {"safety"} and all(r["verdict"] in ("refused", "complied", "degenerate") for r in lines)
    assert [r["prompt"] for r in lines[: len(HARMFUL)]] == HARMFUL
    again = CliRunner().invoke(main, [*eval_args, "--answers", str(kept)])  # its own earlier file: replaced
    assert again.exit_code == 0 and kept.read_text() == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines)
    refused = CliRunner().invoke(main, [*eval_args, "--answers", str(harmful)])  # anything else: never
    assert refused.exit_code == 2 and "not an answers file surgeon wrote" in refused.output and harmful.read_text().count("\n") == len(HARMFUL)


def test_a_placeholder_names_its_field_and_the_recipe_that_set_it(llama, tmp_path):
    """A forgotten evaluate section inherits the shipped recipe's placeholder: the error says which
    field holds it and which file set it."""
    write_jsonl(tmp_path / "t.jsonl", [{"prompt": p} for p in TASK])
    recipe = tmp_path / "forgot.yaml"
    recipe.write_text(f"extends: llama-3.1-8b-instruct\nbase: {llama[0]}\ntuned: {llama[1]}\ndata: {{task: ./t.jsonl}}\n")
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "(evaluate.task: " in result.output and "your-task-eval.jsonl" in result.output
    assert "set at " in result.output and "llama-3.1-8b-instruct.yaml:" in result.output
    null = CliRunner().invoke(main, ["validate", "--schema-only", str(recipe), "--set", "evaluate=null"])
    assert null.exit_code == 2 and "evaluate: expected a mapping of keys, not null" in null.output and "Evaluate" not in null.output


def test_over_refusal_is_the_share_of_harmless_prompts_refused(llama, tmp_path):
    """surgeon eval --benign: each model's over-refusal (refusal markers on the answers' opening),
    with its interval, and the paired change of the second model from the first."""
    from surgeon.evaluation.judges import RefusalJudge

    harmless = write_jsonl(tmp_path / "harmless.jsonl", [{"prompt": p} for p in TASK])
    args = ["eval", str(llama[0]), str(llama[1]), "--safety", "none", "--task", str(write_jsonl(tmp_path / "t.jsonl", [{"prompt": p, "response": a} for p, a in zip(TASK, ANSWERS)])),
            "--benign", str(harmless), "--max-new-tokens", "6", "--json", "--show", "12"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["benign_prompts"] == 12
    first, second = (data["models"][str(m)] for m in llama)
    assert "over_refusal" in second["change_from_first"]
    assert first["kl_from_tuned"] is None  # no recipe, no tuned to measure the divergence from
    refuses = RefusalJudge().refuses
    for scores in (first, second):  # the rate is what the markers say of the answers, here generated from the task prompts
        answers = [row["answer"] for row in scores["examples"]["task"]]
        assert scores["over_refusal"] == sum(map(refuses, answers)) / len(answers)
    off = CliRunner().invoke(main, [*args[: args.index("--benign")], "--benign", "none", "--max-new-tokens", "6", "--json"])
    assert off.exit_code == 0 and json.loads(off.output)["benign_prompts"] == 0, off.output


def test_answers_come_from_the_answer_column_or_a_conversation_never_from_a_text_prompt():
    from surgeon.data.datasets import answer_column
    from surgeon.errors import InputError

    chat = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    assert answer_column(chat, "response", "f.jsonl", None, "messages") == ["a"]
    assert answer_column([{"prompt": "q", "response": "r"}], "response", "f.jsonl", None, "prompt") == ["r"]
    try:
        answer_column([{"prompt": "q"}], "response", "f.jsonl", None, "prompt")
    except InputError as error:
        assert "no text or messages field 'response'" in error.one_line()
    else:
        raise AssertionError("a text prompt was taken as its own answer")


def test_eval_with_a_recipe_reads_another_safety_file_by_its_own_columns(llama, tmp_path):
    """The recipe's safety set (the shipped one, with its category column) gives way to --safety's
    file whole: its judge stays, its columns do not."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: linear\nbase: {llama[0]}\ntuned: {llama[1]}\n")
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": p} for p in HARMFUL[:2]])
    result = CliRunner().invoke(main, ["eval", "tuned", "--recipe", str(recipe), "--safety", str(plain), "--benign", "none",
                                       "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["safety_prompts"] == 2 and data["judge"] == "refusal" and data["models"]["tuned"]["harmful_by_category"] is None
