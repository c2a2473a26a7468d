"""Benchmark: does the learning-rate controller save runs whose learning rate is too high?

Trains the demo's 12-layer ReLU MLP classifier (:mod:`gradscope.demo`: 8 classes of a random
teacher network, batches of 128, Adam) with a linear warm-up over the first half of the run
to a peak learning rate, for several seeds and peaks, each run twice — under
``gradscope.watch`` without actions, and with ``adapt_lr=gradscope.AdaptiveLR()`` (its
defaults) — and reports per peak and arm:

* the final training loss (mean of the last 20 steps) and the held-out loss at the end,
  medians with min..max over the seeds;
* how many runs diverged: the final loss at or above 90% of chance (``ln 8``: the ReLU
  network collapsed to a constant output) or non-finite, and how many end with the health
  report's ``divergence`` finding;
* the learning-rate changes the controller made (and what triggered them).

The peak ``1e-3`` is the demo's healthy rate: there the controller must change nothing.
The loss is the result here, not time, so this benchmark is not disturbed by a busy machine.

It prints a table and writes JSON (device, versions, date, commit) under ``benchmarks/results/``.

Usage: python benchmarks/bench_actions.py [--seeds 5] [--steps 300] [--peaks 1e-3 3e-2 5e-2 1e-1]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from pathlib import Path

import torch
from bench_stats import RESULTS, environment
from torch import nn

import gradscope
from gradscope import demo

CHANCE = math.log(demo.CLASSES)
"""The loss of a constant output (uniform over the classes): a collapsed network's loss."""


def train(peak: float, seed: int, steps: int, controller: bool, device: str = "cpu") -> dict:
    """One run; returns its final losses, whether it diverged and the controller's changes."""
    model = demo.build("none", device, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=peak)
    warmup = max(steps // 2, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    task = demo.SyntheticTask(device, seed=seed + 1)
    held_out = task.batch(1024)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a diverging run's NumPy warnings are not the result
        with gradscope.watch(model, optimizer=opt, adapt_lr=gradscope.AdaptiveLR() if controller else None) as mon:
            for _ in range(steps):
                x, y = task.batch()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                mon.step(loss=loss.detach())
                opt.step()
                opt.zero_grad(set_to_none=True)
                schedule.step()
                losses.append(float(loss))
            with torch.no_grad():
                val = float(nn.functional.cross_entropy(model(held_out[0]), held_out[1]))
            report = mon.report(wait=True)
    final = statistics.fmean(losses[-20:]) if all(map(math.isfinite, losses[-20:])) else math.inf
    return {
        "seed": seed,
        "final_loss": final,
        "val_loss": val if math.isfinite(val) else math.inf,
        "collapsed": not math.isfinite(final) or final >= 0.9 * CHANCE,
        "divergence_finding": any(f.kind == "divergence" for f in report.findings),
        "changes": [a["message"] for a in report.actions if a["action"] == "lr"],
        "triggers": [a["detail"]["because"]["kind"] for a in report.actions if a["action"] == "lr"],
        "lr_scale": mon.lr_scale,
    }


def summary(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--peaks", type=float, nargs="+", default=[1e-3, 3e-2, 5e-2, 1e-1])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/actions-DEVICE-DATE.json)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    results = []
    header = (
        f"{'peak lr':>8} {'controller':>10} {'final loss (median, min..max)':>31} {'val loss':>8} "
        f"{'collapsed':>9} {'divergence':>10} {'lr changes':>10}"
    )
    seeds = f"seeds 0..{args.seeds - 1}"
    print(f"demo MLP, Adam, warm-up over {args.steps // 2} steps to the peak, {args.steps} steps, {seeds}")
    print(header)
    for peak in args.peaks:
        for controller in (False, True):
            runs = [train(peak, seed, args.steps, controller, args.device) for seed in range(args.seeds)]
            final, val = summary(runs, "final_loss"), summary(runs, "val_loss")
            row = {
                "peak_lr": peak,
                "controller": controller,
                "final_loss": final,
                "val_loss": val,
                "collapsed": sum(r["collapsed"] for r in runs),
                "divergence_findings": sum(r["divergence_finding"] for r in runs),
                "lr_changes": sum(len(r["changes"]) for r in runs),
                "runs": runs,
            }
            results.append(row)
            print(
                f"{peak:>8.0e} {'on' if controller else 'off':>10} "
                f"{final['median']:>11.3f} ({final['min']:.3f}..{final['max']:.3f}) {val['median']:>8.3f} "
                f"{row['collapsed']:>6d}/{args.seeds} {row['divergence_findings']:>7d}/{args.seeds} "
                f"{row['lr_changes']:>10d}",
                flush=True,
            )
    env = environment(args.device)
    out = Path(args.out) if args.out else RESULTS / f"actions-{args.device}-{env['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"environment": env, "steps": args.steps, "seeds": args.seeds, "results": results}
    out.write_text(json.dumps(document, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
