"""The GPU check: every CUDA test and the GPU benchmarks, in one command (``make gpu-check``).

Runs on a machine with an NVIDIA GPU as it is: its own ``python3`` with torch and Triton,
gradscope installed with ``pip install --no-deps --no-build-isolation -e .`` (the Makefile
target does this when needed), no network. Steps, each in its own process with its own
time limit so that one slow step cannot eat the others:

1. ``tests``: the kernel, statistics and monitor tests and the exporters' CUDA test,
   compiled for the GPU (every test that needs CUDA runs; the interpreter-only ones skip and
   say so);
2. ``stats``: ``bench_stats.py --device cuda`` (full statistic set against
   ``torch._foreach_norm``, a bandwidth-bound read and the per-tensor alternatives);
3. ``launch``: ``bench_launch.py`` (the kernel's launch configurations against the copy
   ceiling measured in the same run; registers and spills of each);
4. ``overhead``: ``bench_overhead.py --device cuda`` (a GPT-2 124M bf16 training step with
   and without monitoring, and ``_foreach_norm``), 5 interleaved rounds of 30 steps each,
   with gradscope's own host time per step (its hooks, end-of-backward callback and
   ``mon.step()``) and its kernels' GPU time (CUDA events) apart from the step's wall time,
   at the default histogram cadence and with a histogram every step.

``stats`` also times the light launch beside the full one (GB/s against the read floor and
``_foreach_norm``), checks that light rows hold the full rows' scalars bit for bit, and
gives the cost amortised over the default histogram cadence.

Writes ``gpu-check-<date>.json`` (device, driver, torch/Triton versions, commit, date, each
step's outcome and wall time) next to each step's own JSON and log, under ``--out-dir``
(default ``benchmarks/results``). At most 7 min 50 s (the steps' time limits); ``--quick`` about 3.
Without a CUDA device it says so and exits with status 2; ``--dry-run`` lists the steps.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def steps(out_dir: Path, quick: bool) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of each step."""
    python = sys.executable
    tests = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels", "tests/stats", "tests/monitor"]
    tests += ["tests/outputs/exporters/test_exporters_cuda.py", "tests/actions/test_actions_cuda.py"]
    tests += ["--ignore", "tests/kernels/test_kernel_static.py"]  # static (no GPU needed): proven in CI
    if importlib.util.find_spec("xdist") is not None:
        tests += ["-n", "8"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        tests += ["--timeout", "120"]
    stats = [python, str(HERE / "bench_stats.py"), "--device", "cuda", "--out", str(out_dir / "stats-cuda.json")]
    launch = [python, str(HERE / "bench_launch.py"), "--out", str(out_dir / "launch-cuda.json")]
    overhead = [python, str(HERE / "bench_overhead.py"), "--device", "cuda"]
    overhead += ["--out", str(out_dir / "overhead-cuda.json")]
    # GPT-2 124M bf16: the plain step, watch(every=1) at the default histogram cadence and with a
    # histogram every step, every=10, _foreach_norm; gradscope's host and GPU time apart.
    methods = "gradscope watch(every=1),histogram_every=1,gradscope watch(every=10),_foreach_norm"
    if quick:
        stats += ["--sets", "gpt2-124m,llama-1b-bf16", "--repeats", "5"]
        launch += ["--quick", "--rounds", "8"]
        overhead += ["--rounds", "5", "--steps", "30", "--methods", "watch(every=1),histogram_every=1,_foreach_norm"]
    else:
        overhead += ["--rounds", "5", "--steps", "30", "--methods", methods]
    return [
        ("tests", tests, 150),
        ("stats", stats, 60 if quick else 90),
        ("launch", launch, 60 if quick else 100),
        ("overhead", overhead, 90 if quick else 130),
    ]


def environment() -> dict:
    import torch

    def run(*command: str) -> str:
        try:
            return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": run("git", "rev-parse", "HEAD"),
        "dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no")),
        "device": torch.cuda.get_device_name(),
        "driver": run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": sys.version.split()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller benchmark sets (about 3 minutes)")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and exit")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    parser.add_argument("--only", default=None, help="comma-separated step names")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    chosen = steps(out_dir, args.quick)
    if args.only:
        chosen = [s for s in chosen if s[0] in args.only.split(",")]
    if args.dry_run:
        for name, command, limit in chosen:
            print(f"{name} (limit {limit} s): {' '.join(command)}")
        return 0
    try:
        import torch
    except ImportError:
        print("gpu-check: torch is not installed for this Python; it needs torch with CUDA", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; it runs on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    report = {"check": "gpu-check", "quick": args.quick, "environment": environment(), "steps": []}
    summary = out_dir / f"gpu-check-{report['environment']['date'][:10]}.json"
    for name, command, limit in chosen:
        started = time.perf_counter()
        log = out_dir / f"{name}-cuda.log"
        with log.open("w") as sink:
            try:
                done = subprocess.run(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=limit)
                code = done.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        wall = time.perf_counter() - started
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        report["steps"].append({"step": name, "status": code, "wall_s": round(wall, 1), "last_line": tail[0]})
        print(f"{name:<9} {'ok' if code == 0 else f'FAILED ({code})':<14} {wall:6.1f} s  {tail[0][:100]}", flush=True)
        summary.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {summary}")
    return 0 if all(s["status"] == 0 for s in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
