"""Forward statistics: what every module's inputs and outputs held on sampled steps.

With ``watch(model, forward=True)`` every module of the model (containers included; the
model itself is ``"(root)"``) gets a forward pre-hook and a forward hook while a sampled
step is open. They measure, with the same engine as the gradients and without a host
sync:

* each module's **outputs** — every floating-point tensor in what ``forward`` returned
  (tensors, tuples, lists, dicts, dataclasses and ``ModelOutput`` objects; ``None`` and
  non-tensors are skipped), all its calls in the step combined;
* the **inputs** of a module that no measured module produced: the batch at the root, and
  tensors a parent computes with its own code between its submodules (a residual add,
  ``torch.exp`` in a forward). Inputs that are another module's unchanged output are not
  read again.

Each call takes a position in the step's forward sequence (pre-hook = the call starting,
hook = it returning), and each row keeps the position of its first call whose tensors held
NaN/Inf. The first non-finite row in that sequence is where a bad value was born: a module
whose inputs and submodules' outputs were all finite (they come earlier in the sequence)
made it with its own code; a non-finite *inputs* row means the batch, or the parent's own
code, did (:mod:`gradscope.run.state` reads it).

Hooks are installed only while a sampled step is open, so unsampled steps (and a
``torch.compile``'d model's graphs on them) run without them; under ``torch.compile`` the
hooks run outside the graph (``torch._dynamo.disable``). Only forward passes with autograd
recording are measured: evaluation under ``torch.no_grad()``/``inference_mode`` and
activation-checkpoint recomputation during backward are not. Tensors are measured as the
hook sees them, before any later in-place operation. In a distributed run (DDP, FSDP2)
each rank measures its own activations and two asynchronous all-reduces per sampled step
combine them (:mod:`gradscope.distributed.rank_rows`): every rank reports the statistics of
the global batch, the earliest origin of a NaN/Inf on any rank, and the lowest rank it
appeared on.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable

import numpy as np
import torch

from gradscope.distributed.rank_rows import RankRows
from gradscope.distributed.topology import local_tensor
from gradscope.monitor.forward_rows import DeviceRows, ForwardStep, HostRows
from gradscope.monitor.watched import ROOT_LAYER
from gradscope.run import records
from gradscope.stats.dispatch import engine_for, is_host
from gradscope.stats.inputs import SUPPORTED_DTYPES, is_dense

MAX_TENSORS = 64
"""Tensors measured per module call (the first found); larger structures are cut there."""

MAX_DEPTH = 4
"""Nesting depth searched for tensors in a module's inputs or outputs."""

INPUTS, OUTPUTS = 0, 1


def _measurable(value) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.dtype in SUPPORTED_DTYPES
        and value.layout == torch.strided
        and value.numel() > 0
        and value.device.type != "meta"
    )


def find_tensors(value, limit: int = MAX_TENSORS) -> list[torch.Tensor]:
    """The floating-point tensors in ``value`` (depth-first, each object once, at most ``limit``)."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(item, depth: int) -> None:
        if len(found) >= limit or item is None or isinstance(item, (str, bytes, int, float, bool)):
            return
        if isinstance(item, torch.Tensor):
            if _measurable(item) and id(item) not in seen:
                seen.add(id(item))
                found.append(item)
            return
        if depth >= MAX_DEPTH:
            return
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            children = (getattr(item, f.name, None) for f in dataclasses.fields(item))
        else:
            return
        for child in children:
            walk(child, depth + 1)

    walk(value, 0)
    return found


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation-checkpoint recomputation)."""
    try:
        return torch._C._current_graph_task_id() != -1
    except (AttributeError, RuntimeError):  # a private API: a torch without it has no such pass to see
        return False


def _autocast_dtype(device_type: str) -> str:
    try:
        if torch.is_autocast_enabled(device_type):
            return str(torch.get_autocast_dtype(device_type)).removeprefix("torch.")
    except (AttributeError, RuntimeError):  # a device type autocast does not know: no autocast
        pass
    return ""


