"""Benchmark: what monitoring costs per training step, gradscope against today's alternatives.

One interleaved run per model: each round trains a few steps with every method in turn,
so that drifts of the machine (clock, other load) hit every method alike. Methods:

* ``no monitoring``: the plain training step (forward, backward, optimizer step);
* ``gradscope watch(every=1)`` and ``watch(every=10)``: every statistic, per layer;
* ``watch(every=1)`` acting on findings: with ``on_finding``, ``halt_on``, early stopping and
  the learning-rate controller, so that findings are checked at every ``mon.step()``;
* the same with ``forward=True``: gradients plus every module's forward statistics;
* ``watch(every=1, track_updates=True)`` and ``watch(every=1/10, compression=True)``: the
  optimizer-side options, which read the weights around ``optimizer.step()`` on sampled steps;
* ``per-parameter .norm().item()``: the hand-written loop (one host sync per parameter);
* ``torch._foreach_norm + one sync``: the norm alone, as ``clip_grad_norm_`` computes it;
* ``set_detect_anomaly(True)``: torch's anomaly mode;
* ``tensorboard add_histogram``: a histogram per parameter per step (if installed);
* ``wandb.watch(log="gradients", log_freq=1)`` offline, against gradscope with its
  ``WandbExporter`` into an offline run (if wandb is installed; ``integration_methods.py``);
* with ``--integrations``, also per model: Lightning's ``Trainer.fit`` with no callback,
  with ``GradscopeCallback(every=1/10)`` and with the per-parameter ``grad_norm`` callback
  users write today (``integration_methods.py``), in a table of its own.

Models: on CPU ``small``, 200 x (Linear(64, 64) + LayerNorm(64)) (800 small parameter
tensors: the fixed cost per tensor shows), the 25.7M-parameter MLP (8 x Linear 1792, batch
512) and a 6-layer TransformerEncoder (d=512), and on request (``--models demo``) the demo's
12-layer MLP, whose few-ms step shows per-step host costs; on CUDA a GPT-2-small-shaped decoder (124M parameters) under
bfloat16 autocast. Prints step times and, per method, the median over rounds of its step
time divided by the unmonitored step time of the same round (with the spread over rounds);
writes JSON under ``benchmarks/results/``.

Usage: python benchmarks/bench_overhead.py [--models mlp,transformer] [--device cpu|cuda] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import integration_methods
import torch
from bench_stats import RESULTS, environment
from torch import nn

import gradscope

# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


class GPT2Small(nn.Module):
    """A GPT-2-small-shaped decoder (12 x d768, vocab 50257, tied embeddings): 124M parameters."""

    def __init__(self, vocab: int = 50257, width: int = 768, layers: int = 12, context: int = 1024) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(
            width, 12, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.h = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        return self.lm_head(self.ln_f(self.h(x, mask=mask, is_causal=True)))


class Workload:
    """A model, an optimizer and a fixed batch: ``loss()`` runs the forward pass."""

    def __init__(self, name: str, device: str) -> None:
        torch.manual_seed(0)
        self.name, self.device = name, device
        self.autocast = contextlib.nullcontext
        if name == "tiny":  # a smoke test of this script
            self.model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).to(device)
            self.inputs = torch.randn(16, 32, device=device)
            self.targets = torch.randn(16, 8, device=device)
            self.criterion = nn.functional.mse_loss
            self.description = "a two-layer MLP (smoke test)"
        elif name == "demo":  # fast steps: where per-step host costs (judging findings) would show
            from gradscope import demo

            self.model = demo.build("none").to(device)
            self.inputs = torch.randn(demo.BATCH, demo.INPUTS, device=device)
            self.targets = torch.randint(0, demo.CLASSES, (demo.BATCH,), device=device)
            self.criterion = nn.functional.cross_entropy
            self.description = "the demo's 12-layer MLP (44k parameters), batch 128, SGD: a ~10 ms step"
        elif name == "small":  # many small tensors: the fixed cost per parameter tensor shows
            blocks: list[nn.Module] = []
            for _ in range(200):
                blocks += [nn.Linear(64, 64), nn.LayerNorm(64)]
            self.model = nn.Sequential(*blocks).to(device)
            self.inputs = torch.randn(32, 64, device=device)
            self.targets = torch.randn(32, 64, device=device)
            self.criterion = nn.functional.mse_loss
            self.description = "200 x (Linear(64, 64) + LayerNorm(64)): 800 parameter tensors, batch 32, SGD"
        elif name == "mlp":
            layers: list[nn.Module] = []
            for _ in range(8):
                layers += [nn.Linear(1792, 1792), nn.ReLU()]
            self.model = nn.Sequential(*layers[:-1]).to(device)
            self.inputs = torch.randn(512, 1792, device=device)
            self.targets = torch.randn(512, 1792, device=device)
            self.criterion = nn.functional.mse_loss
            self.description = "8 x Linear(1792, 1792), batch 512, SGD"
        elif name == "transformer":
            layer = nn.TransformerEncoderLayer(512, 8, 2048, dropout=0.0, batch_first=True)
            self.model = nn.Sequential(nn.TransformerEncoder(layer, 6, enable_nested_tensor=False), nn.Linear(512, 16))
            self.model.to(device)
            self.inputs = torch.randn(8, 64, 512, device=device)
            self.targets = torch.randn(8, 64, 16, device=device)
            self.criterion = nn.functional.mse_loss
            self.description = "6-layer TransformerEncoder d=512 (ff 2048), batch 8 x 64 tokens, SGD"
        elif name == "gpt2":
            self.model = GPT2Small().to(device)
            self.inputs = torch.randint(0, 50257, (8, 512), device=device)
            self.targets = torch.randint(0, 50257, (8, 512), device=device)
            self.criterion = lambda logits, targets: nn.functional.cross_entropy(
                logits.flatten(0, 1), targets.flatten()
            )
            self.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
            self.description = "GPT-2 small shape (124M), batch 8 x 512 tokens, bf16 autocast, AdamW"
        else:
            raise SystemExit(f"unknown model {name!r}")
        params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=1e-4) if name == "gpt2" else torch.optim.SGD(params, lr=1e-3)
        self.parameters = sum(p.numel() for p in params)

    def loss(self) -> torch.Tensor:
        with self.autocast():
            return self.criterion(self.model(self.inputs), self.targets)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


# --------------------------------------------------------------------------------------
# Methods: each returns (per-step callback after backward, context for the step, teardown),
# or (..., teardown, drain): ``drain`` finishes the measured steps' own background work
# (gradscope's pump delivering records to exporters, which flush every 2 s); its time is
# spread over the measured steps, so a round shorter than a flush still pays for it.
# --------------------------------------------------------------------------------------


def method_none(work: Workload):
    return (lambda step, loss: None), contextlib.nullcontext, lambda: None


class Breakdown:
    """gradscope's own share of a step, apart from the step's wall time.

    * host: seconds of the training thread spent in gradscope's calls: its backward hooks,
      its end-of-backward callback and ``mon.step()`` (each call timed with ``perf_counter``);
    * GPU (CUDA): seconds of its kernels, from CUDA events recorded on the stream right before
      and after each of its launches (the stream runs them in order, so the time between a
      pair is theirs alone).

    The backward receiver's methods are wrapped on the instance (the hooks look them up at
    each call).
    """

    def __init__(self, mon) -> None:
        from gradscope.monitor.capture import KernelCapture

        self.mon = mon
        self.host = 0.0
        self.steps = 0
        self.events: list = []
        receiver = mon._backward
        for name in ("on_grad", "on_first_arrival", "_on_backward_end"):
            setattr(receiver, name, self._timed(getattr(receiver, name)))
        for capture in mon._engines.captures.values():
            if isinstance(capture, KernelCapture) and capture.device.type == "cuda":
                flush = self._evented(capture.flush, capture.device)
                capture.flush = capture.end_backward = flush

    def _timed(self, call):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.host += time.perf_counter() - start

        return timed

    def _evented(self, flush, device):
        def evented():
            if not flush.__self__._pending:
                return flush()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(device))
            flush()
            stop.record(torch.cuda.current_stream(device))
            self.events.append((start, stop))

        return evented

    def step(self, loss) -> None:
        """``mon.step(loss=loss)``, timed as gradscope's host time."""
        self._timed(self.mon.step)(loss=loss)
        self.steps += 1

    def reset(self) -> None:
        self.host, self.steps, self.events = 0.0, 0, []

    def per_step(self) -> dict:
        """Host and GPU milliseconds per step since :meth:`reset` (after a device sync)."""
        steps = max(self.steps, 1)
        gpu = sum(start.elapsed_time(stop) for start, stop in self.events) if self.events else None
        return {"host_ms": 1e3 * self.host / steps, "gpu_ms": None if gpu is None else gpu / steps}


