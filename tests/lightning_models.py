"""A tiny LightningModule that records its own float64 reference, for either Lightning namespace.

:func:`module_class` builds the module on ``lightning.pytorch`` or ``pytorch_lightning`` (a
Trainer accepts only its own namespace's modules and callbacks). What the module records is
independent of gradscope and is what the callback tests compare gradscope's numbers with:

* ``grads``: at each optimizer step, in the module's own ``on_before_optimizer_step`` (which
  Lightning calls after the callbacks' and before clipping), a float64 copy of every
  gradient, divided by the GradScaler's scale when ``scaled_in_hook`` (a fused optimizer's
  gradients are still scaled there); ``hook_scales`` the scale read there;
* ``clipped_norms``: the float64 total gradient norm at ``optimizer.step`` (a step pre-hook:
  after clipping and unscaling; under a GradScaler only, where Lightning runs backward before
  ``optimizer.step`` instead of inside it); ``stepped`` the global steps at which the
  optimizer stepped (the scaler skips ``optimizer.step`` when a gradient is not finite);
* ``losses``: ``(global_step, loss)`` of every training micro-batch, as float64;
* ``weights_at``: per global step, a copy of every weight as the step's first micro-batch
  begins (``on_train_batch_start``), i.e. the weights before that step's update;
* ``val_losses``: per validation (sanity checks excluded), the values logged as ``val_loss``.
"""

from __future__ import annotations

import csv

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

IN, HIDDEN = 8, 16


def dataset(n: int, seed: int = 0) -> TensorDataset:
    """``n`` random samples; input feature 0 is always 0 (its weight column's gradient is exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    x[:, 0] = 0.0
    return TensorDataset(x, torch.randn(n, 1, generator=g))


def loader(n: int, batch_size: int = 4, seed: int = 0) -> DataLoader:
    return DataLoader(dataset(n, seed), batch_size=batch_size)


def scaler_plugin(pl, init_scale: float = 1024.0):
    """A real GradScaler on CPU (``precision="16-mixed"`` alone becomes bf16 without one there)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return pl.plugins.MixedPrecision("16-mixed", "cpu", scaler=scaler)


def make_trainer(pl, root, callbacks, **options):
    """A quiet CPU trainer: no progress bar, summary, sanity check, checkpoints or logger unless asked."""
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": root,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "num_sanity_val_steps": 0,
    }
    settings.update(options)
    return pl.Trainer(callbacks=callbacks, **settings)


class Recording:
    """The module's behaviour (mixed into a namespace's ``LightningModule`` by :func:`module_class`).

    Args:
        lr: the optimizer's learning rate.
        fused: ``torch.optim.Adam(fused=True)`` (unscales inside its ``step``) instead of SGD.
        nan_at: the global step at which a NaN enters the input of ``net.2`` (one element):
            only ``net.2.weight``'s gradient gets a NaN, as the prediction goes through
            ``nan_to_num`` (whose gradient is 0 at the NaN).
        val_values: the ``val_loss`` to log at each validation (the last one repeats); by
            default the validation batch's MSE.
        scaled_in_hook: divide the recorded gradients by the scaler's scale.
    """

    def __init__(self, *, lr=0.1, fused=False, nan_at=None, val_values=None, scaled_in_hook=False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
        self.lr, self.fused, self.nan_at = lr, fused, nan_at
        self.val_values, self.scaled_in_hook = val_values, scaled_in_hook
        self.grads: list[dict[str, torch.Tensor]] = []
        self.raw_norms: list[float] = []
        self.hook_scales: list[float] = []
        self.hook_steps: list[int] = []
        self.clipped_norms: list[float] = []
        self.stepped: list[int] = []
        self.losses: list[tuple[int, float]] = []
        self.val_losses: list[list[float]] = []
        self.weights_at: dict[int, dict[str, torch.Tensor]] = {}
        self._validations = 0

    def forward(self, x):
        h = self.net[1](self.net[0](x))
        if self.training and self.nan_at is not None and self.global_step == self.nan_at:
            poison = torch.zeros_like(h)
            poison[0, 0] = float("nan")
            h = h + poison
        return self.net[2](h).nan_to_num()

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self.global_step not in self.weights_at:
            self.weights_at[self.global_step] = {name: p.detach().clone() for name, p in self.named_parameters()}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append((self.global_step, loss.detach().double().item()))
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        if self.val_values is None:
            value = nn.functional.mse_loss(self(x), y)
        else:
            value = torch.tensor(float(self.val_values[min(self._validations, len(self.val_values) - 1)]))
        if not self.trainer.sanity_checking:
            while len(self.val_losses) <= self._validations:
                self.val_losses.append([])
            self.val_losses[self._validations].append(value.detach().double().item())
        self.log("val_loss", value)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._validations += 1

    def configure_optimizers(self):
        if self.fused:
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr, fused=True)
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        optimizer.register_step_pre_hook(self._before_step)
        return optimizer

    def on_before_optimizer_step(self, optimizer) -> None:
        scale = 1.0
        if self.scaled_in_hook:
            scale = float(self.trainer.precision_plugin.scaler.get_scale())
        self.hook_scales.append(scale)
        self.hook_steps.append(self.global_step)
        grads = {name: p.grad.detach().double().clone() for name, p in self.named_parameters()}
        self.raw_norms.append(float(torch.sqrt(sum((g**2).sum() for g in grads.values()))))
        self.grads.append({name: g / scale for name, g in grads.items()})

    def _before_step(self, optimizer, args, kwargs) -> None:
        # Only under a GradScaler does Lightning run the closure (backward) before
        # optimizer.step; otherwise step runs it, after this hook: nothing to see yet.
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            return
        self.stepped.append(self.global_step)
        grads = [p.grad.detach().double() for p in self.parameters()]
        self.clipped_norms.append(float(torch.sqrt(sum((g**2).sum() for g in grads))))


def module_class(pl):
    """:class:`Recording` as a ``LightningModule`` of namespace ``pl``."""
    return type("Tiny", (Recording, pl.LightningModule), {})


def reference(grads: list[dict[str, torch.Tensor]], rows: tuple[str, ...], stat: str) -> np.ndarray:
    """A per-layer statistic of recorded gradients, ``(steps, rows)``, float64: ``norm``,
    ``max_abs``, ``zeros`` or ``nans`` over every parameter of the layer (``net.0.weight``
    belongs to ``net.0``)."""
    out = np.zeros((len(grads), len(rows)))
    for i, step in enumerate(grads):
        for j, row in enumerate(rows):
            flat = torch.cat([g.reshape(-1) for name, g in step.items() if name.rsplit(".", 1)[0] == row])
            if stat == "norm":
                out[i, j] = float(torch.sqrt((flat**2).sum()))
            elif stat == "max_abs":
                out[i, j] = float(flat.abs().max())
            elif stat == "zeros":
                out[i, j] = float((flat == 0).sum())
            elif stat == "nans":
                out[i, j] = float(flat.isnan().sum())
            else:
                raise ValueError(stat)
    return out


def step_losses(losses: list[tuple[int, float]], steps: int) -> np.ndarray:
    """The mean micro-batch loss of each optimizer step, ``(steps,)``."""
    return np.array([np.mean([loss for step, loss in losses if step == s]) for s in range(steps)])


def read_csv_rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def logged_at(rows: list[dict[str, str]], column: str) -> dict[int, float]:
    return {int(row["step"]): float(row[column]) for row in rows if row.get(column)}
