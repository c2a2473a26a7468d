"""Acting on findings: call the user, halt a broken run, stop early, adapt the learning rate.

Between the health report and the monitor in the data flow: the monitor feeds the
:class:`~gradscope.actions.responder.Responder` records and asks it to respond at each
``mon.step()``; what it does becomes ``action`` records in the run.

* ``halting``: ``halt_on`` and :class:`TrainingHalted`;
* ``novelty``: which findings are new (``on_finding`` and halting act once per finding);
* ``early_stopping``: :class:`EarlyStopping` (``mon.should_stop``, ``mon.best_step``);
* ``adaptive_lr``: :class:`AdaptiveLR`, the learning-rate controller;
* ``cadence``: when to judge (alarms in arriving records; a time budget otherwise);
* ``responder``: the above, together, for one monitor.
"""

from gradscope.actions.adaptive_lr import TRIGGERS, AdaptiveLR
from gradscope.actions.early_stopping import EarlyStopping
from gradscope.actions.halting import TrainingHalted

__all__ = ["TRIGGERS", "AdaptiveLR", "EarlyStopping", "TrainingHalted"]
