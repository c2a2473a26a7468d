"""Which parameters a monitor watches, and how they group into the rows it reports.

A row is a layer (the module that owns the parameters, ``"encoder.layers.0.linear1"``) or,
with ``granularity="parameter"``, one parameter. Layer statistics combine their parameters
exactly (:mod:`gradscope.monitor.aggregate`), so the monitor keeps one row per parameter
internally and groups them when it reports.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from gradscope.distributed.topology import unwrap

ROOT_LAYER = "(root)"
"""Row name for parameters that belong directly to the watched module."""

GRANULARITIES = ("layer", "parameter")
"""What a reported row is: a layer (the module owning the parameters) or one parameter."""

ParamSelector = None | str | Iterable[str] | Callable[[str, torch.nn.Parameter], bool]


@dataclass(frozen=True)
class WatchedParams:
    """The watched parameters of a model and their rows.

    Attributes:
        params: the parameters, each once (tied parameters under their first name).
        names: parameter names, without ``torch.compile``'s ``_orig_mod.`` prefix.
        row_names: names of the reported rows (layers, or parameters).
        row_types: class name of the module owning each row (``"Linear"``, ``"Embedding"``).
        row_of: int ``(P,)``, the row of each parameter.
        numel: int64 ``(P,)``, elements per parameter.
        selector: the ``params=`` predicate the selection was made with.
    """

    params: tuple[torch.nn.Parameter, ...]
    names: tuple[str, ...]
    row_names: tuple[str, ...]
    row_types: tuple[str, ...]
    row_of: np.ndarray
    numel: np.ndarray
    selector: Callable[[str, torch.nn.Parameter], bool]

    def __len__(self) -> int:
        return len(self.params)


def layer_name(param_name: str) -> str:
    """The owning module's name: ``"enc.0.linear.weight"`` -> ``"enc.0.linear"``."""
    owner, _, _ = param_name.rpartition(".")
    return owner or ROOT_LAYER


def _selector(params: ParamSelector) -> Callable[[str, torch.nn.Parameter], bool]:
    if params is None:
        return lambda name, p: True
    if callable(params):
        return params
    patterns = [params] if isinstance(params, str) else list(params)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError("watch: params= takes parameter names, glob patterns, or a predicate(name, param)")
    return lambda name, p: any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def select(model: torch.nn.Module, params: ParamSelector = None, granularity: str = "layer") -> WatchedParams:
    """The parameters of ``model`` to watch and their rows.

    Args:
        model: any module, also one wrapped by ``torch.compile``.
        params: None (all), parameter names or glob patterns (``"encoder.*"``), or a
            predicate ``(name, parameter) -> bool``.
        granularity: ``"layer"`` (one row per owning module) or ``"parameter"``.

    Raises:
        ValueError: an unknown granularity, or nothing selected.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"watch: granularity must be 'layer' or 'parameter', got {granularity!r}")
    wanted = _selector(params)
    target = unwrap(model)
    chosen = [(name, p) for name, p in target.named_parameters() if wanted(name, p)]
    if not chosen:
        raise ValueError("watch: no parameters selected" + ("" if params is None else f" by params={params!r}"))
    names = tuple(name for name, _ in chosen)
    modules = dict(target.named_modules())
    rows_by_name: dict[str, int] = {}
    row_types: list[str] = []
    row_of = np.empty(len(chosen), dtype=np.int64)
    for i, name in enumerate(names):
        row = layer_name(name) if granularity == "layer" else name
        if row not in rows_by_name:
            owner = modules.get(name.rpartition(".")[0], target)
            row_types.append(type(owner).__name__)
        row_of[i] = rows_by_name.setdefault(row, len(rows_by_name))
    return WatchedParams(
        params=tuple(p for _, p in chosen),
        names=names,
        row_names=tuple(rows_by_name),
        row_types=tuple(row_types),
        row_of=row_of,
        numel=np.array([p.numel() for _, p in chosen], dtype=np.int64),
        selector=wanted,
    )


def untracked(model: torch.nn.Module, watched: WatchedParams) -> list[str]:
    """Names of parameters that ``params=`` selects in ``model`` now but that ``watched``
    does not cover: added, or replaced by new Parameter objects, after ``watch()``."""
    known = {id(p) for p in watched.params}
    return [name for name, p in unwrap(model).named_parameters() if id(p) not in known and watched.selector(name, p)]


def new_params_warning(model: torch.nn.Module, watched: WatchedParams) -> str | None:
    """The warning for parameters :func:`untracked` finds (None when there are none)."""
    new = untracked(model, watched)
    if not new:
        return None
    shown = ", ".join(new[:10]) + (" ..." if len(new) > 10 else "")
    return (
        f"gradscope: parameters added after watch() are not monitored: {shown}; "
        "close() and watch() again to include them"
    )
