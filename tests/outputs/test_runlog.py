"""The run log: written off the training thread, read back into the same report."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope.outputs.exporters import Exporter
from gradscope.outputs.runlog import RunLog
from gradscope.run import records
from gradscope.run.logfile import RunLogError

ROOT = Path(__file__).resolve().parents[1]


def train(mon, model, opt, steps, *, nan_at=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(32, 16, generator=g)
        if step == nan_at:
            x[0, 0] = float("nan")
        y = torch.tanh(x[:, :4])
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.step(loss=loss, lr=opt.param_groups[0]["lr"])
        if step % 10 == 0:
            mon.log(val_loss=loss.item() * 1.1)
        if torch.isfinite(loss):
            opt.step()
        opt.zero_grad()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def log_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("gradscope-*.jsonl"))


def assert_same_series(a, b):
    assert np.array_equal(a.steps, b.steps)
    assert a.rows == b.rows
    assert np.array_equal(a.values, b.values, equal_nan=True)


@pytest.mark.parametrize("every", [1, 3])
def test_loaded_run_equals_the_live_monitor(tmp_path, every):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.watch(model, every=every, optimizer=opt, track_updates=True, log_dir=tmp_path / "run") as mon:
        train(mon, model, opt, 60, nan_at=41)
    run = gradscope.load_run(tmp_path / "run")
    live = mon.report()
    assert run.report().to_dict() == live.to_dict()
    assert "nonfinite" in {f.kind for f in live.findings}  # the report compared is not a trivial one
    assert run.closed and run.first_segment == 0
    assert run.rows == mon.rows and run.summary == mon.summary
    assert set(run.fields()) == set(mon.fields())
    for name in mon.fields():
        assert_same_series(run.history(name), mon.history(name))
    last = mon.history("present").steps[-1]
    assert run.stats(int(last)).names == mon.stats(int(last)).names
    assert np.array_equal(run.stats(int(last)).hist, mon.stats(int(last)).hist)
    assert run.info.extra["torch"] == torch.__version__
    assert run.info.extra["gradscope"] == gradscope.__version__


def test_thresholds_travel_with_the_log(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    strict = gradscope.Thresholds(sustain=2, dead_zero_frac=0.5)
    with gradscope.watch(model, optimizer=opt, thresholds=strict, log_dir=tmp_path) as mon:
        train(mon, model, opt, 10)
    run = gradscope.load_run(tmp_path)
    assert run.thresholds == strict
    assert run.report().to_dict() == mon.report().to_dict()
    assert run.report(gradscope.Thresholds()).to_dict() == mon.report(gradscope.Thresholds()).to_dict()


def test_a_file_path_reads_that_file(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.watch(model, optimizer=opt, log_dir=tmp_path) as mon:
        train(mon, model, opt, 5)
    (file,) = log_files(tmp_path)
    assert gradscope.load_run(file).report().to_dict() == mon.report().to_dict()


def test_records_reach_the_file_within_seconds_while_training_runs(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gradscope.watch(model, optimizer=opt, log_dir=tmp_path)
    try:
        train(mon, model, opt, 8)
        mon.report(wait=True)  # every step's measurements have reached the host (and the pump)
        deadline, run = time.monotonic() + 10, None
        while time.monotonic() < deadline:
            with contextlib.suppress(RunLogError):  # the header may not be written yet
                run = gradscope.load_run(tmp_path)
                if len(run.history("loss")) == 8:
                    break
            time.sleep(0.2)
        assert run is not None and len(run.history("loss")) == 8, "records were not flushed within 10 s"
        assert not run.closed
    finally:
        mon.close()
    assert gradscope.load_run(tmp_path).closed


KILLED_TRAINING = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import gradscope
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = gradscope.watch(model, optimizer=opt, log_dir=sys.argv[1])
    step = 0
    while True:  # until killed
        x = torch.randn(16, 8)
        loss = model(x).pow(2).mean()
        loss.backward()
        mon.step(loss=loss)
        opt.step()
        opt.zero_grad()
        step += 1
        if step == 20:
            print("ready", flush=True)
    """
)


