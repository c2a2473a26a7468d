"""The monitor: a model in training in, records out — per-layer statistics, no host sync.

Receives a model (and its optimizer, GradScaler, loss and metrics as training goes), and
hands on records (:mod:`gradscope.run.records`) to its run state, run log and exporters:

* ``start``: :func:`watch`, the entry point; ``options``: its options, validated once;
* ``watched``: which parameters, grouped into which reported rows;
* ``hooks``: backward-pass hooks, the end of backward, gradient-accumulation counting;
* ``scaler``: unscaling under a GradScaler (the only place that knows its internals);
* ``engines``, ``capture``: the capture engines per device (Triton launches, NumPy worker);
* ``forward``, ``forward_rows``: forward statistics (``watch(..., forward=True)``): module
  hooks on sampled steps, and the per-step rows of every module's inputs and outputs;
* ``aggregate``: per-parameter rows into per-layer rows (pure functions);
* ``replicated``: DDP's extras (communication hook, noise scale, replica check);
* ``resources``: step time, memory, energy; ``updates``: update/weight norms around
  ``optimizer.step()``; ``weights``: the weights' statistics and Taylor terms before it
  (``watch(..., compression=True)``);
* ``schedule``: the open step (sampled or not, histograms or not), which only the monitor moves;
* ``failures``: a failure inside gradscope recorded and warned about, never raised into training;
* ``backward``: the receiver backward's hooks call (per gradient, or at the pass's end);
* ``recorder``: results in flight collected into records, and where records go;
* ``acting``: the monitor's responder (:mod:`gradscope.actions`): ``on_finding``, halting,
  early stopping, the learning-rate controller;
* ``shutdown``: what ``close()`` (or a dropped monitor's finalizer) ends;
* ``checkpoint``: what a resumed run needs of a monitor (``state_dict``), and its format;
* ``monitor``: :class:`Monitor`, the life of one watched model and its steps, made of the
  parts above, each built with what it touches.
"""

from gradscope.monitor.monitor import Monitor
from gradscope.monitor.options import WatchOptions
from gradscope.monitor.start import watch

__all__ = ["Monitor", "WatchOptions", "watch"]
