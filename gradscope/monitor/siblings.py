"""Groups of interchangeable sibling modules, such as the experts of a mixture of experts.

A mixture-of-experts layer keeps its experts as the children of one container: an
``nn.ModuleList``, an ``nn.ModuleDict`` (Switch Transformers' ``expert_0``, ``expert_1``...)
or a module whose children are numbered (``nn.Sequential``), each with the same parameters
of the same shapes. A router sends each token to a few of them, so in a step some experts
get no gradient at all; over many steps, one that never gets any is starved. The groups are
found once, at ``watch()``, from the model itself, and recorded with the run
(:attr:`gradscope.run.info.RunInfo.sibling_groups`), so that the health checks can tell
which rows belong to which expert also from a run log. How many siblings make a mixture of
experts is the health check's call (:mod:`gradscope.health.checks.expert_starvation`).
"""

from __future__ import annotations

import torch

from gradscope.monitor.watched import WatchedParams


def _numbered_container(module: torch.nn.Module, children: list[tuple[str, torch.nn.Module]]) -> bool:
    """Whether ``module`` holds its children as a collection rather than as named parts:
    a ``ModuleList``/``ModuleDict``, or children that are all named by numbers."""
    return isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)) or all(name.isdigit() for name, _ in children)


def sibling_groups(model: torch.nn.Module, watched: WatchedParams) -> dict[str, tuple[str, ...]]:
    """The groups of sibling modules of ``model`` with identical trainable parameters.

    For each container (see :func:`_numbered_container`), its children are compared by their
    watched parameters that require grad, as ``(name within the child, shape)``; the largest
    set of at least two children with the same non-empty signature is a group. Children
    without a trainable watched parameter are left out (a frozen sibling cannot be starved of
    gradient), as are children that differ from the others (a shared expert of another size).

    Args:
        model: the watched model, unwrapped (its module names are the rows' prefixes).
        watched: its watched parameters.

    Returns:
        container module name (``"layers.0.experts"``; ``""`` for the model itself) -> the
        names of the group's children in it (``("0", "1", ...)``), in model order.
    """
    trainable = {id(p) for p in watched.params if p.requires_grad}
    groups: dict[str, tuple[str, ...]] = {}
    for name, module in model.named_modules():
        children = list(module.named_children())
        if len(children) < 2 or not _numbered_container(module, children):
            continue
        by_signature: dict[tuple, list[str]] = {}
        for key, child in children:
            signature = tuple(
                (param_name, tuple(p.shape)) for param_name, p in child.named_parameters() if id(p) in trainable
            )
            if signature:
                by_signature.setdefault(signature, []).append(key)
        largest = max(by_signature.values(), key=len, default=[])
        if len(largest) >= 2:
            groups[name] = tuple(largest)
    return groups
