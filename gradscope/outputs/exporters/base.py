"""``Exporter``: the interface every destination of a run's records implements."""

from __future__ import annotations

import numpy as np

from gradscope.run import records
from gradscope.run.history import update_norms
from gradscope.run.info import RunInfo
from gradscope.stats import layout


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


class ScalarExporter(Exporter):
    """Turns records into named scalars per step, for exporters of scalar metrics.

    Per present row (layer): ``grad_norm/<row>``, ``grad_rms/<row>``, ``grad_max_abs/<row>``,
    ``grad_zero_frac/<row>``, and ``grad_nonfinite/<row>`` when non-zero; with update tracking
    ``update_ratio/<row>``; per step ``loss`` and every metric by name.
    """

    def start(self, header: records.Header) -> None:
        self.info = RunInfo.from_dict(header.info)

    def write(self, record: records.Record) -> None:
        if isinstance(record, records.Sampled):
            self.write_scalars(record.step, self.layer_scalars(record))
            self.write_histograms(record)
        elif isinstance(record, (records.StepValues, records.Metrics)):
            values = {k: v for k, v in record.values.items() if k not in ("step_time", "peak_memory", "energy")}
            if isinstance(record, records.StepValues):
                values.update(
                    {k: record.values[k] for k in ("step_time", "peak_memory", "energy") if k in record.values}
                )
            self.write_scalars(record.step, {k: v for k, v in values.items() if np.isfinite(v)})
        elif isinstance(record, records.Updates):
            ratio = update_norms(record.weight_sq, record.update_sq)["update_ratio"]
            self.write_scalars(
                record.step,
                {
                    f"update_ratio/{row}": float(r)
                    for row, r in zip(self.info.rows, ratio, strict=True)
                    if np.isfinite(r)
                },
            )

    def layer_scalars(self, record: records.Sampled) -> dict[str, float]:
        """The per-layer scalars of a sampled step, by name (present rows only)."""
        present = np.flatnonzero(record.present)
        rows = record.rows[present]
        columns = {name: rows[:, i] for i, name in enumerate(layout.SCALAR_FIELDS)}
        values = {name: layout.derive(name, columns) for name in ("norm", "rms", "zero_frac", "nonfinite")}
        out = {}
        for i, r in enumerate(present):
            name = self.info.rows[r]
            out[f"grad_norm/{name}"] = float(values["norm"][i])
            out[f"grad_rms/{name}"] = float(values["rms"][i])
            out[f"grad_max_abs/{name}"] = float(columns["max_abs"][i])
            out[f"grad_zero_frac/{name}"] = float(values["zero_frac"][i])
            if values["nonfinite"][i]:
                out[f"grad_nonfinite/{name}"] = float(values["nonfinite"][i])
        return out

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        """Write named scalars of ``step`` (override)."""

    def write_histograms(self, record: records.Sampled) -> None:
        """Write per-row histograms of a sampled step (override if the destination has them)."""
