"""Hub references through the real huggingface_hub client, against a loopback server."""

import json

import pytest

from surgeon.data.datasets import column, load_rows
from surgeon.errors import InputError
from surgeon.io.references import resolve_model


def test_hub_model_is_downloaded_and_recorded_by_commit(hub, llama):
    sha = hub.add("org/tuned", llama[1])
    model = resolve_model("org/tuned@main")
    assert model.revision == sha and model.folder.name == sha
    assert sorted(model.tensors.names()) == sorted(resolve_model(str(llama[1])).tensors.names())
    assert any(r.startswith("GET /api/models/org/tuned/revision/main") for r in hub.requests)


def test_missing_hub_model_is_one_clear_line(hub):
    with pytest.raises(InputError) as info:
        resolve_model("org/absent")
    assert "not found on the Hub" in info.value.one_line() and info.value.where == "org/absent"


def test_hub_dataset_file(hub, tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    hub.add("org/prompts", folder, repo_type="dataset")
    reference = "hf://datasets/org/prompts/train.jsonl"
    assert column(load_rows(reference), "prompt", reference) == ["hello"]
