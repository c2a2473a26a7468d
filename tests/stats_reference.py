"""An independent float64 reference for every statistic, written with plain torch ops.

It shares no code with gradscope: bins come from ``torch.frexp`` (not from exponent bits),
sums from float64 torch reductions over the dense tensor.
"""

from __future__ import annotations

import numpy as np
import torch

NUM_BINS = 64
MIN_EXPONENT = -48


def reference_row(tensor: torch.Tensor) -> dict:
    """Statistics of one tensor (any layout, dtype, device), computed in float64."""
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    x = tensor.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    finite = torch.isfinite(x)
    values = x[finite]
    nonzero = values[values != 0].abs()
    _, exponent = torch.frexp(nonzero)  # |g| = mantissa * 2**exponent, mantissa in [0.5, 1)
    bins = torch.clamp(exponent.to(torch.int64) - 1 - MIN_EXPONENT, 0, NUM_BINS - 1)
    return {
        "numel": x.numel(),
        "sum": float(values.sum()),
        "abs_sum": float(values.abs().sum()),
        "sumsq": float((values * values).sum()),
        "max_abs": float(values.abs().max()) if values.numel() else 0.0,
        "zeros": int((x == 0).sum()),
        "nans": int(torch.isnan(x).sum()),
        "infs": int(torch.isinf(x).sum()),
        "hist": np.bincount(bins.numpy(), minlength=NUM_BINS),
    }


def assert_matches_reference(stats, tensors, rtol: float = 1e-5) -> None:
    """Assert a ``TensorStats`` equals the reference: counts, max and histogram exactly, sums
    within ``rtol`` of the sum of magnitudes (the only honest scale for a sum that can
    cancel) and squares within ``rtol`` relative."""
    assert len(stats) == len(tensors)
    for i, tensor in enumerate(tensors):
        ref = reference_row(tensor)
        where = f"tensor {i} ({tensor.dtype}, shape {tuple(tensor.shape)})"
        assert stats.numel[i] == ref["numel"], where
        assert stats.zeros[i] == ref["zeros"], where
        assert stats.nans[i] == ref["nans"], where
        assert stats.infs[i] == ref["infs"], where
        assert stats.max_abs[i] == ref["max_abs"], f"{where}: max_abs {stats.max_abs[i]!r} != {ref['max_abs']!r}"
        np.testing.assert_array_equal(stats.hist[i], ref["hist"], err_msg=where)
        if not np.isfinite(ref["abs_sum"]):
            # float64 inputs near 1.8e308: sums of magnitudes leave float64's range, where a
            # sum's value depends on the order of additions; squares overflow to inf for sure.
            assert np.isinf(stats.sumsq[i]), where
            continue
        assert abs(stats.sum[i] - ref["sum"]) <= rtol * ref["abs_sum"], (
            f"{where}: sum {stats.sum[i]!r} vs {ref['sum']!r}"
        )
        if np.isinf(ref["sumsq"]):  # only float64 inputs beyond 1.3e154 overflow, as float64 must
            assert np.isinf(stats.sumsq[i]), where
        else:
            assert abs(stats.sumsq[i] - ref["sumsq"]) <= rtol * ref["sumsq"], (
                f"{where}: sumsq {stats.sumsq[i]!r} vs {ref['sumsq']!r}"
            )


def smallest_nonzero(tensor: torch.Tensor) -> float:
    """The smallest non-zero finite ``|g|`` of a tensor, in float64 (``inf`` when there is none)."""
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    x = tensor.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    magnitudes = x[torch.isfinite(x) & (x != 0)].abs()
    return float(magnitudes.min()) if magnitudes.numel() else float("inf")


def triggers_histogram(tensor: torch.Tensor) -> bool:
    """Whether a light pass computes this (already unscaled) tensor's histogram anyway, by the
    documented rule written out here: it holds NaN/Inf, a non-zero ``|g|`` below 2**-63 or a
    finite ``|g|`` of 2**56 or more."""
    ref = reference_row(tensor)
    return ref["nans"] + ref["infs"] > 0 or smallest_nonzero(tensor) < 2.0**-63 or ref["max_abs"] >= 2.0**56


def unscaled(tensor: torch.Tensor, inv_scale: float) -> torch.Tensor:
    """``tensor * inv_scale`` as GradScaler.unscale_ computes it: inv_scale is a float32
    value; the product is float32 (float64 for float64 tensors)."""
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    inv = torch.tensor(inv_scale, dtype=torch.float32)
    if tensor.dtype == torch.float64:
        return tensor * inv.double()
    return tensor.float() * inv


def reference_layers(grads_by_param: dict[str, torch.Tensor | None], row_of: dict[str, str]) -> dict[str, dict]:
    """Reference statistics per row (layer) from final gradients: sums and counts add, max
    takes max, histograms add; rows whose parameters all lack a gradient are absent."""
    rows: dict[str, dict] = {}
    for name, grad in grads_by_param.items():
        if grad is None:
            continue
        ref = reference_row(grad)
        row = rows.setdefault(row_of[name], {key: 0 for key in ref})
        for key, value in ref.items():
            row[key] = max(row[key], value) if key == "max_abs" else row[key] + value
    return rows


def assert_rows_match(series_by_field: dict, step_position: int, expected: dict[str, dict], rtol: float = 1e-5):
    """Compare one sampled step of a monitor's history with :func:`reference_layers`.

    The ``"hist"`` series holds only the steps that have histograms (``watch(histogram_every=)``,
    and rows that trigger one): a row's histogram there is compared where it is known, and must
    be known at step 0 (always a histogram step); a light row has none to compare (which rows
    have one is tests/monitor/test_histogram_cadence.py's subject).
    """
    rows = series_by_field["norm"].rows
    step = int(series_by_field["norm"].steps[step_position])
    hist_steps = series_by_field["hist"].steps.tolist() if "hist" in series_by_field else []
    for r, name in enumerate(rows):
        present = bool(series_by_field["present"].values[step_position, r])
        assert present == (name in expected), f"row {name}: present={present}"
        if not present:
            assert np.isnan(series_by_field["norm"].values[step_position, r])
            continue
        ref = expected[name]
        value = {field: series_by_field[field].values[step_position, r] for field in series_by_field if field != "hist"}
        for field in ("numel", "zeros", "nans", "infs", "max_abs"):
            assert value[field] == ref[field], f"row {name}: {field} {value[field]} != {ref[field]}"
        hist = series_by_field["hist"].values[hist_steps.index(step), r] if step in hist_steps else None
        assert step != 0 or (hist is not None and not np.isnan(hist).any()), f"row {name}: no histogram at step 0"
        if hist is not None and not np.isnan(hist).all():
            np.testing.assert_array_equal(hist, ref["hist"], err_msg=f"row {name}, step {step}")
        assert abs(value["sum"] - ref["sum"]) <= rtol * ref["abs_sum"], f"row {name}: sum"
        assert abs(value["sumsq"] - ref["sumsq"]) <= rtol * ref["sumsq"], f"row {name}: sumsq"
