"""Benchmark: do the compression section's rankings and verdicts predict what compression costs?

Trains two models under ``gradscope.watch(..., compression=True)`` for several seeds:

* the demo's MLP classifier (:mod:`gradscope.demo`, Adam 1e-3, batches of 128);
* the same MLP with outlier weights: before training, 0.2% of the weights of three blocks are
  multiplied by 25 (the outliers large language models grow; they persist through training);
* a small GPT-2 built from a config (``transformers.GPT2Config``: 2 blocks, width 64, 4 heads,
  vocabulary 64), trained to output a fixed permutation of the token two positions back
  (random tokens: only attention can solve it), nothing downloaded;

then compresses the trained model in place, one way at a time, and measures the held-out
loss change (the model is restored between trials). The candidates are the layers with a
matrix (``quantized_numel > 0``).

**Pruning.** Remove ``k`` layers (zero every parameter of each: in the GPT-2 the residual
stream carries on past a removed sublayer) chosen three ways: the ``k`` lowest Taylor
first-order saliency ``Σ |Σ g·w|`` (the report's ``least_important``), the ``k`` lowest
elementwise ``Σ (g·w)²`` (``fisher``), the ``k`` smallest weights per element (rms: magnitude
pruning at layer level) and ``k`` at random (the mean of 20 draws). In the demo MLP, which
has no residual path, removing any layer is ruinous whichever is chosen (the table shows it);
50% sparsity inside the chosen layers is the comparison that means something there. Also, a milder
operation: 50% unstructured magnitude sparsity inside each chosen layer.

**Quantization.** Quantize each candidate layer alone (its matrices, per-tensor power-of-two
amax scale: INT8 by rounding, FP8 E4M3 through ``torch.float8_e4m3fn``) and compare the loss
change of the layers that format's verdict calls ready with that of the others (per-channel
scaling needed, keep in 16-bit). When every layer is ready for a format, the claim cannot be
tested on these models, and the table says so.

The loss is the result, not time: a busy machine does not disturb it. It prints tables of
medians (min..max) over the seeds and writes JSON under ``benchmarks/results/``.

Usage: python benchmarks/bench_compression.py [--seeds 5] [--steps 300] [--k 2]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch
from bench_stats import RESULTS, environment
from torch import nn

import gradscope
from gradscope import demo
from gradscope.health.compression import QUANT_FORMATS
from gradscope.stats import formats

VOCAB, CONTEXT = 64, 32


class LagTask:
    """Random tokens; the label of position ``t`` is a fixed permutation of the token two
    positions back: the model must attend to an earlier position (its blocks matter, the
    embeddings alone cannot do it)."""

    def __init__(self, seed: int) -> None:
        self._perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))
        self._generator = torch.Generator().manual_seed(seed + 1)

    def batch(self, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(VOCAB, (size, CONTEXT), generator=self._generator)
        labels = torch.full_like(tokens, -100)  # ignored: the first positions have no token two back
        labels[:, 2:] = self._perm[tokens[:, :-2]]
        return tokens, labels


OUTLIER_BLOCKS, OUTLIER_SHARE, OUTLIER_GAIN = (2, 5, 8), 0.002, 25.0


def add_outliers(model: nn.Module, seed: int) -> None:
    """Multiply a few weights of three blocks by ``OUTLIER_GAIN`` before training: the outlier
    weights trained large language models grow, in a model small enough for this machine."""
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for block in OUTLIER_BLOCKS:
            weight = model.blocks[block].linear.weight
            picked = torch.rand(weight.shape, generator=g) < OUTLIER_SHARE
            weight[picked] *= OUTLIER_GAIN


def build_gpt(seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


def train(model_name: str, seed: int, steps: int) -> tuple[nn.Module, callable, gradscope.HealthReport]:
    """Train one model under watch(compression=True); returns it, its held-out loss function
    and its report."""
    if model_name.startswith("demo-mlp"):
        model = demo.build("none", seed=seed)
        if model_name == "demo-mlp-outliers":
            add_outliers(model, seed)
        task = demo.SyntheticTask(seed=seed + 1)
        held_out = task.batch(2048)

        def loss_of(m: nn.Module, batch) -> torch.Tensor:
            return nn.functional.cross_entropy(m(batch[0]), batch[1])

        next_batch = task.batch
    else:
        model = build_gpt(seed)
        task = LagTask(seed + 1)
        held_out = task.batch(256)

        def loss_of(m: nn.Module, batch) -> torch.Tensor:
            return m(input_ids=batch[0], labels=batch[1]).loss

        next_batch = task.batch
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradscope.watch(model, every=5, optimizer=opt, compression=True) as mon:
        for _ in range(steps):
            loss = loss_of(model, next_batch())
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
        report = mon.report()
    model.eval()

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(loss_of(model, held_out))

    return model, held_out_loss, report


def layer_params(model: nn.Module, report) -> dict[str, list[nn.Parameter]]:
    """Each report row's parameters (a row is a module: its own parameters)."""
    modules = dict(model.named_modules())
    out = {}
    for layer in report.compression.layers:
        module = modules["" if layer.name == "(root)" else layer.name]
        out[layer.name] = list(module.parameters(recurse=False))
    return out


