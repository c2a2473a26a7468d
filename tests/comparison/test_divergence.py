"""The first divergence between real runs: identical runs match bit for bit, a nudged module is found."""

import numpy as np
import pytest
import torch
from compared_runs import logged_run, mlp

import gradscope


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("divergence")
    return {
        "a": logged_run(root / "a"),
        "b": logged_run(root / "b"),
        "nudged": logged_run(root / "nudged", nudge_module="2", nudge_from=5),
        "fa": logged_run(root / "fa", forward=True),
        "fnudged": logged_run(root / "fnudged", forward=True, nudge_module="2", nudge_from=5),
        "late": logged_run(root / "late", nudge_module="4", nudge_from=7),
    }


def test_identical_runs_match_bit_for_bit(runs):
    cmp = gradscope.compare(runs["a"], runs["b"], exact=True)
    assert cmp.divergence is None
    assert cmp.divergences == {str(runs["b"]): None}
    assert "matches run [0]" in str(cmp)


def test_with_forward_statistics_the_nudged_module_itself_is_named(runs):
    d = gradscope.compare(runs["fa"], runs["fnudged"]).divergence
    assert (d.step, d.pass_, getattr(d, "pass"), d.layer) == (5, "forward", "forward", "2")
    assert (d.reference, d.run) == (str(runs["fa"]), str(runs["fnudged"]))
    # the nudge is 1e-3 of the module's output: far above the default rtol, visible in the values
    assert d.reference_value != d.run_value
    assert "loss" in d.metrics  # the loss of step 5 is computed from the nudged output
    assert "at step 5 in the forward pass" in d.message and "'2'" in d.message


def test_without_forward_statistics_the_first_gradient_in_backward_order_is_named(runs):
    d = gradscope.compare(runs["a"], runs["nudged"], exact=True).divergence
    # Scaling the output of Linear '2' changes the gradient of every layer: '4' (its input is
    # the nudged activation), '2' (its output's gradient is scaled) and '0' (upstream of it).
    # Backward order visits the layer nearest the loss first, so the layer named is '4', the
    # last one, not '2': only forward statistics can point at the module that changed.
    assert (d.step, d.pass_, d.layer) == (5, "backward", "4")
    order, steps, rows = gradscope.load_run(runs["a"]).history("backward_order")
    assert order[list(steps).index(5), list(rows).index("4")] == 0  # '4' is first in backward order
    norms = [gradscope.load_run(runs[k]).history("norm") for k in ("a", "nudged")]
    differs = norms[0].values[5] != norms[1].values[5]
    assert differs.all()  # every layer's gradient differs at step 5, so the order decides
    assert (norms[0].values[:5] == norms[1].values[:5]).all()  # and none before it


def test_a_nudge_below_the_tolerance_is_no_divergence(runs):
    assert gradscope.compare(runs["a"], runs["nudged"], rtol=0.05).divergence is None
    assert gradscope.compare(runs["a"], runs["nudged"], rtol=1e-6).divergence.step == 5


def test_more_runs_are_each_compared_with_the_first(runs):
    cmp = gradscope.compare(runs["a"], runs["late"], runs["b"], runs["nudged"])
    found = cmp.divergences
    assert list(found) == [str(runs["late"]), str(runs["b"]), str(runs["nudged"])]
    assert found[str(runs["late"])].step == 7 and found[str(runs["b"])] is None
    assert cmp.divergence == found[str(runs["nudged"])]  # the earliest of them
    as_json = cmp.to_dict()
    assert as_json["divergence"]["step"] == 5 and as_json["divergence"]["pass"] == "backward"
    assert as_json["divergences"][str(runs["b"])] is None


def test_a_single_run_has_no_divergence(runs):
    cmp = gradscope.compare(runs["a"])
    with pytest.raises(ValueError, match="divergence needs two runs or more, got 1"):
        _ = cmp.divergence
    assert cmp.to_dict()["divergence"] is None  # the rest of the comparison still exports
    assert "divergence: needs two runs or more" in str(cmp)


def test_runs_with_different_layers_compare_the_common_ones(tmp_path):
    torch.manual_seed(0)
    wider = torch.nn.Sequential(*mlp(), torch.nn.ReLU(), torch.nn.Linear(3, 3))  # adds layer '6'
    a = logged_run(tmp_path / "a")
    b = logged_run(tmp_path / "b", model=wider)
    cmp = gradscope.compare(a, b)
    assert cmp.rows == ("0", "2", "4")
    assert cmp.layers.rows == ("0", "2", "4")
    assert any("comparing the 3 layers they all have" in note for note in cmp.notes)
    assert any(str(b) in note and "'6'" in note for note in cmp.notes)
    d = cmp.divergence
    assert d is not None and d.step == 0 and d.layer in cmp.rows  # different models differ at once


def test_a_nan_equals_a_nan_bit_for_bit():
    from gradscope.comparison.divergence import same

    a = np.array([np.nan, 1.0, np.inf, 1.0])
    b = np.array([np.nan, 1.0, np.inf, 1.0 + 1e-12])
    assert same(a, b, None).tolist() == [True, True, True, False]
    assert same(a, b, 1e-9).tolist() == [True, True, True, True]
    assert not same(np.array([np.inf, 1.0, np.nan]), np.array([-np.inf, np.inf, 1.0]), 1e-6).any()
