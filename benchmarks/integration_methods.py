"""``bench_overhead.py``'s methods that go through the libraries users train with.

W&B (per training step, like the other methods of ``bench_overhead.py``):

* ``wandb.watch(log='gradients')``: ``wandb.watch(model, log="gradients", log_freq=1)`` in
  an offline run, the loss logged every step;
* ``gradscope watch(every=N) + WandbExporter``: gradscope with its W&B exporter (defaults) in
  an offline run: the whole-model summary every sampled step, every layer's scalars as often
  as its time budget allows, histograms with every 10th of those; the exporter logs the loss
  given to ``mon.step`` every step, so the loop calls no ``wandb.log`` itself. The exporter's
  ``run.log`` calls happen at its flushes (every 2 s) and at ``mon.close()``, whose time is
  counted in the measured steps.

Lightning (``bench_overhead.py --integrations``): each method is one short ``fit`` of the same
model and batch (the benchmark's workloads), timed per training batch by a timing callback
(``on_train_batch_start`` to ``on_train_batch_end``, the first batches dropped as warm-up),
in interleaved rounds. Methods:

* ``Lightning fit, no callback``: the plain fit;
* ``GradscopeCallback(every=1)`` / ``(every=10)``: gradscope's Lightning callback with its
  defaults (summary scalars through the loggers at Lightning's cadence);
* ``grad_norm callback (what users write)``: in ``on_before_optimizer_step``, Lightning's
  ``grad_norm(pl_module, norm_type=2)`` (one norm per parameter) logged with ``log_dict``
  every step, as Lightning's documentation suggests for inspecting gradients.

Every fit has a ``CSVLogger`` (so logging really happens) with ``log_every_n_steps=1``.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import tempfile
import time

import torch

import gradscope

try:
    import lightning.pytorch as L
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities import grad_norm
except ImportError:  # the benchmark says so and skips these methods
    L = None
else:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banner per fit in the tables


# ---- W&B ------------------------------------------------------------------------------------


def _offline_run():
    import wandb

    return wandb.init(
        mode="offline",
        dir=tempfile.mkdtemp(prefix="gradscope-overhead-wandb-"),
        project="gradscope-bench",
        settings=wandb.Settings(silent=True),
    )


def method_wandb(work):
    import wandb

    run = _offline_run()
    wandb.watch(work.model, log="gradients", log_freq=1)

    def after(step, loss):
        wandb.log({"loss": loss.item()})

    def teardown():
        wandb.unwatch(work.model)
        run.finish()

    return after, contextlib.nullcontext, teardown


def method_wandb_exporter(every: int):
    def make(work):
        from gradscope.exporters import WandbExporter

        run = _offline_run()
        mon = gradscope.watch(work.model, every=every, exporters=[WandbExporter(run)])

        def after(step, loss):
            mon.step(loss=loss)  # the exporter logs the loss too (gradscope/loss): no wandb.log here

        return after, contextlib.nullcontext, run.finish, mon.close  # mon.close(): the last flush, timed

    return make


# ---- Lightning --------------------------------------------------------------------------------


def _module(work):
    class Fit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = work.model

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            loss = work.criterion(self.model(inputs), targets)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    return Fit()


class StepTimer(L.Callback if L is not None else object):
    """Wall time of each training batch (forward, backward, callbacks, optimizer step, logging)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


class GradNormLogger(L.Callback if L is not None else object):
    """What users write today: per-parameter norms, logged every step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        pl_module.log_dict(grad_norm(pl_module, norm_type=2))


def _gradscope_callback(every: int) -> list:
    from gradscope.integrations.lightning import GradscopeCallback

    return [GradscopeCallback(every=every, log_dir=None, report=False)]


METHODS = {
    "Lightning fit, no callback": lambda: [],
    "GradscopeCallback(every=1)": lambda: _gradscope_callback(1),
    "GradscopeCallback(every=10)": lambda: _gradscope_callback(10),
    "grad_norm callback (what users write)": lambda: [GradNormLogger()],
}


def fit_step_times(work, callbacks: list, steps: int, warmup: int) -> list[float]:
    """Per-batch times of one fit of ``warmup + steps`` batches (warm-up dropped)."""
    inputs, targets = work.inputs.cpu(), work.targets.cpu()
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(
            inputs.unsqueeze(0).expand(warmup + steps, *inputs.shape),
            targets.unsqueeze(0).expand(warmup + steps, *targets.shape),
        ),
        batch_size=None,
    )
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="gradscope-bench-lightning-") as root:
        trainer = L.Trainer(
            accelerator=work.device,
            devices=1,
            max_steps=warmup + steps,
            logger=CSVLogger(root),
            log_every_n_steps=1,
            callbacks=[timer, *callbacks],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=root,
        )
        trainer.fit(_module(work), data)
    return timer.times[warmup:]


def run(work, rounds: int, steps: int, warmup: int = 3) -> list[dict]:
    """The table rows for one workload: per method, the median over rounds of its median
    step time over the plain fit's in the same round."""
    if L is None:
        print("  (lightning not installed: the Lightning methods are not measured)")
        return []
    labels = list(METHODS)
    times: dict[str, list[list[float]]] = {label: [] for label in labels}
    for round_ in range(rounds):
        shift = round_ % len(labels)
        for label in labels[shift:] + labels[:shift]:
            times[label].append(fit_step_times(work, METHODS[label](), steps, warmup))
    base = [statistics.median(r) for r in times[labels[0]]]
    rows = []
    for label in labels:
        ratios = [statistics.median(r) / b for r, b in zip(times[label], base, strict=True)]
        rows.append(
            {
                "method": label,
                "median_ms": statistics.median([t for r in times[label] for t in r]) * 1e3,
                "steps": sum(len(r) for r in times[label]),
                "x_plain": statistics.median(ratios),
                "x_plain_rounds": ratios,
            }
        )
    return rows
