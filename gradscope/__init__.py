"""gradscope: GPU-accelerated gradient diagnostics for PyTorch.

``grad_stats`` computes, for every gradient tensor and in one read of its bytes, the
element count, sum, sum of squares, maximum magnitude, exact-zero count, NaN and Inf counts
and a 64-bin log2-magnitude histogram (see :mod:`gradscope.layout`), with Triton kernels on
GPU and NumPy on CPU. ``watch`` captures them for every layer during training, with no
host synchronisation, into a bounded history.
"""

from gradscope.findings import Finding
from gradscope.history import Series
from gradscope.layout import HIST_EDGES, HIST_MIN_EXPONENT, NUM_BINS
from gradscope.monitor import Monitor, watch
from gradscope.report import HealthReport, LayerHealth
from gradscope.runlog import Run, RunLogError, load_run
from gradscope.statistics import BACKENDS, grad_stats
from gradscope.tensor_stats import TensorStats
from gradscope.thresholds import Thresholds

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "HIST_EDGES",
    "HIST_MIN_EXPONENT",
    "NUM_BINS",
    "Finding",
    "HealthReport",
    "LayerHealth",
    "Monitor",
    "Run",
    "RunLogError",
    "Series",
    "TensorStats",
    "Thresholds",
    "__version__",
    "grad_stats",
    "load_run",
    "watch",
]