def method_gradscope(
    every: int,
    mode: str = "backward",
    forward: bool = False,
    acting: bool = False,
    histogram_every: int | None = None,
    optimizer_side: str | None = None,
):
    """``watch(every=...)``; ``histogram_every`` (None: gradscope's default cadence);
    ``optimizer_side``: ``"track_updates"`` or ``"compression"``, that option on (with the
    optimizer)."""

    def make(work: Workload):
        actions = {}
        if acting:  # every action on: findings checked at each mon.step() (gradscope.actions)
            actions = {
                "optimizer": work.optimizer,
                "on_finding": lambda finding: None,
                "halt_on": "critical",
                "early_stopping": True,
                "adapt_lr": gradscope.AdaptiveLR(),
            }
        if histogram_every is not None:
            actions["histogram_every"] = histogram_every
        if optimizer_side is not None:
            actions.update({"optimizer": work.optimizer, optimizer_side: True})
        mon = gradscope.watch(work.model, every=every, mode=mode, forward=forward, **actions)
        breakdown = Breakdown(mon)
        return (lambda step, loss: breakdown.step(loss)), contextlib.nullcontext, lambda: None, mon.close, breakdown

    return make


def method_item_loop(work: Workload):
    params = list(work.model.parameters())
    return (lambda step, loss: [p.grad.norm().item() for p in params]), contextlib.nullcontext, lambda: None


