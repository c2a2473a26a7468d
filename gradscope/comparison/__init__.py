"""Comparison: several runs' data in, a comparison out (folds, seeds, sweeps, regressions).

Receives runs read back from their logs (:func:`gradscope.load_run`, or their directories)
and hands on a :class:`~gradscope.comparison.comparison.Comparison`:

* ``runs``: the runs compared, their labels and tags, the layers they share, groups by a tag;
* ``summary``: each logged metric's best and final value per run, their mean and standard
  deviation across runs (the k-fold estimate), generalisation gaps, the outlier run;
* ``layers``: the same layer's gradient norm across runs, side by side;
* ``divergence``: the first step, pass and layer at which two runs' statistics differ;
* ``comparison``: :func:`~gradscope.comparison.comparison.compare` and ``Comparison`` (``to_dict``);
  ``text``: the comparison as plain text (``print(comparison)``, ``gradscope compare``).
"""

from gradscope.comparison.comparison import Comparison, compare
from gradscope.comparison.divergence import Divergence

__all__ = ["Comparison", "Divergence", "compare"]
