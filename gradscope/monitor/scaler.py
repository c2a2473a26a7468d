"""GradScaler: all that gradscope knows about ``torch.amp.GradScaler``, in one place.

Under a GradScaler the gradients hold ``g * scale``. gradscope measures the unscaled
gradient in the same pass, multiplying each element by ``inv_scale`` computed as the scaler
computes it (``scale.double().reciprocal().float()``, then a float32 product), and reads the
scale on the device, so unscaling costs no host synchronisation. Steps the scaler skips for
overflow show as a falling scale from one step to the next (``skipped`` in the history).

The scaler offers no public, sync-free way to read its scale or whether a given optimizer's
gradients were already unscaled; the two private attributes gradscope reads for that are
each behind one function here and nowhere else.
"""

from __future__ import annotations

import torch

from gradscope.stats.dispatch import Engine, is_host


def scale_tensor(scaler) -> torch.Tensor | None:
    """The scaler's current scale as a 0-d device tensor; None without an enabled scaler, or
    before its first ``scale()`` (which creates the scale: until then nothing is scaled)."""
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)  # private: get_scale() would synchronise the host
    return None if scale is None else scale.detach().reshape(())


def already_unscaled(scaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` has run since the scaler's last ``update()``."""
    # private: the scaler's per-optimizer stage is not exposed publicly
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
    return getattr(state.get("stage"), "name", None) == "UNSCALED"


def inv_scale_for(scaler, optimizer, mode: str, engine: Engine) -> torch.Tensor | float | None:
    """What a capture engine multiplies the gradients by to unscale them, or None.

    Args:
        scaler: a ``GradScaler`` or None.
        optimizer: the watched optimizer, or None.
        mode: the monitor's mode; in ``"step"`` mode the user may have called
            ``scaler.unscale_(optimizer)`` before ``mon.step()``, and then nothing is scaled.
        engine: a device (the kernels read a float32 one-element tensor there) or
            a CPU kernel's name (a Python float).
    """
    scale = scale_tensor(scaler)
    if scale is None:
        return None
    if mode == "step" and optimizer is not None and already_unscaled(scaler, optimizer):
        return None
    inverse = scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
    return float(inverse) if is_host(engine) else inverse.reshape(1).to(engine)
