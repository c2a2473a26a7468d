"""The run: records in, the run's data out — no verdicts.

Receives records (:mod:`gradscope.run.records`: what the monitor learns at one moment — a
sampled step's statistics rows per layer, a step's loss and resources, metrics, update
norms, failures) and hands on the run's state: a bounded history of every field
(:mod:`gradscope.run.history`; forward statistics in :mod:`gradscope.run.forward_history`,
with where a NaN/Inf first appeared in the forward pass) and the events a report must never forget
(:class:`~gradscope.run.state.RunState`), described by a
:class:`~gradscope.run.info.RunInfo`. A live monitor and a run log replayed by
:mod:`gradscope.run.logfile` build the same state from the same records; the logs of a
pipeline's stages join into one run's state (:mod:`gradscope.run.stages`). What the state
means is for :mod:`gradscope.health` to say.
"""
