"""Benchmark: the full gradient statistic set against what people use today.

For each gradient set (real model shapes) it times, in the same run:

* ``read floor``: one streaming read of the same bytes (``torch.sum`` over one concatenated
  buffer, all threads on CPU; a bandwidth-bound reduction on GPU);
* ``torch._foreach_norm``: the norm alone, what ``clip_grad_norm_`` computes;
* ``torch per-tensor, full set``: every gradscope statistic with plain per-tensor torch ops
  and one host sync at the end;
* ``torch per-tensor, 4 stats`` / ``numpy per-tensor, 4 stats``: norm, max |g|, zeros,
  non-finite count (what hand-written monitoring usually computes);
* ``tensorboard add_histogram``: TensorBoard's per-tensor histogram (if installed);
* ``gradscope``: :func:`gradscope.grad_stats` (``backend="auto"``: the fastest CPU kernel on
  CPU, Triton on GPU), plus on CPU each CPU kernel (numba, NumPy) on all threads and on one,
  and on GPU the no-sync launch the monitor uses;
* ``gradscope light``: the same with ``histogram=False`` (light rows: no histogram unless a
  tensor triggers it, see ``gradscope.stats.layout``), next to each full method above, so the
  price of the histogram is read within one run.

Methods run in interleaved rounds (each round runs every method once, in a rotated order);
it prints per method the median time, bandwidth, the median over rounds of its time over
the same round's read floor (with min..max), and writes JSON (device, versions, date,
commit) under ``benchmarks/results/``. Sets on CPU: the 25.7M MLP's real gradients, GPT-2
small shapes and ``small-800`` (800 small tensors: the fixed cost per tensor).

Usage: python benchmarks/bench_stats.py [--sets mlp-25.7m,gpt2-124m] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from model_shapes import gpt2_shapes, llama_1b_shapes, mlp_gradients, small_model_shapes, synthetic_gradients

import gradscope
from gradscope.monitor.options import HISTOGRAM_EVERY
from gradscope.stats import host_backend, layout, triton_backend
from gradscope.stats.inputs import flat_elements

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------
# The alternatives, written as their users would
# --------------------------------------------------------------------------------------


def torch_full_set(grads: list[torch.Tensor]) -> torch.Tensor:
    """Every gradscope statistic with plain per-tensor torch ops; one host sync at the end."""
    rows = []
    for g in grads:
        x = g.reshape(-1).float() if g.dtype in (torch.float16, torch.bfloat16) else g.reshape(-1)
        finite = torch.isfinite(x)
        values = torch.where(finite, x, 0)
        magnitude = values.abs()
        _, exponent = torch.frexp(magnitude)
        bins = (exponent.long() - 1 - layout.HIST_MIN_EXPONENT).clamp(0, layout.NUM_BINS - 1)
        counted = (finite & (magnitude != 0)).long()
        hist = torch.zeros(layout.NUM_BINS, dtype=torch.long, device=x.device).scatter_add_(0, bins, counted)
        scalars = torch.stack(
            [
                values.sum(dtype=torch.float64),
                values.double().square().sum(),
                magnitude.amax().double(),
                (x == 0).sum().double(),
                torch.isnan(x).sum().double(),
                torch.isinf(x).sum().double(),
            ]
        )
        rows.append(torch.cat([scalars, hist.double()]))
    return torch.stack(rows).cpu()


def torch_four_stats(grads: list[torch.Tensor]) -> torch.Tensor:
    """Norm, max |g|, zeros and non-finite count per tensor with torch ops; one sync."""
    rows = [
        torch.stack(
            [
                torch.linalg.vector_norm(g, dtype=torch.float32),
                g.abs().amax().float(),
                (g == 0).sum().float(),
                (~torch.isfinite(g)).sum().float(),
            ]
        )
        for g in grads
    ]
    return torch.stack(rows).cpu()


def numpy_four_stats(grads: list[torch.Tensor]) -> list[tuple]:
    """Norm, max |g|, zeros and non-finite count per tensor with NumPy (CPU float32)."""
    out = []
    for g in grads:
        x = g.detach().reshape(-1).float().numpy()
        out.append((np.linalg.norm(x), np.abs(x).max(), np.count_nonzero(x == 0), np.count_nonzero(~np.isfinite(x))))
    return out


def tensorboard_histograms(grads: list[torch.Tensor], names: list[str], logdir: str) -> Callable[[], None]:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(logdir)
    step = [0]

    def run() -> None:
        for name, g in zip(names, grads, strict=True):
            writer.add_histogram(name, g, step[0])
        writer.flush()
        step[0] += 1

    return run


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def time_cpu(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def time_cuda(fn: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return times


def python_progress_while(fn: Callable[[], object], seconds: float = 1.0) -> float:
    """Speed of a pure-Python thread while ``fn`` runs back to back, relative to its speed
    while this thread sleeps: 1.0 means ``fn`` never held the GIL, 0.5 half the time."""

    def spin(stop: threading.Event, out: list) -> None:
        count = 0
        while not stop.is_set():
            count += 1
        out.append(count)

    def measure(busy: bool) -> float:
        stop, out = threading.Event(), []
        thread = threading.Thread(target=spin, args=(stop, out))
        thread.start()
        start = time.perf_counter()
        if busy:
            while time.perf_counter() - start < seconds:
                fn()
        else:
            time.sleep(seconds)
        stop.set()
        thread.join()
        return out[0] / (time.perf_counter() - start)

    return measure(busy=True) / measure(busy=False)


# --------------------------------------------------------------------------------------
# One gradient set
# --------------------------------------------------------------------------------------


def gradient_set(name: str, device: str) -> tuple[list[torch.Tensor], list[str], str]:
    if name == "tiny":
        grads, names = synthetic_gradients([("w", (64, 32)), ("b", (32,))], torch.float32, device)
        return grads, names, "two small tensors (a smoke test of this script)"
    if name == "small-800":
        grads, names = synthetic_gradients(small_model_shapes(), torch.float32, device)
        return grads, names, "200 x (Linear(64, 64) + LayerNorm(64)): 800 small tensors, float32"
    if name == "mlp-25.7m":
        grads, names = mlp_gradients(device)
        return grads, names, "real gradients of the built-in MLP (one backward on synthetic data)"
    if name == "gpt2-124m":
        grads, names = synthetic_gradients(gpt2_shapes(), torch.float32, device)
        return grads, names, "GPT-2 small parameter shapes, float32, gradient-like noise"
    if name == "gpt2-124m-bf16":
        grads, names = synthetic_gradients(gpt2_shapes(), torch.bfloat16, device)
        return grads, names, "GPT-2 small parameter shapes, bfloat16, gradient-like noise"
    if name == "llama-1b-bf16":
        grads, names = synthetic_gradients(llama_1b_shapes(), torch.bfloat16, device)
        return grads, names, "Llama-3.2-1B-style parameter shapes, bfloat16, gradient-like noise"
    raise SystemExit(f"unknown gradient set {name!r}")


def run_set(name: str, device: str, repeats: int, with_slow: bool) -> dict:
    """Time every method on one gradient set in interleaved rounds: each round runs every
    method once, in an order rotated round by round, so that the machine's drift over the
    run hits every method alike; ratios to the read floor are taken within a round."""
    grads, names, description = gradient_set(name, device)
    numel = sum(g.numel() for g in grads)
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    buffer = torch.cat([g.reshape(-1) for g in grads])
    timer = time_cuda if device == "cuda" else time_cpu
    slow_rounds = max(3, repeats // 2)
    # (label, function, rounds it runs in)
    methods: list[tuple[str, Callable[[], object], int]] = [
        ("read floor (torch.sum, one buffer)", lambda: buffer.sum(), repeats),
        ("torch._foreach_norm (norm only)", lambda: torch._foreach_norm(grads), repeats),
    ]
    if with_slow:
        methods.append(("torch per-tensor, full set", lambda: torch_full_set(grads), slow_rounds))
        methods.append(("torch per-tensor, 4 stats", lambda: torch_four_stats(grads), slow_rounds))
    if device == "cpu":
        if with_slow:
            methods.append(("numpy per-tensor, 4 stats", lambda: numpy_four_stats(grads), slow_rounds))
        for kernel in reversed(host_backend.KERNELS):
            if not host_backend.kernel_available(kernel):
                print(f"  (the {kernel} kernel cannot run here: {host_backend.why_unavailable(kernel)})")
                continue
            for histogram, suffix in ((True, ""), (False, " light")):
                rows_of = functools.partial(host_backend.host_rows, grads, kernel, histogram=histogram)
                methods.append(
                    (f"gradscope {kernel}{suffix}, 1 thread", functools.partial(rows_of, num_threads=1), repeats)
                )
                methods.append((f"gradscope {kernel}{suffix}", rows_of, repeats))
        methods.append(("gradscope (grad_stats)", lambda: gradscope.grad_stats(grads), repeats))
        methods.append(
            ("gradscope light (histogram=False)", lambda: gradscope.grad_stats(grads, histogram=False), repeats)
        )
    else:
        flats = [flat_elements(g) for g in grads]
        out = torch.empty((len(grads), layout.ROW_WIDTH), dtype=torch.float64, device=device)
        methods.append(("gradscope (grad_stats, to host)", lambda: gradscope.grad_stats(grads), repeats))
        methods.append(
            (
                "gradscope light (histogram=False, to host)",
                lambda: gradscope.grad_stats(grads, histogram=False),
                repeats,
            )
        )
        methods.append(
            (
                "gradscope launch (no sync, monitor path)",
                lambda: triton_backend.launch_rows(flats, out, range(len(flats))),
                repeats,
            )
        )
        methods.append(
            (
                "gradscope light launch (no sync, monitor path)",
                lambda: triton_backend.launch_rows(flats, out, range(len(flats)), histogram=False),
                repeats,
            )
        )
    tensorboard_dir = None
    if with_slow and numel > 200_000_000:
        print(f"  ({name}: tensorboard add_histogram not measured over 200M elements; its CPU histogram takes minutes)")
    elif with_slow:
        try:
            tensorboard_dir = tempfile.mkdtemp(prefix="gradscope-bench-tb-")
            methods.append(("tensorboard add_histogram", tensorboard_histograms(grads, names, tensorboard_dir), 3))
        except ImportError:
            print("  (tensorboard not installed: its add_histogram is not measured)")

    for _, fn, _ in methods:  # warm up (and compile) every method once
        timer(fn, 1)
    times: dict[str, list[float]] = {label: [] for label, _, _ in methods}
    floor_of_round: list[float] = []
    for round_ in range(repeats):
        shift = round_ % len(methods)
        for label, fn, rounds in methods[shift:] + methods[:shift]:
            if round_ < rounds:
                times[label].append(timer(fn, 1, warmup=0)[0])
        floor_of_round.append(times[methods[0][0]][-1])
    results = []
    for label, _, _ in methods:
        ratios = [t / f for t, f in zip(times[label], floor_of_round, strict=False)]
        median = statistics.median(times[label])
        results.append(
            {
                "method": label,
                "median_ms": median,
                "min_ms": min(times[label]),
                "max_ms": max(times[label]),
                "rounds": len(times[label]),
                "x_floor": statistics.median(ratios),
                "x_floor_min": min(ratios),
                "x_floor_max": max(ratios),
                "us_per_tensor": median * 1e3 / len(grads),
            }
        )
    ours = next(r["median_ms"] for r in results if r["method"].startswith("gradscope (grad_stats"))
    for r in results:
        r["gb_per_s"] = nbytes / (r["median_ms"] * 1e-3) / 1e9
        r["x_gradscope"] = r["median_ms"] / ours
    entry = {
        "set": name,
        "description": description,
        "tensors": len(grads),
        "numel": numel,
        "bytes": nbytes,
        "dtype": str(grads[0].dtype),
        "results": results,
        "light_matches_full_bitwise": light_matches_full(grads),
        "amortised": amortised(results),
    }
    if device == "cpu":
        entry["python_thread_speed_during_gradscope"] = python_progress_while(lambda: gradscope.grad_stats(grads))
    return entry


def light_matches_full(grads) -> bool:
    """Whether light rows (``histogram=False``) hold the full rows' scalar columns bit for bit
    (the histogram columns aside: unknown in light rows unless a tensor triggers one)."""
    full = gradscope.grad_stats(grads).to_rows()[:, : layout.HIST]
    light = gradscope.grad_stats(grads, histogram=False).to_rows()[:, : layout.HIST]
    return full.tobytes() == light.tobytes()


def light_label(label: str) -> str:
    """The light method measured beside the full method ``label``."""
    fixed = {
        "gradscope (grad_stats)": "gradscope light (histogram=False)",
        "gradscope (grad_stats, to host)": "gradscope light (histogram=False, to host)",
        "gradscope launch (no sync, monitor path)": "gradscope light launch (no sync, monitor path)",
    }
    if label in fixed:
        return fixed[label]
    head, comma, tail = label.partition(",")  # "gradscope numba, 1 thread" -> "gradscope numba light, 1 thread"
    return f"{head} light{comma}{tail}"


def amortised(results: list[dict], every: int = HISTOGRAM_EVERY) -> dict:
    """Per full method with a light one in this run: the cost per sampled step of watch's
    histogram cadence (one full step in ``every``, light ones between), in ms and as a
    multiple of the light method alone."""
    by_label = {r["method"]: r["median_ms"] for r in results}
    out = {}
    for label, full in by_label.items():
        light = by_label.get(light_label(label)) if " light" not in label else None
        if light:
            cost = (full + (every - 1) * light) / every
            out[label] = {"histogram_every": every, "ms": cost, "x_light": cost / light}
    return out


def print_set(entry: dict) -> None:
    print(
        f"\n{entry['set']}: {entry['tensors']} tensors, {entry['numel'] / 1e6:.1f}M elements, "
        f"{entry['bytes'] / 1e6:.1f} MB ({entry['description']})"
    )
    print(f"  {'method':<42} {'median ms':>10} {'GB/s':>8} {'x floor':>8} {'rounds min..max':>16} {'x gradscope':>12}")
    for r in entry["results"]:
        spread = f"{r['x_floor_min']:.1f}..{r['x_floor_max']:.1f}"
        print(
            f"  {r['method']:<42} {r['median_ms']:>10.2f} {r['gb_per_s']:>8.1f} {r['x_floor']:>8.1f} {spread:>16} "
            f"{r['x_gradscope']:>12.2f}"
        )
    print(f"  light rows equal the full rows' scalar columns bit for bit: {entry['light_matches_full_bitwise']}")
    for label, cost in entry["amortised"].items():
        print(
            f"  {label}, amortised at histogram_every={cost['histogram_every']}: {cost['ms']:.2f} ms, "
            f"{cost['x_light']:.3f}x its light rows"
        )
    if "python_thread_speed_during_gradscope" in entry:
        print(
            "  a pure-Python thread keeps "
            f"{100 * entry['python_thread_speed_during_gradscope']:.0f}% of its speed while gradscope runs "
            "(the rest is time gradscope holds the GIL)"
        )


def environment(device: str) -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=RESULTS.parent).stdout.strip()
        except OSError:
            return ""

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import numba

        numba_version = numba.__version__
    except ImportError:
        numba_version = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU: {cpu}",
        "cpu": cpu,
        "cpu_threads": host_backend.default_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "triton": triton_version,
        "numba": numba_version,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "gradscope": gradscope.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=None, help="comma-separated gradient sets")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=10, help="interleaved rounds")
    parser.add_argument(
        "--out", default=None, help="JSON path (default: benchmarks/results/stats-<device>-<date>.json)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA device", file=sys.stderr)
        return 2

    if args.sets:
        sets = args.sets.split(",")
    else:
        sets = ["mlp-25.7m", "gpt2-124m"] + (
            ["gpt2-124m-bf16", "llama-1b-bf16"] if args.device == "cuda" else ["small-800"]
        )

    env = environment(args.device)
    print(f"gradscope {env['gradscope']} stats benchmark on {env['device']} ({env['cpu_threads']} CPU threads)")
    print(f"torch {env['torch']}, numpy {env['numpy']}, triton {env['triton']}, python {env['python']}")

    entries = []
    for name in sets:
        entry = run_set(name, args.device, args.repeats, with_slow=True)
        print_set(entry)
        entries.append(entry)

    out = Path(args.out) if args.out else RESULTS / f"stats-{args.device}-{env['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "bench_stats", "environment": env, "sets": entries}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
