"""Float64 reference gradients for the trainer integration tests (Hugging Face, Accelerate).

The references are computed here, independently of gradscope: float64 copies of every
parameter's ``.grad`` taken where a trainer has unscaled them and not yet clipped them, and
their per-layer statistics (a row is the module owning the parameters; it sums them).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def grads64(model: torch.nn.Module) -> dict[str, np.ndarray | None]:
    """Every parameter's gradient now, as a float64 copy (None where it has none)."""
    return {
        name: None if p.grad is None else p.grad.detach().to(torch.float64).cpu().numpy().copy()
        for name, p in model.named_parameters()
    }


def owner(name: str) -> str:
    """The module owning a parameter: ``"bert.pooler.dense.weight"`` -> ``"bert.pooler.dense"``."""
    return name.rpartition(".")[0] or "(root)"


def row_stats(steps: list[dict[str, np.ndarray | None]], rows: tuple[str, ...]) -> dict[str, np.ndarray]:
    """``norm``, ``max_abs`` and ``zeros`` of every row at every step, float64 ``(steps, rows)``
    (NaN for a row none of whose parameters has a gradient)."""
    out = {name: np.full((len(steps), len(rows)), np.nan) for name in ("norm", "max_abs", "zeros")}
    column = {row: j for j, row in enumerate(rows)}
    for i, grads in enumerate(steps):
        by_row: dict[str, list[np.ndarray]] = {}
        for name, grad in grads.items():
            if grad is not None:
                by_row.setdefault(owner(name), []).append(grad.ravel())
        assert set(by_row) <= set(rows), f"rows the monitor lacks: {set(by_row) - set(rows)}"
        for row, parts in by_row.items():
            g = np.concatenate(parts)
            j = column[row]
            out["norm"][i, j] = np.sqrt(np.sum(g * g))
            out["max_abs"][i, j] = np.max(np.abs(g))
            out["zeros"][i, j] = np.count_nonzero(g == 0)
    return out


def total_norm(grads: dict[str, np.ndarray | None]) -> float:
    """The L2 norm of every gradient element together, as ``clip_grad_norm_`` computes it."""
    return float(np.sqrt(sum(np.sum(g * g) for g in grads.values() if g is not None)))


def record_after_unscale(accelerator, model: torch.nn.Module, into: list, scales: list | None = None) -> None:
    """Make ``accelerator.unscale_gradients()`` (which ``accelerator.clip_grad_norm_`` calls
    first) also append :func:`grads64` of ``model`` to ``into`` once it has unscaled them,
    and the scale it unscaled by to ``scales`` (None without a GradScaler).

    Calling ``unscale_gradients()`` a second time in a step would raise (``GradScaler.unscale_``
    refuses to unscale twice before ``update()``), so the reference is taken inside the call
    the trainer makes anyway.
    """
    unscale: Callable = accelerator.unscale_gradients

    def unscale_and_record(*args, **kwargs):
        scaler = accelerator.scaler
        if scales is not None:
            scales.append(scaler.get_scale() if scaler is not None and scaler.is_enabled() else None)
        unscale(*args, **kwargs)
        into.append(grads64(model))

    accelerator.unscale_gradients = unscale_and_record


def give_real_grad_scaler(accelerator, init_scale: float = 300.0, growth_interval: int = 2) -> bool:
    """Give an fp16 Accelerator on the CPU the GradScaler (and fp16 autocast) it has on a GPU.

    accelerate 1.15 gives ``mixed_precision="fp16"`` on the CPU neither a scaler nor autocast
    (``accelerator.scaler is None``, ``native_amp`` False): training runs plain float32. A
    ``torch.amp.GradScaler("cpu")`` works, so set one before ``prepare()`` (the Trainer
    prepares its optimizer in ``train()``, which hands it to the optimizer wrapper). The scale
    is not a power of two (its inverse is inexact in float32) and grows every
    ``growth_interval`` steps, so that a stale or wrong scale shows. Returns whether a scaler
    was added (False where the accelerator already has one, e.g. on a GPU).
    """
    if accelerator.scaler is not None:
        return False
    accelerator.scaler = torch.amp.GradScaler(
        accelerator.device.type, init_scale=init_scale, growth_interval=growth_interval
    )
    accelerator.native_amp = True
    return True
