"""Benchmark: what ``watch(every=1)`` costs per training step at one torch thread and at torch's default.

``torchrun`` sets ``torch.set_num_threads(1)``; then autograd leaves the machine's other cores
free and gradscope's CPU capture measures gradients on a worker thread while backward runs
(at torch's default, every core is autograd's and the gradients are measured together when
backward ends). This script measures, on CPU, the step time of each model unwatched and
watched (``gradscope.watch(model, every=1)``, default options), at each thread setting, and
reports the watched step time over the unwatched one of the same round.

Models (many small gradients: gradscope's fixed cost per gradient shows):

* ``layers1000``: ``nn.Sequential`` of 1000 ``nn.Linear(32, 32)``, batch 16, MSE, SGD
  (2000 gradients of 1024 or 32 elements);
* ``gpt2-32``: ``transformers.GPT2LMHeadModel`` of ``GPT2Config(n_layer=32, n_embd=64,
  n_head=4, vocab_size=1024, n_positions=64)``, built locally (no download), batch 2 x 32
  tokens, SGD (388 gradients); skipped when transformers is not installed;
* ``tiny``: a two-layer MLP (a smoke test of this script).

Rounds are interleaved: each round runs every (model, threads, watched or not) in an order
rotated from round to round, so that drifts of a shared machine hit every setting alike.
Each ratio is the median of a round's watched steps over the median of the same round's
unwatched steps (same model, same threads); the report gives the median over rounds and
their min..max, and gradscope's own time per step on the training thread (its hooks' calls,
its end-of-backward callback, ``mon.step()``), which depends less on how busy the machine
is. The machine's load averages before and after are written with the results.

Usage: python benchmarks/bench_threads.py [--models layers1000,gpt2-32] [--rounds 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_stats import RESULTS, environment
from torch import nn

import gradscope


class Workload:
    """A model, its optimizer and a fixed batch; :meth:`step` is one training step."""

    def __init__(self, name: str) -> None:
        torch.manual_seed(0)
        self.name = name
        if name == "layers1000":
            self.model = nn.Sequential(*(nn.Linear(32, 32) for _ in range(1000)))
            inputs, targets = torch.randn(16, 32), torch.randn(16, 32)
            self.loss = lambda: nn.functional.mse_loss(self.model(inputs), targets)
            self.description = "1000 x nn.Linear(32, 32), batch 16, MSE, SGD"
        elif name == "gpt2-32":
            import transformers

            config = transformers.GPT2Config(
                n_layer=32, n_embd=64, n_head=4, vocab_size=1024, n_positions=64, bos_token_id=0, eos_token_id=0
            )
            self.model = transformers.GPT2LMHeadModel(config)
            tokens = torch.randint(0, config.vocab_size, (2, 32))
            self.loss = lambda: self.model(tokens, labels=tokens).loss
            self.description = "GPT2LMHeadModel(n_layer=32, n_embd=64, n_head=4, vocab 1024), batch 2 x 32, SGD"
        elif name == "tiny":
            self.model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
            inputs, targets = torch.randn(4, 8), torch.randn(4, 2)
            self.loss = lambda: nn.functional.mse_loss(self.model(inputs), targets)
            self.description = "a two-layer MLP (smoke test)"
        else:
            raise SystemExit(f"unknown model {name!r}")
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        self.tensors = sum(1 for _ in self.model.parameters())

    def step(self, mon, mon_step=None) -> None:
        """One step; watched by ``mon``, whose ``step`` is called as ``mon_step`` if given."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        if mon is not None:
            (mon_step or mon.step)(loss=loss)
        self.optimizer.step()


class OwnTime:
    """Seconds the training thread spends in gradscope's calls: its backward hooks' calls into
    the monitor, its end-of-backward callback (which waits for a capture worker) and
    ``mon.step()``. The receiver's methods are wrapped on the instance (the hooks look them up
    at each call); the list appends of the cheapest hooks are not counted."""

    CALLS = ("on_grad", "on_grad_at_once", "on_first_arrival", "_on_backward_end")

    def __init__(self, mon) -> None:
        self.seconds = 0.0
        for name in self.CALLS:
            if hasattr(mon._backward, name):
                setattr(mon._backward, name, self.wrap(getattr(mon._backward, name)))
        self.step = self.wrap(mon.step)

    def wrap(self, call):
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed_call


def capture_path(mon) -> str:
    """How the watched model's gradients are measured: on a worker as they arrive (how many
    parameters), or all together when backward ends."""
    capture = next(iter(mon._engines.captures.values()))
    if not getattr(capture, "overlap", False):
        return "at end of backward"
    at_once = getattr(mon._engines, "at_once", None)
    return "worker" if at_once is None else f"worker ({int(at_once.sum())} of {at_once.size})"


