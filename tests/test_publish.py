"""Model card and Hub push, through the real huggingface_hub client and a loopback Hub."""

import json
import shutil

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from surgeon.cli import main
from surgeon.errors import RecipeValidationError
from surgeon.pipeline import run
from surgeon.recipe.options import RunOptions
from surgeon.publish.push import gate, push
from surgeon.recipe.schema import Push
from surgeon.records import RunRecord
from surgeon.recipe import load_recipe, parse_recipe
from surgeon.tiny import HARMFUL

TOKEN = "hf_loopbackSecret123"


@pytest.fixture(scope="module")
def finished(model_pairs, tmp_path_factory):
    """A finished output whose tuned model has its own card (license: mit)."""
    root = tmp_path_factory.mktemp("finished")
    base, tuned = model_pairs["llama"]
    tuned_with_card = root / "tuned"
    shutil.copytree(tuned, tuned_with_card)
    (tuned_with_card / "README.md").write_text("---\nlicense: mit\n---\n# The SQL fine-tune\n\nTrained on SQL.\n")
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": p, "response": "select"}) + "\n" for p in HARMFUL))
    recipe = root / "recipe.yaml"
    recipe.write_text(json.dumps({
        "base": str(base), "tuned": str(tuned_with_card),
        "data": {"harmful": {"prompts": HARMFUL}, "task": {"prompts": HARMFUL}},
        "restore": {"sparsity": 0.01, "steps": 2, "warmup": 0, "save_every": 1, "rollback": {"mode": "never"}},
        "evaluate": {"safety": {"prompts": HARMFUL, "max_new_tokens": 4}, "task": {"path": str(task), "metric": "loss"}},
        "compute": {"device": "cpu"},
        "output": {"path": str(root / "out"), "max_shard_size": "60KB"},
    }))
    run(load_recipe(recipe)).dump()
    return root / "out"


def _folder(finished, tmp_path, tuned_rate=0.5, repaired_rate=0.1):
    folder = tmp_path / "out"
    shutil.copytree(finished, folder)
    report = json.loads((folder / "surgeon.json").read_text())
    report["evaluation"]["models"]["tuned"]["harmful_rate"] = tuned_rate
    report["evaluation"]["models"]["repaired"]["harmful_rate"] = repaired_rate
    (folder / "surgeon.json").write_text(json.dumps(report))
    return folder


def test_card_front_matter_parses_and_keeps_the_tuned_card_below(finished):
    text = (finished / "README.md").read_text()
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["license"] == "mit"
    assert set(data["tags"]) == {"surgeon", "safety", "alignment"}
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    report = json.loads((finished / "surgeon.json").read_text())
    assert metrics["loss"] == round(report["evaluation"]["models"]["repaired"]["task_score"], 4)
    assert "harmful_rate" in metrics
    body = card.text
    assert body.index("# Safety-repaired model") < body.index("| repaired |") < body.index("# The SQL fine-tune")
    assert "arXiv 2504.09757" in body and "```yaml" in body and "Trained on SQL." in body
    assert "base_model" not in data  # local inputs have no Hub id


def test_card_validates_against_the_hub_rules(hub, finished):
    ModelCard((finished / "README.md").read_text()).validate()
    assert hub.requests == ["POST /api/validate-yaml"]


