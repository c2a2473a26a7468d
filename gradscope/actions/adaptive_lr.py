"""An adaptive learning rate driven by findings: ``watch(..., optimizer=opt, adapt_lr=AdaptiveLR())``.

The controller lowers the learning rate by ``factor`` when the run shows a trigger:
``exploding`` gradients (a layer above the rms ceiling, a spike of the total norm, a steady
rise), a ``loss_spike`` (the loss above 3x its running median, see
:mod:`gradscope.actions.cadence`), ``divergence`` of the loss, or a ``plateau`` (what
``ReduceLROnPlateau`` does, from gradscope's own finding). For divergence it applies the
report's rule (:func:`gradscope.health.checks.loss.divergence`) with its own, more sensitive
``rise`` and ``window``: a learning rate too high shows as a loss that climbs back from its
best, and cutting the rate while it is 20% up saves runs that at 50% up (the report's
``divergence`` finding) are already lost — dead ReLUs, weights gone. After a change it waits
``cooldown`` steps, and it acts again only on evidence newer than its last change (a
plateau: once the metric has again gone as long without improving). It never goes below
``min_scale`` times the rate the optimizer (or its scheduler) sets, and it never raises the
rate: a run that needed the cut keeps it.

How it composes with a scheduler: it does not touch ``param_groups[i]["lr"]`` between steps.
It multiplies each group's rate by its scale just before ``optimizer.step()`` and puts the
scheduler's value back just after (optimizer step pre/post hooks), so the effective rate is
*the scheduler's output times the controller's scale*, with any ``torch.optim``
optimizer and any scheduler (chainable or closed-form), and ``scheduler.get_last_lr()`` still
reports the schedule. ``mon.lr_scale`` is the current scale.

``per_layer=True`` also acts on single layers, from the update/weight ratio (needs
``track_updates=True``): a layer in a ``stalled_updates`` finding on the high side (each
step moves it by more than ``Thresholds.update_ratio_high`` of its norm) has its own updates
scaled by ``factor``. A per-layer rate cannot be set through a parameter group the layer
shares, so this scales the layer's *update*: ``w = w_before + s * (w_after - w_before)``
after the step, which is exactly a learning rate ``s`` times smaller for optimizers whose
step is linear in the learning rate (SGD with or without momentum, Adam, AdamW, RMSprop,
Adagrad: their states do not depend on it). It costs a copy of the scaled layers' weights
on every step while a layer is scaled.

Every change is an ``action`` record in the run log, in the report and on the visual
report's loss panel: "lr 0.003 -> 0.0015 at step 412 because exploding in 'blocks.3'".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from gradscope.health.checks.loss import divergence
from gradscope.health.findings import Finding
from gradscope.health.thresholds import Thresholds
from gradscope.health.view import RunView, moving_average
from gradscope.run import records

TRIGGERS = ("exploding", "loss_spike", "divergence", "plateau")
"""What can lower the learning rate (``AdaptiveLR.on``)."""


@dataclass(frozen=True)
class AdaptiveLR:
    """The controller's settings (see the module docstring).

    Attributes:
        factor: each change multiplies the rate by this, in (0, 1).
        on: the triggers it acts on, a subset of :data:`TRIGGERS`.
        cooldown: steps after a change during which it does not change the rate again.
        min_scale: the floor, as a fraction of the optimizer's (scheduler's) own rate, in (0, 1].
        per_layer: also scale single layers' updates from their update/weight ratio
            (needs ``track_updates=True``).
        rise: divergence, for the controller: the smoothed loss this fraction above its best...
        window: ...and rising steadily over this many steps, or staying above for as long
            (the report's divergence rule, ``Thresholds.divergence_rise``/``divergence_window``,
            made more sensitive).
    """

    factor: float = 0.5
    on: tuple[str, ...] = TRIGGERS
    cooldown: int = 50
    min_scale: float = 0.01
    per_layer: bool = False
    rise: float = 0.2
    window: int = 25

    def __post_init__(self) -> None:
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not 0 < self.factor < 1:
            raise ValueError(f"AdaptiveLR: factor must be in (0, 1), got {self.factor!r}")
        scale = self.min_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1:
            raise ValueError(f"AdaptiveLR: min_scale must be in (0, 1], got {scale!r}")
        if isinstance(self.cooldown, bool) or not isinstance(self.cooldown, int) or self.cooldown < 0:
            raise ValueError(f"AdaptiveLR: cooldown must be an integer >= 0, got {self.cooldown!r}")
        on = (self.on,) if isinstance(self.on, str) else tuple(self.on)
        unknown = [name for name in on if name not in TRIGGERS]
        if unknown:
            raise ValueError(f"AdaptiveLR: unknown trigger {unknown[0]!r}; triggers are {', '.join(TRIGGERS)}")
        object.__setattr__(self, "on", on)
        if isinstance(self.rise, bool) or not isinstance(self.rise, (int, float)) or not self.rise > 0:
            raise ValueError(f"AdaptiveLR: rise must be a positive fraction, got {self.rise!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 3:
            raise ValueError(f"AdaptiveLR: window must be an integer >= 3, got {self.window!r}")
        if not isinstance(self.per_layer, bool):
            raise TypeError(f"AdaptiveLR: per_layer must be True or False, got {self.per_layer!r}")


NOISE_Z = 6.0
"""How many standard errors of the smoothed loss a rise must exceed to count (see :func:`noise_rise`)."""

NOISE_STEPS = 200
"""Recent steps over which the loss's step-to-step noise is estimated."""