def method_foreach_norm(work: Workload):
    params = list(work.model.parameters())

    def after(step, loss):
        torch.stack(torch._foreach_norm([p.grad for p in params])).cpu()

    return after, contextlib.nullcontext, lambda: None


def method_anomaly(work: Workload):
    return (lambda step, loss: None), (lambda: torch.autograd.set_detect_anomaly(True)), lambda: None


def method_tensorboard(work: Workload):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tempfile.mkdtemp(prefix="gradscope-overhead-tb-"))
    named = list(work.model.named_parameters())

    def after(step, loss):
        for name, p in named:
            writer.add_histogram(name, p.grad, step)

    return after, contextlib.nullcontext, writer.close


def available_methods() -> list[tuple[str, Callable]]:
    methods = [
        ("no monitoring", method_none),
        ("gradscope watch(every=1)", method_gradscope(1)),
        ("gradscope watch(every=1, histogram_every=1)", method_gradscope(1, histogram_every=1)),
        ("gradscope watch(every=10)", method_gradscope(10)),
        ("gradscope watch(every=1, mode='step')", method_gradscope(1, "step")),
        ("gradscope watch(every=1) acting on findings", method_gradscope(1, acting=True)),
        ("gradscope watch(every=1, forward=True)", method_gradscope(1, forward=True)),
        ("gradscope watch(every=10, forward=True)", method_gradscope(10, forward=True)),
        ("gradscope watch(every=1, track_updates=True)", method_gradscope(1, optimizer_side="track_updates")),
        ("gradscope watch(every=1, compression=True)", method_gradscope(1, optimizer_side="compression")),
        ("gradscope watch(every=10, compression=True)", method_gradscope(10, optimizer_side="compression")),
        ("per-parameter .norm().item()", method_item_loop),
        ("torch._foreach_norm + one sync", method_foreach_norm),
        ("set_detect_anomaly(True)", method_anomaly),
    ]
    try:
        import torch.utils.tensorboard  # noqa: F401

        methods.append(("tensorboard add_histogram", method_tensorboard))
    except ImportError:
        print("  (tensorboard not installed: add_histogram is not measured)")
    try:
        import wandb  # noqa: F401

        methods += [
            ("wandb.watch(log='gradients')", integration_methods.method_wandb),
            ("gradscope watch(every=1) + WandbExporter", integration_methods.method_wandb_exporter(1)),
            ("gradscope watch(every=10) + WandbExporter", integration_methods.method_wandb_exporter(10)),
        ]
    except ImportError:
        print("  (wandb not installed: wandb.watch is not measured)")
    return methods


