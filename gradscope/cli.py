"""The ``gradscope`` command: ``demo``, ``report``, ``compare`` and ``bench``.

``gradscope demo`` trains the built-in model (:mod:`gradscope.demo`) with or without a fault,
prints the health report and writes the run log and the visual report (``--act``: acting on
the findings, :mod:`gradscope.actions`); ``gradscope report
RUN`` prints a saved run's report and renders it; ``gradscope compare RUN...`` compares saved
runs (:func:`gradscope.compare`); ``gradscope bench`` runs the benchmarks of a
source checkout. A user's mistake (a missing file, a bad flag, a missing optional extra)
prints one line and exits with status 1 or 2, never a traceback (set ``GRADSCOPE_DEBUG=1``
to see one): 2 for a bad command line (an unknown option, a missing command, ``--png`` or
``--html`` naming a file of the other kind), 1 for the rest. A warning (a run log whose last
line was torn by a killed run) is one line on stderr, ``gradscope: warning: ...``, and the
command goes on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from gradscope.outputs import report_files
from gradscope.stats.reporting import GradscopeWarning

USER_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ImportError,
    ValueError,  # includes RunLogError
)
"""Exceptions that mean the user asked for something impossible: one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (and exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(message: str) -> int:
    print(f"gradscope: error: {message}", file=sys.stderr)
    return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` while a command runs: one line, no source path or line."""
    text = " ".join(str(message).split()).removeprefix("gradscope: ")
    if not issubclass(category, GradscopeWarning):
        text = f"{category.__name__}: {text}"
    print(f"gradscope: warning: {text}", file=sys.stderr if file is None else file)


def _suffix(*suffixes: str):
    """An argparse ``type``: a file name ending in one of ``suffixes`` (any case); argparse
    names the option in its message (``argument --png: 'r.html' is not a .png file``)."""

    def check(name: str) -> str:
        if not name.lower().endswith(suffixes):
            raise argparse.ArgumentTypeError(f"{name!r} is not a {' or '.join(suffixes)} file")
        return name

    return check


def _progress(total: int, description: str):
    """A progress callback ``(step, loss)`` and a function that finishes it: tqdm when
    installed (the ``cli`` extra), otherwise a line every tenth of the run."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, desc=description, unit="step", file=sys.stderr, dynamic_ncols=True)

        def update(step: int, loss) -> None:
            bar.update(1)
            if step % 10 == 0 or step == total - 1:
                bar.set_postfix(loss=f"{float(loss):.4g}", refresh=False)

        return update, bar.close
    every = max(1, total // 10)

    def report_line(step: int, loss) -> None:
        if (step + 1) % every == 0 or step == total - 1:
            print(f"{description}: step {step + 1}/{total}, loss {float(loss):.4g}", file=sys.stderr)

    return report_line, lambda: None


def cmd_demo(args) -> int:
    import torch

    from gradscope import demo
    from gradscope.run.logfile import check_log_dir

    if args.steps < 1:
        return _fail(f"--steps must be a positive integer, got {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is available here (use --device cpu)")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"demo-{args.fault}-{stamp}"
    check_log_dir(out)  # before any work: a directory that already holds a run is refused at once
    expected = demo.EXPECTED[args.fault]
    print(f"gradscope demo: {demo.DEPTH + 2}-layer MLP on synthetic data, fault: {args.fault}, {args.steps} steps")
    print(f"  what to expect: {expected.explanation}")
    update, finish = _progress(args.steps, f"training ({args.fault})")
    started = time.perf_counter()
    try:
        mon = demo.run(args.fault, args.steps, device=args.device, log_dir=out, progress=update, act=args.act)
    finally:
        finish()
    seconds = time.perf_counter() - started
    report = mon.report()
    print(report)
    print(f"\ntrained {mon.step_index} steps in {seconds:.1f} s; run log: {out}/")
    if args.act and expected.kind == "divergence":
        ok = _acted(mon, report, expected)  # the controller's job is that the divergence never comes
    else:
        ok = _expectation_met(report, expected)
        print(("  as expected: " if ok else "  NOT as expected: ") + expected.explanation)
        if args.act:
            ok = _acted(mon, report, expected) and ok
    if report_files.visual_available():
        files = report_files.write_visual(
            mon, report, out / "report.html", out / "report.png", f"gradscope demo: {args.fault}"
        )
        print("  visual report: " + ", ".join(str(f) for f in files))
    else:
        print("  visual report skipped: it needs matplotlib (pip install 'gradscope-diagnostics[viz]')")
    print(f"  read it back: gradscope report {out}")
    return 0 if ok else 1


def _acted(mon, report, expected) -> bool:
    """``--act``: say what gradscope did; a NaN run must have been halted naming the layer."""
    if mon.halted is not None:
        print(f"  halted: {mon.halted}")
    if mon.should_stop:
        print(f"  stopped early: {mon.stop_reason} (restore the checkpoint of step {mon.best_step})")
    changes = [a for a in report.actions if a["action"] == "lr"]
    for change in changes:
        print(f"  learning rate: {change['message']}")
    if expected.kind == "nonfinite":
        ok = mon.halted is not None and mon.halted.finding.layer == expected.layer
        print(("  as expected: " if ok else "  NOT as expected: ") + f"training halted naming '{expected.layer}'")
        return ok
    if expected.kind == "divergence":
        ok = bool(changes)
        print(("  as expected: " if ok else "  NOT as expected: ") + "the controller lowered the learning rate")
        return ok
    return True


def _expectation_met(report, expected) -> bool:
    gradient_kinds = {"nonfinite", "exploding", "vanishing", "dead", "stalled_updates", "overflow"}
    if expected.kind is None:
        return report.status == "healthy" and not any(f.kind in gradient_kinds for f in report.findings)
    return any(f.kind == expected.kind and f.layer == expected.layer for f in report.findings)


def cmd_report(args) -> int:
    from gradscope.health.readout import load_run

    if (args.html or args.png) and not report_files.visual_available():  # before any output
        return _fail("--html/--png need matplotlib: pip install 'gradscope-diagnostics[viz]'")
    run = load_run(args.run)
    report = run.report()
    if args.json:
        print(report.to_json(indent=2))
    else:
        state = "" if run.closed else " (not closed: the run is still going, or it stopped without close())"
        print(f"gradscope run {args.run}: {len(run.rows)} layers, {len(run.files)} log file(s){state}")
        print(report)
    if args.html or args.png:
        title = f"gradscope run: {Path(args.run).resolve().name}"
        html = Path(args.html) if args.html else None
        png = Path(args.png) if args.png else None
        files = report_files.write_visual(run, report, html, png, title)
        print("visual report: " + ", ".join(str(f) for f in files), file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_compare(args) -> int:
    from gradscope.comparison import compare
    from gradscope.outputs.compare_page import write_html

    cmp = compare(*args.runs, by=args.by, exact=args.exact, rtol=args.rtol)
    data = cmp.to_dict() if args.json is not None else None
    if args.json == "-":
        print(json.dumps(data, indent=2))
    else:
        print(cmp)
        if args.json is not None:
            Path(args.json).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            print(f"comparison (JSON): {args.json}")
    if args.html:
        write_html(cmp, args.html, f"gradscope compare: {len(cmp.runs)} runs")
        print(f"comparison (HTML): {args.html}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 0


def benchmarks_dir() -> Path | None:
    """The benchmarks/ folder of the source checkout gradscope runs from, if any."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    return folder if (folder / "bench_overhead.py").is_file() else None


def cmd_bench(args) -> int:
    import torch

    folder = benchmarks_dir()
    if folder is None:
        return _fail(
            "the benchmarks are scripts of the source tree (benchmarks/), not part of the installed package: "
            "run 'gradscope bench' from a clone installed with 'pip install -e .', or 'make bench'"
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is available here (use --device cpu)")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gradscope-bench-")) if args.quick else None)
    runs = [
        ("bench_overhead.py", ["--models", "tiny", "--rounds", "1", "--steps", "2"] if args.quick else []),
        ("bench_stats.py", ["--sets", "tiny", "--repeats", "3"] if args.quick else []),
        ("bench_runlog.py", ["--steps", "20", "--layers", "20"] if args.quick else []),
        ("bench_actions.py", ["--seeds", "1", "--steps", "40", "--peaks", "1e-3"] if args.quick else []),
        (
            "bench_distributed.py",
            ["--world", "2", "--layers", "2", "--width", "16", "--steps", "2", "--rounds", "1"] if args.quick else [],
        ),
    ]
    status = 0
    for script, extra in runs:
        command = [sys.executable, str(folder / script), "--device", device, *extra]
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            command += ["--out", str(out / f"{Path(script).stem}-{device}.json")]
        print(f"$ {' '.join(command[1:])}", flush=True)
        status = status or subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    return status


def parser() -> argparse.ArgumentParser:
    from gradscope import __version__
    from gradscope.demo import FAULTS

    root = _Parser(prog="gradscope", description="Gradient diagnostics for PyTorch training runs.")
    root.add_argument("--version", action="version", version=f"gradscope {__version__}")
    # Not required here: main() reports an unknown option before a missing command (argparse
    # would report the missing command first).
    commands = root.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    demo = commands.add_parser("demo", help="train the built-in model (optionally with a fault) and report on it")
    demo.add_argument("--fault", choices=FAULTS, default="none", help="the fault to inject (default: none)")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    demo.add_argument("--out", help="a new directory for the run log and visual report (default: runs/demo-...)")
    demo.add_argument(
        "--act",
        action="store_true",
        help="act on findings: halt at a NaN, adapt the learning rate, stop early (gradscope.actions)",
    )
    demo.set_defaults(handler=cmd_demo)

    report = commands.add_parser("report", help="print a saved run's health report and render its visual report")
    report.add_argument("run", metavar="RUN", help="a run log directory (watch(log_dir=...)) or one of its files")
    report.add_argument(
        "--html",
        metavar="FILE",
        type=_suffix(".html", ".htm"),
        help="write the visual report as one self-contained HTML file (.html)",
    )
    report.add_argument(
        "--png", metavar="FILE", type=_suffix(".png"), help="write the visual report's panels as one PNG (.png)"
    )
    report.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    report.set_defaults(handler=cmd_report)

    compared = commands.add_parser("compare", help="compare saved runs: folds, seeds, sweeps, regressions")
    compared.add_argument("runs", nargs="+", metavar="RUN", help="run log directories (the first is the reference)")
    compared.add_argument("--html", metavar="FILE", type=_suffix(".html", ".htm"), help="write the comparison as HTML")
    compared.add_argument(
        "--json", metavar="FILE", nargs="?", const="-", help="write the comparison as JSON to FILE (no FILE: print it)"
    )
    compared.add_argument("--by", metavar="TAG", help="group the runs by this tag's value (watch(tags=...))")
    compared.add_argument("--exact", action="store_true", help="first divergence bit for bit (default: within --rtol)")
    compared.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance of the divergence (1e-6)")
    compared.set_defaults(handler=cmd_compare)

    bench = commands.add_parser("bench", help="run the overhead, statistics, run-log and distributed benchmarks here")
    bench.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    bench.add_argument("--quick", action="store_true", help="tiny inputs: checks the benchmarks run, not timings")
    bench.add_argument("--out", metavar="DIR", help="write the JSON results here (default: benchmarks/results)")
    bench.set_defaults(handler=cmd_bench)
    return root


def main(argv: list[str] | None = None) -> int:
    root = parser()
    args, unknown = root.parse_known_args(argv)
    if unknown:
        root.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        root.error("the following arguments are required: COMMAND (demo, report, compare or bench)")
    try:
        with warnings.catch_warnings():  # restores the caller's showwarning: main() may run in-process
            warnings.showwarning = _show_warning
            return args.handler(args)
    except USER_ERRORS as error:
        if os.environ.get("GRADSCOPE_DEBUG"):
            raise
        return _fail(str(error))
    except KeyboardInterrupt:
        print("gradscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
