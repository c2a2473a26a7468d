"""The examples in docstrings, the README quickstart and the trainer snippets run as written, and
do what they say (tests/test_docs_examples.py runs every docs example; these check results)."""

import doctest
import re
from pathlib import Path

import pytest

import gradscope.stats.compute
import gradscope.stats.tensor_stats

README = Path(__file__).resolve().parents[1] / "README.md"
TRAINERS = Path(__file__).resolve().parents[1] / "docs" / "guides" / "trainers.md"


@pytest.mark.parametrize("module", [gradscope.stats.tensor_stats, gradscope.stats.compute])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_readme_quickstart_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes runs/quickstart
    quickstart = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", quickstart, flags=re.S)
    assert len(blocks) == 2, "the quickstart has a monitor example and a grad_stats example"
    marked = [line for line in blocks[0].splitlines() if re.search(r"# [1-9]\b", line)]
    assert len(marked) == 5, "five lines in the training loop, marked # 1 to # 5"
    monitored: dict = {}
    exec(compile(blocks[0], "README quickstart (watch)", "exec"), monitored)
    assert "gradscope health: HEALTHY" in capsys.readouterr().out
    assert monitored["norm"].shape == (100, 2)
    assert list(monitored["steps"]) == list(range(100))
    assert monitored["layers"] == ("0", "2")
    assert monitored["run"].report().to_dict() == monitored["mon"].report().to_dict()
    single: dict = {}
    exec(compile(blocks[1], "README quickstart (grad_stats)", "exec"), single)
    assert single["stats"].names == ("0.weight", "0.bias", "2.weight", "2.bias")


SNIPPETS = {
    "## With Lightning": "lightning",
    "## With the Hugging Face Trainer": "transformers",
    "## With Weights & Biases": "wandb",
    "## With Accelerate": "accelerate",
}


def integration_snippet(heading: str) -> str:
    part = TRAINERS.read_text().split("\n" + heading + "\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", part, flags=re.S)
    return block


@pytest.mark.parametrize("heading", list(SNIPPETS))
def test_trainer_snippets_run(heading, tmp_path, monkeypatch, capsys):
    pytest.importorskip(SNIPPETS[heading], reason=f"needs the {SNIPPETS[heading]} extra")
    torch = pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)  # they write lightning_logs/, out/, wandb/
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    if SNIPPETS[heading] == "wandb":
        import wandb

        wandb.teardown()  # W&B keeps its first run's settings (its directory) for the process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        names: dict = {}
        exec(compile(integration_snippet(heading), f"docs/guides/trainers.md {heading}", "exec"), names)
    finally:
        torch.set_num_threads(threads)
    if heading == "## With Lightning":
        mon = names["callback"].monitor
        assert mon.step_index == names["trainer"].global_step > 0
        assert "val_loss" in mon.fields()
        assert "gradscope health" in capsys.readouterr().out
        assert (names["callback"].session.run_dir / "report.txt").is_file()
    elif heading == "## With the Hugging Face Trainer":
        mon = names["trainer"].callback_handler.callbacks[0].monitor  # it moves itself first
        assert mon.step_index == names["trainer"].state.global_step == 4
    elif heading == "## With Weights & Biases":
        assert list(names["mon"].history("norm").steps) == list(range(20))
        assert Path(names["run"].settings.sync_file).is_file()  # the offline run's records
    else:
        mon = names["mon"]
        assert mon.step_index == 5  # 13 batches, windows of 3, 3, 3, 3 and 1
        assert bool(mon.history("present").values.all())  # the short window measured too
