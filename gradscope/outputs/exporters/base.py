"""``Exporter``: the interface every destination of a run's records implements."""

from __future__ import annotations

import numpy as np

from gradscope.health.compression import layer_noise
from gradscope.outputs.budget import TimeBudget, check_budget
from gradscope.run import records
from gradscope.run.history import update_norms
from gradscope.run.info import RunInfo
from gradscope.stats import formats, layout


def layer_scalars(rows: np.ndarray, present: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
    """Per-row scalars of one sampled step, named ``<statistic>/<row>`` (present rows only).

    ``grad_norm``, ``grad_rms``, ``grad_max_abs``, ``grad_zero_frac``, ``grad_nonfinite``
    (when non-zero) and ``fp8_e4m3_zero``/``fp8_e5m2_zero`` (where defined).

    Args:
        rows: float64 ``(R, ROW_WIDTH)`` statistics rows (:mod:`gradscope.stats.layout`).
        present: bool ``(R,)``, rows that had a gradient.
        names: ``R`` row names.
    """
    present = np.flatnonzero(present)
    rows = np.asarray(rows, dtype=np.float64)[present]
    columns = {name: rows[:, i] for i, name in enumerate(layout.SCALAR_FIELDS)}
    values = {name: layout.derive(name, columns) for name in ("norm", "rms", "zero_frac", "nonfinite")}
    out = {}
    for i, r in enumerate(present):
        name = names[r]
        out[f"grad_norm/{name}"] = float(values["norm"][i])
        out[f"grad_rms/{name}"] = float(values["rms"][i])
        out[f"grad_max_abs/{name}"] = float(columns["max_abs"][i])
        out[f"grad_zero_frac/{name}"] = float(values["zero_frac"][i])
        if values["nonfinite"][i]:
            out[f"grad_nonfinite/{name}"] = float(values["nonfinite"][i])
    fp8 = formats.fp8_fields(rows[:, layout.HIST :], columns["max_abs"])
    for short in formats.FP8_FORMATS:
        lost = fp8[f"fp8_{short}_zero"]
        out.update(
            {f"fp8_{short}_zero/{names[r]}": float(lost[i]) for i, r in enumerate(present) if np.isfinite(lost[i])}
        )
    return out


def weight_scalars(record: records.Weights, names: tuple[str, ...]) -> dict[str, float]:
    """Per-row scalars of a weight reading (``watch(..., compression=True)``):
    ``quant_noise_int8/<row>``, ``quant_noise_fp8_e4m3/<row>`` (relative quantization noise
    of the row's matrices with per-tensor scaling, :mod:`gradscope.health.compression`) and
    ``taylor_saliency/<row>`` and ``taylor_fisher/<row>`` (this reading's ``|Σ g·w|`` and
    ``Σ (g·w)²``, the terms the report's saliency and fisher sum)."""
    noise = layer_noise(record.rows, record.row_of, record.ndim, len(names))
    saliency = np.abs(np.bincount(record.row_of, weights=record.grad_dot_weight, minlength=len(names)))
    fisher = np.bincount(record.row_of, weights=record.grad_weight_sq, minlength=len(names))
    out = {}
    for short in ("int8", "fp8_e4m3"):
        out.update(
            {f"quant_noise_{short}/{n}": float(v) for n, v in zip(names, noise[short], strict=True) if np.isfinite(v)}
        )
    out.update({f"taylor_saliency/{n}": float(v) for n, v in zip(names, saliency, strict=True) if np.isfinite(v)})
    out.update({f"taylor_fisher/{n}": float(v) for n, v in zip(names, fisher, strict=True) if np.isfinite(v)})
    return out


SUMMARY_PREFIX = "gradscope/"
"""Exporters (and the trainer callbacks) log :func:`summary_scalars` under this prefix: a chart
``grad_norm`` beside ``grad_norm/<layer>`` would be both a metric and a folder of them (MLflow's
file store refuses that), and the user's own ``grad_norm`` stays theirs."""

SUMMARY_SCALARS = (
    "grad_norm",
    "grad_max_abs",
    "grad_zero_frac",
    "grad_nonfinite",
    "layer_grad_norm_min",
    "layer_grad_norm_max",
)
"""The whole-model scalars of :func:`summary_scalars`."""


def summary_scalars(rows: np.ndarray, present: np.ndarray) -> dict[str, float]:
    """Whole-model scalars of one sampled step: a handful of charts instead of several per layer.

    ``grad_norm`` (L2 norm of every finite gradient element of the model: the norm
    ``clip_grad_norm_`` computes before clipping while every element is finite; where some
    are NaN/Inf, ``clip_grad_norm_``'s norm is NaN/Inf, and this one stays the finite
    elements' norm, their count going to ``grad_nonfinite``), ``grad_max_abs``,
    ``grad_zero_frac`` (exact zeros over all elements), ``grad_nonfinite`` (NaN + Inf count,
    0 included, so a chart shows when it stops being 0), and ``layer_grad_norm_min`` /
    ``layer_grad_norm_max`` (the smallest and largest layer norm: vanishing and exploding
    layers show there first). Rows are combined by :func:`gradscope.stats.layout.combine_rows`.

    Args:
        rows: float64 ``(R, ROW_WIDTH)`` statistics rows; present: bool ``(R,)``.

    Returns:
        The scalars by name (empty when no row is present).
    """
    rows = np.asarray(rows, dtype=np.float64)[np.asarray(present, dtype=bool)]
    if len(rows) == 0:
        return {}
    total = layout.combine_rows(rows)
    columns = {name: total[i] for i, name in enumerate(layout.SCALAR_FIELDS)}
    norms = layout.derive("norm", {"sumsq": rows[:, layout.SUMSQ]})
    return {
        "grad_norm": float(layout.derive("norm", columns)),
        "grad_max_abs": float(columns["max_abs"]),
        "grad_zero_frac": float(layout.derive("zero_frac", columns)),
        "grad_nonfinite": float(layout.derive("nonfinite", columns)),
        "layer_grad_norm_min": float(norms.min()),
        "layer_grad_norm_max": float(norms.max()),
    }


class Exporter:
    """Base class: override what you need. Methods run on the monitor's background thread."""

    def start(self, header: records.Header) -> None:
        """The run begins; ``header.info`` describes it (a :class:`gradscope.run.info.RunInfo` as a dict)."""

    def write(self, record: records.Record) -> None:
        """One record (see :mod:`gradscope.run.records`)."""

    def flush(self) -> None:
        """Called every few seconds: make what was written durable."""

    def close(self) -> None:
        """The run ends (``mon.close()``)."""

    def spent(self, seconds: float) -> None:
        """The pump's measurement: the last ``write`` or ``flush`` call took ``seconds``."""


EXPORT_BUDGET = 0.01
"""Default fraction of wall time a :class:`ScalarExporter` may spend (see its docstring)."""


class ScalarExporter(Exporter):
    """Turns records into named scalars per step, for exporters of scalar metrics.

    At every sampled step, the whole model's :func:`summary_scalars` under
    :data:`SUMMARY_PREFIX` (``gradscope/grad_norm``, ``gradscope/grad_max_abs``,
    ``gradscope/grad_zero_frac``, ``gradscope/grad_nonfinite``,
    ``gradscope/layer_grad_norm_min``, ``gradscope/layer_grad_norm_max``). At *layer steps*
    (below), per present row (layer):
    ``grad_norm/<row>``, ``grad_rms/<row>``, ``grad_max_abs/<row>``, ``grad_zero_frac/<row>``,
    ``grad_nonfinite/<row>`` when non-zero, and FP8 readiness ``fp8_e4m3_zero/<row>``,
    ``fp8_e5m2_zero/<row>`` (fraction of the non-zero gradient values that format would
    flush; :mod:`gradscope.stats.formats`), the histograms (:meth:`write_histograms`); with
    update tracking ``update_ratio/<row>``; with forward statistics, per module that ran,
    ``act_rms/<module>``, ``act_max_abs/<module>`` and ``act_nonfinite/<module>`` when non-zero.
    Per step ``loss`` and every metric by name; at each change of the learning-rate controller
    (:mod:`gradscope.actions`) ``lr_scale`` (the rate's scale) or ``lr_scale/<row>`` (a layer's).

    **Layer steps.** Dashboards charge per value and per row (W&B about 9 µs of this
    process's CPU per value and 0.6 ms per row, and about as much again in its service
    process; TensorBoard's ``add_scalar`` about 100 µs per value), so a model with hundreds of
    layers sampled at every step, or a fast loop, would spend more time exporting than
    training. So the exporter's own time (each ``write`` and ``flush``, as the pump measures
    it) is kept to ``budget`` of wall time by the rule of :mod:`gradscope.outputs.budget`.
    Always written: each sampled step's summary and step values, logged metrics, the
    controller's changes, and the layers of the first sampled step and of every step where
    the gradients or the forward outputs turn non-finite or finite again. Written as the
    budget allows: the layers of the other sampled steps (the *layer steps*), and the step
    values of steps that are not sampled. A small model in a slow loop gets everything; a
    large one a layer point every few sampled steps. ``budget=None`` writes everything
    whatever it costs. The run log (``watch(log_dir=...)``) keeps every step in full either way.
    """

    budget: float | None = EXPORT_BUDGET
    """Fraction of wall time the exporter may spend; None: every layer at every sampled step."""

    def start(self, header: records.Header) -> None:
        self.info = RunInfo.from_dict(header.info)
        self._start_layer_steps()

    def _start_layer_steps(self) -> None:
        self._timer = None if self.budget is None else TimeBudget(check_budget(type(self).__name__, self.budget))
        self._layer_steps: dict[int, bool] = {}  # recent steps -> whether their layers go out
        self._first_layers = True
        self._nonfinite: dict[str, bool] = {}  # record kind -> whether its last record held NaN/Inf

    def spent(self, seconds: float) -> None:
        timer = getattr(self, "_timer", None)
        if timer is not None:
            timer.spend(seconds)

    def layers_due(self, step: int, kind: str | None = None, nonfinite: bool = False) -> bool:
        """Whether ``step`` is a layer step (see the class docstring), decided once per step.

        Args:
            step: the record's step.
            kind: ``"gradients"`` or ``"forward"`` for records whose non-finite values are
                followed (a change of ``nonfinite`` from that kind's previous record makes
                the step a layer step), None for the others.
            nonfinite: whether the record holds NaN/Inf.
        """
        if not hasattr(self, "_layer_steps"):  # a subclass whose start() did not call ours
            self._start_layer_steps()
        turned = kind is not None and nonfinite != self._nonfinite.get(kind, False)
        if kind is not None:
            self._nonfinite[kind] = nonfinite
        due = self._layer_steps.get(step)
        if due is None:
            due = self._first_layers or self._paid_for()
            self._first_layers = False
            self._layer_steps[step] = due
            if len(self._layer_steps) > 64:
                del self._layer_steps[next(iter(self._layer_steps))]
        if turned and not due:
            due = self._layer_steps[step] = True
        return due

    def _paid_for(self) -> bool:
        """Whether optional work may go out now (then a new period of the budget begins)."""
        if self._timer is None:
            return True
        if not self._timer.due():
            return False
        self._timer.begin()
        return True

    def step_values_due(self, step: int) -> bool:
        """Whether a step's values (loss, step time...) go out: always at sampled steps, at
        the others as the budget allows (each is one more row or point in the destination)."""
        if not hasattr(self, "_layer_steps"):
            self._start_layer_steps()
        return step % max(self.info.every, 1) == 0 or self._paid_for()

    def write(self, record: records.Record) -> None:
        if isinstance(record, records.Sampled):
            summary = summary_scalars(record.rows, record.present)
            values = {SUMMARY_PREFIX + k: v for k, v in summary.items()}
            # a step without gradients (a failed or empty step, no summary) says nothing about NaN/Inf
            kind = "gradients" if summary else None
            layers = self.layers_due(record.step, kind, summary.get("grad_nonfinite", 0.0) > 0)
            if layers:
                values.update(self.layer_scalars(record))
            self.write_scalars(record.step, values)
            if layers:
                self.write_histograms(record)
        elif isinstance(record, records.Forward):
            bad = record.outputs[record.order[1] >= 0][:, [layout.NANS, layout.INFS]]
            if self.layers_due(record.step, "forward", bool(bad.any())):
                self.write_scalars(record.step, self.module_scalars(record))
        elif isinstance(record, records.Metrics) or (
            isinstance(record, records.StepValues) and self.step_values_due(record.step)
        ):
            values = {k: v for k, v in record.values.items() if k not in ("step_time", "peak_memory", "energy")}
            if isinstance(record, records.StepValues):
                values.update(
                    {k: record.values[k] for k in ("step_time", "peak_memory", "energy") if k in record.values}
                )
            self.write_scalars(record.step, {k: v for k, v in values.items() if np.isfinite(v)})
        elif isinstance(record, records.Action) and record.action == "lr":
            detail = record.detail
            names = [f"lr_scale/{row}" for row in detail.get("layers", ())] or ["lr_scale"]
            self.write_scalars(record.step, dict.fromkeys(names, float(detail["scale"])))
        elif isinstance(record, records.Updates) and self.layers_due(record.step):
            ratio = update_norms(record.weight_sq, record.update_sq)["update_ratio"]
            self.write_scalars(
                record.step,
                {
                    f"update_ratio/{row}": float(r)
                    for row, r in zip(self.info.rows, ratio, strict=True)
                    if np.isfinite(r)
                },
            )
        elif isinstance(record, records.Weights) and self.layers_due(record.step):
            self.write_scalars(record.step, weight_scalars(record, self.info.rows))

    def layer_scalars(self, record: records.Sampled) -> dict[str, float]:
        """The per-layer scalars of a sampled step, by name (present rows only)."""
        return layer_scalars(record.rows, record.present, self.info.rows)

    def module_scalars(self, record: records.Forward) -> dict[str, float]:
        """The per-module scalars of a sampled step's forward statistics (modules that ran)."""
        ran = np.flatnonzero(record.order[1] >= 0)
        rows = record.outputs[ran]
        columns = {name: rows[:, i] for i, name in enumerate(layout.SCALAR_FIELDS)}
        rms, nonfinite = layout.derive("rms", columns), layout.derive("nonfinite", columns)
        out = {}
        for i, m in enumerate(ran):
            name = self.info.modules[m]
            out[f"act_rms/{name}"] = float(rms[i])
            out[f"act_max_abs/{name}"] = float(columns["max_abs"][i])
            if nonfinite[i]:
                out[f"act_nonfinite/{name}"] = float(nonfinite[i])
        return out

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        """Write named scalars of ``step`` (override)."""

    def write_histograms(self, record: records.Sampled) -> None:
        """Write per-row histograms of a sampled step (override if the destination has them)."""
