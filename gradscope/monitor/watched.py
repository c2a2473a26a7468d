"""Which parameters a monitor watches, and how they group into the rows it reports.

A row is a layer (the module that owns the parameters, ``"encoder.layers.0.linear1"``) or,
with ``granularity="parameter"``, one parameter. Layer statistics combine their parameters
exactly (:mod:`gradscope.monitor.aggregate`), so the monitor keeps one row per parameter
internally and groups them when it reports.

Parameters are named as in the watched module, or, with ``watch(names=...)``, as in another
model: a pipeline stage cut from a larger model (``nn.Sequential(*blocks[4:])`` calls its
first block ``"0"``) then reports the rows under the whole model's names, so that the
stages' rows never share a name (:mod:`gradscope.distributed.pipeline`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from gradscope.distributed.topology import unwrap

ROOT_LAYER = "(root)"
"""Row name for parameters that belong directly to the watched module."""

GRANULARITIES = ("layer", "parameter")
"""What a reported row is: a layer (the module owning the parameters) or one parameter."""

ParamSelector = None | str | Iterable[str] | Callable[[str, torch.nn.Parameter], bool]

NameSource = None | torch.nn.Module | Mapping[str, str] | Callable[[str], str]
"""What ``watch(names=...)`` takes: None (the watched module's own names), the model the watched
module's parameters belong to (each parameter is named as there, found by identity), or a
mapping or function from the watched module's parameter names to the names to report."""


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
        rename: the ``names=`` rule, ``(name, parameter) -> name`` (KeyError for a parameter
            it does not name).
    """

    params: tuple[torch.nn.Parameter, ...]
    names: tuple[str, ...]
    row_names: tuple[str, ...]
    row_types: tuple[str, ...]
    row_of: np.ndarray
    numel: np.ndarray
    selector: Callable[[str, torch.nn.Parameter], bool]
    rename: Callable[[str, torch.nn.Parameter], str] = lambda name, param: name

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


def _renamer(names: NameSource) -> Callable[[str, torch.nn.Parameter], str]:
    """The ``names=`` rule as ``(name, parameter) -> name``; raises KeyError for a parameter it
    does not name."""
    if names is None:
        return lambda name, p: name
    if isinstance(names, torch.nn.Module):
        by_id: dict[int, str] = {}

        def in_model(name: str, p: torch.nn.Parameter) -> str:
            if id(p) not in by_id:  # read the model again: a parameter may have been replaced
                by_id.clear()
                for full, q in reversed(list(unwrap(names).named_parameters(remove_duplicate=False))):
                    by_id[id(q)] = full  # a tied parameter under its first name
            return by_id[id(p)]

        return in_model
    if isinstance(names, Mapping):
        return lambda name, p: names[name]
    if callable(names):
        return lambda name, p: names(name)
    raise TypeError(
        "watch: names= takes the model the parameters belong to, or a mapping or function from "
        f"parameter names to names, got {type(names).__name__}"
    )


def _named(target: torch.nn.Module, rename: Callable[[str, torch.nn.Parameter], str]) -> list[tuple[str, str, object]]:
    """``(name to report, name in target, parameter)`` of each of ``target``'s parameters."""
    named, unnamed = [], []
    for local, p in target.named_parameters():
        try:
            name = rename(local, p)
        except KeyError:
            unnamed.append(local)
            continue
        if not isinstance(name, str) or not name:
            raise TypeError(f"watch: names= gave {name!r} for parameter '{local}'; names must be non-empty strings")
        named.append((name, local, p))
    if unnamed:
        shown = ", ".join(unnamed[:5]) + (" ..." if len(unnamed) > 5 else "")
        raise ValueError(f"watch: names= has no name for parameters {shown}")
    counts: dict[str, int] = {}
    for name, _, _ in named:
        counts[name] = counts.get(name, 0) + 1
    twice = [name for name, count in counts.items() if count > 1]
    if twice:
        raise ValueError(f"watch: names= gives several parameters the same name: {', '.join(twice[:5])}")
    return named


def select(
    model: torch.nn.Module, params: ParamSelector = None, granularity: str = "layer", names: NameSource = None
) -> WatchedParams:
    """The parameters of ``model`` to watch and their rows.

    Args:
        model: any module, also one wrapped by ``torch.compile``.
        params: None (all), parameter names or glob patterns (``"encoder.*"``), or a
            predicate ``(name, parameter) -> bool``; the names are those ``names`` gives.
        granularity: ``"layer"`` (one row per owning module) or ``"parameter"``.
        names: what to call the parameters (:data:`NameSource`; None: their names in ``model``).

    Raises:
        ValueError: an unknown granularity, nothing selected, or ``names`` that leaves a
            parameter unnamed or gives two parameters one name.
        TypeError: ``names`` or ``params`` of the wrong kind.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"watch: granularity must be 'layer' or 'parameter', got {granularity!r}")
    wanted = _selector(params)
    rename = _renamer(names)
    target = unwrap(model)
    chosen = [(name, local, p) for name, local, p in _named(target, rename) if wanted(name, p)]
    if not chosen:
        raise ValueError("watch: no parameters selected" + ("" if params is None else f" by params={params!r}"))
    modules = dict(target.named_modules())
    rows_by_name: dict[str, int] = {}
    row_types: list[str] = []
    row_of = np.empty(len(chosen), dtype=np.int64)
    for i, (name, local, _) in enumerate(chosen):
        row = layer_name(name) if granularity == "layer" else name
        if row not in rows_by_name:
            owner = modules.get(local.rpartition(".")[0], target)
            row_types.append(type(owner).__name__)
        row_of[i] = rows_by_name.setdefault(row, len(rows_by_name))
    return WatchedParams(
        params=tuple(p for _, _, p in chosen),
        names=tuple(name for name, _, _ in chosen),
        row_names=tuple(rows_by_name),
        row_types=tuple(row_types),
        row_of=row_of,
        numel=np.array([p.numel() for _, _, p in chosen], dtype=np.int64),
        selector=wanted,
        rename=rename,
    )


def untracked(model: torch.nn.Module, watched: WatchedParams) -> list[str]:
    """Names of parameters that ``params=`` selects in ``model`` now but that ``watched``
    does not cover: added, or replaced by new Parameter objects, after ``watch()`` (under
    their ``names=`` name where it has one)."""
    known = {id(p) for p in watched.params}
    found = []
    for local, p in unwrap(model).named_parameters():
        if id(p) in known:
            continue
        try:
            name = watched.rename(local, p)
        except KeyError:
            name = local  # a parameter the model passed as names= does not hold
        if watched.selector(name, p):
            found.append(name)
    return found


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