def timed(work: Workload, watched: bool, threads: int, steps: int, warmup: int) -> tuple[list[float], float, str]:
    """Step times (seconds) of ``steps`` steps after ``warmup`` at ``threads`` torch threads;
    watched, gradscope's seconds per step on the training thread (:class:`OwnTime`) and
    :func:`capture_path`."""
    torch.set_num_threads(threads)
    mon = gradscope.watch(work.model, every=1) if watched else None
    own = OwnTime(mon) if mon is not None else None
    step = own.step if own is not None else None
    try:
        times = []
        for i in range(warmup + steps):
            if i == warmup and own is not None:
                own.seconds = 0.0
            start = time.perf_counter()
            work.step(mon, step)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        if mon is None:
            return times, 0.0, ""
        return times, own.seconds / steps, capture_path(mon)
    finally:
        if mon is not None:
            mon.close()


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def run(models: list[str], settings: list[int], rounds: int, steps: int, warmup: int) -> list[dict]:
    works = [Workload(name) for name in models]
    cells = [(w, t, watched) for w in works for t in settings for watched in (False, True)]
    medians: dict[tuple[str, int, bool], list[float]] = {(w.name, t, x): [] for w, t, x in cells}
    own: dict[tuple[str, int], list[float]] = {(w.name, t): [] for w in works for t in settings}
    paths: dict[tuple[str, int], str] = {}
    for w, t, watched in cells:  # warm-up: numba's compiled loops load, allocators settle
        timed(w, watched, t, steps=1, warmup=1)
    for round_ in range(rounds):
        shift = round_ % len(cells)
        for w, t, watched in cells[shift:] + cells[:shift]:
            times, seconds, path = timed(w, watched, t, steps, warmup)
            medians[w.name, t, watched].append(statistics.median(times))
            if watched:
                own[w.name, t].append(1e3 * seconds)
                paths[w.name, t] = path
    entries = []
    for w in works:
        for t in settings:
            plain, watched = medians[w.name, t, False], medians[w.name, t, True]
            ratios = [b / a for a, b in zip(plain, watched, strict=True)]
            entries.append(
                {
                    "model": w.name,
                    "description": w.description,
                    "tensors": w.tensors,
                    "threads": t,
                    "capture": paths[w.name, t],
                    "unwatched_ms": summary([1e3 * v for v in plain]),
                    "watched_ms": summary([1e3 * v for v in watched]),
                    "ratio": summary(ratios),
                    "gradscope_training_thread_ms": summary(own[w.name, t]),
                }
            )
    return entries


def print_table(entries: list[dict]) -> None:
    print(
        f"\n{'model':<11} {'tensors':>7} {'threads':>7} {'capture':<20} {'unwatched ms':>12} {'watched ms':>10}"
        f"  {'ratio median (min..max)':<24} gradscope ms on the training thread"
    )
    for e in entries:
        r, own = e["ratio"], e["gradscope_training_thread_ms"]
        print(
            f"{e['model']:<11} {e['tensors']:>7} {e['threads']:>7} {e['capture']:<20} "
            f"{e['unwatched_ms']['median']:>12.1f} {e['watched_ms']['median']:>10.1f}  "
            f"{r['median']:.2f} ({r['min']:.2f}..{r['max']:.2f}){'':<9} "
            f"{own['median']:.1f} ({own['min']:.1f}..{own['max']:.1f})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="layers1000,gpt2-32")
    parser.add_argument("--threads", default=None, help="comma-separated torch thread counts (default: 1 and torch's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per setting per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--label", default="", help="what was measured (e.g. 'before: commit abc'), kept in the JSON")
    args = parser.parse_args(argv)
    default = torch.get_num_threads()
    settings = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, default})
    models = [m for m in args.models.split(",") if m]
    if "gpt2-32" in models:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("  (transformers not installed: gpt2-32 is not measured)")
            models.remove("gpt2-32")
    load_before = os.getloadavg()
    env = environment("cpu")
    print(f"gradscope {env['gradscope']} threads benchmark on {env['device']}; load average {load_before}")
    try:
        entries = run(models, settings, args.rounds, args.steps, args.warmup)
    finally:
        torch.set_num_threads(default)
    load_after = os.getloadavg()
    print_table(entries)
    print(f"load average before {load_before}, after {load_after}")
    env.update(load_average_before=load_before, load_average_after=load_after, default_threads=default)
    env.update(label=args.label, gradscope_path=str(Path(gradscope.__file__).parent))
    out = Path(args.out) if args.out else RESULTS / f"threads-cpu-{env['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "bench_threads", "environment": env, "rounds": args.rounds, "steps": args.steps}
    out.write_text(json.dumps({**payload, "models": entries}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
