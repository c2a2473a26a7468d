"""Benchmark (GPU only): the statistics kernel's launch configuration, measured.

The kernel's tiling (warps per program, elements per fast-path step, registers per thread,
elements per chunk) decides how many programs fit on an SM and how many bytes each keeps
in flight. This script compiles and times the candidates on the GPU it runs on, against
the ceilings measured in the same run:

* ``copy``: a device-to-device copy (bytes read + written per second): the memory ceiling;
* ``read floor``: ``torch.amax`` over one buffer of the same bytes (a bandwidth-bound read);
* ``torch._foreach_norm``: the norm alone, what ``clip_grad_norm_`` computes.

For every configuration it records registers and spills per thread (Triton's own report
of the compiled kernel) and the median/min/max time over interleaved rounds, on gradient
sets built like real ones (Llama-3.2-1B-style bf16, GPT-2 float32), on one 262M-element
bf16 tensor (a Llama embedding: the finishing program's worst case) against the same
bytes in 16 tensors, and on the careful path (one NaN per tensor; every chunk careful).
Every configuration's rows are checked against float64 torch (counts, ``max_abs`` and the
histogram exactly; sums within the float32 accumulation bound).

Usage: python benchmarks/bench_launch.py [--out PATH] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_stats import environment, torch_full_set
from gradscope.kernels import launch as kernel
from model_shapes import gpt2_shapes, llama_1b_shapes, synthetic_gradients

from gradscope.stats import layout

# (warps, block, careful block, smallest chunk, maxnreg); the first is the launcher's default
# for 16/32-bit inputs.
CANDIDATES = [
    (4, 4096, 512, 1 << 16, None),
    (8, 4096, 512, 1 << 16, None),
    (4, 8192, 512, 1 << 16, None),
    (4, 2048, 512, 1 << 16, None),
    (8, 8192, 512, 1 << 16, None),
    (4, 4096, 512, 1 << 15, None),
    (4, 4096, 512, 1 << 17, None),
    (4, 4096, 512, 1 << 16, 128),
]


def median_range(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def event_time(fn: Callable[[], object]) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop)


def interleaved(methods: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Times of each method over ``rounds`` rounds, the methods taking turns within a round."""
    for fn in methods.values():
        fn()
        fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            times[name].append(event_time(fn))
    return times


def launcher(values: list[torch.Tensor], out: torch.Tensor, config, scale: torch.Tensor | None):
    """A no-check launch closure for one configuration; returns (closure, compiled kernel)."""
    warps, block, careful, chunk, maxnreg = config
    addresses = np.array([v.data_ptr() for v in values], dtype=np.int64)
    numels = np.array([v.numel() for v in values], dtype=np.int64)
    table = kernel.work_table(addresses, numels, np.arange(len(values), dtype=np.int64), chunk)

    def launch():
        return kernel.launch_table(
            table,
            len(values),
            values[0].dtype,
            out,
            inv_scale=scale,
            block=block,
            careful_block=careful,
            final_rows=16,
            num_warps=warps,
            maxnreg=maxnreg,
        )

    return launch, launch()


