"""Outputs: a run's records and report out of the process — files, dashboards, pictures.

Receives the run's records (:mod:`gradscope.run.records`) as the monitor emits them, and its
state and report when asked, and hands them on to where people look:

* ``pump``: the background thread that delivers records to exporters, off the training thread;
* ``budget``: ``TimeBudget``, the rule that keeps optional work (exporting every layer, judging
  the run's health) to a share of wall time;
* ``exporters/``: the ``Exporter`` interface, TensorBoard, MLflow and W&B (optional extras);
* ``runlog``: the run log writer (an exporter), read back by :func:`gradscope.load_run`;
* ``visual``: the visual report's panels (matplotlib, the ``viz`` extra) and PNG; ``html_page``: the
  same as one self-contained HTML file.
"""
