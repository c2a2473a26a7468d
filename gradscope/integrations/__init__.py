"""gradscope where users train: trainer callbacks that watch, log and act in one line.

The top of the data flow, beside ``cli`` and ``demo``: each callback translates its
trainer's events into a :class:`~gradscope.integrations.session.TrainerSession` (a monitor's
life over one run). Each module imports its trainer library, an optional extra:

* ``lightning``: ``GradscopeCallback`` for ``lightning.pytorch`` (``pytorch_lightning`` when
  only that is installed); ``pytorch_lightning``: the same for the ``pytorch_lightning``
  namespace (``pip install "gradscope-diagnostics[lightning]"``);
* ``transformers``: ``GradscopeCallback``, a Hugging Face ``TrainerCallback``
  (``pip install "gradscope-diagnostics[transformers]"``).

The W&B exporter is an exporter like the others: :class:`gradscope.exporters.WandbExporter`.
"""