def trial(params: list[nn.Parameter], change, loss) -> float:
    """The held-out loss after ``change`` is applied to ``params`` (restored afterwards)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            change(p)
    try:
        return loss()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def remove(p: torch.Tensor) -> None:
    p.zero_()


def sparsify(p: torch.Tensor) -> None:
    if p.dim() >= 2:
        threshold = p.abs().flatten().kthvalue(max(p.numel() // 2, 1)).values
        p.masked_fill_(p.abs() <= threshold, 0.0)


def fake_quantize(short: str):
    fmt = QUANT_FORMATS[short]

    def change(p: torch.Tensor) -> None:
        if p.dim() < 2:
            return
        k = int(formats.amax_scale_exponent(p.abs().max().double().numpy(), fmt))
        scaled = p.double() * 2.0**k
        if short == "int8":
            q = scaled.round().clamp(-127, 127)
        else:
            q = scaled.float().to(torch.float8_e4m3fn).double()
        p.copy_(q * 2.0**-k)

    return change


def one_run(model_name: str, seed: int, steps: int, k: int) -> dict:
    model, loss, report = train(model_name, seed, steps)
    base = loss()
    params = layer_params(model, report)
    layers = [layer for layer in report.compression.layers if layer.quantized_numel > 0]
    names = [layer.name for layer in layers]
    by_name = {layer.name: layer for layer in layers}
    rms = {
        name: float(torch.cat([p.detach().flatten() for p in params[name]]).square().mean().sqrt()) for name in names
    }
    chosen = {
        "ranking": [name for name in report.compression.least_important if name in names][:k],
        "fisher": sorted(names, key=lambda n: by_name[n].fisher)[:k],
        "magnitude": sorted(names, key=rms.get)[:k],
    }
    draws = random.Random(seed)
    random_sets = [draws.sample(names, k) for _ in range(20)]
    pruning = {}
    for op_name, op in (("remove", remove), ("sparsify 50%", sparsify)):
        row = {}
        for method, picked in chosen.items():
            row[method] = trial([p for n in picked for p in params[n]], op, loss) - base
        row["random"] = statistics.mean(trial([p for n in s for p in params[n]], op, loss) - base for s in random_sets)
        pruning[op_name] = row
    quantization = {}
    for short in ("int8", "fp8_e4m3"):
        change = fake_quantize(short)
        deltas = {"ready": [], "not ready": []}
        for layer in layers:
            group = "ready" if layer.formats[short]["verdict"] == "ready" else "not ready"
            deltas[group].append(abs(trial(params[layer.name], change, loss) - base))
        quantization[short] = deltas
    verdicts = {layer.name: layer.verdict for layer in layers}
    return {
        "seed": seed,
        "base_loss": base,
        "chosen": chosen,
        "pruning": pruning,
        "quantization": quantization,
        "verdicts": verdicts,
    }


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):+.4f} ({min(values):+.4f}..{max(values):+.4f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--k", type=int, default=2, help="layers pruned")
    parser.add_argument("--models", nargs="+", default=["demo-mlp", "demo-mlp-outliers", "gpt2-tiny"])
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/compression-cpu-DATE.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    document = {"steps": args.steps, "seeds": args.seeds, "k": args.k, "models": {}}
    for model_name in args.models:
        runs = [one_run(model_name, seed, args.steps, args.k) for seed in range(args.seeds)]
        document["models"][model_name] = runs
        print(f"\n{model_name}: {args.steps} steps, seeds 0..{args.seeds - 1}, held-out loss change (median, min..max)")
        methods = ("ranking", "fisher", "magnitude", "random")
        print(f"  pruning {args.k} layers     " + " ".join(f"{m:>28}" for m in methods))
        for op_name in runs[0]["pruning"]:
            cells = [spread([r["pruning"][op_name][m] for r in runs]) for m in methods]
            wins = sum(
                r["pruning"][op_name]["ranking"]
                <= min(r["pruning"][op_name]["magnitude"], r["pruning"][op_name]["random"])
                for r in runs
            )
            print(f"  {op_name:<22} " + " ".join(f"{c:>28}" for c in cells) + f"  ranking best in {wins}/{len(runs)}")
        print(f"  quantizing one layer     {'ready layers':>28} {'not-ready layers':>28}")
        for short in ("int8", "fp8_e4m3"):
            ready = [d for r in runs for d in r["quantization"][short]["ready"]]
            other = [d for r in runs for d in r["quantization"][short]["not ready"]]
            note = "" if other else "  (every layer ready: not testable here)"
            print(f"  {short:<22} {spread(ready):>28} {spread(other):>28}  n={len(ready)}/{len(other)}{note}")
    env = environment("cpu")
    document["environment"] = env
    out = Path(args.out) if args.out else RESULTS / f"compression-cpu-{env['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
