"""Benchmark: the memory of a monitor's history and of ``load_run``, on a model of many rows.

A synthetic model of ``--rows`` modules (10 000 by default), each owning one 4-element
parameter whose gradient is set once, is watched (``mode="step"``, NumPy backend, defaults
otherwise: ``history=10_000``, ``hist_history=1_000``, ``watch(history_mib=512)`` where the
code has it) for ``--steps`` steps with a run log; the log is then read back with
``load_run``. Each measurement runs in a fresh process, for this checkout's code and, with
``--before PATH``, for the gradscope sources at ``PATH`` (e.g. ``git archive 3587e66 | tar -x
-C /tmp/mb-before``), measured the same way:

* ``watch``: the history's allocated bytes (its NumPy arrays' ``nbytes``: what a budget
  bounds; untouched ``np.zeros`` pages are not resident yet, so the resident cost grows
  towards it step by step) and the peak resident set size's growth over the process's size
  before ``watch()`` (``VmHWM`` minus ``VmRSS``, from ``/proc/self/status``);
* ``load_run``: the same two numbers for reading the log back, and the peak of the memory
  Python and NumPy allocate while reading (``tracemalloc``, on while reading: it counts
  allocated bytes, resident or not).

It prints a table and writes JSON (machine, versions, date, commit) under
``benchmarks/results/``.

Usage: python benchmarks/bench_memory.py [--rows 10000] [--steps 300] [--before PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HERE = Path(__file__).resolve()
SOURCES = HERE.parents[1]


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` value in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def history_bytes(state) -> int:
    """Bytes of a run state's history arrays (also for code without ``History.nbytes``)."""
    import numpy as np

    history = state.history
    arrays = [a for a in vars(history).values() if isinstance(a, np.ndarray)]
    return sum(a.nbytes for a in arrays) + sum(a.nbytes for a in history._metrics.values())


def worker_watch(rows: int, steps: int, log_dir: str) -> dict:
    import warnings

    import torch
    from torch import nn

    import gradscope

    class Leaf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4))

    model = nn.Sequential(*[Leaf() for _ in range(rows)])
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.grad = torch.randn(4, generator=generator)
    start = status_kib("VmRSS")
    began = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = gradscope.watch(model, mode="step", backend="numpy", log_dir=log_dir)
    for step in range(steps):
        mon.step(loss=1.0 / (step + 1))
    mon.close()  # every step recorded, the log written
    seconds, peak = time.perf_counter() - began, (status_kib("VmHWM") - start) * 1024
    return {
        "history_bytes": history_bytes(mon._run),
        "peak_rss_growth_bytes": peak,
        "sampled_steps_kept": len(mon._run.history.series("present")),
        "seconds": seconds,
        "warnings": [str(w.message) for w in caught],
        "log_bytes": sum(f.stat().st_size for f in Path(log_dir).glob("*.jsonl")),
    }


def worker_load(log_dir: str) -> dict:
    import tracemalloc
    import warnings

    import gradscope

    start = status_kib("VmRSS")
    began = time.perf_counter()
    tracemalloc.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = gradscope.load_run(log_dir)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "history_bytes": history_bytes(run._state),
        "peak_rss_growth_bytes": (status_kib("VmHWM") - start) * 1024,
        "traced_peak_bytes": traced,
        "sampled_steps_kept": len(run._state.history.series("present")),
        "seconds": time.perf_counter() - began,
    }


def in_process(sources: Path, *args: str) -> dict:
    """Run this script's worker ``args`` in a fresh process importing gradscope from ``sources``."""
    env = {**os.environ, "PYTHONPATH": str(sources)}
    done = subprocess.run(
        [sys.executable, str(HERE), "--worker", *args], env=env, cwd=sources, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"worker {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def measure(sources: Path, rows: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = str(Path(tmp) / "run")
        watch = in_process(sources, "watch", str(rows), str(steps), log_dir)
        load = in_process(sources, "load", log_dir)
    return {"watch": watch, "load_run": load}


def mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.0f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--before", type=Path, help="gradscope sources of the code to compare with")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        if kind == "watch":
            result = worker_watch(int(rest[0]), int(rest[1]), rest[2])
        else:
            result = worker_load(rest[0])
        print(json.dumps(result))
        return 0

    versions = {"after": SOURCES} | ({"before": args.before.resolve()} if args.before else {})
    results = {name: measure(path, args.rows, args.steps) for name, path in versions.items()}
    print(f"{args.rows} rows, {args.steps} steps (mode='step', NumPy backend, defaults otherwise)")
    head = ("", "history", "steps kept", "watch: peak RSS +", "log", "load_run: peak RSS +", "traced peak")
    print("{:8} {:>10} {:>10} {:>18} {:>8} {:>21} {:>12}".format(*head))
    for name, result in sorted(results.items(), reverse=True):
        watch, load = result["watch"], result["load_run"]
        print(
            f"{name:8} {mb(watch['history_bytes']):>10} {watch['sampled_steps_kept']:>10} "
            f"{mb(watch['peak_rss_growth_bytes']):>18} {mb(watch['log_bytes']):>8} "
            f"{mb(load['peak_rss_growth_bytes']):>21} {mb(load['traced_peak_bytes']):>12}"
        )
    sys.path.insert(0, str(HERE.parent))
    from bench_stats import environment

    out = args.out or RESULTS / f"memory-cpu-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        "environment": environment("cpu"),
        "rows": args.rows,
        "steps": args.steps,
        "method": __doc__.split("\n\n", 1)[1].split("\n\nUsage")[0],
        "results": {k: {"sources": str(versions[k]), **v} for k, v in results.items()},
    }
    out.write_text(json.dumps(entry, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
