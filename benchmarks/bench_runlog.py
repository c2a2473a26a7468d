"""Benchmark: the run log's size on disk and its cost, measured on a real training run.

Trains a residual MLP with ``--layers`` monitored rows (Linear and LayerNorm modules; 200 by
default, the issue's "200-layer model") for ``--steps`` steps under ``gradscope.watch`` with
``log_dir`` and reports, in the same run:

* bytes written per sampled step (measured: the log's size over the sampled steps), and the
  size of 100k sampled steps at that rate (arithmetic on the measured rate; the rate does
  not depend on the step count, since every sampled step is one line of the same shape);
* the time to encode one sampled step's record (done on the monitor's background thread);
* the median training step time without monitoring, with ``watch()``, and with
  ``watch(log_dir=...)``, interleaved in rounds, with ratios to the unmonitored step.

It prints a table and writes JSON (device, versions, date, commit) under
``benchmarks/results/``.

Usage: python benchmarks/bench_runlog.py [--layers 200] [--steps 300] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_stats import RESULTS, environment
from torch import nn

import gradscope
from gradscope.run import records


class ResidualBlock(nn.Module):
    """Two Linear + LayerNorm pairs with a residual connection: four monitored rows."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.norm1 = nn.Linear(width, width), nn.LayerNorm(width)
        self.fc2, self.norm2 = nn.Linear(width, width), nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm2(self.fc2(torch.relu(self.norm1(self.fc1(x)))))


def model_with_rows(layers: int, width: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    blocks = [ResidualBlock(width) for _ in range(max(layers // 4, 1))]
    return nn.Sequential(*blocks).to(device)


def train(model: nn.Module, steps: int, device: str, monitor_kwargs: dict | None) -> tuple[list[float], object]:
    """Step times (s) of ``steps`` steps; ``monitor_kwargs`` None: no monitoring."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator(device=device).manual_seed(1)
    width = model[0].fc1.in_features
    mon = gradscope.watch(model, optimizer=opt, **monitor_kwargs) if monitor_kwargs is not None else None
    times = []
    try:
        for _ in range(steps):
            start = time.perf_counter()
            x = torch.randn(64, width, generator=g, device=device)
            loss = model(x).pow(2).mean()
            loss.backward()
            if mon is not None:
                mon.step(loss=loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    finally:
        if mon is not None:
            mon.close()
    return times, mon


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=200, help="monitored rows (a multiple of 4)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA device", file=sys.stderr)
        return 2
    env = environment(args.device)
    print(f"gradscope {env['gradscope']} run-log benchmark on {env['device']} ({env['torch_threads']} torch threads)")

    with tempfile.TemporaryDirectory() as tmp:
        # Size: one logged run.
        model = model_with_rows(args.layers, args.width, args.device)
        _, mon = train(model, args.steps, args.device, {"log_dir": Path(tmp) / "size", "track_updates": True})
        files = sorted((Path(tmp) / "size").glob("gradscope-*.jsonl"))
        total = sum(f.stat().st_size for f in files)
        lines = [line for f in files for line in f.read_text().splitlines()]
        sampled_lines = [line for line in lines if line.startswith('{"t":"sampled"')]
        sampled_bytes = sum(len(line) + 1 for line in sampled_lines)
        per_step = total / args.steps
        rows = len(mon.rows)
        record = records.decode(sampled_lines[-1])
        encode_times = []
        for _ in range(50):
            start = time.perf_counter()
            records.encode(record)
            encode_times.append(time.perf_counter() - start)
        loaded = gradscope.load_run(Path(tmp) / "size")
        assert loaded.report().to_dict() == mon.report().to_dict()

        # Cost: interleaved rounds of the three configurations.
        configs = {"no monitoring": None, "watch()": {}, "watch(log_dir=...)": {}}
        step_times: dict[str, list[float]] = {name: [] for name in configs}
        for round_index in range(args.rounds):
            for name, kwargs in configs.items():
                kwargs = dict(kwargs) if kwargs is not None else None
                if name == "watch(log_dir=...)":
                    kwargs["log_dir"] = Path(tmp) / f"cost-{round_index}"
                times, _ = train(model_with_rows(args.layers, args.width, args.device), args.steps, args.device, kwargs)
                step_times[name] += times[5:]  # past warm-up

    base = statistics.median(step_times["no monitoring"])
    print(f"\nmodel: {rows} monitored rows, {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"log: {total:,} bytes for {args.steps} sampled steps ({len(files)} file(s)), every=1, track_updates=True")
    print(f"  per sampled step: {per_step:,.0f} bytes ({sampled_bytes / len(sampled_lines):,.0f} of them statistics)")
    print(f"  100k sampled steps at this rate: {per_step * 1e5 / 2**30:.2f} GiB")
    print(f"  encoding one sampled step (background thread): {statistics.median(encode_times) * 1e6:.0f} us")
    print(f"\n  {'configuration':<22} {'median step ms':>15} {'x unmonitored':>14}")
    results = []
    for name, times in step_times.items():
        median = statistics.median(times)
        print(f"  {name:<22} {median * 1e3:>15.2f} {median / base:>14.3f}")
        results.append({"configuration": name, "median_step_ms": median * 1e3, "x_unmonitored": median / base})
    out = Path(args.out) if args.out else RESULTS / f"runlog-{args.device}-{env['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": "bench_runlog",
        "environment": env,
        "rows": rows,
        "steps": args.steps,
        "log_bytes": total,
        "bytes_per_sampled_step": per_step,
        "statistics_bytes_per_sampled_step": sampled_bytes / len(sampled_lines),
        "projected_gib_per_100k_sampled_steps": per_step * 1e5 / 2**30,
        "encode_us_median": statistics.median(encode_times) * 1e6,
        "step_times": results,
    }
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