def chosen_methods(only: list[str] | None) -> list[tuple[str, Callable]]:
    """The methods whose labels contain one of ``only`` (all if None); the plain step always."""
    methods = available_methods()
    if only:
        methods = [
            (label, make) for label, make in methods if label == "no monitoring" or any(o in label for o in only)
        ]
    return methods


def train_step(work: Workload, after, context, step: int) -> None:
    """One training step with a method's context and per-step callback (no sync)."""
    with context():
        work.optimizer.zero_grad(set_to_none=True)
        loss = work.loss()
        loss.backward()
    after(step, loss)
    work.optimizer.step()


def timed_steps(
    work: Workload, after, context, steps: int, warmup: int, measuring=None
) -> tuple[list[float], list[float]]:
    """(host time to enqueue each step, synchronised time of each step), warm-up steps dropped;
    ``measuring()`` is called when the first measured step begins."""
    enqueue, total = [], []
    for step in range(warmup + steps):
        work.sync()
        if step == warmup and measuring is not None:
            measuring()
        start = time.perf_counter()
        train_step(work, after, context, step)
        queued = time.perf_counter()
        work.sync()
        if step >= warmup:
            enqueue.append(queued - start)
            total.append(time.perf_counter() - start)
    return enqueue, total


def run_steps(work: Workload, make, steps: int, warmup: int) -> tuple[list[float], dict | None]:
    """Each measured step's time, the method's drain (see Methods above) spread over them, and
    for gradscope's methods its :class:`Breakdown` per step (before the drain)."""
    after, context, teardown, *extra = make(work)
    drain = extra[0] if extra else None
    breakdown = extra[1] if len(extra) > 1 else None
    try:
        total = timed_steps(work, after, context, steps, warmup, breakdown.reset if breakdown else None)[1]
        share = breakdown.per_step() if breakdown is not None else None
        if drain is not None:
            start = time.perf_counter()
            drain()
            work.sync()
            total = [t + (time.perf_counter() - start) / len(total) for t in total]
        return total, share
    finally:
        teardown()


def profile_model(name: str, device: str, steps: int, only: list[str] | None, top: int = 30) -> None:
    """Where each method's step time goes: per step, the host time to enqueue the step (no
    sync inside) against the synchronised step time, then a cProfile of the host side."""
    import cProfile
    import pstats

    work = Workload(name, device)
    run_steps(work, method_none, steps=1, warmup=2)
    for label, make in chosen_methods(only):
        after, context, teardown, *drain = make(work)
        drain = drain[:1]
        try:
            enqueue, total = timed_steps(work, after, context, steps, warmup=2)
            print(
                f"{label:<40} host enqueue {statistics.median(enqueue) * 1e3:7.2f} ms, "
                f"step {statistics.median(total) * 1e3:7.2f} ms"
            )
            if label == "no monitoring":
                continue
            profiler = cProfile.Profile()
            profiler.enable()
            for step in range(steps):
                train_step(work, after, context, step)
            work.sync()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(top)
        finally:
            for finish in (*drain, teardown):
                finish()


