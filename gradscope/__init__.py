"""gradscope: GPU-accelerated gradient diagnostics for PyTorch.

``grad_stats`` computes, for every gradient tensor and in one read of its bytes, the
element count, sum, sum of squares, maximum magnitude, exact-zero count, NaN and Inf counts
and a 64-bin log2-magnitude histogram (see :mod:`gradscope.stats.layout`), with Triton
kernels on GPU and NumPy on CPU. ``watch`` captures them for every layer during training,
with no host synchronisation, into a bounded history, and judges the run's health.

The subpackages are the stages of the data flow, each importing only those before it:

    stats        gradient tensors -> statistics rows           (grad_stats, TensorStats)
    distributed  rows on each rank -> rows of the whole gradient
    run          records -> the run's data: history, events    (RunState; no verdicts)
    health       the run's data -> findings, HealthReport      (Thresholds, load_run)
    comparison   several runs -> a comparison                  (compare, Comparison)
    outputs      records -> run log, exporters, visual report
    actions      findings -> what to do: halt, stop early, adapt the learning rate
    monitor      a model in training -> records                (watch, Monitor)

``cli`` and ``demo`` sit on top. ``gradscope.exporters``, ``gradscope.visual`` and
``gradscope.runlog`` are short public paths to parts of ``outputs`` (and ``load_run``),
kept from before this layout.
"""

import sys
from pathlib import Path

from gradscope import _kernels_location
from gradscope.actions import AdaptiveLR, EarlyStopping, TrainingHalted
from gradscope.comparison import Comparison, Divergence, compare
from gradscope.health.findings import Finding
from gradscope.health.readout import Run, load_run
from gradscope.health.report import HealthReport, LayerHealth
from gradscope.health.thresholds import Thresholds
from gradscope.monitor import Monitor, WatchOptions, watch
from gradscope.run.history import Series
from gradscope.run.info import package_version
from gradscope.run.logfile import RunLogError
from gradscope.stats import BACKENDS, TensorStats, grad_stats, layout
from gradscope.stats.layout import HIST_EDGES, HIST_MIN_EXPONENT, NUM_BINS
from gradscope.stats.reporting import GradscopeWarning

__version__ = package_version()

# In a source checkout, gradscope.kernels is the top-level kernels/ folder (see the module).
_kernels_location.install(Path(__file__).resolve().parent)

# The row's definition was ``gradscope.layout`` before the stages had folders, and the
# README pointed there: ``import gradscope.layout`` still finds it (the same module).
sys.modules.setdefault("gradscope.layout", layout)

__all__ = [
    "BACKENDS",
    "HIST_EDGES",
    "HIST_MIN_EXPONENT",
    "NUM_BINS",
    "AdaptiveLR",
    "Comparison",
    "Divergence",
    "EarlyStopping",
    "Finding",
    "GradscopeWarning",
    "HealthReport",
    "LayerHealth",
    "Monitor",
    "Run",
    "RunLogError",
    "Series",
    "TensorStats",
    "Thresholds",
    "TrainingHalted",
    "WatchOptions",
    "__version__",
    "compare",
    "grad_stats",
    "layout",
    "load_run",
    "watch",
]