def forward_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules forward statistics has rows for, in row order, with their names (the
    model itself is ``"(root)"``); :func:`gradscope.monitor.resources.describe_run` names them."""
    return [(name or ROOT_LAYER, module) for name, module in model.named_modules(remove_duplicate=True)]


class _Hook:
    """A module's forward (pre-)hook calling the capture, held weakly (see ``GradHook``)."""

    __slots__ = ("capture", "index", "kind")

    def __init__(self, capture: ForwardCapture, index: int, kind: int) -> None:
        self.capture = weakref.ref(capture)
        self.index = index
        self.kind = kind

    def __call__(self, module, args, kwargs, output=None):
        capture = self.capture()
        if capture is not None:
            if self.kind == INPUTS:
                capture.on_inputs(self.index, (args, kwargs))
            else:
                capture.on_outputs(self.index, output)
        return None


class ForwardCapture:
    """Forward statistics of every module of a model (module docstring).

    Args:
        model: the model (unwrapped: the module whose parameters are watched).
        backend: ``"auto"``, ``"triton"`` or ``"numpy"``, as for the gradients.
        on_error: called with an exception raised inside a hook (training goes on).
        group, device: in a distributed run (DDP, FSDP2), the process group whose ranks'
            rows are combined and the device the collectives run on; None otherwise.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        backend: str,
        on_error: Callable[[BaseException], None],
        group=None,
        device: torch.device | None = None,
    ) -> None:
        named = forward_modules(model)
        self.names = tuple(name for name, _ in named)
        self.types = tuple(type(module).__name__ for _, module in named)
        self._modules = [weakref.ref(module) for _, module in named]
        self._backend = backend
        self._on_error = on_error
        self._handles: list = []
        self._hooks: list | None = None
        self._engines: dict = {}
        self._seq = 0
        self._first = np.full(2 * len(named), -1, dtype=np.int64)
        self._dtypes = [""] * len(named)
        self._autocast: str | None = None  # unknown until a module returns a tensor
        self._row_tensors = np.zeros(2 * len(named), dtype=np.int64)  # tensors measured into each row
        self._known: dict[tuple, tuple] = {}
        self._in_flight: list[ForwardStep] = []
        self._combiner = RankRows(group, 2 * len(named), device) if device is not None else None

    @classmethod
    def of(cls, model: torch.nn.Module, backend: str, topology, device: torch.device, on_error) -> ForwardCapture:
        """The capture of a monitor: rows combined over the ranks of a DDP or FSDP2 run
        (``topology``, a :class:`gradscope.distributed.topology.Topology`; ``device``: where
        the monitor's rows live), local otherwise."""
        combined = topology.kind in ("replicated", "sharded") and topology.world > 1
        group, where = (topology.group, device) if combined else (None, None)
        return cls(model, backend, on_error, group=group, device=where)

    def __len__(self) -> int:
        return len(self.names)

    # ---- hooks --------------------------------------------------------------------------

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> None:
        """Hook every module (a sampled step opens)."""
        if self._handles:
            return
        if self._hooks is None:  # made once: installing is repeated at every sampled step
            self._hooks = [
                (torch._dynamo.disable(_Hook(self, i, INPUTS)), torch._dynamo.disable(_Hook(self, i, OUTPUTS)))
                for i in range(len(self))
            ]
        for ref, (pre, post) in zip(self._modules, self._hooks, strict=True):
            module = ref()
            if module is None:
                continue
            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(post, with_kwargs=True))

    def remove(self) -> None:
        """Unhook every module (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _measuring(self) -> bool:
        return bool(self._handles) and torch.is_grad_enabled() and not _in_backward()

    def on_inputs(self, index: int, value) -> None:
        if not self._measuring():
            return
        try:
            seq = self._next()
            tensors = find_tensors(value)
            fresh = [t for t in tensors if self._source(t) is None]
            if fresh:
                self._measure(index, seq, fresh)
        except Exception as error:
            self._on_error(error)

    def on_outputs(self, index: int, value) -> None:
        if not self._measuring():
            return
        try:
            row = len(self) + index
            seq = self._next()
            tensors = find_tensors(value)
            if not tensors:
                return
            if not self._dtypes[index]:
                self._dtypes[index] = str(tensors[0].dtype).removeprefix("torch.")
            if self._autocast is None:  # autocast is on or off for a whole forward pass
                self._autocast = _autocast_dtype(tensors[0].device.type)
            source = self._source(tensors[0]) if len(tensors) == 1 else None
            if source is not None and self._row_tensors[source[0]] == 1:
                # The output is one earlier measured tensor, alone in its row (a container
                # returning its last child's output): copy that row instead of reading again.
                engine = self._engines[source[1]]
                engine.combine(row, seq, engine.row(source[0]))
                self._first[row] = seq if self._first[row] < 0 else self._first[row]
                self._row_tensors[row] += 1
                return  # the tensor stays known as its source's (an outer container copies that too)
            self._measure(row, seq, tensors)
        except Exception as error:
            self._on_error(error)

    def _next(self) -> int:
        seq, self._seq = self._seq, self._seq + 1
        return seq

    # ---- measuring ----------------------------------------------------------------------

    def _measure(self, row: int, seq: int, tensors: list[torch.Tensor]) -> None:
        if self._first[row] < 0:
            self._first[row] = seq
        self._row_tensors[row] += len(tensors)
        by_engine: dict = {}
        for tensor in tensors:
            local = local_tensor(tensor).detach()
            key = engine_for(local.device, self._backend, "activations", caller="watch")
            by_engine.setdefault(key, []).append(local)
        for key, group in by_engine.items():
            engine = self._engines.get(key)
            if engine is None:
                count = 2 * len(self)
                engine = HostRows(count, key) if is_host(key) else DeviceRows(group[0].device, count)
                self._engines[key] = engine
            engine.add(row, seq, group)
        if len(by_engine) == 1:
            (key,) = by_engine
            for tensor in tensors:
                self._remember(tensor, row, key)

    @staticmethod
    def _key(tensor: torch.Tensor) -> tuple:
        return (tensor.data_ptr(), tensor.numel(), tensor.dtype, tensor.device)

    def _remember(self, tensor: torch.Tensor, row: int, engine) -> None:
        if is_dense(tensor):
            self._known[self._key(tensor)] = (weakref.ref(tensor), tensor._version, row, engine)

    def _source(self, tensor: torch.Tensor) -> tuple | None:
        """``(row, engine)`` of a measured tensor holding the same elements as ``tensor`` now
        (the same tensor or a dense view of it, not modified since), or None."""
        if not is_dense(tensor):
            return None
        known = self._known.get(self._key(tensor))
        if known is None:
            return None
        ref, version, row, engine = known
        measured = ref()
        if measured is None or measured._version != version or tensor._version != version:
            return None
        return row, engine

    # ---- steps --------------------------------------------------------------------------

    def finish(self, step: int, failed: bool = False) -> None:
        """Close a sampled step: send its rows on their way to the host (combined across
        ranks first in a distributed run: then every rank calls this at every sampled step,
        ``failed`` or not). A step without measurements, outside a distributed run, is dropped."""
        engines, self._engines = self._engines, {}
        first, self._first = self._first, np.full(2 * len(self), -1, dtype=np.int64)
        dtypes, self._dtypes = tuple(self._dtypes), [""] * len(self)
        autocast, self._autocast = self._autocast or "", None
        self._row_tensors[:] = 0
        self._known.clear()
        self._seq = 0
        if self._combiner is None and (failed or not (first >= 0).any()):
            return
        if failed:
            engines = {}
        self._in_flight.append(ForwardStep(step, engines, first, dtypes, autocast, self._combiner, failed))

    @property
    def pending(self) -> tuple[int, ...]:
        """Sampled steps whose forward rows have not reached the host yet."""
        return tuple(item.step for item in self._in_flight)

    def completed(self, block: bool = False) -> list[records.Forward]:
        """Forward records of the steps whose rows reached the host (with ``block``, all)."""
        out = []
        while self._in_flight:
            item = self._in_flight[0]
            if block:
                item.wait()
            elif not item.done():
                break
            self._in_flight.pop(0)
            record = item.record()
            if record is not None:
                out.append(record)
        return out

    def close(self) -> None:
        self.remove()
        self._in_flight.clear()
        self._engines = {}
        self._known.clear()
