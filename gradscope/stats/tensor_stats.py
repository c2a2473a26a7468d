"""``TensorStats``: gradient statistics of a list of tensors, one NumPy array per field."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradscope.stats import layout


@dataclass(frozen=True, eq=False)
class TensorStats:
    """Statistics of ``T`` tensors, as computed by :func:`gradscope.grad_stats`.

    Every field is a NumPy array with one entry per tensor, in input order. Sums and the
    maximum cover finite elements only; NaN and Inf elements are only counted.

    Attributes:
        numel: int64 ``(T,)``, elements per tensor.
        sum: float64 ``(T,)``, sum of the finite elements.
        sumsq: float64 ``(T,)``, sum of squares of the finite elements.
        max_abs: float64 ``(T,)``, largest finite ``|g|`` (0 when there is none).
        zeros: int64 ``(T,)``, elements exactly +0.0 or -0.0.
        nans: int64 ``(T,)``, NaN elements.
        infs: int64 ``(T,)``, +Inf/-Inf elements.
        hist: int64 ``(T, 64)``, counts of finite non-zero ``|g|`` per binade; bin edges
            are :data:`gradscope.HIST_EDGES`. All zeros where ``hist_known`` is False.
        names: one name per tensor (parameter names when computed from a module), or None.
        hist_known: bool ``(T,)``, where the histogram was computed. Light statistics
            (``grad_stats(..., histogram=False)``) compute it only for tensors that trigger
            it (:func:`gradscope.stats.layout.triggers_histogram`); elsewhere it is unknown,
            not empty. Default (None given): every histogram known.

    Examples:
        >>> import torch, gradscope
        >>> stats = gradscope.grad_stats([torch.tensor([3.0, -4.0, 0.0])])
        >>> float(stats.norm[0]), int(stats.zeros[0])
        (5.0, 1)
    """

    numel: np.ndarray
    sum: np.ndarray
    sumsq: np.ndarray
    max_abs: np.ndarray
    zeros: np.ndarray
    nans: np.ndarray
    infs: np.ndarray
    hist: np.ndarray
    names: tuple[str, ...] | None = None
    hist_known: np.ndarray | None = None

    def __post_init__(self) -> None:
        known = np.ones(len(self), dtype=bool) if self.hist_known is None else np.asarray(self.hist_known, dtype=bool)
        object.__setattr__(self, "hist_known", known)

    @classmethod
    def from_rows(cls, rows: np.ndarray, names: tuple[str, ...] | None = None) -> TensorStats:
        """Build from statistics rows (float64 ``(T, ROW_WIDTH)``, see :mod:`gradscope.stats.layout`).

        A row whose histogram columns are NaN (a light row, :func:`layout.histogram_known`)
        gives ``hist_known`` False and a ``hist`` row of zeros.
        """
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != layout.ROW_WIDTH:
            raise ValueError(f"statistics rows must have shape (T, {layout.ROW_WIDTH}), got {rows.shape}")
        if names is not None and len(names) != rows.shape[0]:
            raise ValueError(f"{len(names)} names for {rows.shape[0]} rows")
        fields = {}
        for column, name in enumerate(layout.SCALAR_FIELDS):
            values = rows[:, column].copy()
            fields[name] = values.astype(np.int64) if name in layout.COUNT_FIELDS else values
        known = layout.histogram_known(rows)
        hist = np.zeros((rows.shape[0], layout.NUM_BINS), dtype=np.int64)
        hist[known] = rows[known, layout.HIST :]
        fields["hist"] = hist
        return cls(**fields, names=tuple(names) if names is not None else None, hist_known=known)

    def to_rows(self) -> np.ndarray:
        """The statistics rows, float64 ``(T, ROW_WIDTH)``; inverse of :meth:`from_rows`
        (unknown histograms are NaN columns again)."""
        rows = np.empty((len(self), layout.ROW_WIDTH), dtype=np.float64)
        for column, name in enumerate(layout.SCALAR_FIELDS):
            rows[:, column] = getattr(self, name)
        rows[:, layout.HIST :] = self.hist
        rows[~self.hist_known, layout.HIST :] = layout.NO_HISTOGRAM
        return rows

    def __len__(self) -> int:
        return int(self.numel.shape[0])

    def _derived(self, name: str) -> np.ndarray:
        return layout.derive(name, {field: getattr(self, field) for field in layout.SCALAR_FIELDS})

    @property
    def finite(self) -> np.ndarray:
        """int64 ``(T,)``: finite elements per tensor (``numel - nans - infs``)."""
        return self._derived("finite")

    @property
    def norm(self) -> np.ndarray:
        """float64 ``(T,)``: L2 norm of the finite elements."""
        return self._derived("norm")

    @property
    def rms(self) -> np.ndarray:
        """float64 ``(T,)``: root mean square of the finite elements (0 when there are none)."""
        return self._derived("rms")

    @property
    def mean(self) -> np.ndarray:
        """float64 ``(T,)``: mean of the finite elements (0 when there are none)."""
        return self._derived("mean")

    @property
    def zero_frac(self) -> np.ndarray:
        """float64 ``(T,)``: fraction of all elements that are exactly zero (0 for empty tensors)."""
        return self._derived("zero_frac")

    @property
    def nonfinite(self) -> np.ndarray:
        """int64 ``(T,)``: NaN plus Inf elements."""
        return self._derived("nonfinite")

    @property
    def total_norm(self) -> float:
        """L2 norm of all finite elements of all tensors together.

        The quantity ``torch.nn.utils.clip_grad_norm_`` computes, except that non-finite
        elements are excluded (they are reported in ``nans``/``infs`` instead of turning the
        norm into NaN).
        """
        return float(np.sqrt(self.sumsq.sum()))

    def combined(self) -> TensorStats:
        """All tensors combined into one row, as if they were one tensor (see ``layout.COMBINE``);
        its histogram is known only if every tensor's is."""
        return TensorStats.from_rows(layout.combine_rows(self.to_rows())[None, :])

    def to_dict(self) -> dict[str, list]:
        """Plain Python lists per field (JSON-serialisable), derived fields included."""
        out: dict[str, list] = {}
        if self.names is not None:
            out["names"] = list(self.names)
        for name in (*layout.SCALAR_FIELDS, "norm", "rms", "mean", "zero_frac", "nonfinite"):
            out[name] = getattr(self, name).tolist()
        out["hist"] = self.hist.tolist()
        out["hist_known"] = self.hist_known.tolist()
        return out

    def __repr__(self) -> str:
        header = f"TensorStats({len(self)} tensors, total_norm={self.total_norm:.4g})"
        lines = [
            header,
            f"  {'tensor':<32} {'numel':>10} {'norm':>10} {'rms':>10} {'max_abs':>10} {'zero%':>6} {'nonfin':>6}",
        ]
        for i in range(len(self)):
            name = self.names[i] if self.names is not None else str(i)
            if len(name) > 32:
                name = "…" + name[-31:]
            lines.append(
                f"  {name:<32} {self.numel[i]:>10d} {self.norm[i]:>10.3e} {self.rms[i]:>10.3e} "
                f"{self.max_abs[i]:>10.3e} {100 * self.zero_frac[i]:>6.1f} {self.nonfinite[i]:>6d}"
            )
        return "\n".join(lines)
