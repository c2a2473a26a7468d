"""Statistics: gradient tensors in, statistics rows out.

Receives tensors (gradients, or any float tensors) and hands on, per tensor, one row of
``layout.ROW_WIDTH`` float64 values — counts, sums, the largest magnitude and a log2
histogram (:mod:`gradscope.stats.layout`, where the row and how rows combine are declared) —
computed in one read of the tensor's bytes:

* ``inputs``: collecting, checking and flattening what the user passes;
* ``dispatch``: which backend reads which tensor (one rule, for ``grad_stats`` and the monitor);
* ``host_backend`` (any device, on the CPU, with the compiled ``numba_kernels`` when numba
  is installed, else ``numpy_kernels``; ``host_kernels`` says which can run) and
  ``triton_backend`` (glue to the kernels in ``gradscope.kernels``, CUDA or Triton's
  interpreter), each also computing *light* rows, without the histograms that do not
  trigger (``layout``);
* ``compute``: :func:`grad_stats`, the public entry point; ``tensor_stats``: :class:`TensorStats`;
* ``formats``: number formats (float16, bfloat16, FP8) and what a row's histogram says about
  them: values below the smallest normal, FP8 readiness.

Nothing here knows about training, steps or layers.
"""

from gradscope.stats.compute import grad_stats
from gradscope.stats.dispatch import BACKENDS
from gradscope.stats.tensor_stats import TensorStats

__all__ = ["BACKENDS", "TensorStats", "grad_stats"]