def reference_rows(values: list[torch.Tensor]) -> np.ndarray:
    """Rows computed in float64 by plain torch ops (``bench_stats.torch_full_set``)."""
    rows = np.zeros((len(values), layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = [v.numel() for v in values]
    rows[:, layout.SUM :] = torch_full_set(values).numpy()
    return rows


def agree(rows: np.ndarray, reference: np.ndarray) -> bool:
    """Counts, max_abs and histogram exactly; the sum within 1e-6 of sqrt(numel * sumsq)
    (a bound on sum |g|), the sum of squares to 1e-4 relative (float32 lanes)."""
    exact = [layout.NUMEL, layout.MAX_ABS, layout.ZEROS, layout.NANS, layout.INFS]
    exact += range(layout.HIST, layout.ROW_WIDTH)
    if not np.array_equal(rows[:, exact], reference[:, exact]):
        return False
    scale = np.sqrt(reference[:, layout.NUMEL] * reference[:, layout.SUMSQ])
    sums_close = np.abs(rows[:, layout.SUM] - reference[:, layout.SUM]) <= 1e-6 * scale + 1e-30
    squares_close = np.isclose(rows[:, layout.SUMSQ], reference[:, layout.SUMSQ], rtol=1e-4, atol=0)
    return bool(sums_close.all() and squares_close.all())


def measure_set(name: str, values: list[torch.Tensor], rounds: int, scaled: bool) -> dict:
    nbytes = sum(v.numel() * v.element_size() for v in values)
    flat = [v.reshape(-1) for v in values]
    buffer = torch.cat(flat)
    scale = torch.full((1,), 0.5, dtype=torch.float32, device="cuda") if scaled else None
    methods: dict[str, Callable[[], object]] = {
        "read floor (torch.amax, one buffer)": lambda: torch.amax(buffer),
        "torch._foreach_norm (norm only)": lambda: torch._foreach_norm(values),
    }
    compiled = {}
    outputs = {}
    for config in CANDIDATES:
        label = "w{} b{} cb{} chunk{} maxnreg{}".format(*config)
        out = torch.zeros((len(values), layout.ROW_WIDTH), dtype=torch.float64, device="cuda")
        try:
            launch, k = launcher(flat, out, config, scale)
        except Exception as error:  # a configuration that does not compile is a result too
            compiled[label] = {"error": f"{type(error).__name__}: {error}"[:300]}
            continue
        torch.cuda.synchronize()
        outputs[label] = out.cpu().numpy()
        compiled[label] = {"registers": int(k.n_regs), "spills": int(k.n_spills)}
        methods[label] = launch
    times = interleaved(methods, rounds)
    reference = reference_rows(values if scale is None else [v.float() * 0.5 for v in values])
    results = []
    floor = statistics.median(times["read floor (torch.amax, one buffer)"])
    for label, series in times.items():
        entry = {"method": label, **median_range(series), **compiled.get(label, {})}
        entry["gb_per_s"] = nbytes / (entry["median_ms"] * 1e-3) / 1e9
        entry["x_floor"] = entry["median_ms"] / floor
        if label in outputs:
            entry["rows_match_float64_reference"] = agree(outputs[label], reference)
        results.append(entry)
    failed = {label: c for label, c in compiled.items() if "error" in c}
    print(f"\n{name}: {len(values)} tensors, {nbytes / 1e9:.2f} GB, {values[0].dtype}, scale={scaled}")
    print(f"  {'method':<44} {'median ms':>10} {'min..max':>16} {'GB/s':>7} {'x floor':>8} {'regs':>5} {'spill':>5}")
    for r in results:
        span = f"{r['min_ms']:.3f}..{r['max_ms']:.3f}"
        print(
            f"  {r['method']:<44} {r['median_ms']:>10.3f} {span:>16} {r['gb_per_s']:>7.0f} {r['x_floor']:>8.2f} "
            f"{r.get('registers', ''):>5} {r.get('spills', ''):>5}"
            + ("" if r.get("rows_match_float64_reference", True) else "  ROWS DIFFER FROM FLOAT64")
        )
    for label, c in failed.items():
        print(f"  {label}: {c['error']}")
    return {
        "set": name,
        "tensors": len(values),
        "bytes": nbytes,
        "dtype": str(values[0].dtype),
        "scale": scaled,
        "results": results,
        "failed": failed,
    }


def ceilings(rounds: int) -> dict:
    source = torch.empty(1 << 30, dtype=torch.float32, device="cuda").normal_()
    target = torch.empty_like(source)
    times = interleaved({"copy": lambda: target.copy_(source), "amax": lambda: torch.amax(source)}, rounds)
    nbytes = source.numel() * 4
    copy = median_range(times["copy"])
    read = median_range(times["amax"])
    result = {
        "copy_tb_per_s_read_plus_write": 2 * nbytes / (copy["median_ms"] * 1e-3) / 1e12,
        "amax_read_tb_per_s": nbytes / (read["median_ms"] * 1e-3) / 1e12,
        "bytes": nbytes,
        "copy": copy,
        "amax": read,
    }
    print(
        f"ceilings on 4.3 GB float32: copy {result['copy_tb_per_s_read_plus_write']:.2f} TB/s (read+write), "
        f"amax read {result['amax_read_tb_per_s']:.2f} TB/s"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="the Llama set and the embedding only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or kernel.is_interpreted():
        print("error: bench_launch.py needs a CUDA device and compiled kernels", file=sys.stderr)
        return 2
    started = time.perf_counter()
    env = environment("cuda")
    print(f"gradscope launch benchmark on {env['device']}: torch {env['torch']}, triton {env['triton']}")
    report = {"benchmark": "bench_launch", "environment": env, "ceilings": ceilings(args.rounds), "sets": []}

    out = (
        Path(args.out)
        if args.out
        else Path(__file__).resolve().parent / "results" / (f"launch-cuda-{env['date'][:10]}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)

    def add(name: str, values: list[torch.Tensor], scaled: bool = False) -> None:
        report["sets"].append(measure_set(name, values, args.rounds, scaled=scaled))
        report["wall_s"] = time.perf_counter() - started
        out.write_text(json.dumps(report, indent=2) + "\n")  # after every set: a cut run keeps its results

    llama, _ = synthetic_gradients(llama_1b_shapes(), torch.bfloat16, "cuda")
    add("llama-1b-bf16", llama)
    embedding = llama[0]
    add("embedding-262m-bf16", [embedding])
    add("embedding-262m-bf16-as-16", list(embedding.reshape(16, -1).unbind(0)))
    if not args.quick:
        gpt2, _ = synthetic_gradients(gpt2_shapes(), torch.float32, "cuda")
        add("gpt2-124m-fp32", gpt2)
        add("llama-1b-bf16-gradscaler", llama, scaled=True)
        for g in llama:
            g.view(-1)[g.numel() // 2] = float("nan")
        add("llama-1b-bf16-one-nan-per-tensor", llama)
        del llama, embedding
        torch.cuda.empty_cache()
        add("gpt2-124m-fp32-gradscaler", gpt2, scaled=True)
        add("gpt2-124m-fp32-all-careful", [g * 1e-20 for g in gpt2])  # every chunk takes the careful path
    report["wall_s"] = time.perf_counter() - started
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
