"""``Exporter``: the interface every destination of a run's records implements."""

from __future__ import annotations

import numpy as np

from gradscope import layout, records
from gradscope.run import RunInfo


class Exporter:
    """Base class: override what you need. Methods run on the monitor's background thread."""

    def start(self, header: records.Header) -> None:
        """The run begins; ``header.info`` describes it (a :class:`gradscope.run.RunInfo` as a dict)."""

    def write(self, record: records.Record) -> None:
        """One record (see :mod:`gradscope.records`)."""

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
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.sqrt(record.update_sq / record.weight_sq)
            self.write_scalars(
                record.step,
                {
                    f"update_ratio/{row}": float(r)
                    for row, r in zip(self.info.rows, ratio, strict=True)
                    if np.isfinite(r)
                },
            )

    def layer_scalars(self, record: records.Sampled) -> dict[str, float]:
        out = {}
        rows = record.rows
        finite = rows[:, layout.NUMEL] - rows[:, layout.NANS] - rows[:, layout.INFS]
        for r in np.flatnonzero(record.present):
            name = self.info.rows[r]
            sumsq = rows[r, layout.SUMSQ]
            out[f"grad_norm/{name}"] = float(np.sqrt(sumsq))
            out[f"grad_rms/{name}"] = float(np.sqrt(sumsq / max(finite[r], 1)))
            out[f"grad_max_abs/{name}"] = float(rows[r, layout.MAX_ABS])
            out[f"grad_zero_frac/{name}"] = float(rows[r, layout.ZEROS] / max(rows[r, layout.NUMEL], 1))
            nonfinite = rows[r, layout.NANS] + rows[r, layout.INFS]
            if nonfinite:
                out[f"grad_nonfinite/{name}"] = float(nonfinite)
        return out

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        """Write named scalars of ``step`` (override)."""

    def write_histograms(self, record: records.Sampled) -> None:
        """Write per-row histograms of a sampled step (override if the destination has them)."""
