"""The cross-validation summary of real runs, checked against NumPy on the values the runs logged."""

import numpy as np
import pytest
from compared_runs import logged_run

import gradscope
from gradscope.comparison.summary import OUTLIER_Z, robust_z
from gradscope.health.checks.loss import training_counterpart


def logged(path, name):
    """The finite values of metric ``name`` a run logged, and their steps."""
    values, steps, _ = gradscope.load_run(path).history(name)
    keep = np.isfinite(values)
    return values[keep], steps[keep]


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    """Five folds (different initialisations) of two learning rates, and a sixth fold that is
    clearly off (its validation loss 1.0 higher)."""
    root = tmp_path_factory.mktemp("folds")
    runs = [logged_run(root / f"fold{k}", seed=k, tags={"fold": k, "lr": 0.05}) for k in range(5)]
    runs += [logged_run(root / f"fast{k}", seed=k, lr=0.5, tags={"fold": k, "lr": 0.5}) for k in range(3)]
    off = logged_run(root / "off", seed=5, val_shift=1.0, tags={"fold": 5, "lr": 0.05})
    return runs, off


def test_best_final_mean_and_std_are_the_logged_values(folds):
    runs, _ = folds
    cmp = gradscope.compare(*runs[:5])
    for name, pick in (("val_loss", np.min), ("loss", np.min), ("val_accuracy", np.max)):
        summary = cmp.metrics[name]
        best = [pick(logged(run, name)[0]) for run in runs[:5]]
        final = [logged(run, name)[0][-1] for run in runs[:5]]
        (group,) = summary.groups
        assert group.best.mean == pytest.approx(np.mean(best), rel=1e-12)
        assert group.best.std == pytest.approx(np.std(best, ddof=1), rel=1e-12)
        assert group.final.mean == pytest.approx(np.mean(final), rel=1e-12)
        assert group.final.n == 5
        values = summary.runs[str(runs[2])]
        assert values.best == best[2] and values.final == final[2]
        steps = logged(runs[2], name)[1]
        assert values.best_step == steps[list(logged(runs[2], name)[0]).index(best[2])]
    assert cmp.metrics["val_loss"].direction == -1 and cmp.metrics["val_accuracy"].direction == 1
    assert len({cmp.metrics["val_loss"].runs[str(r)].best for r in runs[:5]}) == 5  # the folds do differ


def test_the_generalisation_gap_is_train_minus_validation(folds):
    runs, _ = folds
    cmp = gradscope.compare(*runs[:3])
    gaps = {(g.train, g.validation): g for g in cmp.gaps}
    assert set(gaps) == {("loss", "val_loss"), ("train_accuracy", "val_accuracy")}
    for run in runs[:3]:
        expected = logged(run, "loss")[0][-1] - logged(run, "val_loss")[0][-1]
        assert gaps["loss", "val_loss"].runs[str(run)] == pytest.approx(expected, rel=1e-12)
    assert training_counterpart("val_acc", ("loss", "train_acc", "acc")) == "train_acc"
    assert training_counterpart("val_loss", ("loss",)) == "loss"
    assert training_counterpart("loss", ("loss",)) is None


def test_the_outlier_fold_is_flagged_and_only_it(folds):
    runs, off = folds
    clean = gradscope.compare(*runs[:5])
    assert all(not g.outliers for m in clean.metrics.values() for g in m.groups)
    cmp = gradscope.compare(*runs[:5], off)
    (group,) = cmp.metrics["val_loss"].groups
    assert group.outliers == (str(off),)
    assert group.robust_z[str(off)] > OUTLIER_Z
    assert f"outlier: {off}" in str(cmp)
    assert cmp.to_dict()["metrics"]["val_loss"]["groups"][0]["outliers"] == [str(off)]
    assert not gradscope.compare(runs[0], off).metrics["val_loss"].groups[0].outliers  # needs 3 runs


def test_robust_z_is_the_modified_z_score():
    values = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    mad = np.median(np.abs(values - 3.0))  # 1.0
    assert robust_z(values) == pytest.approx(0.6745 * (values - 3.0) / mad)
    tied = np.array([1.0, 1.0, 1.0, 1.0, 5.0])  # MAD 0: the mean absolute deviation instead
    assert robust_z(tied)[-1] == pytest.approx(4.0 / (1.253314 * 0.8))
    assert (robust_z(np.ones(4)) == 0).all()


def test_grouped_by_a_tag_each_group_has_its_own_estimate(folds):
    runs, _ = folds
    cmp = gradscope.compare(*runs, by="lr")
    groups = cmp.metrics["val_loss"].groups
    assert [g.key for g in groups] == [0.05, 0.5]
    assert groups[0].runs == tuple(str(r) for r in runs[:5]) and groups[1].runs == tuple(str(r) for r in runs[5:])
    for group, members in zip(groups, (runs[:5], runs[5:]), strict=True):
        best = [logged(r, "val_loss")[0].min() for r in members]
        assert group.best.mean == pytest.approx(np.mean(best), rel=1e-12)
        assert group.best.std == pytest.approx(np.std(best, ddof=1), rel=1e-12)
    assert groups[0].best.mean != pytest.approx(groups[1].best.mean)
    assert "val_loss [lr=0.5]" in str(cmp)
    assert [g["key"] for g in cmp.to_dict()["groups"]] == [0.05, 0.5]


def test_grouping_by_a_tag_no_run_has_is_an_error(folds):
    runs, _ = folds
    with pytest.raises(ValueError, match=r"by='seed': no run has the tag 'seed' \(the runs' tags are 'fold', 'lr'"):
        gradscope.compare(*runs[:2], by="seed")
