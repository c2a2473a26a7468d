"""Benchmark: gradscope in distributed training (FSDP2 and DDP), measured with real ranks.

Spawns ``--world`` processes (gloo on CPU, or NCCL with ``--device cuda`` and one GPU per
rank) that train an MLP of ``--layers`` Linear layers, sharded with ``fully_shard`` (one
FSDP group per layer) or wrapped in DDP, and reports, in the same run:

* bytes gradscope's collectives move per sampled step, from the buffers it all-reduces
  (exact: they depend only on the parameter count and the world size);
* the time of one such collective alone (median of a blocking all-reduce of that buffer);
* the median step time without monitoring, with ``watch()`` at every step and every 10th,
  interleaved in rounds, with ratios to the unmonitored step (DDP with
  ``check_consistency=True`` and gradscope's communication hook).

It prints a table and writes JSON (device, versions, date, commit) under
``benchmarks/results/``.

Usage: python benchmarks/bench_distributed.py [--world 2 4] [--layers 32] [--width 256]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_stats import RESULTS, environment
from torch import nn

import gradscope
from gradscope.distributed import replicas, sharded

CONFIGS = ("no monitoring", "watch() every=1", "watch() every=10")


def build(kind: str, layers: int, width: int, device: str):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(layers)]).to(device)
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device, (dist.get_world_size(),))
        for block in model:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return nn.parallel.DistributedDataParallel(model)


def run_steps(model, steps: int, batch: int, width: int, device: str, config: str) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = None
    if config != "no monitoring":
        every = 1 if config.endswith("every=1") else 10
        kwargs = {"check_consistency": True} if isinstance(model, nn.parallel.DistributedDataParallel) else {}
        mon = gradscope.watch(model, every=every, **kwargs)
    g = torch.Generator(device=device).manual_seed(dist.get_rank())
    times = []
    for _ in range(steps):
        x = torch.randn(batch, width, generator=g, device=device)
        dist.barrier()
        start = time.perf_counter()
        loss = model(x).square().mean()
        loss.backward()
        if mon is not None:
            mon.step(loss=loss)
        opt.step()
        opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if mon is not None:
        mon.close()
    return times


def collective_time(numel: int, device: str, repeats: int = 50) -> float:
    """Median seconds of one blocking all-reduce of ``numel`` float64 values."""
    buffer = torch.zeros(numel, dtype=torch.float64, device=device)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rank_main(rank: int, world: int, root: str, args: dict) -> None:
    device = args["device"]
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, args["threads"] // world))
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=f"file://{root}/store",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        out = {}
        params = 2 * args["layers"]
        for kind in ("fsdp", "ddp"):
            samples = {config: [] for config in CONFIGS}
            for _ in range(args["rounds"]):
                for config in CONFIGS:
                    model = build(kind, args["layers"], args["width"], device)
                    times = run_steps(model, args["steps"] + 2, args["batch"], args["width"], device, config)
                    samples[config].extend(times[2:])  # the first steps warm up
            if kind == "fsdp":
                wire = sharded.wire_bytes(params)
            else:
                wire = replicas.wire_bytes(world, params, check_consistency=True)
            out[kind] = {
                "median_step_s": {config: statistics.median(values) for config, values in samples.items()},
                "bytes_per_sampled_step": wire,
                "collective_s": collective_time(wire // 8, device),
            }
        if rank == 0:
            with open(Path(root) / "rank0.json", "w") as file:
                json.dump(out, file)
        # Without this, a rank that tears its group down while another still talks to it
        # sometimes aborts at exit ("terminate called without an active exception").
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure(world: int, args: dict) -> dict:
    with tempfile.TemporaryDirectory() as root:
        mp.start_processes(rank_main, args=(world, root, args), nprocs=world, start_method="spawn")
        return json.loads((Path(root) / "rank0.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="examples per rank")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/distributed-<device>-<date>.json)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < max(args.world):
        print(f"bench_distributed: needs {max(args.world)} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    settings = {**vars(args), "threads": torch.get_num_threads()}
    rows = []
    print(f"MLP {args.layers} x Linear({args.width}), batch {args.batch} per rank, {args.device}")
    print(f"{'world':>5} {'kind':<5} {'bytes/step':>10} {'collective':>11} {'config':<18} {'step ms':>8} {'x none':>7}")
    for world in args.world:
        result = measure(world, settings)
        for kind, data in result.items():
            base = data["median_step_s"]["no monitoring"]
            for config, seconds in data["median_step_s"].items():
                rows.append(
                    {
                        "world": world,
                        "kind": kind,
                        "configuration": config,
                        "median_step_ms": 1e3 * seconds,
                        "x_unmonitored": seconds / base,
                        "bytes_per_sampled_step": data["bytes_per_sampled_step"],
                        "collective_us": 1e6 * data["collective_s"],
                    }
                )
                print(
                    f"{world:>5} {kind:<5} {data['bytes_per_sampled_step']:>10} "
                    f"{1e6 * data['collective_s']:>9.0f}us {config:<18} {1e3 * seconds:>8.2f} {seconds / base:>7.3f}"
                )
    env = environment(args.device)
    out = Path(args.out) if args.out else RESULTS / f"distributed-{args.device}-{env['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "bench_distributed", "environment": env, "settings": vars(args), "rows": rows}
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
