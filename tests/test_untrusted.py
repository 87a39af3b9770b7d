"""No file given to the tool runs code: crafted pickles that would write a marker file, a
`code_eval` module in the current directory, and lm-eval's code tasks by whatever name."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from rlsedit_cli.cli import main
from rlsedit_cli.errors import DataError
from rlsedit_cli.runner.run import run

TINY = ["editor=rlsedit", "eval=none", "stream.num_edits=4", "stream.batch_size=2",
        "stream.shuffle=false", "measure.fluency=false", "measure.pre_edit=false",
        "measure.retention_edits=0", "checkpoint.every=1"]


class Payload:
    """Unpickling this writes ``path``: what a crafted file would do with os.system."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.write_text, (self.path, "code from the file ran\n")


@pytest.fixture
def crafted_run(make_cfg, tmp_path):
    """A real run folder whose checkpoint.pt was replaced by a crafted one (as shared)."""
    run(make_cfg(*TINY))
    folder = tmp_path / "run"
    (folder / "summary.json").unlink()  # as if killed after its last checkpoint
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    state["editor"] = Payload(tmp_path / "ran.txt")
    torch.save(state, folder / "checkpoint.pt")
    return folder


def test_a_crafted_checkpoint_runs_no_code_on_export_or_resume(crafted_run, make_cfg,
                                                               tmp_path, caplog):
    marker = tmp_path / "ran.txt"
    assert main(["export", str(crafted_run), "--out", str(tmp_path / "out")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "other than tensors and plain values" in errors[0]
    with pytest.raises(DataError, match="it was not loaded"):
        run(make_cfg(*TINY, f"resume={crafted_run}"))
    assert not marker.exists()


def test_checkpoints_hold_only_tensors_and_plain_values(make_cfg, tmp_path):
    """The run's own checkpoint loads with torch's safe loader, random states included."""
    run(make_cfg(*TINY))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert isinstance(state["rng"]["numpy"][1], torch.Tensor) and state["identity"]["records"]


def test_paper_glue_pickles_are_read_as_plain_data_only(tmp_path):
    from rlsedit_cli.eval.paper_glue import read_rows

    rows = [{"sentence": "a fine film", "label": 1, "idx": 3}]
    (tmp_path / "sst2.pkl").write_bytes(pickle.dumps(rows))  # AlphaEdit's files: plain rows
    assert read_rows(tmp_path, "sst2") == rows
    marker = tmp_path / "ran.txt"
    (tmp_path / "mrpc.pkl").write_bytes(pickle.dumps([Payload(marker)]))
    with pytest.raises(DataError, match=r"eval.paper_glue_dir: cannot read .*mrpc.pkl \(it "
                                        r"names the Python object pathlib"):
        read_rows(tmp_path, "mrpc")
    assert not marker.exists()


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


@pytest.mark.parametrize("task", ["humaneval", "mbpp", "mbpp_plus", "humaneval_instruct",
                                  "humaneval_64"])
def test_code_tasks_are_gated_by_lm_evals_own_marker(task, manager):
    from rlsedit_cli.eval.general import GeneralSettings, evaluate_lm
    from rlsedit_cli.eval.specs import executes_code

    assert executes_code(manager, task)
    result = evaluate_lm(None, [task], GeneralSettings())  # refused before the model is used
    assert "executes generated code: set eval.allow_code_execution=true" in result.errors[task]


def test_plain_tasks_and_groups_are_not_code_tasks(manager):
    from rlsedit_cli.eval.specs import executes_code

    assert not any(executes_code(manager, t) for t in ("arc_easy", "mmlu", "sst2", "wikitext"))


def test_no_metric_module_is_imported_from_the_current_directory(tmp_path, monkeypatch):
    """evaluate.load("code_eval") imported ./code_eval/code_eval.py; now code_eval is ours and
    any other metric of a name that exists in the current directory is refused."""
    import evaluate

    from rlsedit_cli.eval.code_exec import CodeEval, offline_code_eval

    marker = tmp_path / "ran.txt"
    for name in ("code_eval", "exact_match"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.py").write_text(
            f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    monkeypatch.chdir(tmp_path)
    with offline_code_eval():
        assert isinstance(evaluate.load("code_eval"), CodeEval)
        with pytest.raises(DataError, match="would be imported and run"):
            evaluate.load("exact_match")
    assert not marker.exists()
    shutil.rmtree(tmp_path / "exact_match")