def run_model(
    name: str, device: str, rounds: int, steps: int, only: list[str] | None = None, integrations: bool = False
) -> dict:
    work = Workload(name, device)
    methods = chosen_methods(only)
    print(f"\n{name}: {work.description}, {work.parameters / 1e6:.1f}M parameters, on {device}")
    # times[label][round] = step times of that method in that round; shares: its Breakdown
    times: dict[str, list[list[float]]] = {label: [] for label, _ in methods}
    shares: dict[str, list[dict]] = {label: [] for label, _ in methods}
    run_steps(work, method_none, steps=1, warmup=2)  # warm up kernels and allocator
    for round_ in range(rounds):
        # Rotate the order each round so that no method always runs first or after the heaviest.
        shift = round_ % len(methods)
        for label, make in methods[shift:] + methods[:shift]:
            total, share = run_steps(work, make, steps=steps, warmup=2)
            times[label].append(total)
            if share is not None:
                shares[label].append(share)
    # Each round's medians are compared with the same round's unmonitored median, so that
    # the machine's drift over minutes cancels; the ratio reported is the median over rounds.
    base_rounds = [statistics.median(r) for r in times["no monitoring"]]
    results = []
    print(f"  {'method':<46} {'median step ms':>15} {'x plain step':>13} {'rounds min..max':>17}")
    for label, _ in methods:
        ratios = [statistics.median(r) / b for r, b in zip(times[label], base_rounds, strict=True)]
        median_ms = statistics.median([t for r in times[label] for t in r]) * 1e3
        ratio = statistics.median(ratios)
        result = {
            "method": label,
            "median_ms": median_ms,
            "steps": sum(len(r) for r in times[label]),
            "x_plain": ratio,
            "x_plain_rounds": ratios,
        }
        line = f"  {label:<46} {median_ms:>15.1f} {ratio:>13.3f} {min(ratios):>8.3f}..{max(ratios):.3f}"
        for part in ("host_ms", "gpu_ms"):  # gradscope's own time per step, median (min..max) over rounds
            values = [share[part] for share in shares[label] if share[part] is not None]
            if values:
                result[part] = statistics.median(values)
                result[f"{part}_rounds"] = values
                spread = f"{statistics.median(values):.3f} ({min(values):.3f}..{max(values):.3f})"
                line += f"  {part.split('_')[0]} {spread} ms"
        results.append(result)
        print(line)
    entry = {"model": name, "description": work.description, "parameters": work.parameters, "results": results}
    if integrations:
        entry["lightning"] = rows = integration_methods.run(work, rounds, steps)
        print(f"  {'inside Lightning Trainer.fit':<46} {'median step ms':>15} {'x plain fit':>13}")
        for row in rows:
            ratios = row["x_plain_rounds"]
            line = f"{row['median_ms']:>15.1f} {row['x_plain']:>13.3f} {min(ratios):>8.3f}..{max(ratios):.3f}"
            print(f"  {row['method']:<46} {line}")
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default=None, help="comma-separated: mlp, transformer, small, demo, gpt2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per method per round")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--methods", default=None, help="comma-separated substrings of method labels to keep (plain step always kept)"
    )
    parser.add_argument(
        "--integrations", action="store_true", help="also time Lightning fits with and without gradscope's callback"
    )
    parser.add_argument(
        "--profile", action="store_true", help="host enqueue time and a cProfile per method, instead of the table"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA device", file=sys.stderr)
        return 2
    default_models = ["gpt2"] if args.device == "cuda" else ["small", "mlp", "transformer"]
    models = args.models.split(",") if args.models else default_models
    if args.profile:
        only = [m for m in args.methods.split(",") if m] if args.methods else None
        for name in models:
            profile_model(name, args.device, args.steps, only)
        return 0
    env = environment(args.device)
    print(f"gradscope {env['gradscope']} overhead benchmark on {env['device']} ({env['torch_threads']} torch threads)")
    only = [m for m in args.methods.split(",") if m] if args.methods else None
    entries = [run_model(name, args.device, args.rounds, args.steps, only, args.integrations) for name in models]
    out = Path(args.out) if args.out else RESULTS / f"overhead-{args.device}-{env['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "bench_overhead", "environment": env, "models": entries}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
