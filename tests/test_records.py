"""surgeon.json as typed records: written and read through one model, and rendered from typed
fixtures (no model is run here)."""

import json

import pytest

from surgeon.errors import InputError
from surgeon.methods.registry import MethodSpec, register, unregister
from surgeon.methods.restore.record import RestoreRecord
from surgeon.publish.card import render_card
from surgeon.publish.push import gate
from surgeon.records import ApplyRecord, MethodRecord, RunRecord, Tradeoff, read_record, read_run_record
from surgeon.report import render_markdown

RECIPE = "base: ./base\ntuned: ./tuned\noutput: {path: ./out}\n"


def _checkpoint(step, harm, score, chosen=False, meets=True):
    return {"step": step, "restored": 10 * step, "share_of_N": step / 100, "score": score, "harmful_rate": harm,
            "meets_floor": meets, "chosen": chosen}


def run_record(method="restore", record=None, tradeoff=True, **changes) -> RunRecord:
    described = {"reference": "./m", "local": {"m": "sha256:0"}}
    models = {"base": {"harmful_rate": 0.0, "task_score": 0.30}, "tuned": {"harmful_rate": 0.9, "task_score": 0.40},
              "repaired": {"harmful_rate": 0.1, "task_score": 0.39, "restored": 20}}
    data = {
        "tool": {"name": "surgeon", "distribution": "alignment-surgeon", "version": "0.3.0"}, "recipe_sha256": "ab" * 32,
        "method": method, "inputs": {"base": described, "tuned": described}, "settings": {"steps": 2},
        "decoder_parameters_N": 1000, "change": "20 weights restored", "changed": {"tensors": 2, "parameters": 20, "share_of_N": 0.02},
        "tradeoff": {"tuned": 0.40, "tuned_harmful_rate": 0.9, "floor": 0.38, "chosen_step": 2, "chosen_by": "The schedule ran all 2 steps",
                     "checkpoints": [_checkpoint(1, 0.5, 0.395), _checkpoint(2, 0.1, 0.39, chosen=True)]} if tradeoff else None,
        "record": record,
        "evaluation": {"judge": "refusal", "safety_prompts": 10, "metric": "exact_match", "higher_is_better": True, "task_rows": 20,
                       "models": models, "safety_shared": {"probe": 0, "choosing": 0}},
        "seconds": {"repair": 1.0}, "peak_memory": {"rss_bytes": 2**30}, "memory": {}, "output": {"shards": ["model.safetensors"], "folder": "out"},
        **changes,
    }
    return RunRecord.of(json.loads(json.dumps(data)))


RESTORE = {"restored": {"total": 20, "share_of_N": 0.02, "by_layer": {"0": 15, "1": 5}, "by_module": {"mlp.down_proj": 20}},
           "steps": [{"step": s, "phase": "restore-only", "restored": 10, "reverted": 0, "total_restored": 10 * s, "harm_cosine": 0.5,
                      "seconds": 1.0} for s in (1, 2)],
           "warmup": None, "rollback_used": False, "stopped": "steps"}


def test_a_run_record_reads_back_as_written_with_the_methods_own_type(tmp_path):
    record = run_record(record=RESTORE)
    assert isinstance(record.record, RestoreRecord) and record.record.restored.by_layer == {0: 15, 1: 5}
    record.write(tmp_path / "surgeon.json")
    again = read_run_record(tmp_path)
    assert again == record and again.dump() == json.loads((tmp_path / "surgeon.json").read_text())
    assert again.dump()["format"] == "surgeon.run" and again.dump()["version"] == 2


@pytest.mark.parametrize("content, says", [
    ("{", "not a finished surgeon output (no readable surgeon.json)"),
    ('{"method": "restore", "task": {}}', "not a record this surgeon reads (written before surgeon 0.3? run again)"),
    (None, "does not read as a surgeon.run record: changed.parameters: Input should be a valid integer"),
    ("unknown key", "does not read as a surgeon.run record: record.wrong: Extra inputs are not permitted"),
])
def test_a_record_that_does_not_read_is_one_line_naming_the_field(tmp_path, content, says):
    if content is None:
        content = json.dumps({**run_record().dump(), "changed": {"tensors": 1, "parameters": "many", "share_of_N": 0.1}})
    elif content == "unknown key":
        content = json.dumps({**run_record(record=RESTORE).dump(), "record": {**RESTORE, "wrong": 1}})
    (tmp_path / "surgeon.json").write_text(content)
    with pytest.raises(InputError) as info:
        read_record(tmp_path)
    assert says in info.value.message and "\n" not in str(info.value)


def test_an_applied_checkpoints_record_is_not_a_run(tmp_path):
    applied = ApplyRecord(tool={"version": "0.3.0"}, patch={"method": "restore", "kind": "masks", "made_by": {}},
                          inputs={"base": {"reference": "./b"}, "tuned": {"reference": "./t"}}, restored=5, tensors=1, forced=False,
                          mismatches=[], output={"shards": ["model.safetensors"], "folder": "out"})
    applied.write(tmp_path / "surgeon.json")
    assert read_record(tmp_path) == applied
    with pytest.raises(InputError, match="written by `surgeon apply`, not by a run"):
        read_run_record(tmp_path)
    assert gate(applied) == ["this checkpoint was written by `surgeon apply` and not evaluated (evaluate it, or push the patch's own run)"]


def test_the_push_gate_reads_the_tradeoff_of_any_method():
    record = run_record()
    assert gate(record) == []
    record.tradeoff = Tradeoff(tuned=0.4, tuned_harmful_rate=0.9, floor=1.0, checkpoints=[], chosen_step=None)
    record.evaluation.models["repaired"].harmful_rate = 0.95
    assert gate(record) == ["the harmful rate did not fall (tuned 90.0%, repaired 95.0%)",
                            "no checkpoint kept the task score within the floor 1.0000"]


def test_restores_sections_render_from_its_record():
    record = run_record(record=RESTORE)
    report = render_markdown(record)
    assert "The schedule ran all 2 steps." in report and "| step 2 | 2.000% | 10.0% | 0.3900 | yes | chosen |" in report
    assert "| 2 | restore-only | 10 | 0 | 20 | 10.0% | 0.3900 | chosen |" in report
    assert "Task floor 0.3800 (tuned 0.4000); rollback not used." in report
    card = render_card(record, RECIPE)
    assert "## Restored weights" in card and "| mlp.down_proj | 20 |" in card and "layer   0" in card


class Votes(MethodRecord):
    """A toy method's record: how many experts voted for the repair."""

    voters: int

    def report_sections(self, run):
        return ["## Votes", "", f"{self.voters} experts voted for {run.change}.", ""]

    def card_sections(self, run):
        return [f"Approved by {self.voters} experts.", ""]

    def summary_lines(self, run):
        return [f"{self.voters} votes"]


@pytest.fixture
def voting():
    register(MethodSpec("voting", "surgeon.methods.baselines:ResetLayersRun", "a toy method of the tests", record=Votes))
    yield
    unregister("voting")


def test_a_methods_own_record_and_sections_need_no_change_elsewhere(voting, tmp_path):
    from surgeon.console import summary_lines

    record = run_record(method="voting", record={"voters": 3}, tradeoff=False)
    record.write(tmp_path / "surgeon.json")
    again = read_run_record(tmp_path)
    assert isinstance(again.record, Votes) and again.record.voters == 3
    report = render_markdown(again)
    assert "## Votes\n\n3 experts voted for 20 weights restored." in report and "## Checkpoints" not in report
    assert "Approved by 3 experts." in render_card(again, RECIPE)
    assert "3 votes" in summary_lines(again, tmp_path)
