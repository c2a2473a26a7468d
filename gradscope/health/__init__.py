"""Health: a run's state in, findings and the health report out.

Receives a :class:`~gradscope.run.state.RunState` and hands on a
:class:`~gradscope.health.report.HealthReport`: status, findings (what, where, since when,
what to try) and a row per layer.

* ``thresholds``: every number behind a verdict; ``findings``: ``Finding``, the kinds and
  their suggestions;
* ``view``: the arrays the checks read, cut out of the run's state;
* ``checks/``: one module per family of problems (``detect(view, thresholds)``);
* ``causes``: which finding explains which (consequences listed under their root cause);
* ``report``: running the checks and assembling the report (:func:`~gradscope.health.report.assess`);
* ``readout``: the read interface a live monitor and a run read back from its log share
  (``history``, ``stats``, ``report``), and :func:`~gradscope.health.readout.load_run`.
"""
