"""The per-layer table: each run's median and final gradient norm, and the ratio to the reference."""

import numpy as np
from compared_runs import logged_run

import gradscope


def test_the_layer_table_is_the_runs_norms(tmp_path):
    runs = [logged_run(tmp_path / str(k), seed=k) for k in range(2)]
    t = gradscope.compare(*runs).layers
    norms = [gradscope.load_run(r).history("norm").values for r in runs]
    assert np.allclose(t.median, [np.median(n, axis=0) for n in norms])
    assert np.allclose(t.final, [n[-1] for n in norms])
    assert np.allclose(t.ratio[1], np.median(norms[1], axis=0) / np.median(norms[0], axis=0))
    assert t.steps.tolist() == list(range(8)) and np.allclose(t.norms[1], norms[1])
