"""The ``gradscope`` command, run as a user runs it: a separate process."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_runs import train_monitored

import gradscope

ROOT = Path(__file__).resolve().parents[1]


def gradscope_cli(*args, cwd=None, timeout=300, prelude=None):
    """Run ``gradscope ARGS``; ``prelude``: Python code run first in that process (to take a
    module away, say)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GRADSCOPE_DEBUG", None)
    command = ["-m", "gradscope.cli"]
    if prelude is not None:
        command = ["-c", f"import sys\n{prelude}\nfrom gradscope.cli import main\nsys.exit(main(sys.argv[1:]))"]
    return subprocess.run(
        [sys.executable, *command, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def assert_one_line_error(done, status, *fragments):
    assert done.returncode == status, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith("gradscope")
    for fragment in fragments:
        assert fragment in lines[0]


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "gradscope"
    if not script.exists():
        pytest.skip("gradscope is not installed into this interpreter's environment")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"gradscope {gradscope.__version__}"


def small_run(directory: Path, steps: int = 5) -> Path:
    """A short run logged to ``directory`` (no findings needed: these tests are about the command)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    with gradscope.watch(model, log_dir=directory) as mon:
        for _ in range(steps):
            loss = model(torch.randn(4, 3)).pow(2).mean()
            loss.backward()
            mon.step(loss=loss)
    return directory


@pytest.fixture(scope="module")
def nan_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "nan"
    done = gradscope_cli("demo", "--fault", "nan", "--steps", "120", "--out", out)
    return done, out


def test_demo_prints_the_report_and_writes_the_run(nan_demo):
    done, out = nan_demo
    assert done.returncode == 0, done.stderr
    assert "gradscope health: CRITICAL" in done.stdout
    assert "[critical] nonfinite in 'blocks.4.linear', step 60" in done.stdout
    assert "as expected" in done.stdout
    assert (out / "gradscope-00000.jsonl").is_file()
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert gradscope.load_run(out).report().first_nonfinite == (60, "blocks.4.linear")
    assert "120/120" in done.stderr  # the progress bar reached the end


def test_demo_without_a_fault_is_healthy(tmp_path):
    done = gradscope_cli("demo", "--steps", "300", "--out", tmp_path / "none")
    assert done.returncode == 0, done.stderr
    assert "gradscope health: HEALTHY" in done.stdout and "as expected" in done.stdout


def test_demo_act_halts_the_nan_run_naming_the_layer(tmp_path):
    out = tmp_path / "nan-act"
    done = gradscope_cli("demo", "--fault", "nan", "--steps", "120", "--act", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "halted: gradscope halted training at step 60: [critical] nonfinite in 'blocks.4.linear'" in done.stdout
    assert "as expected: training halted naming 'blocks.4.linear'" in done.stdout
    assert "trained 61 steps" in done.stdout  # the halted step is the last; its update never ran
    (action,) = gradscope.load_run(out).report().actions
    assert action["action"] == "halt" and action["step"] == 60
    assert action["detail"]["because"] == {"kind": "nonfinite", "layer": "blocks.4.linear", "step": 60}


def test_demo_act_lowers_the_learning_rate_of_the_high_lr_run(tmp_path):
    out = tmp_path / "high-lr-act"
    done = gradscope_cli("demo", "--fault", "high-lr", "--act", "--out", out)
    assert done.returncode == 0, done.stderr
    assert re.search(r"learning rate: lr [0-9.e-]+ -> [0-9.e-]+ at step \d+ because ", done.stdout), done.stdout
    assert "as expected: the controller lowered the learning rate" in done.stdout
    changes = [a for a in gradscope.load_run(out).report().actions if a["action"] == "lr"]
    assert changes and changes[0]["detail"]["scale"] == 0.5


def test_demo_high_lr_without_act_diverges(tmp_path):
    done = gradscope_cli("demo", "--fault", "high-lr", "--out", tmp_path / "high-lr")
    assert done.returncode == 0, done.stderr
    assert "[critical] divergence" in done.stdout and "as expected" in done.stdout
    assert "actions taken" not in done.stdout


def test_report_prints_and_renders_a_saved_run(nan_demo, tmp_path):
    _, out = nan_demo
    done = gradscope_cli("report", out, "--html", tmp_path / "r.html", "--png", tmp_path / "r.png")
    assert done.returncode == 0, done.stderr
    assert "gradscope health: CRITICAL" in done.stdout and "nonfinite in 'blocks.4.linear'" in done.stdout
    assert (tmp_path / "r.html").stat().st_size > 10_000 and (tmp_path / "r.png").stat().st_size > 10_000
    done = gradscope_cli("report", out / "gradscope-00000.jsonl", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == gradscope.load_run(out).report().to_dict()


def test_bench_quick_runs_every_benchmark(tmp_path):
    done = gradscope_cli("bench", "--quick", "--device", "cpu", "--out", tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    written = sorted(p.name for p in tmp_path.glob("*.json"))
    assert written == [
        "bench_actions-cpu.json",
        "bench_distributed-cpu.json",
        "bench_overhead-cpu.json",
        "bench_runlog-cpu.json",
        "bench_stats-cpu.json",
    ]
    assert "x unmonitored" in done.stdout and "x floor" in done.stdout and "x none" in done.stdout
    assert "lr changes" in done.stdout


def test_user_mistakes_are_one_line(tmp_path):
    assert_one_line_error(gradscope_cli("report", tmp_path / "nowhere"), 1, "no run log at")
    (tmp_path / "gradscope-00000.jsonl").write_text("hello\n")
    assert_one_line_error(gradscope_cli("report", tmp_path), 1, "gradscope-00000.jsonl:1", "not a gradscope run log")
    assert_one_line_error(gradscope_cli("demo", "--fault", "typo"), 2, "invalid choice: 'typo'")
    assert_one_line_error(gradscope_cli("demo", "--steps", "many"), 2, "invalid int value")
    assert_one_line_error(gradscope_cli("demo", "--steps", "0"), 1, "--steps must be a positive integer")
    assert_one_line_error(gradscope_cli("demo", "--out", tmp_path, "--steps", "5"), 1, "already holds a gradscope run")
    assert_one_line_error(gradscope_cli("frobnicate"), 2, "invalid choice")
    assert_one_line_error(gradscope_cli(), 2, "required")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_device_is_a_clear_error(tmp_path):
    assert_one_line_error(gradscope_cli("demo", "--device", "cuda", "--out", tmp_path / "x"), 1, "no CUDA device")


def test_without_the_optional_extras(tmp_path, monkeypatch, capsys):
    """No tqdm: progress lines instead of a bar; no matplotlib: the run is still logged and
    reported, the visual report is skipped with a note, and asking for it is a clear error."""
    from gradscope import cli

    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` fail
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["demo", "--fault", "dead", "--steps", "30", "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert "training (dead): step 30/30" in captured.err
    assert "visual report skipped: it needs matplotlib" in captured.out
    assert not (tmp_path / "run" / "report.html").exists()
    assert cli.main(["report", str(tmp_path / "run"), "--html", str(tmp_path / "r.html")]) == 1
    assert "need matplotlib" in capsys.readouterr().err


def test_a_warning_is_one_line(tmp_path):
    """A killed run's log (its last line torn): the report, and one line saying what was skipped."""
    run = small_run(tmp_path / "killed")
    log = run / "gradscope-00000.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    assert lines[-1].startswith('{"t":"closed"')
    log.write_text("".join(lines[:-2]) + lines[-2][: len(lines[-2]) // 2])  # a step's line cut short, not closed
    done = gradscope_cli("report", run)
    assert done.returncode == 0, done.stderr
    assert "gradscope health:" in done.stdout and "(not closed" in done.stdout
    assert done.stderr.splitlines() == [
        f"gradscope: warning: skipping the torn last line of {log}:{len(lines) - 1} (the line is cut short)"
    ]


def test_an_unknown_option_is_named():
    assert_one_line_error(gradscope_cli("--bogus"), 2, "unrecognized arguments: --bogus")
    assert_one_line_error(gradscope_cli("report", "RUN", "--bogus"), 2, "unrecognized arguments: --bogus")
    assert_one_line_error(gradscope_cli("demo", "--bogus", "--steps", "5"), 2, "unrecognized arguments: --bogus")
    assert_one_line_error(gradscope_cli(), 2, "required: COMMAND")


def test_visual_report_without_matplotlib_fails_before_printing(tmp_path):
    run = small_run(tmp_path / "run")
    for flag, name in (("--html", "r.html"), ("--png", "r.png")):
        done = gradscope_cli("report", run, flag, tmp_path / name, prelude="sys.modules['matplotlib'] = None")
        assert_one_line_error(done, 1, "--html/--png need matplotlib")
        assert done.stdout == ""  # not the report first
        assert not (tmp_path / name).exists()


def test_visual_report_files_must_have_their_suffix(tmp_path):
    run = small_run(tmp_path / "run")
    for flag, name in (("--png", "r.html"), ("--html", "r.png"), ("--html", "r"), ("--png", "r.png.txt")):
        done = gradscope_cli("report", run, flag, tmp_path / name)
        assert_one_line_error(done, 2, f"argument {flag}: ", str(tmp_path / name))
        assert done.stdout == ""
        assert not (tmp_path / name).exists()


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Three folds logged with tags, the third with its module '2' nudged from step 5."""
    from compared_runs import logged_run

    root = tmp_path_factory.mktemp("compare")
    return [
        logged_run(root / "f0", tags={"fold": 0, "lr": 0.05}),
        logged_run(root / "f1", seed=1, tags={"fold": 1, "lr": 0.05}),
        logged_run(root / "f2", nudge_module="2", tags={"fold": 2, "lr": 0.1}),
    ]


def test_compare_prints_writes_json_and_html(compared, tmp_path):
    done = gradscope_cli("compare", *compared, "--json", tmp_path / "c.json", "--html", tmp_path / "c.html")
    assert done.returncode == 0, done.stderr
    assert "gradscope compare: 3 runs, 3 layers compared" in done.stdout
    assert "val_loss: best" in done.stdout and "± " in done.stdout
    assert f"[2] {compared[2]} first differs from {compared[0]} at step 5" in done.stdout
    data = json.loads((tmp_path / "c.json").read_text())
    assert data == json.loads(json.dumps(gradscope.compare(*map(str, compared)).to_dict()))
    assert data["layers"]["rows"] == ["0", "2", "4"]
    assert data["divergences"][str(compared[2])]["step"] == 5
    assert data["divergence"]["step"] == 0  # the earliest: fold 1 starts from another seed
    best = [gradscope.load_run(run).history("val_loss").values for run in compared]
    assert data["metrics"]["val_loss"]["groups"][0]["best"]["mean"] == pytest.approx(
        sum(float(min(v[v == v])) for v in best) / 3
    )
    page = (tmp_path / "c.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<td>0</td>" in page and "<td>4</td>" in page
    assert "first differs" in page


def test_compare_json_to_stdout_grouped_and_exact(compared):
    done = gradscope_cli("compare", compared[0], compared[2], "--json", "--by", "lr", "--exact")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [g["key"] for g in data["groups"]] == [0.05, 0.1]
    assert data["tolerance"] == {"exact": True, "rtol": None}
    assert data["divergence"]["layer"] == "4" and data["divergence"]["pass"] == "backward"


def test_compare_mistakes_are_one_line(compared, tmp_path):
    assert_one_line_error(gradscope_cli("compare", compared[0], tmp_path / "nowhere"), 1, "no run log at")
    assert_one_line_error(gradscope_cli("compare", compared[0], tmp_path), 1, "no gradscope run log here")
    assert_one_line_error(
        gradscope_cli("compare", *compared, "--by", "seed"), 1, "no run has the tag 'seed'", "'fold', 'lr'"
    )
    assert_one_line_error(gradscope_cli("compare", compared[0], "--rtol", "-1"), 1, "rtol must be a finite number")
    assert_one_line_error(gradscope_cli("compare"), 2, "RUN")
    done = gradscope_cli("compare", compared[0])
    assert done.returncode == 0 and "divergence: needs two runs or more" in done.stdout


def test_report_prints_and_exports_the_compression_section(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_at = lambda step: model(torch.randn(16, 8)).square().mean()  # noqa: E731
    mon, _ = train_monitored(model, opt, 4, loss_at, optimizer=opt, compression=True, log_dir=tmp_path / "run")
    mon.close()
    text = gradscope_cli("report", str(tmp_path / "run"))
    assert text.returncode == 0, text.stderr
    assert "compression (weights at step 3, saliency over 4 readings): 2 ready" in text.stdout
    done = gradscope_cli("report", str(tmp_path / "run"), "--json")
    section = json.loads(done.stdout)["compression"]
    assert section == json.loads(json.dumps(mon.report().to_dict()["compression"]))