def test_a_killed_process_leaves_a_readable_log(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_TRAINING, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(3)  # past one flush interval
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = gradscope.load_run(tmp_path)
    assert not run.closed
    assert len(run.history("loss")) >= 20
    assert len(run.history("norm")) >= 20
    assert all("torn last line" in str(w.message) for w in caught)  # at most the last line is cut
    run.report()


def write_log(directory: Path, steps: int = 6) -> Path:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.watch(model, optimizer=opt, log_dir=directory) as mon:
        train(mon, model, opt, steps)
    (file,) = log_files(directory)
    return file


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path):
    file = write_log(tmp_path)
    lines = file.read_text().splitlines(keepends=True)
    file.write_text("".join(lines[:-3]) + lines[-3][: len(lines[-3]) // 2])
    with pytest.warns(RuntimeWarning, match=rf"torn last line of .*gradscope-00000.jsonl:{len(lines) - 2}"):
        run = gradscope.load_run(tmp_path)
    assert not run.closed


def test_a_corrupt_line_names_its_file_and_line(tmp_path):
    file = write_log(tmp_path)
    lines = file.read_text().splitlines(keepends=True)
    lines[3] = lines[3][:40] + "#" + lines[3][41:]
    file.write_text("".join(lines))
    with pytest.raises(RunLogError, match=r"gradscope-00000.jsonl:4: corrupt record"):
        gradscope.load_run(tmp_path)


def test_a_record_that_does_not_fit_the_run_is_corrupt(tmp_path):
    file = write_log(tmp_path)
    wrong = records.Sampled(1, np.zeros((2, gradscope.layout.ROW_WIDTH)), np.ones(2, bool), np.zeros(2, int))
    with open(file, "a") as handle:
        handle.write(records.encode(wrong) + "\n")
    with pytest.raises(RunLogError, match=r"corrupt record \(a sampled step with shapes"):
        gradscope.load_run(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("step,loss\n1,0.5\n", "gradscope-00000.jsonl:1: not a gradscope run log"),
        ('{"event": "start"}\n{"event": "stop"}\n', "gradscope-00000.jsonl:1: not a gradscope run log"),
        ('{"t": "step", "step": 1, "v": {}}\n', "the first line is not a gradscope header"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not UTF-8"),
        ('{"t": "header", "info": {"rows": []}, "segment": 0, "schema": 1}\n', "the header does not describe a run"),
    ],
)
def test_a_foreign_file_is_refused_clearly(tmp_path, content, message):
    file = tmp_path / "gradscope-00000.jsonl"
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(RunLogError, match=message):
        gradscope.load_run(tmp_path)


def test_a_newer_schema_is_refused_not_guessed(tmp_path):
    file = write_log(tmp_path)
    lines = file.read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    header["schema"] = records.SCHEMA + 1
    file.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    with pytest.raises(RunLogError, match=rf"newer gradscope \(log schema {records.SCHEMA + 1}\).*upgrade"):
        gradscope.load_run(tmp_path)


def test_missing_paths_and_empty_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run log at"):
        gradscope.load_run(tmp_path / "nowhere")
    with pytest.raises(RunLogError, match="no gradscope run log here"):
        gradscope.load_run(tmp_path)


def test_an_existing_log_is_never_appended_to(tmp_path):
    write_log(tmp_path)
    with pytest.raises(FileExistsError, match="already holds a gradscope run log"):
        gradscope.watch(mlp(), log_dir=tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        gradscope.watch(mlp(), log_dir=tmp_path / "file")


@pytest.mark.parametrize("kwargs", [{"segment_bytes": 0}, {"max_bytes": -1}, {"segment_bytes": 1.5}])
def test_bad_sizes_are_named(tmp_path, kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"RunLog: {name} must be a positive integer"):
        RunLog(tmp_path, **kwargs)


def test_segments_rotate_and_read_back_as_one_run(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.watch(model, optimizer=opt, exporters=[RunLog(tmp_path, segment_bytes=6_000)]) as mon:
        train(mon, model, opt, 40, nan_at=30)
    files = log_files(tmp_path)
    assert len(files) >= 4
    for index, file in enumerate(files):
        header = records.decode(file.open().readline())
        assert isinstance(header, records.Header) and header.segment == index
    assert gradscope.load_run(tmp_path).report().to_dict() == mon.report().to_dict()


def test_max_bytes_deletes_the_oldest_segments(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.watch(
        model, optimizer=opt, exporters=[RunLog(tmp_path, segment_bytes=4_000, max_bytes=12_000)]
    ) as mon:
        train(mon, model, opt, 60)
    files = log_files(tmp_path)
    assert files[0].name != "gradscope-00000.jsonl"
    assert sum(f.stat().st_size for f in files) <= 12_000 + 4_000 + 2_000  # the cap plus the file being written
    run = gradscope.load_run(tmp_path)
    assert run.first_segment == int(files[0].stem.split("-")[1]) > 0
    kept = run.history("loss").steps
    assert kept[-1] == 59 and kept[0] > 0
    assert np.array_equal(kept, np.arange(kept[0], 60))  # what is kept is contiguous up to the end
    run.report()


def test_a_missing_segment_is_reported(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    directory = tmp_path / "run"
    with gradscope.watch(model, optimizer=opt, exporters=[RunLog(directory, segment_bytes=3_000)]) as mon:
        train(mon, model, opt, 30)
    files = log_files(directory)
    assert len(files) >= 3
    files[1].unlink()
    with pytest.warns(RuntimeWarning, match="segment 1 is missing"):
        gradscope.load_run(directory)


class Broken(Exporter):
    def write(self, record):
        if isinstance(record, records.Sampled) and record.step == 3:
            raise OSError("disk full")


def test_a_failing_exporter_is_dropped_and_nothing_else_stops(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.warns(RuntimeWarning, match=r"Broken.write failed \(OSError: disk full\); it is dropped"):
        with gradscope.watch(model, optimizer=opt, log_dir=tmp_path, exporters=[Broken()]) as mon:
            train(mon, model, opt, 10)
    assert any("disk full" in e for e in mon.errors)
    assert len(mon.history("loss")) == 10
    assert gradscope.load_run(tmp_path).report().to_dict() == mon.report().to_dict()


def test_exporters_must_be_exporters(tmp_path):
    with pytest.raises(TypeError, match=r"exporters must be gradscope\.exporters\.Exporter objects, got str"):
        gradscope.watch(mlp(), exporters=["tensorboard"])
