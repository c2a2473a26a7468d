"""Benchmark: what one ``mon.step()`` call costs the training thread, sampled and not.

``bench_overhead.py`` measures whole training steps, where a few hundred microseconds drown
in this machine's noise unless the step is short. This script times the call itself: the
demo's 12-layer MLP (a ~4 ms CPU step, where per-step host costs show) is trained with
``watch(every=N)``, and each ``mon.step()`` is timed with ``time.perf_counter``, right after
backward as in a real loop (so with the caches backward leaves behind). Rounds alternate the
``every`` settings; the table gives the median per round, then the median (min..max) over
rounds, for sampled and unsampled calls apart, and the mean over every call (the median of
the rounds' means: it includes the calls that record a batch of steps).

    python benchmarks/bench_step_cost.py [--steps 600] [--rounds 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_overhead import Workload
from bench_stats import RESULTS, environment

import gradscope

EVERY = (1, 10, 100)


def one_round(work: Workload, every: int, steps: int, warmup: int = max(EVERY)) -> tuple[list[float], list[float]]:
    """Durations (s) of sampled and unsampled ``mon.step()`` calls over ``steps`` steps (the
    first of them sampled for every setting)."""
    sampled, unsampled = [], []
    with gradscope.watch(work.model, every=every) as mon:
        for step in range(warmup + steps):
            work.optimizer.zero_grad(set_to_none=True)
            loss = work.loss()
            loss.backward()
            start = time.perf_counter()
            mon.step(loss=loss)
            elapsed = time.perf_counter() - start
            work.optimizer.step()
            if step >= warmup:
                (sampled if step % every == 0 else unsampled).append(elapsed)
    return sampled, unsampled


def spread(values: list[float]) -> dict:
    return {"median_us": statistics.median(values), "min_us": min(values), "max_us": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="measured steps per setting per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="demo", help="a bench_overhead.py model (demo, small, ...)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    env = environment("cpu")
    work = Workload(args.model, "cpu")
    medians = {every: {"sampled": [], "unsampled": [], "mean": []} for every in EVERY}
    for _ in range(args.rounds):
        for every in EVERY:
            sampled, unsampled = one_round(work, every, args.steps)
            for kind, values in (("sampled", sampled), ("unsampled", unsampled)):
                if values:
                    medians[every][kind].append(statistics.median(values) * 1e6)
            medians[every]["mean"].append(statistics.fmean(sampled + unsampled) * 1e6)
    print(f"gradscope {env['gradscope']}: mon.step() on {work.description} ({env['torch_threads']} torch threads)")
    print(f"  {'every':>5}  {'sampled call µs':>26}  {'unsampled call µs':>26}  {'mean per step µs':>16}")
    rows = []
    for every in EVERY:
        row = {"every": every, **{kind: spread(v) for kind, v in medians[every].items() if v and kind != "mean"}}
        row["mean_per_step_us"] = statistics.median(medians[every]["mean"])  # every call, tails included
        rows.append(row)
        cells = []
        for kind in ("sampled", "unsampled"):
            s = row.get(kind)
            cells.append(f"{s['median_us']:8.0f} ({s['min_us']:.0f}..{s['max_us']:.0f})" if s else "-")
        print(f"  {every:>5}  {cells[0]:>26}  {cells[1]:>26}  {row['mean_per_step_us']:>16.0f}")
    out = Path(args.out) if args.out else RESULTS / f"step-cost-cpu-{env['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "bench_step_cost", "environment": env, "model": args.model, "steps": args.steps}
    out.write_text(json.dumps({**result, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    sys.exit(main())