def test_push_is_one_commit_with_every_file_surgeon_wrote_and_nothing_else(hub, finished, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = _folder(finished, tmp_path)
    local = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    # what a user may keep beside the output, which must never be published
    (folder / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    (folder / ".secret").mkdir()
    (folder / ".secret" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (folder / "notes.txt").write_text("private notes\n")
    url = push(folder, Push(repo_id="org/repaired"), backoff=0)
    assert url.startswith(f"{hub.endpoint}/org/repaired/commit/")
    assert len(hub.commits) == 1 and hub.created["org/repaired"]["private"] is True
    pushed = hub.commits[0]["files"]
    assert set(pushed) == set(local) and hub.commits[0]["branch"] == "main"
    assert all(pushed[name] == local[name] for name in local if name != "recipe.yaml")
    # the recipe as the card rewrites it: inputs by their published names, no path of this machine
    assert str(tmp_path) not in pushed["recipe.yaml"].decode() and str(finished.parent) not in pushed["recipe.yaml"].decode()
    assert "./tuned" in pushed["recipe.yaml"].decode() or "tuned: ./" in pushed["recipe.yaml"].decode()
    assert not [p for p in folder.parent.iterdir() if "surgeon-push" in p.name]  # the staging folder is gone
    assert any(r.endswith(".git/info/lfs/objects/batch") for r in hub.requests)
    assert all(h.get("authorization") == f"Bearer {TOKEN}" for h in hub.headers if not h["path"].startswith("/lfs-upload/"))


def test_public_branch_and_pull_request_are_honoured(hub, finished, tmp_path):
    folder = _folder(finished, tmp_path)
    push(folder, Push(repo_id="org/repaired", private=False, branch="dev"), backoff=0)
    assert hub.created["org/repaired"]["private"] is False and "dev" in hub.branches["org/repaired"]
    assert hub.commits[0]["branch"] == "dev" and not hub.commits[0]["create_pr"]
    push(folder, Push(repo_id="org/repaired", create_pr=True), backoff=0)
    assert hub.commits[1]["branch"] == "main" and hub.commits[1]["create_pr"]


def test_a_pull_request_against_another_branch_is_refused():
    """The Hub opens pull requests against the default branch only (huggingface_hub says so too)."""
    with pytest.raises(ValueError, match="default branch"):
        Push(repo_id="org/repaired", branch="dev", create_pr=True)


def test_existing_files_stay_unless_prune(hub, finished, tmp_path):
    folder = _folder(finished, tmp_path)
    push(folder, Push(repo_id="org/repaired"), backoff=0)
    hub.commits[0]["files"]["old.txt"] = b"keep me?"
    push(folder, Push(repo_id="org/repaired"), backoff=0)
    assert hub.commits[1]["deleted"] == []
    push(folder, Push(repo_id="org/repaired", prune=True), backoff=0)
    assert hub.commits[2]["deleted"] == ["old.txt"]


def test_transient_upload_errors_are_retried(hub, finished, tmp_path):
    hub.fail_uploads = 1
    push(_folder(finished, tmp_path), Push(repo_id="org/repaired"), backoff=0)
    assert len(hub.commits) == 1 and hub.fail_uploads == 0


def test_server_error_mid_upload_leaves_no_commit_and_says_how_to_resume(hub, finished, tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # surgeon's and the client's backoff
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = _folder(finished, tmp_path)
    before = sorted((p.name, p.stat().st_size) for p in folder.iterdir())
    hub.fail_uploads = 10**6
    result = CliRunner().invoke(main, ["push", str(folder), "--repo-id", "org/repaired", "--branch", "dev"])
    assert result.exit_code == 2 and hub.commits == [] and "after 4 attempt(s)" in result.output
    assert f"resume with: surgeon push {folder} --repo-id org/repaired --private --branch dev" in result.output
    assert TOKEN not in result.output
    assert sorted((p.name, p.stat().st_size) for p in folder.iterdir()) == before


def test_token_never_appears_in_output_card_or_report(hub, finished, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = _folder(finished, tmp_path)
    result = CliRunner().invoke(main, ["push", str(folder), "--repo-id", "org/repaired", "--public"])
    assert result.exit_code == 0, result.output
    assert "pushed: " in result.output and TOKEN not in result.output
    assert all(TOKEN.encode() not in content for content in hub.commits[0]["files"].values())


def test_push_gate_refuses_without_evidence_of_repair(hub, finished, tmp_path):
    folder = _folder(finished, tmp_path, tuned_rate=0.2, repaired_rate=0.3)
    result = CliRunner().invoke(main, ["push", str(folder), "--repo-id", "org/repaired"])
    assert result.exit_code == 2 and "harmful rate did not fall (tuned 20.0%, repaired 30.0%)" in result.output and "--force" in result.output
    assert hub.requests == []
    assert CliRunner().invoke(main, ["push", str(folder), "--repo-id", "org/repaired", "--force"]).exit_code == 0
    unmeasured = RunRecord.of({**json.loads((folder / "surgeon.json").read_text()), "evaluation": None})
    unmeasured.tradeoff = unmeasured.tradeoff.model_copy(update={"floor": 1.0, "chosen_step": None})
    assert gate(unmeasured) == [
        "the run measured no harmful rate for tuned and repaired (add evaluate.safety)",
        "no checkpoint kept the task score within the floor 1.0000",
    ]


def test_run_pushes_at_the_end_when_the_recipe_says_so(hub, llama, write_recipe, tmp_path):
    recipe = write_recipe(*llama, output={"path": str(tmp_path / "repaired"), "push": {"repo_id": "org/from-run", "branch": "v1"}})
    report = run(load_recipe(recipe), RunOptions(force_push=True)).dump()
    assert report["pushed"].startswith(f"{hub.endpoint}/org/from-run/commit/")
    assert hub.commits[0]["branch"] == "v1" and "README.md" in hub.commits[0]["files"]
    assert (tmp_path / "repaired" / "surgeon.json").exists()


def test_a_token_in_a_recipe_is_refused():
    text = "base: a\ntuned: b\ndata: {harmful: h, task: t}\nrestore: {rollback: {mode: never}}\noutput: {push: {repo_id: o/n, token: hf_x}}\n"
    with pytest.raises(RecipeValidationError) as info:
        parse_recipe(text)
    assert "secrets never go in a recipe" in info.value.problems[0][0] and "hf_x" not in str(info.value.problems)


def test_push_command_checks_the_repo_id(tmp_path):
    result = CliRunner().invoke(main, ["push", str(tmp_path), "--repo-id", "no-slash"])
    assert result.exit_code == 2 and "not a Hub repo id" in result.output


def test_a_patch_is_pushed_as_its_own_repository_with_a_card(hub, llama, write_recipe, tmp_path):
    recipe = write_recipe(*llama, output={"path": str(tmp_path / "patch"), "write": "patch", "push": {"repo_id": "org/the-patch"}})
    report = run(load_recipe(recipe), RunOptions(force_push=True)).dump()
    files = hub.commits[0]["files"]
    assert report["pushed"] and {"masks.safetensors", "patch.json", "README.md"} <= set(files)
    assert not any(name.startswith("model") for name in files)
    card = (tmp_path / "patch" / "README.md").read_text()
    assert "holds a safety patch, not a model" in card and "surgeon apply . --base" in card
