"""The Triton backend: glue between ``grad_stats`` and the kernels in ``gradscope.kernels``.

Tensors are grouped by (device, dtype); each group is launched once (or, for light rows, a
light launch and its gated launch), writing its rows into one float64 buffer per device, and
each buffer is copied to the host once.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence

import numpy as np
import torch

from gradscope.stats import layout
from gradscope.stats.inputs import FlatElements


@functools.cache
def triton_importable() -> bool:
    """True when the ``triton`` package is installed (it is only imported when used)."""
    return importlib.util.find_spec("triton") is not None


def kernels():
    """The kernel module, imported on first use (so ``import gradscope`` never needs Triton)."""
    from gradscope.kernels import launch

    return launch


def serves(device: torch.device) -> bool:
    """True when Triton can read tensors on ``device``.

    Compiled kernels read CUDA tensors; with ``TRITON_INTERPRET=1`` set before the kernels
    were first imported, the interpreter reads CPU tensors instead.
    """
    if not triton_importable():
        return False
    if kernels().is_interpreted():
        return device.type == "cpu"
    return device.type == "cuda" and torch.cuda.is_available()


def launch_rows(
    flats: Sequence[FlatElements],
    out: torch.Tensor,
    out_rows: Sequence[int],
    inv_scale: torch.Tensor | None = None,
    histogram: bool = True,
    **tiling,
) -> None:
    """Launch the kernels writing rows ``out_rows`` of the device buffer ``out``; no host sync.

    ``flats`` share ``out``'s device. With ``inv_scale`` (a one-element float32 tensor on that
    device) the rows describe ``g * inv_scale``. ``histogram=False`` writes light rows
    (``layout``: histogram columns NaN unless the tensor triggers its histogram). Sparse
    tensors' unstored zeros are not added here.
    """
    groups: dict[torch.dtype, list[int]] = {}
    for i, flat in enumerate(flats):
        groups.setdefault(flat.values.dtype, []).append(i)
    for members in groups.values():
        kernels().grad_stats_launch(
            [flats[i].values for i in members],
            out,
            [out_rows[i] for i in members],
            inv_scale=inv_scale,
            histogram=histogram,
            checked=False,  # flat_elements made them 1-D and contiguous; grouped by dtype above
            **tiling,
        )


def triton_rows(
    flats: Sequence[FlatElements], inv_scale: torch.Tensor | None = None, histogram: bool = True, **tiling
) -> np.ndarray:
    """Statistics rows (float64 ``(T, ROW_WIDTH)``) of flattened tensors, computed by the kernels.

    Rows describe ``flats[i].values``; sparse tensors' unstored zeros are not added here.

    Args:
        flats: tensors on devices that :func:`serves`.
        inv_scale: optional one-element float32 tensor: rows then describe ``g * inv_scale``.
        histogram: False: light rows, whose histogram columns are NaN
            (``layout.NO_HISTOGRAM``) except for tensors that trigger their histogram
            (``layout.triggers_histogram``); every other column is the same either way.
        tiling: optional ``block``, ``careful_block``, ``chunk_numel``, ``final_rows``
            overrides passed to the launcher (tests use them to force many chunks).
    """
    rows = np.zeros((len(flats), layout.ROW_WIDTH))
    by_device: dict[torch.device, list[int]] = {}
    for i, flat in enumerate(flats):
        by_device.setdefault(flat.values.device, []).append(i)
    buffers = []
    for device, members in by_device.items():
        out = torch.empty((len(members), layout.ROW_WIDTH), dtype=torch.float64, device=device)
        scale = None if inv_scale is None else inv_scale.to(device)
        launch_rows(
            [flats[i] for i in members], out, range(len(members)), inv_scale=scale, histogram=histogram, **tiling
        )
        buffers.append((members, out))
    for members, out in buffers:  # one device-to-host copy per device, after all launches
        rows[members] = out.cpu().numpy()
    return rows
