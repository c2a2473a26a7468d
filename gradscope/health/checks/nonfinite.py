"""``nonfinite`` (NaN/Inf in the forward pass, a gradient or the loss, and where it was born)
and ``overflow`` (GradScaler skips).

Where a NaN/Inf was born decides where to look, so the root finding names the pass:

* **forward** — with forward statistics, the first module in the forward sequence whose
  outputs held NaN/Inf while its inputs and its submodules' outputs were finite (or the
  batch, or a parent's own code, when a module's unproduced inputs did). Without them, a
  non-finite loss still proves the forward pass (the loss is computed before any gradient):
  the finding says so, and how to name the module.
* **backward** — the forward pass (or at least the loss) was finite: the first layer, in
  backward order, whose gradient went non-finite (nearest the loss).
* **the loss code** — forward statistics show every module's output finite at a step whose
  loss was not: the value was born between the model's output and the loss.
* **the optimizer** — with ``track_updates``, a layer whose update was non-finite while its
  gradient was finite: the optimizer step wrote NaN/Inf into the weights (e.g. Adam's
  ``eps=1e-8`` is 0 in float16), and the forward pass that follows inherits it.

The non-finite gradients and loss that follow a forward-born value are reported as its
consequences (``cause``), not as separate problems.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gradscope.health.findings import SUGGESTIONS, Finding
from gradscope.health.thresholds import Thresholds
from gradscope.health.view import RunView, layer_list
from gradscope.stats import formats


def _ranks(event) -> str:
    if event.rank < 0:
        return ""
    others = event.ranks - 1
    return f"; on rank {event.rank}" + (f" and {others} more rank{'s' if others > 1 else ''}" if others > 0 else "")


_SHARDED_ORIGIN = (
    "; the rank it came from cannot be known under sharding: each rank's gradient is reduce-scattered (summed "
    "into every rank's shard) before gradscope sees its shard, so the shards that hold NaN/Inf tell where it "
    "landed, not whose batch it came from"
)


def _cause(finding: Finding) -> dict:
    return {"kind": finding.kind, "layer": finding.layer, "step": finding.since_step}


def _parent(name: str) -> str:
    return name.rpartition(".")[0] or "(root)"


def _forward_root(view: RunView, bad_loss: tuple[int, float] | None) -> Finding:
    event = view.forward_events[0]
    name, kind = view.modules[event.module], view.module_types[event.module]
    values = f"{event.nans} NaN and {event.infs} Inf values"
    if event.where == "inputs" and name == "(root)":
        where, layer = f"in the model's inputs (the batch held {values})", "(root)"
    elif event.where == "inputs":
        parent = _parent(name)
        where = (
            f"in the code of '{parent}' before it calls '{name}': the inputs of '{name}' held {values}, "
            "though every module before them returned finite values"
        )
        layer = parent
    else:
        where = (
            f"in module '{name}' ({kind}): its outputs held {values} while its inputs and its submodules' "
            "outputs were finite"
        )
        layer = name
        if name in view.rows and view.update_ratio is None:
            where += (
                " (or its weights were already non-finite: an optimizer step can write Inf, e.g. Adam's eps in "
                "float16; watch(..., track_updates=True, optimizer=...) tells them apart)"
            )
        fmt = formats.format_of(event.dtype)
        if event.nans == 0 and fmt is not None and fmt.name in formats.LOW_PRECISION:
            where += f" — Inf only, in {fmt.name}: values beyond {fmt.name}'s largest finite value ({fmt.max:.6g})"
    after = [view.modules[m] for m in event.modules if view.modules[m] != name]
    message = f"NaN/Inf born in the forward pass at step {event.step}, {where}"
    if event.rank >= 0:
        message += f" (on rank {event.rank})"
    if after:
        message += f"; then in {layer_list(after)}"
    evidence = {
        "pass": "forward",
        "first_step": event.step,
        "module": name,
        "module_type": kind,
        "where": event.where,
        "nans": event.nans,
        "infs": event.infs,
        "dtype": event.dtype,
        "modules_after": after,
        **({"rank": event.rank} if event.rank >= 0 else {}),
    }
    if bad_loss is not None and bad_loss[0] < event.step:
        message += (
            f". The loss was already {bad_loss[1]} at step {bad_loss[0]}, an unsampled step: by step "
            f"{event.step} NaN weights may have moved the first non-finite output"
        )
        evidence["loss_step"] = bad_loss[0]
    return Finding(
        kind="nonfinite",
        severity="critical",
        layer=layer,
        step=event.step,
        since_step=min(event.step, bad_loss[0]) if bad_loss is not None else event.step,
        message=message,
        suggestion=SUGGESTIONS["nonfinite_forward"],
        evidence=evidence,
        layers=(layer, *after),
    )


def _gradient_finding(view: RunView, event, how: str, cause: Finding | None, affected: int) -> Finding:
    names = [view.rows[r] for r in event.rows]
    where = "nearest the loss in backward order" if event.backward_order_known else "last in model order"
    lead = {
        "backward": "NaN/Inf born in the backward pass",
        "consequence": "NaN/Inf gradients",
        "unknown": "NaN/Inf gradients",
    }[how]
    message = (
        f"{lead} first at step {event.step}: first in layer '{names[0]}' ({where})"
        + (f", followed by {len(names) - 1} more layers ({layer_list(names[1:])})" if len(names) > 1 else "")
        + f"; {event.nans} NaN and {event.infs} Inf values at that step"
        + _ranks(event)
    )
    if how == "backward":
        message += "; the forward pass " + ("was finite" if view.modules else "gave a finite loss") + " at that step"
    # Sharded: the shards say where a NaN/Inf landed, not where it came from (unless the root names the rank).
    sharded = view.topology == "sharded" and event.rank < 0 and not (cause is not None and "rank" in cause.evidence)
    if sharded:
        message += _SHARDED_ORIGIN
    if how == "unknown" and view.world > 1:
        too, name = (" too", ", and name the rank whose forward pass went non-finite") if sharded else ("", "")
        message += (
            f"; whether it was born in forward or backward is unknown{too}: each rank sees only its own loss, and "
            f"watch(..., forward=True) (forward statistics are combined over the ranks) would tell{name}"
        )
    elif how == "unknown":
        message += (
            "; whether it was born in forward or backward is unknown: pass the loss to mon.step(loss=...) "
            "or watch(..., forward=True) to tell"
        )
    elif sharded and not view.modules:
        message += "; watch(..., forward=True) names the rank whose forward pass went non-finite, if one did"
    suggestion = SUGGESTIONS["nonfinite_backward"] if how == "backward" else SUGGESTIONS["nonfinite"]
    return Finding(
        kind="nonfinite",
        severity="critical",
        layer=names[0],
        step=event.step,
        since_step=event.step,
        message=message,
        suggestion=suggestion,
        evidence={
            "pass": how if how != "consequence" else "forward",
            "first_step": event.step,
            "layers": names,
            "nans": event.nans,
            "infs": event.infs,
            "order": "backward" if event.backward_order_known else "model",
            "sampled_steps_affected": affected,
            **({"rank": event.rank, "ranks_affected": event.ranks} if event.rank >= 0 else {}),
        },
        layers=tuple(names),
        cause=_cause(cause) if cause is not None else None,
    )


def _cause_of(finding: Finding, cause: Finding) -> Finding:
    return dataclasses.replace(finding, cause=_cause(cause))


def _loss_finding(
    bad_loss: tuple[int, float],
    cause: Finding | None = None,
    explanation: str = "",
    suggestion: str = "nonfinite",
    **evidence,
) -> Finding:
    """The finding of the run's first non-finite loss: "the loss is nan at step N" and what it
    proves (``explanation``), a root or (with ``cause``) a consequence."""
    step, value = bad_loss
    return Finding(
        kind="nonfinite",
        severity="critical",
        layer=None,
        step=step,
        since_step=step,
        message=f"the loss is {value} at step {step}{explanation}",
        suggestion=SUGGESTIONS[suggestion],
        evidence={**evidence, "step": step, "loss": str(value)},
        cause=_cause(cause) if cause is not None else None,
    )


def _loss_only_forward(bad_loss: tuple[int, float], forward_on: bool) -> Finding:
    step = bad_loss[0]
    why = (
        f"forward statistics were not taken at step {step} (an unsampled step), so the module cannot be named"
        if forward_on
        else "Forward statistics are off, so the module cannot be named: watch(..., forward=True) names the "
        "first module whose output went non-finite"
    )
    explanation = (
        ": the NaN/Inf was born in the forward pass (the loss is computed before any gradient). "
        f"{why[0].upper()}{why[1:]}"
    )
    return _loss_finding(bad_loss, None, explanation, "nonfinite_forward", **{"pass": "forward"})


def _loss_code_root(bad_loss: tuple[int, float]) -> Finding:
    explanation = (
        " while every module's output, the model's included, was finite: the NaN/Inf was born in the loss "
        "computation, after the model (log of 0, division by zero, a mean over an empty selection)"
    )
    return _loss_finding(bad_loss, None, explanation, "nonfinite_forward", **{"pass": "forward", "where": "loss"})


def _optimizer_root(view: RunView, before: float) -> Finding | None:
    """A non-finite update of finite weights from a finite gradient (``track_updates``), at a
    step before ``before``: the optimizer step wrote NaN/Inf into the weights."""
    if view.update_ratio is None or view.weight_norm is None or not len(view.sampled_steps):
        return None
    with np.errstate(invalid="ignore"):
        bad = (
            view.present
            & ~np.isfinite(view.update_ratio)
            & np.isfinite(view.weight_norm)
            & (view.weight_norm > 0)
            & (view.nonfinite == 0)
        )
    bad &= (view.sampled_steps < before)[:, None]
    if not bad.any():
        return None
    i = int(np.flatnonzero(bad.any(axis=1))[0])
    rows = np.flatnonzero(bad[i])
    names = [view.rows[r] for r in rows]
    step = int(view.sampled_steps[i])
    return Finding(
        kind="nonfinite",
        severity="critical",
        layer=names[0],
        step=step,
        since_step=step,
        message=(
            f"the optimizer step at step {step} wrote NaN/Inf into the weights of {layer_list(names)}: their update "
            "was non-finite while their gradients and weights were finite"
        ),
        suggestion=SUGGESTIONS["nonfinite_optimizer"],
        evidence={"pass": "optimizer", "first_step": step, "layers": names},
        layers=tuple(names),
    )


def _origin(view: RunView, events: list, affected: int) -> list[Finding]:
    """The root ``nonfinite`` finding and the non-finite gradients/loss that follow from it."""
    grad = events[0] if events else None
    bad_loss = view.first_bad_loss
    forward = view.forward_events[0] if view.forward_events else None
    first_grad = grad.step if grad is not None else np.inf
    first_loss = bad_loss[0] if bad_loss is not None else np.inf
    first_forward = forward.step if forward is not None else np.inf
    out: list[Finding] = []
    optimizer = _optimizer_root(view, min(first_grad, first_loss, first_forward))
    if optimizer is not None:
        out.append(optimizer)
        if forward is not None and forward.step <= first_grad:
            out.append(_cause_of(_forward_root(view, None), optimizer))
        if grad is not None:
            out.append(_gradient_finding(view, grad, "consequence", optimizer, affected))
        elif bad_loss is not None:
            out.append(_loss_finding(bad_loss, optimizer))
        return out
    if forward is not None and forward.step <= first_grad:  # forward runs before backward
        root = _forward_root(view, bad_loss if first_loss <= forward.step else None)
        out.append(root)
        if grad is not None:
            out.append(_gradient_finding(view, grad, "consequence", root, affected))
        return out
    if grad is not None and first_loss > first_grad:
        # The loss was finite (or not given) when the gradients went bad.
        # Forward statistics are combined over ranks; a loss is one rank's own, so in a
        # distributed run a finite loss here says nothing of the rank the NaN came from.
        known = (view.loss_state(grad.step) == "finite" and view.world == 1) or bool(
            view.modules and view.forward_steps is not None and grad.step in view.forward_steps
        )
        root = _gradient_finding(view, grad, "backward" if known else "unknown", None, affected)
        out.append(root)
        if bad_loss is not None:
            out.append(_loss_finding(bad_loss, root))
        return out
    if bad_loss is not None:
        measured = view.forward_steps is not None and bad_loss[0] in view.forward_steps
        root = _loss_code_root(bad_loss) if measured else _loss_only_forward(bad_loss, bool(view.modules))
        out.append(root)
        if grad is not None:
            out.append(_gradient_finding(view, grad, "consequence", root, affected))
    return out


def detect(view: RunView, t: Thresholds) -> list[Finding]:
    # Steps a GradScaler skipped had overflowing *scaled* gradients: that is its normal
    # operation (reported as overflow below), not a non-finite gradient. Not at a scale of 1
    # or less, though: the scaled gradients are then no larger than the true ones, and a
    # scaler that keeps skipping all the way down there is skipping genuine NaN/Inf.
    with np.errstate(invalid="ignore"):
        overflowed = view.skipped & ~(view.grad_scale <= 1.0)
    skipped = set(view.steps[overflowed].tolist())
    events = [e for e in view.nonfinite_events if e.step not in skipped]
    findings = _origin(view, events, view.nonfinite_steps - len(view.nonfinite_events) + len(events))
    if skipped:
        ordered = sorted(skipped)
        recent = view.steps[-t.overflow_window :]
        fraction = float(np.isin(recent, ordered).mean()) if len(recent) else 0.0
        severity = "warning" if fraction >= t.overflow_warn_fraction else "info"
        findings.append(
            Finding(
                kind="overflow",
                severity=severity,
                layer=None,
                step=ordered[-1],
                since_step=ordered[0],
                message=(
                    f"the GradScaler skipped {len(ordered)} steps for overflowing gradients "
                    f"({100 * fraction:.0f}% of the last {len(recent)} steps), the last at step {ordered[-1]}"
                ),
                suggestion=SUGGESTIONS["overflow"],
                evidence={"skipped_steps": ordered[-50:], "recent_fraction": fraction},
            )
        )
    return findings