def noise_rise(loss: np.ndarray, smooth: int) -> float:
    """The relative rise of the loss's ``smooth``-step trailing mean above its best that its
    noise alone can produce: ``NOISE_Z`` standard errors of that mean, relative to the best.

    A noisy loss (small batches, a regression near its floor) has a best trailing mean that
    is a lucky dip and a trailing mean that wanders: 20% above the best can be noise. The
    noise is estimated robustly from the last ``NOISE_STEPS`` step-to-step differences (a
    trend barely moves them): ``sigma = 1.4826 * MAD(diff) / sqrt(2)``."""
    recent = loss[-NOISE_STEPS:]
    recent = recent[np.isfinite(recent)]
    if len(recent) < 10:
        return 0.0
    diffs = np.diff(recent)
    sigma = 1.4826 * float(np.median(np.abs(diffs - np.median(diffs)))) / math.sqrt(2)
    best = float(np.nanmin(moving_average(loss, smooth))) if np.isfinite(loss).any() else 0.0
    if best == 0:
        return 0.0
    return NOISE_Z * sigma / math.sqrt(smooth) / abs(best)


def _lr_value(lr) -> float:
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


def check_optimizer(optimizer) -> None:
    """Raise a clear error for an optimizer whose learning rate the controller cannot change."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"watch: adapt_lr needs optimizer= (a torch.optim.Optimizer), got {type(optimizer).__name__}")
    for index, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        numeric = isinstance(lr, (int, float)) and not isinstance(lr, bool)
        if not (numeric or (isinstance(lr, torch.Tensor) and lr.numel() == 1)):
            raise ValueError(
                f"watch: adapt_lr cannot change {type(optimizer).__name__}'s learning rate: param group {index} "
                f"has lr={lr!r} (a number is needed; optimizers that set their own step size, such as "
                "Adafactor with relative_step=True, cannot be controlled)"
            )


class LrController:
    """The running controller: scales, optimizer hooks, decisions (see the module docstring).

    Args:
        config: the :class:`AdaptiveLR` settings.
        optimizer: the optimizer to control.
        rows: the monitor's row names; ``row_params``: each row's parameters (per-layer scaling).
    """

    def __init__(
        self,
        config: AdaptiveLR,
        optimizer: torch.optim.Optimizer,
        rows: Sequence[str],
        row_params: Sequence[Sequence[torch.Tensor]],
    ) -> None:
        check_optimizer(optimizer)
        self.config = config
        self._optimizer = optimizer
        self._rows, self._row_params = tuple(rows), [list(p) for p in row_params]
        self.scale = 1.0  # applied at each optimizer step
        self.layer_scale: dict[int, float] = {}
        self.target_scale = 1.0  # decided (applied by apply(); in a distributed run, by every rank at once)
        self.target_layer_scale: dict[int, float] = {}
        self._changed_at: int | None = None  # step of the latest global change
        self._layer_changed_at: dict[int, int] = {}
        self._saved: list | None = None
        self._before: dict[int, list[torch.Tensor]] = {}
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    # ---- the optimizer step -------------------------------------------------------------

    def _pre_step(self, optimizer, args, kwargs) -> None:
        self._restore()  # a step that began and never finished (its closure raised) left lr scaled
        if self.scale != 1.0:
            self._saved = [group["lr"] for group in optimizer.param_groups]
            for group, lr in zip(optimizer.param_groups, self._saved, strict=True):
                group["lr"] = lr * self.scale
        if self.layer_scale:
            with torch.no_grad():
                self._before = {r: [p.detach().clone() for p in self._row_params[r]] for r in self.layer_scale}

    def _restore(self) -> None:
        """Put back the learning rates a step scaled (if one is scaled now)."""
        if self._saved is not None:
            for group, lr in zip(self._optimizer.param_groups, self._saved, strict=True):
                group["lr"] = lr
            self._saved = None

    def _post_step(self, optimizer, args, kwargs) -> None:
        self._restore()
        if self._before:
            with torch.no_grad():
                for r, before in self._before.items():
                    for param, old in zip(self._row_params[r], before, strict=True):
                        param.lerp_(old, 1.0 - self.layer_scale[r])  # old + scale * (new - old)
            self._before = {}

    # ---- decisions ----------------------------------------------------------------------

    def decide(
        self,
        findings: Sequence[Finding],
        view: RunView | None,
        thresholds: Thresholds,
        loss_spike: tuple[int, float, float] | None,
        step: int,
    ) -> list[records.Action]:
        """The changes to make after ``step``, given the report's findings, the run's view
        (for the controller's own divergence rule) and the newest loss spike."""
        actions = []
        if view is not None and "divergence" in self.config.on:
            findings = [*findings, *self._divergence(view, thresholds)]
        cause = self._global_trigger(findings, loss_spike, step)
        if cause is not None and self.target_scale > self.config.min_scale:
            old = self.target_scale
            self.target_scale = max(old * self.config.factor, self.config.min_scale)
            self._changed_at = step
            actions.append(self._record(step, old, cause))
        if self.config.per_layer:
            actions += self._layer_changes(findings, step)
        return actions

    def _divergence(self, view: RunView, thresholds: Thresholds) -> list[Finding]:
        """The report's divergence rule with the controller's rise and window (the window is
        also the smoothing), the rise raised above the loss's own noise (:func:`noise_rise`)."""
        window = self.config.window
        smooth = max(thresholds.smooth, window)
        rise = max(self.config.rise, noise_rise(view.loss, smooth))
        sensitive = replace(thresholds, divergence_rise=rise, divergence_window=window, smooth=smooth)
        return divergence(view, sensitive)

    def _global_trigger(self, findings, loss_spike, step: int) -> dict | None:
        on, since = self.config.on, self._changed_at
        if since is not None and step < since + self.config.cooldown:
            return None
        newer = -1 if since is None else since
        for f in findings:
            if f.kind in ("exploding", "divergence") and f.kind in on and f.step > newer:
                return {"kind": f.kind, "layer": f.layer, "step": int(f.step), "message": f.message}
        if "loss_spike" in on and loss_spike is not None and loss_spike[0] > newer:
            at, loss, median = loss_spike
            message = f"the loss spiked to {loss:.4g} at step {at}, {loss / median:.1f}x its running median"
            return {"kind": "loss_spike", "layer": None, "step": int(at), "message": message}
        if "plateau" in on:
            for f in findings:
                if f.kind != "plateau":
                    continue
                # Again as long without improvement since the last change as the plateau check waits.
                spacing = (f.step - f.since_step) / max(int(f.evidence.get("waited", 1)), 1)
                patience = spacing * int(f.evidence.get("patience", 1))
                if since is None or step - max(since, f.since_step) >= patience:
                    return {"kind": "plateau", "layer": None, "step": int(f.step), "message": f.message}
        return None

    def _layer_changes(self, findings, step: int) -> list[records.Action]:
        actions = []
        for f in findings:
            if f.kind != "stalled_updates" or f.evidence.get("side") != "high":
                continue
            for name in f.layers:
                r = self._rows.index(name) if name in self._rows else -1
                since = self._layer_changed_at.get(r)
                if r < 0 or (since is not None and (step < since + self.config.cooldown or f.step <= since)):
                    continue
                old = self.target_layer_scale.get(r, 1.0)
                if old <= self.config.min_scale:
                    continue
                self.target_layer_scale[r] = max(old * self.config.factor, self.config.min_scale)
                self._layer_changed_at[r] = step
                ratio = f.evidence.get("ratio", {}).get(name)
                because = {"kind": f.kind, "layer": name, "step": int(f.step)}
                message = (
                    f"updates of '{name}' x{old:g} -> x{self.target_layer_scale[r]:g} at step {step} because its "
                    f"update/weight ratio {ratio:.3g} is above {f.evidence.get('bound')}"
                    if isinstance(ratio, float)
                    else f"updates of '{name}' x{old:g} -> x{self.target_layer_scale[r]:g} at step {step} ({f.message})"
                )
                detail = {"layers": [name], "old_scale": old, "scale": self.target_layer_scale[r], "because": because}
                actions.append(records.Action(step, "lr", message, detail))
        return actions

    def _record(self, step: int, old_scale: float, cause: dict) -> records.Action:
        lrs = [_lr_value(group["lr"]) for group in self._optimizer.param_groups]
        old, new = lrs[0] * old_scale, lrs[0] * self.target_scale
        where = f" in '{cause['layer']}'" if cause["layer"] else ""
        message = f"lr {old:.3g} -> {new:.3g} at step {step} because {cause['kind']}{where}: {cause['message']}"
        because = {key: cause[key] for key in ("kind", "layer", "step")}
        detail = {
            "old": old if math.isfinite(old) else None,
            "new": new if math.isfinite(new) else None,
            "old_scale": old_scale,
            "scale": self.target_scale,
            "groups": len(lrs),
            "because": because,
        }
        return records.Action(step, "lr", message, detail)

    def apply(self, scale: float | None = None, layer_scale: dict[int, float] | None = None) -> None:
        """Apply the decided scales (or those given: a distributed run's shared decision) from
        the next optimizer step on."""
        self.scale = self.target_scale if scale is None else float(scale)
        self.layer_scale = dict(self.target_layer_scale if layer_scale is None else layer_scale)
        if scale is not None:  # another rank decided: what it decided is this rank's target too
            self.target_scale, self.target_layer_scale = self.scale, dict(self.layer_scale)

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the applied scales (layers by name) and when they changed."""
        return {
            "scale": self.scale,
            "layer_scale": {self._rows[row]: scale for row, scale in self.layer_scale.items()},
            "changed_at": self._changed_at,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`: the rate stays scaled as it was (layers by name)."""
        index = {name: row for row, name in enumerate(self._rows)}
        layers = {index[name]: float(scale) for name, scale in state["layer_scale"].items() if name in index}
        self.scale = self.target_scale = float(state["scale"])
        self.layer_scale, self.target_layer_scale = layers, dict(layers)
        self._changed_at = state["changed_at"]

    def close(self) -> None:
        self._restore()  # halted inside an optimizer step (Lightning's closure): the rate stays the user's
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._before = {}
        self._row_params = []
